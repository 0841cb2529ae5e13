"""Differentiable optimizers with the API of ``higher.optim``, running the ``nestgrad.optim`` rules.

A ``DifferentiableOptimizer`` is built from a ``torch.optim`` optimizer and the list of
parameters it was built on (``model.parameters()``): it copies the param groups (their
hyperparameters) and the optimizer's state, detached, and maps each parameter of each group
to its position in that list. ``step(loss)`` then differentiates ``loss`` with respect to the
current fast weights and returns the new ones, without ever touching the ``torch.optim``
optimizer or the model.

The built-in optimizers (``DifferentiableSGD``, ``DifferentiableAdam``, ...) apply
the pure update of the ``nestgrad.optim`` twin of their ``torch.optim`` class, so they match
``torch.optim`` step for step. A user may add an optimizer as in ``higher``: subclass
``DifferentiableOptimizer``, implement ``_update(grouped_grads, **kwargs)`` (which replaces
``group["params"][i]`` with the updated tensor, reading and writing
``self.state[group_idx][p_idx]``), and ``register_optim()`` it.
"""

from __future__ import annotations

import abc
import collections
import copy
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import optim as _optim

__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableOptimizer",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableSGD",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "register_optim",
]


def __dir__() -> list[str]:
    """The public API and the module's dunders; not the helpers this file imports."""
    return sorted([*__all__, *(k for k in globals() if k.startswith("__") and k.endswith("__"))])


Override = Mapping[str, Sequence[Any]]
GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]
GroupedGrads = list[list[Tensor | None]]

# torch.optim arguments that choose an implementation, not the math.
_IGNORED = frozenset({"foreach", "fused", "capturable", "differentiable"})


class UnsupportedOptimizerError(TypeError, ValueError):
    """An optimizer type with no differentiable version (a ``TypeError``, and a ``ValueError`` as in ``higher``)."""


