"""Differentiable optimizers for ``nestgrad.higher``, running the :mod:`nestgrad.optim` update rules."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from .. import optim as _optim
from .patch import FunctionalModel, _copy

__all__ = ["DifferentiableOptimizer"]

Override = Mapping[str, Sequence[Any]]
GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]

_TORCH_TO_NG: dict[type[torch.optim.Optimizer], type[_optim.Optimizer]] = {
    torch.optim.SGD: _optim.SGD,
    torch.optim.Adam: _optim.Adam,
    torch.optim.AdamW: _optim.AdamW,
    torch.optim.RMSprop: _optim.RMSprop,
    torch.optim.Adagrad: _optim.Adagrad,
    torch.optim.Adadelta: _optim.Adadelta,
    torch.optim.Adamax: _optim.Adamax,
    torch.optim.NAdam: _optim.NAdam,
    torch.optim.RAdam: _optim.RAdam,
    torch.optim.Rprop: _optim.Rprop,
    torch.optim.ASGD: _optim.ASGD,
}
# torch.optim arguments that choose an implementation, not the math.
_IGNORED = frozenset({"foreach", "fused", "capturable", "differentiable"})

_UNSUPPORTED = (
    "nestgrad.higher.innerloop_ctx: opt must be one of torch.optim.{supported}, or a "
    "nestgrad.optim optimizer; got {got}. Subclasses are not mapped, because their step() "
    "may differ from their parent's. Build one of the supported optimizers, or pass the "
    "nestgrad.optim optimizer with the same update rule."
)


def _literal(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


class DifferentiableOptimizer:
    """Applies a :mod:`nestgrad.optim` update to a :class:`FunctionalModel`'s fast weights.

    Yielded by :func:`innerloop_ctx`; not built directly.

    Attributes:
        state: the :class:`nestgrad.optim.OptState` after the latest step.
        param_groups: one dict per group: ``"params"`` (parameter names) and its hyperparameters.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        cls: type[_optim.Optimizer],
        groups: list[dict[str, Any]],
        source: str,
        state: _optim.OptState,
        track_higher_grads: bool,
        foreach: bool | None = None,
    ) -> None:
        self._fmodel = fmodel
        self._cls = cls
        self._source = source
        self._foreach = foreach
        self.param_groups = groups
        self._track_higher_grads = track_higher_grads
        self.optimizer = self._build()
        self.state = state

    def _build(self) -> _optim.Optimizer:
        groups = [{**g, "params": [_literal(n) for n in g["params"]]} for g in self.param_groups if g["params"]]
        return self._cls(groups=groups, foreach=self._foreach)

    def _apply_override(self, override: Override) -> None:
        if not isinstance(override, Mapping):
            raise TypeError(
                f"nestgrad.higher: override must be a dict of hyperparameter name -> list of "
                f"values, e.g. {{'lr': [lr_tensor]}}; got {type(override).__name__}."
            )
        known = self._cls(groups=None).defaults
        n = len(self.param_groups)
        for k, v in override.items():
            if k not in known:
                raise TypeError(
                    f"nestgrad.higher: override has {k!r}, which is not a hyperparameter of "
                    f"{self._source}; its hyperparameters are {', '.join(known)}."
                )
            if not isinstance(v, (list, tuple)) or len(v) not in (1, n):
                raise ValueError(
                    f"nestgrad.higher: override[{k!r}] must be a list of one value (for all param "
                    f"groups) or of {n} values (one per param group), as in higher, e.g. "
                    f"{{{k!r}: [value]}}; got {v!r}."
                )
        for k, v in override.items():
            for i, group in enumerate(self.param_groups):
                group[k] = v[0] if len(v) == 1 else v[i]
        self.optimizer = self._build()

    def _tracked(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        index = {n: i for i, n in enumerate(self._fmodel._names)}
        return {name: params[index[name]] for g in self.param_groups for name in g["params"]}

    def step(
        self,
        loss: Tensor,
        params: Sequence[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
    ) -> list[Tensor]:
        """Take one optimizer step on ``loss`` and return the new fast weights.

        Replaces ``opt.zero_grad(); loss.backward(); opt.step()``.

        Args:
            loss: a scalar Tensor computed with ``fmodel``'s current fast weights.
            params: fast weights to step from instead of ``fmodel``'s current ones (in
                ``model.parameters()`` order); the result becomes ``fmodel``'s.
            override: hyperparameter overrides, as in :func:`innerloop_ctx`; they stay in force.
            grad_callback: applied to the list of gradients (``None`` for a parameter the loss
                does not use), in ``model.parameters()`` order, before the update; e.g. clipping.

        Returns:
            The new fast weights, in ``model.parameters()`` order.
        """
        params = self._fmodel.fast_params if params is None else list(params)
        if override is not None:
            self._apply_override(override)
            # A new value (say momentum 0 -> a Tensor) may need state slots the old one did not have.
            fresh = self.optimizer.init(self._tracked(params))
            for slot, values in fresh.slots.items():
                for name, value in values.items():
                    self.state.slots.setdefault(slot, {}).setdefault(name, value)
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise ValueError(
                "nestgrad.higher: diffopt.step(loss) needs a loss Tensor that requires grad; "
                "compute it from fmodel(...) outside torch.no_grad()."
            )
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        found = (
            torch.autograd.grad(
                loss, [params[i] for i in trainable], create_graph=self._track_higher_grads, allow_unused=True
            )
            if trainable
            else ()
        )
        grads: list[Tensor | None] = [None] * len(params)
        for i, g in zip(trainable, found):
            grads[i] = g
        if grad_callback is not None:
            grads = list(grad_callback(grads))
        index = {n: i for i, n in enumerate(self._fmodel._names)}
        tracked = self._tracked(params)
        named_grads = {name: grads[index[name]] for name in tracked}
        with torch.set_grad_enabled(self._track_higher_grads and torch.is_grad_enabled()):
            updated, self.state = self.optimizer.update(named_grads, self.state, tracked)
        new = list(params)
        for name, p in updated.items():
            i = index[name]
            # First order (as in higher): every parameter the optimizer holds is detached.
            new[i] = p if self._track_higher_grads else p.detach().requires_grad_(params[i].requires_grad)
        self._fmodel.update_params(new)
        return new


# ------------------------------------------------------------- construction
def _from_torch(
    opt: torch.optim.Optimizer, module: nn.Module
) -> tuple[type[_optim.Optimizer], list[dict[str, Any]], str]:
    cls = _TORCH_TO_NG[type(opt)]
    known = cls(groups=None).defaults
    source = f"torch.optim.{type(opt).__name__}"
    for k in opt.defaults:
        if k not in known and k not in _IGNORED and k != "params":
            raise TypeError(
                f"nestgrad.higher: {source} has the hyperparameter {k!r}, which nestgrad.optim."
                f"{cls.__name__} does not have, so its update cannot be reproduced."
            )
    name_of = {id(p): n for n, p in module.named_parameters()}
    groups = []
    for i, group in enumerate(opt.param_groups):
        names = []
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError(
                    f"nestgrad.higher: param_groups[{i}] of the optimizer holds a parameter of shape "
                    f"{tuple(p.shape)} that is not in model.named_parameters(). The optimizer must "
                    f"be built on the parameters of the model given to innerloop_ctx."
                )
            names.append(name_of[id(p)])
        # Keys that torch.optim's own defaults lack (a scheduler's initial_lr, a user's "name")
        # are ignored by torch.optim too, so they are dropped here.
        groups.append({"params": names, **{k: v for k, v in group.items() if k in known}})
    return cls, groups, source


def _from_nestgrad(opt: _optim.Optimizer, names: list[str]) -> tuple[type[_optim.Optimizer], list[dict[str, Any]], str]:
    # The groups of a nestgrad optimizer, then one for the parameters that no group matches.
    members: list[list[str]] = [[] for _ in range(len(opt.groups) + 1)]
    for name in names:
        i = next(
            (i for i, g in enumerate(opt.groups) if any(fnmatchcase(name, p) for p in g["params"])),
            len(opt.groups),
        )
        members[i].append(name)
    groups = [{**opt.defaults, **g, "params": m} for g, m in zip(opt.groups, members)]
    if members[-1]:
        groups.append({**opt.defaults, "params": members[-1]})
    return type(opt), groups, f"nestgrad.optim.{type(opt).__name__}"


def _carry_state(
    opt: torch.optim.Optimizer, module: nn.Module, state: _optim.OptState, device: torch.device | str | None
) -> None:
    """Copy ``opt``'s per-parameter state, detached, into ``state`` (in place)."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            saved = opt.state.get(p)
            name = name_of[id(p)]
            if not saved or name not in state.step:
                continue
            carried = False
            for slot, values in state.slots.items():
                value = saved.get(slot)
                if isinstance(value, Tensor):
                    values[name] = _copy(value, device, like=values[name])
                    carried = True
            step = saved.get("step")
            if step is not None:
                state.step[name] = int(step)
            elif carried:  # torch's SGD keeps no step count; a buffer means it has stepped
                state.step[name] = max(state.step[name], 1)
