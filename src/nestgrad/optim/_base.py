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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._ops import Foreach, Ops, PerTensor

Hparam = float | Tensor
Params = dict[str, Tensor]
Slots = dict[str, list[Tensor]]


class OptState(NamedTuple):
    """State of any :mod:`nestgrad.optim` optimizer.

    Attributes:
        step: number of updates applied so far, per parameter name.
        slots: per-parameter buffers, keyed first by slot name (``"exp_avg"``,
            ``"momentum_buffer"``, ...) and then by parameter name. The slot names
            are those of ``torch.optim``'s ``state_dict``.
    """

    step: dict[str, int]
    slots: dict[str, dict[str, Tensor]]

    def tensors(self) -> list[Tensor]:
        """The slot tensors in a fixed order (slot by slot, then parameter by parameter)."""
        return [t for values in self.slots.values() for t in values.values()]

    def with_tensors(self, tensors: Sequence[Tensor]) -> OptState:
        """The same state with its slot tensors replaced, in the order of :meth:`tensors`."""
        supply = iter(tensors)
        slots = {slot: {n: next(supply) for n in values} for slot, values in self.slots.items()}
        return OptState(dict(self.step), slots)


_FLAGS = ("maximize", "amsgrad", "nesterov", "centered", "decoupled_weight_decay")
_NON_NEGATIVE = (
    "lr", "eps", "eps_root", "weight_decay", "momentum", "dampening", "lr_decay",
    "initial_accumulator_value", "momentum_decay", "lambd", "alpha",
)  # fmt: skip
_UNIT_INTERVAL = ("betas", "rho")
# Names other libraries use for torch.optim's arguments.
_ALIASES = {
    "learning_rate": "lr", "wd": "weight_decay", "decay": "weight_decay", "beta1": "betas",
    "beta2": "betas", "b1": "betas", "b2": "betas", "epsilon": "eps", "mom": "momentum",
}  # fmt: skip


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a Tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


