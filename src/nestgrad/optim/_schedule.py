"""``Schedule``: a hyperparameter that takes another value at each step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class Schedule:
    r"""A hyperparameter that varies with the step: one value per step, or a function of the step.

    Steps count from 1, as in ``torch.optim``: the update that makes step ``t``
    uses ``values[t - 1]``, or ``fn(t)``.

    ``t`` is the training step: the number of ``update()`` calls so far, plus one
    (``OptState.count``, which a run started from ``state=`` continues). Every
    parameter reads the same entry at a step, also one that received no gradient at
    earlier steps, as ``torch.optim`` with one ``LambdaLR.step()`` per training step;
    bias corrections (Adam's ``1 - beta**t``) still count each parameter's own updates.

    What a function returns is checked against the hyperparameter's range at each step
    (a float or CPU Tensor at once; a Tensor on an accelerator by a flag on the device,
    read with the run's finite flags): ``Schedule(lambda t: 0.1 * (1 - t / 5))`` raises
    at step 6, where it turns negative.

    A Tensor of values is a learnable schedule (Maclaurin et al., 2015): every
    hypergradient method (``Unroll``, ``Reverse``,
    ``Forward``, ...) differentiates with respect to each entry,
    because the optimizer's ``tensors()`` lists it.
    ``values`` may also have shape ``(steps, *shape)`` with ``shape`` broadcastable
    to the parameters: one per-element value per step. A schedule with fewer
    values than the run has steps raises at the first step it has no value for.

    A function ``fn(step) -> float | Tensor`` is a fixed schedule: it must not
    return a Tensor that requires grad (the methods that re-run steps could not
    differentiate with respect to what it captured; pass ``Schedule(tensor)``
    instead, e.g. ``Schedule(lr0 * 0.9 ** torch.arange(steps))``). A function
    cannot be saved in a ``state_dict``.

    Examples:
        >>> lrs = torch.full((100,), 0.1, requires_grad=True)   # one lr per step
        >>> opt = nestgrad.optim.SGD(lr=Schedule(lrs), momentum=0.9)
        >>> cosine = Schedule(lambda t: 0.05 * (1 + math.cos(math.pi * t / 100)))

    References:
        Maclaurin, Duvenaud and Adams, "Gradient-based hyperparameter optimization
        through reversible learning", ICML 2015.
    """

    __slots__ = ("fn", "values")

    values: Tensor | None
    fn: Callable[[int], float | Tensor] | None

    def __init__(self, values: Tensor | Sequence[float] | Callable[[int], float | Tensor]) -> None:
        if callable(values) and not isinstance(values, Tensor):
            self.values, self.fn = None, values
            return
        if not isinstance(values, Tensor):
            try:
                values = torch.as_tensor(values, dtype=torch.get_default_dtype())
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(_NOT_VALUES.format(got=_describe(values))) from None
        if not values.is_floating_point() or values.dim() < 1 or len(values) < 1:
            raise TypeError(_NOT_VALUES.format(got=_describe(values)))
        self.values, self.fn = values, None

    def __len__(self) -> int:
        """The number of steps the schedule has values for (a function has no length)."""
        if self.values is None:
            raise TypeError("A Schedule of a function has no length: it has a value at every step.")
        return len(self.values)

    def _with_values(self, values: Tensor) -> Schedule:
        """The same schedule with its values replaced (by a hypergradient method's leaf); no checks."""
        new = object.__new__(Schedule)
        new.values, new.fn = values, None
        return new

    def at(self, step: int, label: str = "the hyperparameter", where: str = "") -> float | Tensor:
        """The value used at ``step`` (counting from 1)."""
        if self.values is not None:
            if step > len(self.values):
                raise ValueError(_RAN_OUT.format(where=where, label=label, n=len(self.values), step=step))
            return self.values[step - 1]
        out = self.fn(step)  # type: ignore[misc]
        if isinstance(out, Tensor):
            if out.requires_grad:
                raise ValueError(_FN_GRAD.format(where=where, label=label, step=step))
            if not out.is_floating_point():
                raise TypeError(_FN_TYPE.format(where=where, label=label, step=step, got=_describe(out)))
            return out
        if isinstance(out, bool) or not isinstance(out, (int, float)):
            raise TypeError(_FN_TYPE.format(where=where, label=label, step=step, got=_describe(out)))
        return float(out)

    def __repr__(self) -> str:
        return f"Schedule({self.values if self.values is not None else self.fn!r})"


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a Tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


_NOT_VALUES = (
    "nestgrad.optim.Schedule takes a floating-point Tensor (or list of floats) with one value per step, "
    "shape (steps,) or (steps, *shape) for per-element values, or a function step -> value; got {got}. "
    "For example Schedule(torch.full((100,), 0.1, requires_grad=True)) or Schedule(lambda t: 0.1 * 0.99**t)."
)
_RAN_OUT = (
    "{where}: the {label} Schedule has {n} values, one per step, but this is step {step} (steps count "
    "from 1, and step t uses values[t - 1]). Give the schedule at least as many values as training steps, "
    "e.g. Schedule(torch.full((steps,), value)), or train for at most {n} steps."
)
_FN_GRAD = (
    "{where}: the {label} Schedule's function returned a Tensor that requires grad at step {step}. A function "
    "schedule is fixed: methods that re-run steps (Reverse, Forward) cannot differentiate with respect to "
    "the tensors it captured. For a learnable schedule pass its values as a Tensor: "
    "Schedule(values) with values[t - 1] the value at step t, e.g. Schedule(lr0 * decay ** torch.arange(steps))."
)
_FN_TYPE = (
    "{where}: the {label} Schedule's function must return a float or a floating-point Tensor; got {got} at step {step}."
)
