"""The optimizer base class: hyperparameters, parameter groups, ``init`` and ``update``.

A concrete optimizer supplies two pure pieces: the state slots of one parameter
(``_init``) and the update of a list of parameters that share a step count and
hyperparameters (``_step``). This module does the rest: argument checking,
parameter groups, skipping parameters that received no gradient, and choosing
the foreach or per-tensor back end.
"""

from __future__ import annotations

import abc
import copy
import difflib
import fnmatch
import inspect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ._ops import Foreach, Ops, PerTensor
from ._schedule import Schedule

Hparam = float | Tensor
"""A hyperparameter: a float; a Tensor with one value, or one per element of each parameter it
applies to (broadcastable to its shape); a dict of parameter name -> value; or a ``Schedule``."""
Params = dict[str, Tensor]
Slots = dict[str, list[Tensor]]


class OptState(NamedTuple):
    """State of any ``nestgrad.optim`` optimizer.

    Attributes:
        step: number of updates applied so far, per parameter name (a parameter that received
            no gradient at a step is not updated and keeps its count, as in ``torch.optim``):
            bias corrections (Adam's ``1 - beta**t``) use it.
        slots: per-parameter buffers, keyed first by slot name (``"exp_avg"``,
            ``"momentum_buffer"``, ...) and then by parameter name. The slot names
            are those of ``torch.optim``'s ``state_dict``.
        count: number of ``update()`` calls so far: the training step, which indexes every
            ``Schedule`` (as one ``LambdaLR`` step per training step does in ``torch.optim``).
            ``None`` (a state built as ``OptState(step, slots)``, or saved before it existed)
            stands for the largest per-parameter count.
    """

    step: dict[str, int]
    slots: dict[str, dict[str, Tensor]]
    count: int | None = None

    def training_step(self) -> int:
        """``count``, or where it is ``None`` the largest per-parameter step count."""
        return self.count if self.count is not None else max(self.step.values(), default=0)

    def tensors(self) -> list[Tensor]:
        """The slot tensors in a fixed order (slot by slot, then parameter by parameter)."""
        return [t for values in self.slots.values() for t in values.values()]

    def with_tensors(self, tensors: Sequence[Tensor]) -> OptState:
        """The same state with its slot tensors replaced, in the order of ``tensors()``."""
        supply = iter(tensors)
        slots = {slot: {n: next(supply) for n in values} for slot, values in self.slots.items()}
        return OptState(dict(self.step), slots, self.count)

    def state_dict(self) -> dict[str, Any]:
        """The step counts and slots as plain dicts of ints and (detached) Tensors.

        ``torch.save`` writes it and ``torch.load(path, weights_only=True)`` reads it back.

        Examples:
            >>> torch.save(state.state_dict(), "opt_state.pt")
            >>> state = opt.init(params).load_state_dict(torch.load("opt_state.pt", weights_only=True))
        """
        return {
            "step": dict(self.step),
            "slots": {slot: {n: t.detach() for n, t in values.items()} for slot, values in self.slots.items()},
            "count": self.training_step(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> OptState:
        """A new state holding ``state_dict``'s step counts and slots (an OptState is immutable).

        ``self`` is the template, usually ``opt.init(params)``: the loaded state must have its
        parameter names and slots, with the same shapes and dtypes, or this raises. Slots are
        moved to the template's devices.
        """
        where = "OptState.load_state_dict"
        # 'count' came later: a state_dict without it (the largest step count stands for it) still loads.
        keys = set(state_dict) if isinstance(state_dict, Mapping) else set()
        if not isinstance(state_dict, Mapping) or not {"step", "slots"} <= keys <= {"step", "slots", "count"}:
            raise TypeError(
                f"{where}: expected the dict that OptState.state_dict() returns, with keys 'step', 'slots' "
                f"and 'count'; "
                f"got {_describe(state_dict) if not isinstance(state_dict, Mapping) else sorted(state_dict)}."
            )
        step, slots, count = state_dict["step"], state_dict["slots"], state_dict.get("count")
        return _checked_state(self, step, slots, where, "the saved state", count=count)


_STATE_NAMES = (
    "{where}: {what} is for parameters {names}, but this state is for {want}. Load it into the state of "
    "the same params: opt.init(params).load_state_dict(saved)."
)
_STATE_SLOTS = (
    "{where}: {what} has slots {found}, but this optimizer keeps {want}: it was saved from another "
    "optimizer, or with other flags (momentum, amsgrad). Construct the optimizer that saved it."
)
_STATE_STEP = (
    "{where}: step counts must be ints >= 0 (the number of updates a parameter has had); {what} has {got} for {name!r}."
)
_STATE_SLOT = "{where}: slot {slot!r} of parameter {name!r} is {got} in {what}, but {want} {here}: {why}"
_STATE_DEVICE = (
    "{where}: slot {slot!r} of parameter {name!r} is on {got} in {what}, but parameter {name!r} is on {want}. "
    "Move the state to the params' device first: "
    "state.with_tensors([x.to({want_repr}) for x in state.tensors()])."
)
_TASK_DIM = (
    "the params have a leading task dimension of {n} (tasks={n}), and a state for one task does not fit them. "
    "Pass the state a tasks= run returned (return_state=True), or stack one per task along dim 0."
)


def _checked_state(
    template: OptState,
    step: object,
    slots: object,
    where: str,
    what: str,
    devices: Mapping[str, torch.device] | None = None,
    tasks: int | None = None,
    count: object = None,
) -> OptState:
    """The state of ``step`` and ``slots`` checked against ``template`` (``opt.init(params)``).

    The rules ``OptState.load_state_dict`` and ``train(state=)`` share: the same parameter names and
    slots, step counts that are ints >= 0, and slot Tensors of the template's exact shapes and
    dtypes. With ``devices`` (name -> the parameter's device), a slot on another device raises;
    without, slots are moved to the template's devices (loading a checkpoint). ``tasks``: the
    number of tasks the params are stacked for (``train(tasks=)``), for the message.
    """
    if not isinstance(step, Mapping) or set(step) != set(template.step):
        names = sorted(step) if isinstance(step, Mapping) else step
        raise ValueError(_STATE_NAMES.format(where=where, what=what, names=names, want=sorted(template.step)))
    for n, t in step.items():
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(_STATE_STEP.format(where=where, what=what, got=_describe(t), name=n))
    if count is not None and (
        isinstance(count, bool) or not isinstance(count, int) or count < max(step.values(), default=0)
    ):
        raise ValueError(
            f"{where}: the training step count must be an int at least the largest per-parameter step count "
            f"({max(step.values(), default=0)}): a parameter cannot have had more updates than there were steps; "
            f"{what} has {_describe(count)}."
        )
    if not isinstance(slots, Mapping) or set(slots) != set(template.slots):
        found = sorted(slots) if isinstance(slots, Mapping) else slots
        raise ValueError(_STATE_SLOTS.format(where=where, what=what, found=found, want=sorted(template.slots)))
    out: dict[str, dict[str, Tensor]] = {}
    for slot, values in template.slots.items():
        saved = slots[slot]
        if not isinstance(saved, Mapping) or set(saved) != set(values):
            raise ValueError(f"{where}: slot {slot!r} must have an entry for each of {sorted(values)}.")
        out[slot] = {}
        for n, t in values.items():
            x = saved[n]
            if not isinstance(x, Tensor) or x.shape != t.shape or x.dtype != t.dtype:
                why = "the parameter changed shape or dtype since it was saved."
                if devices is not None:
                    why = "the state was made for other params, or in another dtype."
                if tasks is not None and isinstance(x, Tensor) and t.shape == (tasks, *x.shape):
                    why = _TASK_DIM.format(n=tasks)
                elif isinstance(x, Tensor) and x.shape == t.shape and devices is not None:
                    why = (
                        f"a state in {x.dtype} for params in {t.dtype} would change the dtype they train in "
                        f"(and the dtype of the weights returned). Cast the state to the "
                        f"params' dtype: state.with_tensors([x.to({t.dtype}) for x in state.tensors()])."
                    )
                raise ValueError(
                    _STATE_SLOT.format(where=where, what=what, slot=slot, name=n, got=_describe(x), want=_describe(t),
                                       why=why, here="here" if devices is None else "for these params")
                )  # fmt: skip
            if devices is None:
                out[slot][n] = x.to(t.device)
            elif x.device != devices[n]:
                raise ValueError(
                    _STATE_DEVICE.format(where=where, what=what, slot=slot, name=n, got=x.device, want=devices[n],
                                         want_repr=repr(str(devices[n])))
                )  # fmt: skip
            else:
                out[slot][n] = x
    return OptState({n: int(step[n]) for n in template.step}, out, count)


class _Value(NamedTuple):
    """One hyperparameter value as it applies to one parameter (``Optimizer._values``)."""

    name: str  # the parameter's
    param: Tensor
    key: str  # "lr", "betas", ...
    label: str  # for messages: "groups[0].betas[1]", "lr['fc.weight']"
    value: Any  # a float, a Tensor, a Schedule, or _ABSENT (a dict without an entry for the parameter)
    per_name: Mapping[str, Any] | None  # the dict of per-parameter values it came from, if any
    per_label: str  # the label of that dict (of the value itself when there is none)


_ABSENT = object()  # a per-parameter dict's entry for a parameter it does not name


_FLAGS = ("maximize", "amsgrad", "nesterov", "centered", "decoupled_weight_decay")
_PAIRS = ("betas", "etas", "step_sizes")


class _Range(NamedTuple):
    """The valid values of one hyperparameter: finite, between ``lo`` and ``hi``."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = True

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g} and finite"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def holds(self, x: float) -> bool:
        return (
            math.isfinite(x)
            and (self.lo < x if self.lo_open else self.lo <= x)
            and (x < self.hi if self.hi_open else x <= self.hi)
        )

    def holds_tensor(self, x: Tensor) -> Tensor:
        """Elementwise: a bool Tensor of ``x``'s shape, computed on ``x``'s device without a host sync."""
        x = x.detach()
        lo = x > self.lo if self.lo_open else x >= self.lo
        hi = x < self.hi if self.hi_open else x <= self.hi
        return torch.isfinite(x) & lo & hi


_NON_NEGATIVE = _Range(0.0)
_UNIT = _Range(0.0, 1.0)
# The valid values of each hyperparameter (a pair of ranges for a pair). A subclass may
# narrow one in its ``_ranges`` (RMSprop's alpha). Every value must be finite.
_RANGES: dict[str, _Range | tuple[_Range, _Range]] = {
    **dict.fromkeys(
        ("lr", "eps", "eps_root", "weight_decay", "momentum", "dampening", "lr_decay",
         "initial_accumulator_value", "momentum_decay", "lambd", "alpha", "t0"),
        _NON_NEGATIVE,
    ),
    "betas": (_UNIT, _UNIT),
    "rho": _UNIT,
    "etas": (_Range(0.0, 1.0, lo_open=True), _Range(1.0, lo_open=True)),
    "step_sizes": (_NON_NEGATIVE, _NON_NEGATIVE),
}  # fmt: skip
_IN_RANGE_AFTER_OUTER_STEPS = (
    "A meta-learned hyperparameter can leave its range after outer steps; keep it inside by "
    "construction, e.g. lr = log_lr.exp() for a positive value or beta = torch.sigmoid(logit) "
    "for one in (0, 1), or clamp it after each outer step: "
    "with torch.no_grad(): lr.clamp_(min=0)."
)
_FOREIGN_STATE = (
    "{cls}.update: the state of parameter {name!r} has slots {found}, but {cls} with these "
    "hyperparameters keeps {expected} for it. The state comes from another optimizer (or from "
    "this one with other flags, such as momentum or amsgrad). Call state = opt.init(params) "
    "with this optimizer, then pass each update() the state the previous one returned."
)
# Tensor hyperparameters are applied in the parameters' dtype (so a float64 lr cannot promote
# a float32 weight), but never in less than float32: bias corrections such as 1 - 0.999**t
# lose two digits in bfloat16. The few results a low-precision 0-dim tensor would promote are
# cast back to the dtype they came in.
_HP_DTYPE = {torch.float64: torch.float64, torch.complex128: torch.float64}


# Names other libraries use for torch.optim's arguments.
_ALIASES = {
    "learning_rate": "lr", "wd": "weight_decay", "decay": "weight_decay", "beta1": "betas",
    "beta2": "betas", "b1": "betas", "b2": "betas", "epsilon": "eps", "mom": "momentum",
}  # fmt: skip


def _own(v: Any) -> Any:
    """A dict of per-parameter values copied (so that later changes to the caller's dict do not leak in)."""
    if isinstance(v, tuple):
        return tuple(_own(x) for x in v)
    return dict(v) if isinstance(v, Mapping) else v


def _pair(v: Any) -> Any:
    """A list or tuple as a tuple; anything else as given, for ``_check`` to reject."""
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a Tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


class Optimizer(abc.ABC):
    """Base class of the differentiable optimizers. Not instantiated directly.

    Every optimizer is a pair of pure functions in the style of optax:

        state = opt.init(params)
        params, state = opt.update(grads, state, params)

    ``update`` never modifies its inputs, so the new parameters are a
    differentiable function of the old parameters, the gradients, the state,
    and every hyperparameter given as a Tensor that requires grad.

    Any float hyperparameter may also be given as
      * a Tensor: one value (0-dim or 1-element), or one per element of each parameter it
        applies to (broadcastable to the parameter's shape, e.g. Meta-SGD's per-weight lr);
      * a dict of parameter name -> value (float or Tensor), which must name every parameter
        it applies to, and no other (``init`` raises otherwise: a misspelt name never falls
        back silently to a default);
      * a ``Schedule``: one value per step, or a function of the step.
    Shapes and names are checked once, in ``init``; values (elementwise) at construction and
    in ``init``, never per step. ``tensors()`` lists every Tensor among them, so every
    hypergradient method differentiates with respect to each.

    Args common to all optimizers:
        groups: per-parameter hyperparameters, like ``torch.optim``'s param
            groups. A sequence of dicts, each with ``"params"`` (a list of
            parameter names or ``fnmatch`` patterns such as ``"encoder.*"``) and
            the hyperparameters to override for those parameters. A parameter
            may match one group at most (``init`` raises otherwise); parameters
            matching no group use the constructor's values.
        foreach: ``True`` runs each operation as one ``torch._foreach_*`` kernel
            over a group, ``False`` as a Python loop over tensors; both give the
            same numbers. The default ``None`` uses foreach when autograd is not
            recording the update, and the loop when it is, because foreach ops
            save inputs their backward never reads (more memory, no speed gain
            on CPU).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Optimizer:
        # Before __init__ binds its arguments: ``SGD(model.parameters(), lr=0.1)`` would otherwise
        # fail with Python's "got multiple values for argument 'lr'", which does not say why.
        if args and _looks_like_params(args[0]):
            line = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise TypeError(_NO_PARAMS.format(cls=cls.__name__, got=_short(args[0]), line=line))
        return super().__new__(cls)

    def __init__(
        self,
        defaults: dict[str, Any],
        groups: Sequence[Mapping[str, Any]] | None,
        foreach: bool | None,
        unknown: Mapping[str, Any],
    ) -> None:
        self._reject_unknown(unknown, defaults)
        defaults = {k: _own(v) for k, v in defaults.items()}
        self._check(defaults, "")
        self.defaults: dict[str, Any] = defaults
        self.groups: list[dict[str, Any]] = []
        for i, group in enumerate(groups or ()):
            if not isinstance(group, Mapping) or "params" not in group:
                raise TypeError(
                    f"{type(self).__name__}: groups[{i}] must be a dict with a 'params' entry "
                    f"(a list of parameter names or patterns) and the hyperparameters to "
                    f"override, e.g. {{'params': ['fc.*'], 'lr': 0.01}}; got {_describe(group)}."
                )
        for i, group in enumerate(groups or ()):
            overrides = {
                k: _own(tuple(v) if k in _PAIRS and isinstance(v, list) else v)
                for k, v in group.items()
                if k != "params"
            }
            self._reject_unknown(overrides, defaults, where=f"groups[{i}]")
            self._check(overrides, f"groups[{i}].")
            patterns = group["params"]
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            self.groups.append({"params": patterns, **overrides})
        self._check_tensor_values("")
        self.foreach = foreach
        # Range flags of Tensors that function schedules returned on an accelerator, read every
        # _FLAG_EVERY updates, at the next init() and when a run reads its finite flags (no sync per step).
        self._pending: list[tuple[int, str, Tensor, Tensor, _Range]] = []
        self._group_of: dict[str, int] = {}
        self._slots_of: dict[tuple[int, str | None], tuple[str, ...]] = {}
        self._kind_of: dict[int, tuple[bool, bool, bool]] = {}

    # ----------------------------------------------------------------- checks
    def _reject_unknown(self, unknown: Mapping[str, Any], defaults: Mapping[str, Any], where: str = "") -> None:
        names = [k for k in unknown if k not in defaults]
        if not names:
            return
        name = names[0]
        close = [_ALIASES[name]] if _ALIASES.get(name) in defaults else difflib.get_close_matches(name, defaults, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        place = f" in {where}" if where else ""
        raise TypeError(
            f"nestgrad.optim.{type(self).__name__} got an unknown argument {name!r}{place}.{hint} "
            f"Its arguments are: {', '.join(defaults)}, groups, foreach."
        )

    _ranges: ClassVar[Mapping[str, _Range | tuple[_Range, _Range]]] = {}

    def _range(self, k: str) -> _Range | tuple[_Range, _Range]:
        return self._ranges.get(k) or _RANGES.get(k) or _Range(-math.inf)

    # Hyperparameters that must hold one value (ASGD's t0: a step count) and those read only by
    # ``init`` (Rprop's initial step size), where a Schedule would have no effect.
    _scalar_only: ClassVar[tuple[str, ...]] = ()
    _init_only: ClassVar[tuple[str, ...]] = ()

    def _check(self, hp: Mapping[str, Any], prefix: str) -> None:
        """Check types, and the values of floats; ``_check_tensor_values()`` does Tensors."""
        cls = type(self).__name__
        for k, v in hp.items():
            if k in _FLAGS:
                if not isinstance(v, bool):
                    raise TypeError(f"{cls}: {prefix}{k} must be True or False; got {_describe(v)}.")
                continue
            if k in _PAIRS and (not isinstance(v, tuple) or len(v) != 2):
                raise ValueError(
                    f"{cls}: {prefix}{k} must be a pair of values; got {_describe(v)}. "
                    f"For example {k}={self._default(k)!r}."
                )
            ranges = self._range(k)
            for i, x in enumerate(v if isinstance(v, tuple) else (v,)):
                label = f"{prefix}{k}[{i}]" if isinstance(v, tuple) else f"{prefix}{k}"
                self._check_atom(x, k, label, ranges if isinstance(ranges, _Range) else ranges[i], top=True)

    def _check_atom(self, x: Any, k: str, label: str, valid: _Range, top: bool) -> None:
        cls = type(self).__name__
        if isinstance(x, Mapping) and top:
            if not x:
                raise ValueError(f"{cls}: {label} is an empty dict; give a value per parameter name, or a float.")
            for name, y in x.items():
                if not isinstance(name, str):
                    raise TypeError(
                        f"{cls}: {label} is a dict of parameter name -> value, but has the key {name!r}; "
                        f"use the names of the params dict, e.g. {{'fc.weight': 0.1, 'fc.bias': 0.01}}."
                    )
                self._check_atom(y, k, f"{label}[{name!r}]", valid, top=False)
            return
        if isinstance(x, Schedule):
            if k in self._init_only:
                raise TypeError(
                    f"{cls}: {label} is a Schedule, but {cls} reads {k} only once, in init() "
                    f"(it sets the initial state), so a schedule would have no effect after step 1. "
                    f"Pass a float or a Tensor."
                )
            if x.values is not None and k in self._scalar_only and x.values.dim() != 1:
                raise ValueError(
                    f"{cls}: {label} must hold one value per step (shape (steps,)); got a Schedule of "
                    f"shape {tuple(x.values.shape)}."
                )
            return
        if isinstance(x, Tensor):
            if not x.is_floating_point() or x.numel() == 0:
                raise ValueError(f"{cls}: {label} must be a float or a floating-point Tensor; got {_describe(x)}.")
            if x.numel() != 1 and k in self._scalar_only:
                raise ValueError(
                    f"{cls}: {label} must be a float or a 1-element Tensor (it is a step count, not a "
                    f"per-element value); got {_describe(x)}."
                )
            return
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            kinds = (
                "a float, a Tensor (one value, or one per element of each parameter it applies to), "
                "a dict of parameter name -> value, or a nestgrad.optim.Schedule"
                if top
                else "a float, a Tensor or a nestgrad.optim.Schedule"
            )
            raise TypeError(f"{cls}: {label} must be {kinds}; got {_describe(x)}.")
        if not valid.holds(x):
            raise ValueError(self._out_of_range(label, k, repr(x), valid, ""))

    def _check_tensor_values(
        self,
        where: str,
        defaults: Mapping[str, Any] | None = None,
        groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Check the values of every Tensor hyperparameter, elementwise, with one host sync per device.

        Runs at construction and in ``init()`` (once per training run: a meta-learned
        value may have left its range since), never in ``update()``. ``load_state_dict``
        passes the values it is about to load as ``defaults`` and ``groups``.
        """
        loading = defaults is not None
        defaults = self.defaults if defaults is None else defaults
        groups = self.groups if groups is None else groups
        items: list[tuple[str, str, Tensor, _Range]] = []
        for prefix, hp in [("", defaults), *((f"groups[{i}].", g) for i, g in enumerate(groups))]:
            for k, v in hp.items():
                if k == "params" or k in _FLAGS:
                    continue
                ranges = self._range(k)
                for i, x in enumerate(v if isinstance(v, tuple) else (v,)):
                    label = f"{prefix}{k}[{i}]" if isinstance(v, tuple) else f"{prefix}{k}"
                    valid = ranges if isinstance(ranges, _Range) else ranges[i]
                    for sub, t in _named_tensors(x, label):
                        # Inside torch.func transforms (vmap, grad) a value cannot be read; nor on meta
                        # (init() then says that it is not on the params' device).
                        if not _is_functorch_wrapped(t) and not t.is_meta:
                            items.append((sub, k, t, valid))
        by_device: dict[torch.device, list[tuple[str, str, Tensor, _Range]]] = {}
        for item in items:
            by_device.setdefault(item[2].device, []).append(item)
        with torch.no_grad():
            for group in by_device.values():
                ok = torch.stack([valid.holds_tensor(x).all() for _, _, x, valid in group])
                if bool(ok.all()):  # the one sync for this device
                    continue
                for (label, k, x, valid), good in zip(group, ok.tolist(), strict=True):
                    if good:
                        continue
                    if loading:
                        raise ValueError(
                            _BAD_SAVED.format(
                                where=f"{type(self).__name__}{where}", label=label, got=_tensor_value(x, valid),
                                valid=valid,
                            )
                        )  # fmt: skip
                    raise ValueError(self._out_of_range(label, k, _tensor_value(x, valid), valid, where))

    def _default(self, k: str) -> Any:
        parameter = inspect.signature(type(self).__init__).parameters.get(k)
        return None if parameter is None else parameter.default

    def _out_of_range(self, label: str, k: str, got: str, valid: _Range, where: str) -> str:
        cls = type(self).__name__
        if where:
            return f"{cls}{where}: {label} is {got} now, but it must be {valid}. {_IN_RANGE_AFTER_OUTER_STEPS}"
        default = self._default(k)
        example = f" (the default is {k}={default!r})" if default is not None else ""
        return f"{cls}: {label} must be {valid}; got {got}. Pass a value {valid}{example}."

    # -------------------------------------------------------------- hparams
    def hparams(self, name: str | None = None) -> dict[str, Any]:
        """The hyperparameters that apply to parameter ``name``.

        With no name, the constructor's values. Values are returned as given:
        floats stay floats and Tensors keep their autograd history.
        """
        if name is None:
            return dict(self.defaults)
        index = self._group_index(name)
        if index < 0:
            return dict(self.defaults)
        overrides = {k: v for k, v in self.groups[index].items() if k != "params"}
        return {**self.defaults, **overrides}

    def tensors(self) -> list[Tensor]:
        """Every hyperparameter given as a Tensor, across all groups, in a fixed order.

        This includes the values of a dict of per-parameter values and of a
        ``Schedule``; ``tensor_names()`` names them in the same order.
        """
        return [t for _, t in self._named_tensors()]

    def tensor_names(self) -> list[str]:
        """Names of ``tensors()``, in the same order: ``lr``, ``betas[0]``, ``groups[1].lr``,
        ``lr['fc.weight']``, ``lr (schedule)``."""
        return [n for n, _ in self._named_tensors()]

    def _named_tensors(self) -> list[tuple[str, Tensor]]:
        out: list[tuple[str, Tensor]] = []
        for prefix, hp in [("", self.defaults), *((f"groups[{i}].", g) for i, g in enumerate(self.groups))]:
            for k, v in hp.items():
                if k == "params":
                    continue
                for i, x in enumerate(v if isinstance(v, tuple) else (v,)):
                    label = f"{prefix}{k}[{i}]" if isinstance(v, tuple) else f"{prefix}{k}"
                    out.extend(_named_tensors(x, label))
        return out

    def with_tensors(self, tensors: Sequence[Tensor]) -> Optimizer:
        """A copy whose Tensor hyperparameters are replaced, in the order of ``tensors()``.

        Hypergradient methods use it to re-run steps with fresh leaves in place of the
        user's tensors.
        """
        supply = iter(tensors)

        def swap(v: Any) -> Any:
            if isinstance(v, tuple):
                return tuple(swap(x) for x in v)
            if isinstance(v, Tensor):
                return next(supply)
            if isinstance(v, Schedule):
                return v if v.values is None else v._with_values(next(supply))
            if isinstance(v, Mapping):
                return {n: swap(x) for n, x in v.items()}
            return v

        new = copy.copy(self)
        new.defaults = {k: swap(v) for k, v in self.defaults.items()}
        new.groups = [{k: v if k == "params" else swap(v) for k, v in g.items()} for g in self.groups]
        return new

    def _group_index(self, name: str) -> int:
        index = self._group_of.get(name)
        if index is None:
            hits = [(i, [p for p in g["params"] if fnmatch.fnmatchcase(name, p)]) for i, g in enumerate(self.groups)]
            hits = [(i, matched) for i, matched in hits if matched]
            if len(hits) > 1:
                (a, pa), (b, pb) = hits[:2]
                raise ValueError(
                    f"{type(self).__name__}: parameter {name!r} matches two groups: groups[{a}] "
                    f"(params {self.groups[a]['params']!r}, matched by {pa[0]!r}) and groups[{b}] "
                    f"(params {self.groups[b]['params']!r}, matched by {pb[0]!r}), so which "
                    f"hyperparameters apply to it is ambiguous. Make the groups' patterns disjoint: "
                    f"name {name!r} in one group only, e.g. list exact names instead of a pattern."
                )
            index = hits[0][0] if hits else -1
            self._group_of[name] = index
        return index

    def _step_hparams(self, name: str, dtype: torch.dtype, step: int = 1) -> dict[str, Any]:
        """``hparams(name)`` at ``step``, with each 1-element Tensor viewed as 0-dim and cast to ``dtype``.

        A (1,)-shaped Tensor would broadcast a 0-dim weight to shape (1,), and a float64
        one would promote a 0-dim float32 weight to float64. Both conversions are
        differentiable, so gradients still reach the user's Tensor in its own shape.
        Per-parameter dicts give the value of ``name``, schedules that of ``step``.
        """
        where = f"{type(self).__name__}.init"
        return {k: _fit(_resolve(v, name, step, where, k), dtype) for k, v in self.hparams(name).items()}

    def _expected_slots(self, key: tuple[int, str | None] | None, p: Tensor, hp: dict[str, Any]) -> tuple[str, ...]:
        """The slot names ``init`` gives a parameter with hyperparameters ``hp`` (cached by ``key``)."""
        names = self._slots_of.get(key) if key is not None else None
        if names is None:
            with torch.no_grad():
                try:  # an empty stand-in, unless a per-element value (Adagrad's initial sum) needs the shape
                    names = tuple(self._init(torch.empty(0, dtype=p.dtype, device=p.device), hp))
                except RuntimeError:
                    names = tuple(self._init(p.detach(), hp))
            if key is not None:
                self._slots_of[key] = names
        return names

    def _structured(self) -> bool:
        """Whether any hyperparameter value is a Tensor, a dict or a Schedule (floats and flags are checked
        at construction and cannot change shape, device or name)."""

        def structured(v: Any) -> bool:
            if isinstance(v, tuple):
                return any(structured(x) for x in v)
            return isinstance(v, (Tensor, Mapping, Schedule))

        return any(structured(v) for hp in (self.defaults, *self.groups) for k, v in hp.items() if k != "params")

    def _values(self, params: Mapping[str, Tensor]) -> Iterator[_Value]:
        """Every hyperparameter value that applies to each of ``params`` (flags skipped): a pair's
        elements one by one, and of a dict of per-parameter values the entry for that parameter
        (``_ABSENT`` when it has none), with the dict. The one walk the checks of ``init`` share."""
        for name, p in params.items():
            index = self._group_index(name)
            for k, v in self.hparams(name).items():
                if k == "params" or k in _FLAGS:
                    continue
                base = f"groups[{index}].{k}" if index >= 0 and k in self.groups[index] else k
                for i, x in enumerate(v if isinstance(v, tuple) else (v,)):
                    label = f"{base}[{i}]" if isinstance(v, tuple) else base
                    if isinstance(x, Mapping):
                        yield _Value(name, p, k, f"{label}[{name!r}]", x.get(name, _ABSENT), x, label)
                    else:
                        yield _Value(name, p, k, label, x, None, label)

    def _check_shapes(self, params: Mapping[str, Tensor]) -> None:
        """Per-parameter dicts name every parameter they apply to (and no other); per-element
        values broadcast to their parameters. Runs once, in ``init()``."""
        cls = type(self).__name__
        served: dict[int, tuple[str, Mapping[str, Any], set[str]]] = {}
        for v in self._values(params):
            if v.per_name is not None:
                served.setdefault(id(v.per_name), (v.per_label, v.per_name, set()))[2].add(v.name)
                if v.value is _ABSENT:
                    fields = dict(cls=cls, label=v.per_label, k=v.key, name=v.name, known=list(v.per_name))
                    raise ValueError(_MISSING_NAME.format(**fields))
            x, shape = v.value, None
            if isinstance(x, Schedule) and x.values is not None:
                shape = x.values.shape[1:]
                what = f"a Schedule of shape {tuple(x.values.shape)}, whose per-step values have shape"
            elif isinstance(x, Tensor) and x.numel() != 1:
                shape, what = x.shape, "shape"
            if shape is not None and not _broadcasts(shape, v.param.shape):
                raise ValueError(
                    _BAD_SHAPE.format(
                        cls=cls, label=v.label, what=what, shape=tuple(shape), name=v.name, pshape=tuple(v.param.shape)
                    )
                )
        for label, x, names in served.values():
            extra = [n for n in x if n not in names]
            if extra:
                other = [n for n in extra if n in params]
                close = difflib.get_close_matches(extra[0], params, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                why = (
                    f"{other[0]!r} takes {label.rsplit('.', 1)[-1]} from another group"
                    if other
                    else f"there is no parameter {extra[0]!r}{hint}"
                )
                raise ValueError(
                    f"{cls}.init: {label} has a value for {extra}, which it does not apply to: {why}. "
                    f"Remove the entry, or fix the name (parameter names look like {list(params)[:3]})."
                )

    def _check_devices(self, params: Mapping[str, Tensor]) -> None:
        """Tensor hyperparameters are on their parameters' devices (a 1-element CPU Tensor is a scalar
        to torch, fine on any device). Parameters on the meta device (a template) are skipped."""
        for v in self._values(params):
            x, label = v.value, v.label
            on, label = (x.values, f"{label} (schedule)") if isinstance(x, Schedule) else (x, label)
            p = v.param
            if p.is_meta or not isinstance(on, Tensor) or on.device == p.device:
                continue
            if on.device.type == "cpu" and on.numel() == 1:
                continue
            raise ValueError(
                _HP_DEVICE.format(cls=type(self).__name__, label=label, got=on.device, name=v.name, want=p.device,
                                  want_repr=repr(str(p.device)))
            )  # fmt: skip

    def _check_underflow(self, params: Mapping[str, Tensor]) -> None:
        """Raise if a positive ``eps`` rounds to 0 in a low-precision parameter's dtype (1e-8 in float16):
        the update would divide by an exact 0 wherever the second moment underflows."""
        low = {k: p for k, p in params.items() if p.dtype in (torch.float16, torch.bfloat16)}
        for v in self._values(low):
            if v.key != "eps":
                continue
            p = v.param
            tiny = torch.finfo(p.dtype).smallest_normal * torch.finfo(p.dtype).eps  # the smallest subnormal
            values = v.value.values if isinstance(v.value, Schedule) else v.value
            if values is None or values is _ABSENT or (isinstance(values, Tensor) and _is_functorch_wrapped(values)):
                continue
            with torch.no_grad():
                x = torch.as_tensor(values, dtype=torch.float64).detach()
                lost = bool(((x > 0) & (x.to(p.dtype) == 0)).any())
            if lost:
                raise ValueError(
                    _UNDERFLOW.format(
                        cls=type(self).__name__, label=v.label, got=_short_value(values), dtype=p.dtype,
                        name=v.name, tiny=tiny, safe=f"{tiny:.1g}",
                    )
                )  # fmt: skip

    # ---------------------------------------------------------- public API
    def init(self, params: Mapping[str, Tensor]) -> OptState:
        """Return the initial state for ``params`` (a dict of name -> Tensor).

        Checks, once per run, the values of Tensor hyperparameters (elementwise), that
        per-element values broadcast to their parameters and that per-parameter dicts
        name every parameter they apply to.
        """
        _check_params(params, "params", type(self).__name__ + ".init")
        for i, g in enumerate(self.groups):
            for p in g["params"]:
                if not any(fnmatch.fnmatchcase(n, p) for n in params):
                    raise ValueError(
                        f"{type(self).__name__}: groups[{i}] names {p!r}, which matches no "
                        f"parameter. Parameter names look like {list(params)[:3]}."
                    )
        self._read_schedule_flags()  # of the previous run, if it ran on an accelerator
        if self._structured():  # only Tensors, dicts and Schedules have devices, shapes and names to check
            self._check_devices(params)
            self._check_tensor_values(".init")
            self._check_shapes(params)
        self._check_underflow(params)
        slots: dict[str, dict[str, Tensor]] = {}
        for name, p in params.items():
            hp = self._step_hparams(name, _HP_DTYPE.get(p.dtype, torch.float32))
            for slot, value in self._init(p, hp).items():
                slots.setdefault(slot, {})[name] = value if value.dtype is p.dtype else value.to(p.dtype)
        return OptState(step={name: 0 for name in params}, slots=slots, count=0)

    def update(
        self,
        grads: Mapping[str, Tensor | None],
        state: OptState,
        params: Mapping[str, Tensor],
    ) -> tuple[Params, OptState]:
        """Apply one step and return ``(new_params, new_state)``, out of place.

        Parameters whose gradient is missing or ``None`` are left unchanged,
        with their state, as ``torch.optim`` does. Each gradient must have its
        parameter's shape and dtype, and the state must hold this optimizer's slots
        (those ``init`` makes); otherwise it raises. New parameters and slots keep
        the shape and dtype of the ones they replace, whatever the shape (1-element)
        or dtype of a Tensor hyperparameter.
        """
        if not isinstance(state, OptState):
            raise TypeError(
                f"{type(self).__name__}.update: state must be the OptState returned by "
                f"init() or a previous update(); got {_describe(state)}."
            )
        unknown = [n for n in grads if n not in params]
        if unknown:
            raise KeyError(
                f"{type(self).__name__}.update: grads has names that are not in params: "
                f"{unknown}. Pass the same names to both."
            )
        missing = [n for n in params if n not in state.step]
        if missing:
            raise KeyError(
                f"{type(self).__name__}.update: state has no entry for {missing}; "
                f"call init() with the same params dict you pass to update()."
            )
        # One partition per group and step count (and per parameter, in a group with a dict of
        # per-parameter values). The checks read Python attributes only (no tensor op, no sync):
        # they run at every step.
        partitions: dict[tuple[int, int, str | None], list[str]] = {}
        step_of = state.step
        kinds = self._kind_of
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                continue
            if not isinstance(g, Tensor) or g.shape != p.shape or g.dtype is not p.dtype:
                raise _bad_grad(type(self).__name__, name, g, p)
            group = self._group_index(name)
            kind = kinds.get(group) or self._kind(group, name)
            key = (group, step_of[name] + 1, name if kind[2] else None)
            partitions.setdefault(key, []).append(name)
        ops = self._backend()
        count = state.training_step() + 1  # the training step this update makes: schedules are indexed by it
        new_params = dict(params)
        new_step = dict(step_of)
        new_slots = {slot: dict(values) for slot, values in state.slots.items()}
        for (group, step, per_name), names in partitions.items():
            hp = self.hparams(names[0])
            fit, resolve, _ = kinds[group]
            if resolve:  # the values of this parameter (dicts) at this training step (schedules)
                where = f"{type(self).__name__}.update"
                hp = {
                    k: self._produced(k, _resolve(v, names[0], count, where, k), v, names[0], count)
                    for k, v in hp.items()
                }
            # Float hyperparameters never change a dtype or a shape. Tensor ones are fitted to
            # the parameters of each dtype (1-element ones 0-dim, in that dtype but at least
            # float32); what a float32 one promotes in a low-precision 0-dim parameter is cast back.
            by_dtype = _by_dtype(names, params) if fit else {None: names}
            for dtype, names in by_dtype.items():
                compute = _HP_DTYPE.get(dtype, torch.float32) if dtype is not None else None
                hp_d = {k: _fit(v, compute) for k, v in hp.items()} if compute is not None else hp
                ps = [params[n] for n in names]
                gs = [grads[n] for n in names]
                # A schedule may switch a slot on or off (a momentum of 0): no caching there.
                expected = self._expected_slots(None if resolve else (group, per_name), ps[0], hp_d)
                try:
                    slots = {slot: [state.slots[slot][n] for n in names] for slot in expected}
                except KeyError:
                    raise self._foreign_state(names, expected, state) from None
                out, out_slots = self._step(ops, step, ps, gs, slots, hp_d)  # type: ignore[arg-type]
                for i, n in enumerate(names):
                    new_params[n] = out[i]
                    new_step[n] = step
                    for slot, values in out_slots.items():
                        new_slots[slot][n] = values[i]
                if compute is not None and compute is not dtype:
                    _cast_back(names, params, new_params, slots, new_slots)
        return new_params, OptState(new_step, new_slots, count)

    def _produced(self, k: str, value: Any, raw: Any, name: str, step: int) -> Any:
        """``value``, which ``raw`` gives at training ``step``, after checking what function schedules
        in it returned against ``k``'s range (values schedules are checked elementwise in init)."""
        if k in _FLAGS:
            return value
        ranges = self._range(k)
        pairs = zip(raw, value, strict=True) if isinstance(raw, tuple) else [(raw, value)]
        for i, (r, x) in enumerate(pairs):
            label = f"{k}[{i}]" if isinstance(raw, tuple) else k
            if isinstance(r, Mapping):
                r, label = r[name], f"{label}[{name!r}]"
            if not isinstance(r, Schedule) or r.fn is None:
                continue
            valid = ranges if isinstance(ranges, _Range) else ranges[i]
            if isinstance(x, Tensor):
                if _is_functorch_wrapped(x) or x.is_meta:
                    continue
                with torch.no_grad():
                    ok = valid.holds_tensor(x).all()
                if x.device.type != "cpu":
                    self._pending.append((step, label, x.detach(), ok, valid))
                    if len(self._pending) >= _FLAG_EVERY:
                        self._read_schedule_flags()
                    continue
                if not bool(ok):
                    raise ValueError(self._bad_produced(label, step, _tensor_value(x, valid), valid))
            elif not valid.holds(x):
                raise ValueError(self._bad_produced(label, step, repr(x), valid))
        return value

    def _bad_produced(self, label: str, step: int, got: str, valid: _Range) -> str:
        return _BAD_PRODUCED.format(cls=type(self).__name__, label=label, step=step, got=got, valid=valid)

    def _read_schedule_flags(self) -> None:
        """Read the range flags of values that function schedules returned on an accelerator (one sync)."""
        if not self._pending:
            return
        pending, self._pending[:] = list(self._pending), []
        oks = torch.stack([ok.to(pending[0][3].device) for *_, ok, _ in pending])
        if bool(oks.all()):
            return
        step, label, x, _, valid = pending[int((~oks).nonzero()[0, 0])]
        raise ValueError(self._bad_produced(label, step, _tensor_value(x, valid), valid))

    def _kind(self, group: int, name: str) -> tuple[bool, bool, bool]:
        """Whether a group has Tensor values, values to resolve (dicts, schedules) and dicts of
        per-parameter values (cached: with_tensors keeps all three)."""
        atoms = [
            x
            for k, v in self.hparams(name).items()
            if k != "params" and k not in _FLAGS
            for x in (v if isinstance(v, tuple) else (v,))
        ]
        per_name = any(isinstance(x, Mapping) for x in atoms)
        resolve = per_name or any(isinstance(x, Schedule) for x in atoms)
        kind = (resolve or any(isinstance(x, Tensor) for x in atoms), resolve, per_name)
        self._kind_of[group] = kind
        return kind

    def _foreign_state(self, names: list[str], expected: tuple[str, ...], state: OptState) -> ValueError:
        name = next(n for n in names if any(n not in state.slots.get(s, {}) for s in expected))
        found = [s for s, values in state.slots.items() if name in values]
        return ValueError(
            _FOREIGN_STATE.format(cls=type(self).__name__, name=name, found=found, expected=list(expected))
        )

    def _backend(self) -> Ops:
        # torch 2.13's _foreach ops save their inputs for backward even where the backward
        # does not use them, so a recorded foreach update keeps every step's params and grads
        # alive (about 17% more peak memory on the MLP benchmark). By default, use foreach
        # only when autograd is not recording.
        if self.foreach is None:
            return PerTensor if torch.is_grad_enabled() else Foreach
        return Foreach if self.foreach else PerTensor

    # -------------------------------------------------- per-optimizer rules
    @abc.abstractmethod
    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        """The state slots of one parameter."""

    @abc.abstractmethod
    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        """Update parameters that share a group and a step count (``step`` counts from 1)."""

    # ---------------------------------------------------------- state_dict
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's class name, hyperparameters and groups, as tensors, numbers and strings.

        ``torch.save`` writes it and ``torch.load(path, weights_only=True)`` reads it back. Tensor
        hyperparameters (per-element ones, dict values and schedule values included) are saved
        detached. A ``Schedule`` of a function cannot be saved (it raises).

        Examples:
            >>> torch.save({"opt": opt.state_dict(), "state": state.state_dict()}, "ckpt.pt")
            >>> ckpt = torch.load("ckpt.pt", weights_only=True)
            >>> opt.load_state_dict(ckpt["opt"]); state = opt.init(params).load_state_dict(ckpt["state"])
        """
        cls = type(self).__name__

        def save(v: Any, label: str) -> Any:
            if isinstance(v, tuple):
                return tuple(save(x, f"{label}[{i}]") for i, x in enumerate(v))
            if isinstance(v, Tensor):
                return v.detach()
            if isinstance(v, Schedule):
                if v.values is None:
                    raise TypeError(
                        f"{cls}.state_dict: {label} is a Schedule of a function, which cannot be saved as "
                        f"tensors and numbers. Give it its values instead: "
                        f"Schedule(torch.tensor([fn(t) for t in range(1, steps + 1)]))."
                    )
                return {"schedule": v.values.detach()}
            if isinstance(v, Mapping):
                return {"per_parameter": {n: save(x, f"{label}[{n!r}]") for n, x in v.items()}}
            return v

        return {
            "optimizer": cls,
            "defaults": {k: save(v, k) for k, v in self.defaults.items()},
            "groups": [
                {k: list(v) if k == "params" else save(v, f"groups[{i}].{k}") for k, v in g.items()}
                for i, g in enumerate(self.groups)
            ],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load hyperparameters saved by ``state_dict()`` into this optimizer, in place.

        As ``torch.nn.Module.load_state_dict`` does for parameters, Tensor hyperparameters are
        copied into this optimizer's own Tensors (so an outer optimizer that holds them keeps
        working); floats and flags are replaced. The saved optimizer must be of this class, with
        the same groups and the same kind and shape of every value; otherwise this raises.
        """
        cls = type(self).__name__
        where = f"{cls}.load_state_dict"
        if not isinstance(state_dict, Mapping) or "optimizer" not in state_dict:
            raise TypeError(
                f"{where}: expected the dict that an optimizer's state_dict() returns; got "
                f"{_describe(state_dict) if not isinstance(state_dict, Mapping) else sorted(state_dict)}. "
                f"(The state of a run is loaded with state = opt.init(params).load_state_dict(saved).)"
            )
        if state_dict["optimizer"] != cls:
            raise ValueError(
                f"{where}: the state_dict was saved from nestgrad.optim.{state_dict['optimizer']}, not {cls}. "
                f"Construct nestgrad.optim.{state_dict['optimizer']}(...) and load it into that."
            )
        groups = state_dict.get("groups", [])
        if len(groups) != len(self.groups) or any(
            list(g.get("params", ())) != list(h["params"]) for g, h in zip(groups, self.groups, strict=False)
        ):
            raise ValueError(
                f"{where}: the saved optimizer has groups for {[g.get('params') for g in groups]}, but this one "
                f"for {[g['params'] for g in self.groups]}. Construct it with the same groups as the one saved."
            )
        pending: list[tuple[Tensor, Tensor]] = []

        # Everything is checked before anything is loaded: ``load`` returns each value as it will be
        # (this optimizer's own Tensors, into which the saved ones are copied at the end) and the
        # values to check (the saved Tensors themselves).
        def load(cur: Any, saved: Any, label: str) -> tuple[Any, Any]:
            def mismatch() -> ValueError:
                return ValueError(
                    f"{where}: {label} is {_kind(cur)} here but {_kind(saved)} in the state_dict. Construct the "
                    f"optimizer with the same kind of value (float, Tensor of the same shape, dict of the same "
                    f"names, Schedule of the same length) as the one saved."
                )

            if isinstance(cur, tuple):
                if not isinstance(saved, (tuple, list)) or len(saved) != len(cur):
                    raise mismatch()
                pairs = [load(c, x, f"{label}[{i}]") for i, (c, x) in enumerate(zip(cur, saved, strict=True))]
                return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)
            if isinstance(cur, Mapping):
                per = saved.get("per_parameter") if isinstance(saved, Mapping) else None
                if not isinstance(per, Mapping) or list(per) != list(cur):
                    raise mismatch()
                pairs = {n: load(c, per[n], f"{label}[{n!r}]") for n, c in cur.items()}
                return {n: a for n, (a, _) in pairs.items()}, {n: b for n, (_, b) in pairs.items()}
            if isinstance(cur, Schedule):
                values = saved.get("schedule") if isinstance(saved, Mapping) else None
                if cur.values is None or not isinstance(values, Tensor):
                    raise mismatch()
                _, checked = load(cur.values, values, f"{label} (schedule)")
                return cur, cur._with_values(checked)
            if isinstance(cur, Tensor):
                if not isinstance(saved, Tensor) or saved.shape != cur.shape:
                    raise mismatch()
                if not saved.is_floating_point():
                    raise ValueError(
                        f"{where}: {label} is {_describe(saved)} in the state_dict; a hyperparameter holds "
                        f"floating-point values. Nothing was loaded: the optimizer is unchanged."
                    )
                if cur.requires_grad and not cur.is_leaf:
                    raise ValueError(
                        f"{where}: {label} is computed from other tensors (e.g. log_lr.exp()), so a value cannot "
                        f"be loaded into it. Construct the optimizer with leaf tensors, or save and load the "
                        f"tensors it is computed from yourself."
                    )
                pending.append((cur, saved))
                return cur, saved
            if isinstance(saved, (Tensor, Mapping, tuple, list)) or isinstance(cur, bool) != isinstance(saved, bool):
                raise mismatch()
            return saved, saved

        saved_defaults = state_dict.get("defaults", {})
        if not isinstance(saved_defaults, Mapping) or set(saved_defaults) != set(self.defaults):
            names = sorted(saved_defaults) if isinstance(saved_defaults, Mapping) else saved_defaults
            raise ValueError(f"{where}: the saved hyperparameters are {names}, not {sorted(self.defaults)}.")
        loaded = {k: load(v, saved_defaults[k], k) for k, v in self.defaults.items()}
        defaults = {k: a for k, (a, _) in loaded.items()}
        checked = {k: b for k, (_, b) in loaded.items()}
        new_groups, checked_groups = [], []
        for i, (g, saved) in enumerate(zip(self.groups, groups, strict=True)):
            if set(saved) != set(g):
                raise ValueError(f"{where}: groups[{i}] sets {sorted(saved)} in the state_dict but {sorted(g)} here.")
            pairs = {k: (v, v) if k == "params" else load(v, saved[k], f"groups[{i}].{k}") for k, v in g.items()}
            new_groups.append({k: a for k, (a, _) in pairs.items()})
            checked_groups.append({k: b for k, (_, b) in pairs.items()})
        try:
            self._check(checked, "")
            for i, g in enumerate(checked_groups):
                self._check({k: v for k, v in g.items() if k != "params"}, f"groups[{i}].")
        except (TypeError, ValueError) as err:
            text = str(err).removeprefix(f"{cls}: ")
            unchanged = "Nothing was loaded: the optimizer is unchanged."
            raise type(err)(f"{where}: in the state_dict, {text} {unchanged}") from None
        self._check_after_load(checked, checked_groups, where)
        self._check_tensor_values(".load_state_dict", checked, checked_groups)
        with torch.no_grad():
            for cur, saved in pending:
                cur.copy_(saved)
        self.defaults, self.groups = defaults, new_groups
        self._slots_of.clear()
        self._kind_of.clear()

    def _check_after_load(self, defaults: Mapping[str, Any], groups: Sequence[Mapping[str, Any]], where: str) -> None:
        """Rules across hyperparameters that a subclass checks in its constructor (SGD's nesterov)."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        groups = f", groups={self.groups!r}" if self.groups else ""
        return f"{type(self).__name__}({args}{groups})"


_NO_PARAMS = (
    "nestgrad.optim.{cls} takes hyperparameters only, not the parameters to train; got {got} as its first "
    "argument. Write opt = nestgrad.optim.{cls}({line}), and pass the params to the run instead: "
    "nestgrad.train(loss_fn, dict(model.named_parameters()), opt, data, steps=...), or "
    "state = opt.init(dict(model.named_parameters()))."
)


def _looks_like_params(x: object) -> bool:
    """Whether ``x`` is what torch.optim takes as its first argument: a module's parameters, a list of
    Tensors or of param-group dicts, a dict of name -> Tensor or a module."""
    if isinstance(x, (Tensor, str, bytes)) or isinstance(x, Schedule):
        return False
    if isinstance(x, torch.nn.Module) or inspect.isgenerator(x):
        return True
    # Not a dict of name -> Tensor: that is a valid per-parameter lr.
    if isinstance(x, (list, tuple)):
        return bool(x) and all(isinstance(v, Tensor) or (isinstance(v, Mapping) and "params" in v) for v in x)
    return False


def _short(x: object) -> str:
    """What torch.optim-style params were given, in a few words (not their values)."""
    if inspect.isgenerator(x):
        return "a generator (such as model.parameters())"
    if isinstance(x, torch.nn.Module):
        return f"the module {type(x).__name__}"
    return f"a {type(x).__name__} of {len(x)} {'param groups' if isinstance(x[0], Mapping) else 'Tensors'}"  # type: ignore[arg-type,index]


def _check_given_state(
    optimizer: Optimizer, state: OptState, params: Mapping[str, Tensor], where: str, tasks: int | None = None
) -> OptState:
    """``state`` checked against ``optimizer.init(params)`` with the rules of ``OptState.load_state_dict``
    (shapes, dtypes, step counts) and on the params' devices: before a run that starts from it.

    The template is made on the meta device (shapes and dtypes, no memory), unless an optimizer's
    ``init`` needs real values (a per-element Tensor it combines with the parameter)."""
    optimizer._check_devices(params)
    with torch.no_grad():
        try:
            template = optimizer.init({k: torch.empty_like(v, device="meta") for k, v in params.items()})
        except (RuntimeError, NotImplementedError):
            template = optimizer.init(dict(params))
    devices = {k: v.device for k, v in params.items()}
    return _checked_state(template, state.step, state.slots, where, "the given state", devices, tasks, state.count)


def _check_params(params: object, arg: str, where: str) -> None:
    """Raise a clear error unless ``params`` is a dict of str -> Tensor."""
    if not isinstance(params, Mapping):
        hint = ""
        if isinstance(params, torch.nn.Module):
            hint = " Pass dict(module.named_parameters()) instead of the module."
        elif isinstance(params, Iterable):
            hint = " Pass dict(model.named_parameters()) rather than model.parameters()."
        raise TypeError(f"{where}: {arg} must be a dict of name -> Tensor; got {_describe(params)}.{hint}")
    for k, v in params.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(f"{where}: {arg} must be a dict of name -> Tensor; entry {k!r} is {_describe(v)}.")


def _fit(v: Any, dtype: torch.dtype) -> Any:
    """A Tensor hyperparameter of ``dtype``, 0-dim if it has one element; other values unchanged."""
    if isinstance(v, Tensor):
        if v.dim() and v.numel() == 1:
            v = v.reshape(())
        return v if v.dtype is dtype else v.to(dtype)
    if isinstance(v, tuple):
        return tuple(_fit(x, dtype) for x in v)
    return v


def _by_dtype(names: list[str], params: Mapping[str, Tensor]) -> dict[torch.dtype, list[str]]:
    out: dict[torch.dtype, list[str]] = {}
    for n in names:
        out.setdefault(params[n].dtype, []).append(n)
    return out


def _cast_back(
    names: list[str],
    params: Mapping[str, Tensor],
    new_params: Params,
    slots: Slots,
    new_slots: dict[str, dict[str, Tensor]],
) -> None:
    """Give each result the dtype of the value it replaces (differentiably)."""
    for i, n in enumerate(names):
        q, dtype = new_params[n], params[n].dtype
        if q.dtype is not dtype:
            new_params[n] = q.to(dtype)
        for slot, before in slots.items():
            v = new_slots[slot][n]
            if v.dtype is not before[i].dtype:
                new_slots[slot][n] = v.to(before[i].dtype)


def _bad_grad(cls: str, name: str, g: object, p: Tensor) -> Exception:
    where = f"{cls}.update: grads[{name!r}]"
    if not isinstance(g, Tensor):
        return TypeError(f"{where} must be a Tensor or None; got {_describe(g)}.")
    if g.shape != p.shape:
        return ValueError(
            f"{where} has shape {tuple(g.shape)}, but params[{name!r}] has shape {tuple(p.shape)}; "
            f"a gradient must have its parameter's shape (it would broadcast the parameter). "
            f"Pass the gradient of the loss with respect to params[{name!r}] itself, e.g. from "
            f"torch.autograd.grad(loss, list(params.values()))."
        )
    return TypeError(
        f"{where} has dtype {g.dtype}, but params[{name!r}] has dtype {p.dtype}; as in "
        f"torch.optim, a gradient must have its parameter's dtype. Cast it: "
        f"grads[{name!r}].to(params[{name!r}].dtype), or keep the parameter in the dtype "
        f"you compute gradients in."
    )


def _value_of(x: Tensor) -> str:
    """The value of a 1-element Tensor to the precision of its dtype: -0.1, not -0.10000000149."""
    v = x.item()
    if x.dtype is torch.float64 or not math.isfinite(v):
        return repr(v)
    text = f"{v:.{7 if x.dtype is torch.float32 else 4}g}"
    return text if any(c in text for c in ".e") else text + ".0"


def _is_functorch_wrapped(x: Tensor) -> bool:
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped(x)) if is_wrapped is not None else False


def _named_tensors(x: Any, label: str) -> list[tuple[str, Tensor]]:
    """The Tensors in one hyperparameter value (a Tensor, a dict's values, a schedule's values)."""
    if isinstance(x, Tensor):
        return [(label, x)]
    if isinstance(x, Schedule):
        return [] if x.values is None else [(f"{label} (schedule)", x.values)]
    if isinstance(x, Mapping):
        return [pair for n, y in x.items() for pair in _named_tensors(y, f"{label}[{n!r}]")]
    return []


def _resolve(x: Any, name: str, step: int, where: str, label: str) -> Any:
    """The value of one hyperparameter for parameter ``name`` at ``step``."""
    if isinstance(x, tuple):
        return tuple(_resolve(y, name, step, where, f"{label}[{i}]") for i, y in enumerate(x))
    if isinstance(x, Mapping):
        x, label = x[name], f"{label}[{name!r}]"
    if isinstance(x, Schedule):
        return x.at(step, label, where)
    return x


def _broadcasts(shape: Sequence[int], to: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to ``to`` without enlarging it."""
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(to))) == tuple(to)
    except RuntimeError:
        return False


def _tensor_value(x: Tensor, valid: _Range) -> str:
    """A Tensor's value for a message: the value of one element, the first bad one of several."""
    if x.numel() == 1:
        return f"a Tensor holding {_value_of(x)}"
    bad = (~valid.holds_tensor(x)).nonzero()[0].tolist()
    return f"a Tensor of shape {tuple(x.shape)} whose element {bad} is {_value_of(x[tuple(bad)])}"


_BAD_SAVED = (
    "{where}: the state_dict's {label} is {got}, but it must be {valid}. The checkpoint holds an invalid "
    "value: save it again from a valid optimizer, or fix the entry. Nothing was loaded: the optimizer is unchanged."
)
_FLAG_EVERY = 32
_BAD_PRODUCED = (
    "{cls}.update: the {label} Schedule's function returned {got} for training step {step}, but {label} must be "
    "{valid}. A function schedule must stay in range for every step of the run: clamp it "
    "(e.g. lambda t: max(0.0, 0.1 * (1 - t / 5))), use a decay that stays in range (0.1 * 0.9**t), "
    "or train for fewer steps."
)
_UNDERFLOW = (
    "{cls}.init: {label}={got} rounds to 0 in {dtype}, the dtype of parameter {name!r} (its smallest "
    "positive value is {tiny:.3g}), so the update would divide by an exact 0 wherever the second moment "
    "underflows and give inf or NaN. Pass {label} >= {safe} (e.g. eps=1e-4, common for {dtype}), or keep "
    "float32 master weights: train the params in float32 and cast them to {dtype} where you use them."
)


def _short_value(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"{_value_of(x)} (a Tensor)" if x.numel() == 1 else f"a Tensor of shape {tuple(x.shape)}"
    return repr(x)


_HP_DEVICE = (
    "{cls}.init: {label} is a Tensor on {got}, but parameter {name!r} is on {want}. Create it on the params' "
    "device, e.g. torch.tensor(0.1, device={want_repr}), or move it before constructing the optimizer: "
    "value.to({want_repr}) (a leaf that requires grad: value.detach().to({want_repr}).requires_grad_())."
)
_MISSING_NAME = (
    "{cls}.init: {label} is a dict of per-parameter values, but has no entry for parameter {name!r} "
    "(it has {known}). A dict must give every parameter it applies to a value: add {name!r}, or put "
    "{name!r} in a group with its own {k}, e.g. groups=[{{'params': [{name!r}], '{k}': 0.01}}]."
)
_BAD_SHAPE = (
    "{cls}.init: {label} has {what} {shape}, which does not broadcast to parameter {name!r} of shape "
    "{pshape}: a per-element value must broadcast to its parameter's shape without enlarging it. Give it "
    "the shape {pshape} (or one that broadcasts to it, such as (1, ...) dims), or apply it only to "
    "parameters of that shape with groups=[{{'params': [...], ...}}] or a dict of name -> value."
)


def _kind(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"a Tensor of shape {tuple(v.shape)}"
    if isinstance(v, Schedule):
        return "a Schedule of a function" if v.values is None else f"a Schedule of {len(v)} values"
    if isinstance(v, Mapping):
        if "schedule" in v and len(v) == 1:
            return "a Schedule"
        per = v.get("per_parameter", v)
        return f"a dict for {list(per)}" if isinstance(per, Mapping) else "a dict"
    if isinstance(v, (tuple, list)):
        return f"a pair of {len(v)} values" if len(v) == 2 else f"a sequence of {len(v)} values"
    return _describe(v)