def _literal(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _copy_value(x: Any, device: torch.device | str | None) -> Any:
    """A detached copy of every Tensor in a (nested) state value, moved to ``device``."""
    if isinstance(x, Tensor):
        return x.detach().to(device=device, copy=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_copy_value(y, device) for y in x)
    if isinstance(x, dict):
        return {k: _copy_value(v, device) for k, v in x.items()}
    return copy.copy(x)


def _copy_hparam(x: Any) -> Any:
    """A copy of a hyperparameter's containers; Tensors are shared (so gradients reach them)."""
    if isinstance(x, (list, tuple)):
        return type(x)(_copy_hparam(y) for y in x)
    if isinstance(x, dict):
        return {k: _copy_hparam(v) for k, v in x.items()}
    return x


def _check_override(override: object, n_groups: int, where: str) -> Mapping[str, Sequence[Any]]:
    if not isinstance(override, Mapping):
        raise TypeError(
            f"{where}: override must be a dict of hyperparameter name -> list of values, e.g. "
            f"{{'lr': [lr_tensor]}}; got {type(override).__name__}."
        )
    for k, v in override.items():
        if not isinstance(v, (list, tuple)) or len(v) not in (1, n_groups):
            raise ValueError(
                f"{where}: override[{k!r}] must be a list of one value (for all {n_groups} param groups) "
                f"or of {n_groups} values (one per param group), as in higher, e.g. {{{k!r}: [value]}}; "
                f"got {v!r}."
            )
    return override


class DifferentiableOptimizer(abc.ABC):
    r"""Base class of the differentiable optimizers, with ``higher``'s constructor and ``step``.

    Args:
        other: the ``torch.optim`` optimizer whose param groups (hyperparameters) and state
            are copied; it is never modified.
        reference_params: the parameters ``other`` was built on, in the order of the fast
            weights, usually ``model.parameters()``. Every parameter of ``other`` must be one
            of them (compared by identity); those ``other`` does not hold are never updated.
        fmodel: the functional model whose fast weights ``step`` updates (as returned by
            ``nestgrad.higher.monkeypatch()``). Without one, pass ``params`` to ``step``.
        device: where to put the copied state (default: where it is).
        override: ``{name: [value]}`` or ``{name: [value_group0, value_group1, ...]}``: sets a
            hyperparameter for all param groups or per group; values may be Tensors that
            require grad (learned hyperparameters).
        grad_callback: applied to the list of gradients (``None`` where a weight is unused or
            frozen), in ``reference_params`` order, before each update; e.g. clipping.
        track_higher_grads: ``False`` for a first-order loop: no ``create_graph``, and the
            updated weights are detached (they still require grad).

    Attributes:
        param_groups: one dict per group of ``other``: its hyperparameters, and ``"params"``,
            which holds the group's current fast weights during a step.
        state: one ``defaultdict(dict)`` per group, keyed by the position of a parameter in
            its group, holding ``torch.optim``'s state entries (``"step"`` as an int,
            ``"exp_avg"``, ``"momentum_buffer"``, ...). Entries may be read and replaced
            between steps.
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: torch.device | str | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        where = type(self).__name__
        groups = getattr(other, "param_groups", None)
        if not isinstance(groups, list) or not isinstance(getattr(other, "state", None), Mapping):
            raise TypeError(
                f"{where}: other must be a torch.optim optimizer (with param_groups and state); got "
                f"{type(other).__name__}. Build one on the model's parameters, e.g. "
                f"torch.optim.SGD(model.parameters(), lr=0.1)."
            )
        if isinstance(reference_params, Tensor):
            raise TypeError(f"{where}: reference_params must be an iterable of Tensors, such as model.parameters().")
        reference = list(reference_params)
        if not all(isinstance(p, Tensor) for p in reference):
            raise TypeError(f"{where}: reference_params must hold Tensors only, such as model.parameters().")
        if grad_callback is not None and not callable(grad_callback):
            raise TypeError(
                f"{where}: grad_callback must be a function of the list of gradients; got {grad_callback!r}."
            )
        position = {id(p): i for i, p in enumerate(reference)}
        self.param_groups: list[dict[str, Any]] = []
        self._group_to_param_list: list[list[int]] = []
        self.state: list[collections.defaultdict[int, dict[str, Any]]] = [collections.defaultdict(dict) for _ in groups]
        for g, group in enumerate(groups):
            indices = []
            for i, p in enumerate(group["params"]):
                index = position.get(id(p))
                if index is None:
                    raise ValueError(
                        f"{where}: param_groups[{g}]['params'][{i}] of the optimizer, of shape {tuple(p.shape)}, "
                        f"is not in reference_params (not in model.named_parameters()). The optimizer must be "
                        f"built on the parameters of the model given with it (reference_params=model.parameters())."
                    )
                indices.append(index)
                saved = other.state.get(p)
                if saved:
                    self.state[g][i] = {k: _copy_value(v, device) for k, v in saved.items()}
            self._group_to_param_list.append(indices)
            hparams = {k: _copy_hparam(v) for k, v in group.items() if k != "params"}
            self.param_groups.append({"params": [None] * len(indices), **hparams})
        self._reference = reference
        self._fmodel = fmodel
        self._device = device
        self._grad_callback = grad_callback
        self._track_higher_grads = bool(track_higher_grads)
        names = getattr(fmodel, "_names", None)
        if isinstance(names, list) and len(names) == len(reference):
            self._names: list[str] = list(names)
        else:
            self._names = [f"params[{i}]" for i in range(len(reference))]
        if override is not None:
            self._apply_override(override)

    # ------------------------------------------------------------ override
    def _check_override_keys(self, override: Mapping[str, Sequence[Any]]) -> None:
        """Raise for a key the update does not read (a typo). A user's optimizer may read any key."""
        del override

    def _apply_override(self, override: Override) -> None:
        override = _check_override(override, len(self.param_groups), f"nestgrad.higher.{type(self).__name__}")
        self._check_override_keys(override)
        for k, v in override.items():
            for g, group in enumerate(self.param_groups):
                group[k] = v[0] if len(v) == 1 else v[g]

    # ---------------------------------------------------------------- step
    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """Take one optimizer step on ``loss`` and return the new fast weights.

        Replaces ``opt.zero_grad(); loss.backward(); opt.step()``.

        Args:
            loss: a scalar Tensor computed with the current fast weights.
            params: the fast weights to step from (in ``reference_params`` order); needed when
                there is no ``fmodel``. With an ``fmodel``, they replace its current ones.
            override: hyperparameter overrides, as in the constructor; they stay in force.
            grad_callback: replaces the constructor's for this step.
            **kwargs: passed to ``_update``.

        Returns:
            The new fast weights, in ``reference_params`` order (also made ``fmodel``'s).
        """
        where = f"nestgrad.higher.{type(self).__name__}.step"
        if override is not None:
            self._apply_override(override)
        if params is None:
            current = None if self._fmodel is None else self._fmodel.fast_params
            if current is None:
                raise ValueError(
                    f"{where}: params must be passed (the list of fast weights to update) when the "
                    f"optimizer was built without an fmodel."
                )
            params = current
        if isinstance(params, Tensor):
            raise TypeError(f"{where}: params must be a list of Tensors, not one Tensor.")
        params = list(params)
        if len(params) != len(self._reference) or not all(isinstance(p, Tensor) for p in params):
            raise ValueError(
                f"{where}: params must be a list of {len(self._reference)} Tensors, one per reference "
                f"parameter and in the same order; got {len(params)} items."
            )
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise ValueError(
                f"{where}: needs a loss Tensor that requires grad; compute it from the fast weights "
                f"(fmodel(...)) outside torch.no_grad(). Got {type(loss).__name__}."
            )
        if loss.numel() != 1:
            raise ValueError(
                f"{where}: the loss must be a scalar; got a Tensor of shape {tuple(loss.shape)}. "
                f"Reduce it first, e.g. loss.mean()."
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
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = list(callback(grads))
            if len(grads) != len(params):
                raise ValueError(
                    f"{where}: grad_callback must return one gradient (or None) per parameter, "
                    f"{len(params)} in all; it returned {len(grads)}."
                )
        grouped: GroupedGrads = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            group["params"] = [params[i] for i in mapping]
            grouped.append([grads[i] for i in mapping])
        self._update(grouped, **kwargs)
        new = list(params)
        for g, (group, mapping) in enumerate(zip(self.param_groups, self._group_to_param_list)):
            for k, (p, i) in enumerate(zip(group["params"], mapping)):
                if not isinstance(p, Tensor):
                    raise TypeError(
                        f"{where}: after _update, param_groups[{g}]['params'][{k}] is {type(p).__name__}, "
                        f"not a Tensor: _update must leave each updated weight there."
                    )
                new[i] = p if self._track_higher_grads else p.detach().requires_grad_(params[i].requires_grad)
        if self._fmodel is not None:
            self._fmodel.update_params(new)
        return new

    @abc.abstractmethod
    def _update(self, grouped_grads: GroupedGrads, **kwargs: Any) -> None:
        """Replace ``self.param_groups[g]["params"][i]`` by its updated value, out of place.

        ``grouped_grads[g][i]`` is its gradient (``None``: leave it unchanged); the state of
        that parameter is ``self.state[g][i]``.
        """


class _RuleOptimizer(DifferentiableOptimizer):
    """A differentiable optimizer whose update is a ``nestgrad.optim`` rule's pure ``update``."""

    _rule: ClassVar[type[_optim.Optimizer]]
    _rule_options: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: torch.device | str | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        self._built: tuple[Any, _optim.Optimizer, _optim.OptState | None] | None = None
        self._foreach: bool | None = None
        known = self._known()
        # An argument of the torch optimizer that nestgrad's rule lacks would change the update.
        # Extra keys of a single group (a scheduler's initial_lr, a user's "name") are ignored,
        # by torch.optim too.
        for k in getattr(other, "defaults", {}):
            if k not in known and k not in _IGNORED and k != "params":
                raise TypeError(
                    f"nestgrad.higher.{type(self).__name__}: the optimizer has the hyperparameter {k!r}, "
                    f"which nestgrad.optim.{self._rule.__name__} does not have, so its update cannot be "
                    f"reproduced."
                )
        super().__init__(other, reference_params, fmodel, device, override, grad_callback, track_higher_grads, **kwargs)

    @classmethod
    def _known(cls) -> dict[str, Any]:
        return cls._rule(groups=None, **cls._rule_options).defaults

    def _check_override_keys(self, override: Mapping[str, Sequence[Any]]) -> None:
        known = self._known()
        for k in override:
            if k not in known and not all(k in g for g in self.param_groups):
                raise TypeError(
                    f"nestgrad.higher.{type(self).__name__}: override has {k!r}, which is not a "
                    f"hyperparameter of {self._rule.__name__}; its hyperparameters are {', '.join(known)}."
                )

    # The nestgrad optimizer is rebuilt when a group's hyperparameters change (override, or a
    # user's assignment to param_groups[g][k]); its construction checks every value.
    def _signature(self) -> Any:
        def sig(x: Any) -> Any:
            if isinstance(x, Tensor):
                return ("tensor", id(x))
            if isinstance(x, (list, tuple)):
                return tuple(sig(y) for y in x)
            if isinstance(x, Mapping):
                return tuple((k, sig(v)) for k, v in x.items())
            return (type(x).__name__, x)

        return tuple(tuple((k, sig(v)) for k, v in group.items() if k != "params") for group in self.param_groups)

    def _rule_groups(self) -> list[dict[str, Any]]:
        known = self._known()
        out = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            if mapping:
                hp = {k: v for k, v in group.items() if k in known}
                out.append({"params": [_literal(self._names[i]) for i in mapping], **hp})
        return out

    def _optimizer(self) -> tuple[_optim.Optimizer, _optim.OptState | None]:
        signature = self._signature()
        if self._built is None or self._built[0] != signature:
            opt = self._rule(groups=self._rule_groups(), foreach=self._foreach, **self._rule_options)
            self._built = (signature, opt, None)
        return self._built[1], self._built[2]

    def _update(self, grouped_grads: GroupedGrads, **kwargs: Any) -> None:
        opt, template = self._optimizer()
        params: dict[str, Tensor] = {}
        grads: dict[str, Tensor | None] = {}
        where: dict[str, tuple[int, int]] = {}
        for g, (group, gs, mapping) in enumerate(zip(self.param_groups, grouped_grads, self._group_to_param_list)):
            for i, (p, grad, index) in enumerate(zip(group["params"], gs, mapping)):
                name = self._names[index]
                params[name], grads[name], where[name] = p, grad, (g, i)
        if template is None:  # the slots (and their initial values) of these hyperparameters
            template = opt.init({n: p.detach() for n, p in params.items()})
            self._built = (self._built[0], opt, template)  # type: ignore[index]
        step: dict[str, int] = {}
        slots: dict[str, dict[str, Tensor]] = {s: {} for s in template.slots}
        for name, (g, i) in where.items():
            entry = self.state[g].get(i) or {}
            have = [s for s, values in template.slots.items() if name in values and isinstance(entry.get(s), Tensor)]
            count = entry.get("step")
            if count is not None:
                step[name] = int(count)
            else:  # torch's SGD keeps no step count: a momentum buffer means it has stepped
                step[name] = 1 if have else 0
            for s, values in template.slots.items():
                if name in values:
                    slots[s][name] = entry[s] if s in have else values[name]
        state = _optim.OptState(step, slots)
        with torch.set_grad_enabled(self._track_higher_grads and torch.is_grad_enabled()):
            new_params, new_state = opt.update(grads, state, params)
        for name, (g, i) in where.items():
            if grads[name] is None:
                continue
            entry = self.state[g][i]
            entry["step"] = new_state.step[name]
            for s, values in new_state.slots.items():
                if name in values:
                    entry[s] = values[name]
            self.param_groups[g]["params"][i] = new_params[name]


def _rule_class(name: str, rule: type[_optim.Optimizer], doc: str, **options: Any) -> type[_RuleOptimizer]:
    cls = type(
        name, (_RuleOptimizer,), {"_rule": rule, "_rule_options": options, "__doc__": doc, "__module__": __name__}
    )
    return cls  # type: ignore[return-value]


_DOC = (
    "A differentiable ``torch.optim.{0}``: the update of ``nestgrad.optim.{0}``, which matches "
    "``torch.optim.{0}`` step for step. See ``DifferentiableOptimizer`` for the arguments."
)
DifferentiableSGD = _rule_class(
    "DifferentiableSGD",
    _optim.SGD,
    "A differentiable ``torch.optim.SGD``: the update of ``nestgrad.optim.SGD`` with "
    "``unfused_add=True``, i.e. ``p - lr * g`` rounded as a product then a difference, as in ``higher`` "
    "and in hand-written unrolls (``torch.optim.SGD`` rounds ``torch.add(p, g, alpha=-lr)`` once, "
    "with FMA; the two differ in the last bit). See ``DifferentiableOptimizer`` for the arguments.",
    unfused_add=True,
)
DifferentiableAdam = _rule_class("DifferentiableAdam", _optim.Adam, _DOC.format("Adam"))
DifferentiableAdamW = _rule_class("DifferentiableAdamW", _optim.AdamW, _DOC.format("AdamW"))
DifferentiableAdagrad = _rule_class("DifferentiableAdagrad", _optim.Adagrad, _DOC.format("Adagrad"))
DifferentiableAdadelta = _rule_class("DifferentiableAdadelta", _optim.Adadelta, _DOC.format("Adadelta"))
DifferentiableAdamax = _rule_class("DifferentiableAdamax", _optim.Adamax, _DOC.format("Adamax"))
DifferentiableASGD = _rule_class("DifferentiableASGD", _optim.ASGD, _DOC.format("ASGD"))
DifferentiableRMSprop = _rule_class("DifferentiableRMSprop", _optim.RMSprop, _DOC.format("RMSprop"))
DifferentiableRprop = _rule_class("DifferentiableRprop", _optim.Rprop, _DOC.format("Rprop"))
DifferentiableNAdam = _rule_class("DifferentiableNAdam", _optim.NAdam, _DOC.format("NAdam"))
DifferentiableRAdam = _rule_class("DifferentiableRAdam", _optim.RAdam, _DOC.format("RAdam"))


class _NestgradGroups:
    """The param groups of a ``nestgrad.optim`` optimizer, in ``torch.optim``'s shape."""

    def __init__(self, opt: _optim.Optimizer, named: Sequence[tuple[str, Tensor]]) -> None:
        members: list[list[Tensor]] = [[] for _ in range(len(opt.groups) + 1)]
        for name, p in named:
            hit = next(
                (i for i, g in enumerate(opt.groups) if any(fnmatchcase(name, pat) for pat in g["params"])),
                len(opt.groups),
            )
            members[hit].append(p)
        self.param_groups = [{**opt.defaults, **g, "params": m} for g, m in zip(opt.groups, members)]
        if members[-1]:
            self.param_groups.append({**opt.defaults, "params": members[-1]})
        self.state: dict[Tensor, Any] = {}


def _from_nestgrad(
    opt: _optim.Optimizer, reference: list[Tensor], fmodel: Any, kwargs: dict[str, Any]
) -> DifferentiableOptimizer:
    names = getattr(fmodel, "_names", None)
    if not (isinstance(names, list) and len(names) == len(reference)):
        if opt.groups:
            raise ValueError(
                f"nestgrad.higher: the nestgrad.optim.{type(opt).__name__} optimizer has groups, which name "
                f"parameters, but no fmodel gives the names of reference_params. Pass fmodel=, or use a "
                f"torch.optim optimizer with param groups."
            )
        names = [f"params[{i}]" for i in range(len(reference))]
    cls = type(opt)
    rule = type(f"Differentiable{cls.__name__}", (_RuleOptimizer,), {"_rule": cls, "__module__": __name__})
    if isinstance(opt, _optim.SGD):
        rule._rule_options = {"unfused_add": opt.unfused_add}
    diffopt = rule(_NestgradGroups(opt, list(zip(names, reference))), reference, fmodel=fmodel, **kwargs)
    diffopt._foreach = opt.foreach
    return diffopt


# --------------------------------------------------------------- registry
_opt_mapping: dict[type, type[DifferentiableOptimizer]] = {
    torch.optim.SGD: DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.NAdam: DifferentiableNAdam,
    torch.optim.RAdam: DifferentiableRAdam,
    torch.optim.Rprop: DifferentiableRprop,
    torch.optim.ASGD: DifferentiableASGD,
}


def _unsupported(got: str) -> UnsupportedOptimizerError:
    supported = ", ".join(t.__name__ for t in _opt_mapping)
    return UnsupportedOptimizerError(
        f"nestgrad.higher: opt must be one of torch.optim.{supported} (or a type added with "
        f"register_optim), or a nestgrad.optim optimizer; got {got}. Subclasses are not mapped, "
        f"because their step() may differ from their parent's: register one with "
        f"nestgrad.higher.register_optim(MyOptimizer, MyDifferentiableOptimizer)."
    )


def register_optim(optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]) -> None:
    """Make ``get_diff_optim`` (and ``innerloop_ctx``) build ``diff_optim_type`` for ``optim_type``.

    Args:
        optim_type: a ``torch.optim.Optimizer`` subclass (matched exactly, not its subclasses).
        diff_optim_type: a ``DifferentiableOptimizer`` subclass with the same update,
            implementing ``_update(grouped_grads, **kwargs)``. It replaces any earlier one.
    """
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(
            f"nestgrad.higher.register_optim: optim_type must be a torch.optim.Optimizer subclass "
            f"(the class, not an instance); got {optim_type!r}."
        )
    if not (isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)):
        raise TypeError(
            f"nestgrad.higher.register_optim: diff_optim_type must be a subclass of "
            f"nestgrad.higher.optim.DifferentiableOptimizer that implements _update(grouped_grads, **kwargs); "
            f"got {diff_optim_type!r}."
        )
    _opt_mapping[optim_type] = diff_optim_type


