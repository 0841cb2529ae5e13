r"""A drop-in for the ``higher`` library's ``innerloop_ctx``, built on :func:`nestgrad.call` and :mod:`nestgrad.optim`.

Change one import and existing ``higher`` code runs on nestgrad::

    import nestgrad.higher as higher

    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in support:
            diffopt.step(loss_fn(fmodel(x), y))
        meta_loss = loss_fn(fmodel(x_query), y_query)
    meta_loss.backward()  # reaches model.parameters(), through every inner step

``fmodel(*args, **kwargs)`` is ``nestgrad.call(model, fast_weights, *args, **kwargs)``, and
``diffopt.step(loss)`` takes ``torch.autograd.grad(loss, fast_weights, create_graph=True)`` and
applies the pure update of the :mod:`nestgrad.optim` twin of your ``torch.optim`` optimizer.

Differences from ``higher`` 0.2.1
---------------------------------
* **No monkeypatching.** ``higher`` builds a patched copy of every submodule, so forward hooks
  registered on your model never fire and outputs that models collect with hooks are lost:
  with transformers 5, ``fmodel(ids, output_hidden_states=True).hidden_states`` is ``None``
  under ``higher``. Here ``fmodel`` runs *your* module (``torch.func.functional_call``), so
  hooks, hidden states, attentions and every other output are exactly those of ``model(...)``.
* **Nesting works.** ``innerloop_ctx(fmodel, opt)`` starts an inner loop from the current fast
  weights of an outer loop (``higher`` raises "Monkey-patching monkey-patched modules is
  untested"). With ``copy_initial_weights=False`` the inner loop is differentiable with
  respect to the outer fast weights, so an outer unroll can contain inner unrolls.
* **Optimizers.** All of SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam,
  Rprop and ASGD are mapped (``higher`` has no AdamW, NAdam or RAdam), with every flag of
  ``torch.optim`` honoured (``maximize``, ``amsgrad``, ``nesterov``, ``centered``,
  ``decoupled_weight_decay``; ``higher`` ignores several). The updates are ``torch.optim``'s,
  step for step. Where ``higher`` masks gradients at a zero second moment, the Adam family and
  RMSprop here add ``eps_root=1e-30`` inside the square root (see :class:`nestgrad.optim.Adam`),
  which keeps meta-gradients finite and leaves the trajectory unchanged to float precision.
  (``higher``'s Adam also adds ``eps`` before the bias correction, an older formula than
  ``torch.optim.Adam``'s, so its trajectories differ from ``torch.optim``'s by about
  ``eps / sqrt(1 - beta2**t)`` in the denominator; these match ``torch.optim``.)
  A built-in :mod:`nestgrad.optim` optimizer may be passed instead of a ``torch.optim`` one.
* ``copy_initial_weights=False``: the initial fast weights *are* ``model.parameters()``
  (``higher`` uses ``clone()`` of them); the gradients are the same.
* ``fmodel.parameters()`` and ``fmodel.named_parameters()`` return lists, not iterators.
* Not provided: ``higher.monkeypatch``, ``get_diff_optim``, ``create_diff_optim``,
  ``register_optim`` and ``higher.patch``/``higher.utils``.

As in ``higher``
----------------
* ``copy_initial_weights=True`` (the default) starts from detached copies of the weights, so
  no gradient reaches ``model.parameters()`` through the unroll; ``False`` is what MAML needs.
* ``track_higher_grads=False`` is first order: no ``create_graph``, and the fast weights are
  detached after every step (they still require grad). No gradient flows through the steps.
* ``override={"lr": [value, ...]}`` sets a hyperparameter per param group (one value for all
  groups, or one per group); values may be Tensors that require grad. An override passed to
  ``step`` replaces the current value and stays in force for later steps.
* The optimizer's existing state (momentum buffers, Adam's moments and step count, ...) is
  copied, detached, into the inner loop; the ``torch.optim`` optimizer itself is never changed.
  Parameters that the optimizer does not hold keep their initial value.
* ``fmodel(x, params=fast_weights)`` runs with ``fast_weights``, which become the current ones.

Second-order gradients and attention kernels
--------------------------------------------
PyTorch implements no double backward for its fused attention kernels, which
``scaled_dot_product_attention`` (and so transformers' default ``attn_implementation="sdpa"``)
picks on CPU. A hypergradient through such a model then fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" with ``higher``.
Like ``nestgrad.train``, ``fmodel`` selects the math attention kernel, which has a double
backward, whenever it records higher-order gradients, so the same model works here unchanged.

Buffers and BatchNorm
---------------------
``fmodel`` owns copies of the model's buffers, taken when the context is entered. In train
mode, BatchNorm normalises with batch statistics (differentiably) and updates the running
statistics in place on those copies; the model's own buffers are never changed. In eval mode
it reads them. ``fmodel.train()`` and ``fmodel.eval()`` set the mode for ``fmodel``'s calls
only; until either is called, ``fmodel`` follows the model's own mode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from . import optim as _optim
from ._attention import AttentionUse, attention
from ._call import call

__all__ = ["DifferentiableOptimizer", "FunctionalModel", "innerloop_ctx"]

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


def _copy(t: Tensor, device: torch.device | str | None, like: Tensor | None = None) -> Tensor:
    """A detached copy of ``t`` on ``device`` (and with ``like``'s dtype and device, if given)."""
    if like is not None:
        return t.detach().to(device=like.device, dtype=like.dtype, copy=True)
    return t.detach().to(device=device, copy=True)


class FunctionalModel:
    """A view of a module with fast weights: ``fmodel(*args)`` is ``nestgrad.call(module, weights, *args)``.

    Yielded by :func:`innerloop_ctx`; not built directly. It holds no copy of the module,
    only the list of fast weights (in ``module.parameters()`` order) and copies of its buffers.

    Attributes:
        module: the wrapped ``nn.Module`` (never modified).
        track_higher_grads: whether earlier fast weights are kept and steps are recorded.
    """

    def __init__(
        self,
        module: nn.Module,
        params: list[Tensor],
        buffers: dict[str, Tensor],
        track_higher_grads: bool,
        training: bool | None,
    ) -> None:
        self.module = module
        self.track_higher_grads = track_higher_grads
        self._names = [n for n, _ in module.named_parameters()]
        self._buffers = buffers
        self._attention = AttentionUse()  # whether forward calls attention: after one call without, no mode
        self._history: list[list[Tensor]] = []
        self._training = training
        self.update_params(params)

    # ------------------------------------------------------------ weights
    @property
    def fast_params(self) -> list[Tensor]:
        """The current fast weights, in ``module.parameters()`` order."""
        return list(self._history[-1])

    @fast_params.setter
    def fast_params(self, value: Sequence[Tensor]) -> None:
        self.update_params(value)

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The fast weights the inner loop started from."""
        if not self.track_higher_grads:
            raise RuntimeError(
                "nestgrad.higher: init_fast_params is not kept when track_higher_grads=False "
                "(as in higher), to save memory. Read fmodel.fast_params before the first step."
            )
        return list(self._history[0])

    def update_params(self, params: Sequence[Tensor]) -> None:
        """Make ``params`` (in ``module.parameters()`` order) the current fast weights."""
        params = list(params)
        if len(params) != len(self._names) or not all(isinstance(p, Tensor) for p in params):
            raise ValueError(
                f"nestgrad.higher: expected a list of {len(self._names)} Tensors in the order of "
                f"model.parameters() (the first names: {self._names[:3]}); got "
                f"{len(params)} items."
            )
        if self.track_higher_grads:
            self._history.append(params)
        else:
            self._history = [params]

    def parameters(self, recurse: bool = True, time: int | None = None) -> list[Tensor]:
        """The fast weights after step ``time`` (default: the latest), in ``module.parameters()`` order.

        ``recurse`` is accepted for compatibility and ignored, as in ``higher``.
        """
        if time is None:
            return self.fast_params
        if not self.track_higher_grads and time not in (0, -1):
            raise ValueError(
                "nestgrad.higher: fmodel keeps only the latest fast weights when "
                "track_higher_grads=False; parameters(time=...) needs track_higher_grads=True."
            )
        return list(self._history[time])

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        """``(name, fast weight)`` pairs, with the names of ``module.named_parameters()``."""
        return list(zip(self._names, self._history[-1]))

    def buffers(self) -> list[Tensor]:
        """``fmodel``'s own copies of the module's buffers."""
        return list(self._buffers.values())

    def named_buffers(self) -> list[tuple[str, Tensor]]:
        return list(self._buffers.items())

    def tensors(self, params: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """The name -> Tensor dict that ``fmodel`` passes to :func:`nestgrad.call`."""
        weights = self._history[-1] if params is None else params
        return {**dict(zip(self._names, weights)), **self._buffers}

    # -------------------------------------------------------------- calls
    def __call__(self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        """Run the module with the current fast weights (or with ``params``, which become current)."""
        if params is not None:
            self.update_params(params)
        # As in ng.train: fused attention kernels have no double backward, the math kernel has.
        math = self.track_higher_grads and torch.is_grad_enabled()
        with attention(math, self._attention):  # in this thread only: no global flag is touched
            if self._training is None:
                return call(self.module, self.tensors(), *args, **kwargs)
            modes = [(m, m.training) for m in self.module.modules()]
            self.module.train(self._training)
            try:
                return call(self.module, self.tensors(), *args, **kwargs)
            finally:
                for m, mode in modes:
                    m.training = mode

    forward = __call__

    def train(self, mode: bool = True) -> FunctionalModel:
        """Run ``fmodel``'s calls in train mode (``mode=True``) or eval mode; the module is left as it is."""
        self._training = bool(mode)
        return self

    def eval(self) -> FunctionalModel:
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.module.training if self._training is None else self._training

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "module":
            raise AttributeError(name)
        module = self.module
        own = dict(module.named_parameters(recurse=False))
        if name in own:
            return dict(self.named_parameters())[name]
        if name in dict(module.named_buffers(recurse=False)):
            return self._buffers[name]
        value = getattr(module, name)
        if isinstance(value, nn.Module):
            raise AttributeError(
                f"nestgrad.higher: fmodel.{name} would run the submodule with the model's own "
                f"weights, not the fast weights. Call fmodel(...) on the whole model, or run the "
                f"submodule with nestgrad.call(model.{name}, weights) where weights are the "
                f"entries of dict(fmodel.named_parameters()) under '{name}.' with that prefix removed."
            )
        return value

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self.module).__name__}, steps={len(self._history) - 1})"


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