class Optimizer(abc.ABC):
    """Base class of the differentiable optimizers. Not instantiated directly.

    Every optimizer is a pair of pure functions in the style of optax::

        state = opt.init(params)
        params, state = opt.update(grads, state, params)

    ``update`` never modifies its inputs, so the new parameters are a
    differentiable function of the old parameters, the gradients, the state,
    and every hyperparameter given as a Tensor that requires grad.

    Args common to all optimizers:
        groups: per-parameter hyperparameters, like ``torch.optim``'s param
            groups. A sequence of dicts, each with ``"params"`` (a list of
            parameter names or ``fnmatch`` patterns such as ``"encoder.*"``) and
            the hyperparameters to override for those parameters. The first
            matching group wins; parameters matching no group use the
            constructor's values.
        foreach: ``True`` runs each operation as one ``torch._foreach_*`` kernel
            over a group, ``False`` as a Python loop over tensors; both give the
            same numbers. The default ``None`` uses foreach when autograd is not
            recording the update, and the loop when it is, because foreach ops
            save inputs their backward never reads (more memory, no speed gain
            on CPU).
    """

    def __init__(
        self,
        defaults: dict[str, Any],
        groups: Sequence[Mapping[str, Any]] | None,
        foreach: bool | None,
        unknown: Mapping[str, Any],
    ) -> None:
        self._reject_unknown(unknown, defaults)
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
            overrides = {k: v for k, v in group.items() if k != "params"}
            self._reject_unknown(overrides, defaults, where=f"groups[{i}]")
            self._check(overrides, f"groups[{i}].")
            patterns = group["params"]
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            self.groups.append({"params": patterns, **overrides})
        self.foreach = foreach
        self._group_of: dict[str, int] = {}

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

    def _check(self, hp: Mapping[str, Any], prefix: str) -> None:
        cls = type(self).__name__
        for k, v in hp.items():
            values = v if isinstance(v, tuple) else (v,)
            for x in values:
                if k in _FLAGS:
                    if not isinstance(x, bool):
                        raise TypeError(f"{cls}: {prefix}{k} must be True or False; got {_describe(x)}.")
                    continue
                if isinstance(x, Tensor):
                    if x.numel() != 1 or not x.is_floating_point():
                        raise ValueError(
                            f"{cls}: {prefix}{k} must be a float or a 1-element floating-point "
                            f"Tensor; got {_describe(x)}. For one value per parameter group, "
                            f"use groups=[{{'params': [...], {k!r}: value}}, ...]."
                        )
                    continue
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    raise TypeError(f"{cls}: {prefix}{k} must be a float or a 1-element Tensor; got {_describe(x)}.")
                if k in _NON_NEGATIVE and x < 0:
                    raise ValueError(f"{cls}: {prefix}{k} must be >= 0; got {x}.")
                if k in _UNIT_INTERVAL and not 0 <= x < 1:
                    raise ValueError(f"{cls}: {prefix}{k} must be in [0, 1); got {x}.")
            if isinstance(v, tuple) and len(v) != 2:
                raise ValueError(f"{cls}: {prefix}{k} must be a pair; got {v!r}.")

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
        """Every hyperparameter given as a Tensor, across all groups, in a fixed order."""
        out: list[Tensor] = []
        for hp in [self.defaults, *self.groups]:
            for k, v in hp.items():
                if k != "params":
                    out.extend(x for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, Tensor))
        return out

    def with_tensors(self, tensors: Sequence[Tensor]) -> Optimizer:
        """A copy whose Tensor hyperparameters are replaced, in the order of :meth:`tensors`.

        Hypergradient methods use it to re-run steps with fresh leaves in place of the
        user's tensors.
        """
        supply = iter(tensors)

        def swap(v: Any) -> Any:
            if isinstance(v, tuple):
                return tuple(swap(x) for x in v)
            return next(supply) if isinstance(v, Tensor) else v

        new = copy.copy(self)
        new.defaults = {k: swap(v) for k, v in self.defaults.items()}
        new.groups = [{k: v if k == "params" else swap(v) for k, v in g.items()} for g in self.groups]
        return new

    def _group_index(self, name: str) -> int:
        index = self._group_of.get(name)
        if index is None:
            index = next(
                (i for i, g in enumerate(self.groups) if any(fnmatch.fnmatchcase(name, p) for p in g["params"])),
                -1,
            )
            self._group_of[name] = index
        return index

    # ---------------------------------------------------------- public API
    def init(self, params: Mapping[str, Tensor]) -> OptState:
        """Return the initial state for ``params`` (a dict of name -> Tensor)."""
        _check_params(params, "params", type(self).__name__ + ".init")
        for i, g in enumerate(self.groups):
            for p in g["params"]:
                if not any(fnmatch.fnmatchcase(n, p) for n in params):
                    raise ValueError(
                        f"{type(self).__name__}: groups[{i}] names {p!r}, which matches no "
                        f"parameter. Parameter names look like {list(params)[:3]}."
                    )
        slots: dict[str, dict[str, Tensor]] = {}
        for name, p in params.items():
            for slot, value in self._init(p, self.hparams(name)).items():
                slots.setdefault(slot, {})[name] = value
        return OptState(step={name: 0 for name in params}, slots=slots)

    def update(
        self,
        grads: Mapping[str, Tensor | None],
        state: OptState,
        params: Mapping[str, Tensor],
    ) -> tuple[Params, OptState]:
        """Apply one step and return ``(new_params, new_state)``, out of place.

        Parameters whose gradient is missing or ``None`` are left unchanged,
        with their state, as ``torch.optim`` does.
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
        partitions: dict[tuple[int, int], list[str]] = {}
        for name in params:
            if grads.get(name) is not None:
                key = (self._group_index(name), state.step[name] + 1)
                partitions.setdefault(key, []).append(name)
        ops = self._backend()
        new_params = dict(params)
        new_step = dict(state.step)
        new_slots = {slot: dict(values) for slot, values in state.slots.items()}
        for (_, step), names in partitions.items():
            hp = self.hparams(names[0])
            ps = [params[n] for n in names]
            gs = [grads[n] for n in names]
            slots = {slot: [values[n] for n in names] for slot, values in state.slots.items()}
            ps, slots = self._step(ops, step, ps, gs, slots, hp)  # type: ignore[arg-type]
            for i, n in enumerate(names):
                new_params[n] = ps[i]
                new_step[n] = step
                for slot, values in slots.items():
                    new_slots[slot][n] = values[i]
        return new_params, OptState(new_step, new_slots)

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

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        groups = f", groups={self.groups!r}" if self.groups else ""
        return f"{type(self).__name__}({args}{groups})"


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