def get_diff_optim(
    opt: torch.optim.Optimizer | _optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable version of an existing optimizer, starting from its hyperparameters and state.

    Args:
        opt: a ``torch.optim`` optimizer of a supported (or registered) type, or a
            ``nestgrad.optim`` optimizer (whose groups name parameters as ``fmodel`` does).
        reference_params: the parameters ``opt`` was built on, usually ``model.parameters()``.
        fmodel, device, override, track_higher_grads, **kwargs: see ``DifferentiableOptimizer``.
    """
    reference = list(reference_params)
    args = dict(device=device, override=override, track_higher_grads=track_higher_grads, **kwargs)
    if isinstance(opt, _optim.Optimizer):
        return _from_nestgrad(opt, reference, fmodel, args)
    cls = _opt_mapping.get(type(opt))
    if cls is None:
        raise _unsupported(type(opt).__qualname__)
    return cls(opt, reference, fmodel=fmodel, **args)


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: dict[str, Any] | None = None,
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A differentiable optimizer of a new ``opt_type(params, **opt_kwargs)``, with fresh state.

    Args:
        opt_type: a supported (or registered) ``torch.optim`` class.
        opt_kwargs: its constructor's keyword arguments (``lr``, ...).
        params: the fast weights (used for their shapes only), or param groups (dicts with
            ``"params"`` and per-group hyperparameters). Default: ``fmodel.parameters()``.
            The fast weights passed to ``step`` follow this order (groups concatenated).
        fmodel, device, override, track_higher_grads, **kwargs: see ``DifferentiableOptimizer``.
    """
    where = "nestgrad.higher.create_diff_optim"
    if not isinstance(opt_type, type) or opt_type not in _opt_mapping:
        raise _unsupported(getattr(opt_type, "__qualname__", repr(opt_type)))
    if opt_kwargs is not None and not isinstance(opt_kwargs, Mapping):
        raise TypeError(
            f"{where}: opt_kwargs must be a dict of constructor arguments; got {type(opt_kwargs).__name__}."
        )
    if params is not None:
        given = list(params)
        if given and all(isinstance(g, Mapping) for g in given):
            for i, g in enumerate(given):
                if "params" not in g:
                    raise ValueError(f"{where}: params[{i}] is a param group without a 'params' entry.")
            groups: list[Any] = [
                {k: [torch.zeros_like(p, requires_grad=True) for p in v] if k == "params" else v for k, v in g.items()}
                for g in given
            ]
            flat = [p for g in groups for p in g["params"]]
        elif all(isinstance(p, Tensor) for p in given):
            groups = flat = [torch.zeros_like(p, requires_grad=True) for p in given]
        else:
            raise TypeError(f"{where}: params must be a list of Tensors, or a list of param group dicts.")
    elif fmodel is not None:
        groups = flat = [torch.zeros_like(p, requires_grad=True) for p in fmodel.parameters()]
    else:
        raise ValueError(f"{where}: give params (the fast weights, for their shapes) or fmodel.")
    if not flat:
        raise ValueError(f"{where}: there are no parameters to optimize.")
    opt = opt_type(groups, **(opt_kwargs or {}))
    return _opt_mapping[opt_type](
        opt, flat, fmodel=fmodel, device=device, override=override, track_higher_grads=track_higher_grads, **kwargs
    )


# ------------------------------------------------- trainable hyperparameters
def _flatten(x: Any) -> list[Any]:
    if isinstance(x, Mapping):
        return [y for v in x.values() for y in _flatten(v)]
    if isinstance(x, (list, tuple, set)):
        return [y for v in x for y in _flatten(v)]
    return [x]


def _trainable(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.is_floating_point()
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: torch.device | str | None = None
) -> dict[str, list[Any]]:
    """An ``override`` dict of fresh leaf Tensors (requiring grad) from ``opt``'s hyperparameters.

    Every hyperparameter that is a number (not a flag) or a structure of numbers (``betas``) in
    every param group becomes one Tensor per number, per group, with the same value. Pass the
    result as ``override`` to learn the hyperparameters, then write them back with
    ``apply_trainable_opt_params()``.
    """
    groups = getattr(opt, "param_groups", None)
    if not isinstance(groups, list) or not groups:
        raise TypeError(f"nestgrad.higher.get_trainable_opt_params: opt must be a torch.optim optimizer; got {opt!r}.")

    def leaf(x: Any) -> Any:
        if isinstance(x, tuple | list):
            return type(x)(leaf(y) for y in x)
        if isinstance(x, Mapping):
            return {k: leaf(v) for k, v in x.items()}
        if isinstance(x, Tensor):
            return x.detach().to(device=device, copy=True).requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    override: dict[str, list[Any]] = {}
    for k in groups[0]:
        if k == "params" or not all(k in g for g in groups):
            continue
        if all(_flatten(g[k]) and all(_trainable(x) for x in _flatten(g[k])) for g in groups):
            override[k] = [leaf(g[k]) for g in groups]
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Override) -> None:
    """Write learned hyperparameters (an ``override`` dict) back into ``opt``'s param groups, in place.

    Numbers stay numbers (``float(value)``; an int stays an int when the value is whole),
    Tensors are copied into the existing Tensors, and tuples keep their structure.
    """
    where = "nestgrad.higher.apply_trainable_opt_params"
    groups = getattr(opt, "param_groups", None)
    if not isinstance(groups, list):
        raise TypeError(f"{where}: opt must be a torch.optim optimizer; got {opt!r}.")
    override = _check_override(override, len(groups), where)

    def put(new: Any, old: Any, label: str) -> Any:
        if isinstance(old, (tuple, list)):
            if not isinstance(new, (tuple, list)) or len(new) != len(old):
                raise ValueError(
                    f"{where}: {label} is {old!r}, so its value must be a sequence of {len(old)}; got {new!r}."
                )
            return type(old)(put(n, o, f"{label}[{i}]") for i, (n, o) in enumerate(zip(new, old)))
        if isinstance(old, Tensor):
            value = torch.as_tensor(new.detach() if isinstance(new, Tensor) else new)
            if value.numel() != old.numel():
                raise ValueError(f"{where}: {label} has {old.numel()} values; got {value.numel()}.")
            with torch.no_grad():
                old.copy_(value.reshape(old.shape))
            return old
        if isinstance(old, bool) or not isinstance(old, (int, float)):
            raise ValueError(
                f"{where}: {label} is {old!r}, which is not a number, so a learned value cannot replace it."
            )
        if isinstance(new, Tensor):
            if new.numel() != 1:
                raise ValueError(f"{where}: {label} is one number; got a Tensor of shape {tuple(new.shape)}.")
            new = new.item()
        if not isinstance(new, (int, float)) or isinstance(new, bool):
            raise ValueError(f"{where}: {label} must receive a number or a 1-element Tensor; got {new!r}.")
        if isinstance(old, int) and float(new).is_integer():
            return int(new)
        return float(new)

    for k, v in override.items():
        for g, group in enumerate(groups):
            if k not in group:
                raise KeyError(f"{where}: param_groups[{g}] has no hyperparameter {k!r}; it has {sorted(group)}.")
            group[k] = put(v[0] if len(v) == 1 else v[g], group[k], f"param_groups[{g}][{k!r}]")