@contextmanager
def innerloop_ctx(
    model: nn.Module | FunctionalModel,
    opt: torch.optim.Optimizer | _optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Override | None = None,
    track_higher_grads: bool = True,
) -> Iterator[tuple[FunctionalModel, DifferentiableOptimizer]]:
    """A context manager for differentiable inner loops, with ``higher``'s signature.

    Args:
        model: the ``nn.Module`` to train, or the ``fmodel`` of an enclosing ``innerloop_ctx``
            (the inner loop then starts from its current fast weights).
        opt: a ``torch.optim`` optimizer over ``model``'s parameters (SGD, Adam, AdamW,
            RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam, Rprop or ASGD), whose param
            groups, hyperparameters and state are copied; or a :mod:`nestgrad.optim`
            optimizer, which updates every parameter.
        device: where to put the fast weights, buffers and optimizer state (default: where
            the model's are).
        copy_initial_weights: start from detached copies of the weights (``True``, no gradient
            reaches the model's weights) or from the weights themselves (``False``, for MAML).
        override: ``{name: [value]}`` or ``{name: [value_group0, value_group1, ...]}``;
            values may be Tensors that require grad.
        track_higher_grads: ``False`` for a first-order inner loop (no ``create_graph``,
            fast weights detached after each step).

    Yields:
        ``(fmodel, diffopt)``: a :class:`FunctionalModel` and a :class:`DifferentiableOptimizer`.

    Example:
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> with innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                    override={"lr": [lr]}) as (fmodel, diffopt):
        ...     diffopt.step(loss_fn(fmodel(x), y))
        ...     val_loss = loss_fn(fmodel(x_val), y_val)
        >>> (lr_grad,) = torch.autograd.grad(val_loss, lr)
    """
    if isinstance(model, FunctionalModel):
        module, start, own_buffers, training = model.module, model.fast_params, model._buffers, model._training
    elif isinstance(model, nn.Module):
        module, start, training = model, list(model.parameters()), None
        own_buffers = dict(model.named_buffers())
    else:
        raise TypeError(
            f"nestgrad.higher.innerloop_ctx: model must be an nn.Module or the fmodel of another "
            f"innerloop_ctx; got {type(model).__name__}."
        )
    if copy_initial_weights:
        params = [_copy(p, device).requires_grad_(p.requires_grad) for p in start]
    else:
        params = [p if device is None else p.to(device) for p in start]
    buffers = {k: _copy(b, device) for k, b in own_buffers.items()}
    fmodel = FunctionalModel(module, params, buffers, track_higher_grads, training)
    names = fmodel._names

    if isinstance(opt, _optim.Optimizer):
        cls, groups, source = _from_nestgrad(opt, names)
        foreach = opt.foreach
    elif type(opt) in _TORCH_TO_NG:
        cls, groups, source = _from_torch(opt, module)
        foreach = None
    else:
        supported = ", ".join(t.__name__ for t in _TORCH_TO_NG)
        raise TypeError(_UNSUPPORTED.format(supported=supported, got=type(opt).__qualname__))
    diffopt = DifferentiableOptimizer(fmodel, cls, groups, source, _optim.OptState({}, {}), track_higher_grads, foreach)
    if override is not None:
        diffopt._apply_override(override)
    state = diffopt.optimizer.init(diffopt._tracked(params))
    if isinstance(opt, torch.optim.Optimizer):
        _carry_state(opt, module, state, device)
    diffopt.state = state
    yield fmodel, diffopt
