"""``train``: a whole training run as a differentiable function."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._attention import AttentionUse, attention
from ._data import Batches
from ._explain import require_path
from ._methods import Method, Unroll
from .optim._base import Optimizer, OptState, _check_params, _describe

LossFn = Callable[[dict[str, Tensor], Any, Any], Tensor]

_NOT_USED = (
    "nestgrad.train: at step {t}, the loss does not depend on any of the trained params. "
    "loss_fn must compute its output from the params it receives, e.g. "
    "nestgrad.call(model, params, x), not model(x) (which uses the module's own weights)."
)


def hparam_leaves(tree: Any, path: str = "hparams") -> Iterator[tuple[str, Tensor]]:
    """Yield ``(path, tensor)`` for every leaf of a tuple/list/dict nesting of Tensors."""
    if isinstance(tree, Tensor):
        yield path, tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from hparam_leaves(v, f"{path}[{k!r}]")
    elif isinstance(tree, (tuple, list)):
        for i, v in enumerate(tree):
            yield from hparam_leaves(v, f"{path}[{i}]")
    else:
        raise TypeError(
            f"nestgrad.train: {path} must be a Tensor or a tuple/list/dict of Tensors; got "
            f"{_describe(tree)}. Wrap numbers as tensors (torch.tensor(0.1, requires_grad=True)), "
            f"or close over constants in loss_fn instead of passing them as hparams."
        )


def detach_tree(tree: Any) -> Any:
    """The same nesting with every Tensor detached."""
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: detach_tree(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(detach_tree(v) for v in tree)
    return tree


@dataclass
class Problem:
    """Everything a :class:`~nestgrad.Method` needs to run or replay a training run.

    A method calls :meth:`step` (or :meth:`loss` and :meth:`grads`) for
    ``t in range(steps)`` and decides what to keep for the backward pass.
    """

    loss_fn: LossFn
    optimizer: Optimizer
    batches: Batches
    steps: int
    hparams: Any
    frozen: dict[str, Tensor]
    progress: bool = False
    check_path: bool = False  # check once that the hparams reach the loss (see ``loss``)
    # Attention on the math kernel in first-order steps too: set by methods that replay steps with a graph.
    math_attention: bool = False
    attention: AttentionUse = field(default_factory=AttentionUse, repr=False)  # shared by copies of a run

    def hparam_tensors(self) -> list[Tensor]:
        """Every tensor a hypergradient can reach besides the initial params: the leaves of
        ``hparams``, then the optimizer's Tensor hyperparameters."""
        leaves = [] if self.hparams is None else pytree.tree_leaves(self.hparams)
        return [*leaves, *self.optimizer.tensors()]

    def with_hparam_tensors(self, tensors: Sequence[Tensor]) -> Problem:
        """The same problem with :meth:`hparam_tensors` replaced (e.g. by fresh leaves)."""
        if self.hparams is None:
            hparams, n = None, 0
        else:
            leaves, spec = pytree.tree_flatten(self.hparams)
            hparams, n = pytree.tree_unflatten(list(tensors[: len(leaves)]), spec), len(leaves)
        optimizer = self.optimizer.with_tensors(tensors[n:])
        return dataclasses.replace(self, hparams=hparams, optimizer=optimizer)

    def loss(self, params: dict[str, Tensor], t: int, hparams: Any = None, math_sdpa: bool = True) -> Tensor:
        """The scalar training loss at step ``t``."""
        full = {**params, **self.frozen} if self.frozen else params
        hp = self.hparams if hparams is None else hparams
        batch = self.batches(t)
        with attention(math_sdpa, self.attention):
            loss = self.loss_fn(full, batch, hp)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            got = _describe(loss)
            raise ValueError(
                f"nestgrad.train: loss_fn must return a scalar Tensor; at step {t} it returned {got}. "
                f"Reduce it with .mean() or .sum() (per-example weights go inside the reduction)."
            )
        if self.check_path and hparams is None and torch.is_grad_enabled():
            # Once per run, on the first loss computed from the live hparams: one graph walk when
            # the path exists; when it does not, loss_fn runs again under a tracker to say where
            # it was cut, and DisconnectedError is raised instead of a silent zero later.
            self.check_path = False

            def rerun(h: Any) -> Tensor:
                with attention(math_sdpa, self.attention):
                    return self.loss_fn(full, batch, h)

            require_path(loss, self.hparams, rerun)
        return loss

    def grads(self, params: dict[str, Tensor], loss: Tensor, t: int, create_graph: bool) -> dict[str, Tensor | None]:
        """Gradients of ``loss`` w.r.t. ``params``; ``None`` where it does not depend on one."""
        if not loss.requires_grad:
            raise RuntimeError(_NOT_USED.format(t=t))
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
        if all(g is None for g in grads):
            raise RuntimeError(_NOT_USED.format(t=t))
        return dict(zip(params, grads, strict=True))

    def step(
        self, params: dict[str, Tensor], state: OptState, t: int, create_graph: bool
    ) -> tuple[dict[str, Tensor], OptState, Tensor]:
        """One optimizer step at step ``t``; returns the new weights and state, and the loss (detached).

        With ``create_graph`` the new weights are a differentiable function of
        ``params``, ``state`` and the hyperparameters. Without it, the step is
        plain first-order training and returns fresh leaves.
        """
        if create_graph:
            loss = self.loss(params, t)
            params, state = self.optimizer.update(self.grads(params, loss, t, True), state, params)
            return params, state, loss.detach()
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            loss = self.loss(params, t, detach_tree(self.hparams), math_sdpa=self.math_attention)
            grads = self.grads(params, loss, t, False)
        with torch.no_grad():
            params, state = self.optimizer.update(grads, state, params)
        return params, state, loss.detach()

    def fit(
        self,
        params: dict[str, Tensor],
        state: OptState | None = None,
        start: int = 0,
        stop: int | None = None,
        before_step: Callable[[int, dict[str, Tensor], OptState], None] | None = None,
        after_step: Callable[[int, Tensor], None] | None = None,
    ) -> tuple[dict[str, Tensor], OptState]:
        """Plain first-order training over steps ``[start, stop)``; returns detached weights and state.

        ``before_step(t, params, state)`` runs before each step, e.g. to store the trajectory;
        ``after_step(t, loss)`` after it.
        """
        stop = self.steps if stop is None else stop
        state = self.optimizer.init(params) if state is None else state
        for t in self.range(start, stop):
            if before_step is not None:
                before_step(t, params, state)
            params, state, loss = self.step(params, state, t, create_graph=False)
            if after_step is not None:
                after_step(t, loss)
        return {k: v.detach() for k, v in params.items()}, state

    def range(self, start: int = 0, stop: int | None = None) -> Any:
        """``range(start, stop)`` over the steps, with a tqdm bar when ``progress`` is set."""
        steps = range(start, self.steps if stop is None else stop)
        if not self.progress:
            return steps
        from tqdm.auto import tqdm

        return tqdm(steps, desc="nestgrad.train", leave=False, dynamic_ncols=True)


def train(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    optimizer: Optimizer,
    data: Any,
    *,
    steps: int,
    hparams: Any = None,
    method: Method | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Run ``steps`` optimizer updates and return the trained weights.

    The result is a differentiable function of ``hparams``, of the initial
    ``params`` and of any Tensor hyperparameter of ``optimizer``: call
    ``torch.autograd.grad`` (or ``.backward()``) on any loss computed from it.
    ``method`` chooses how gradients get back through the run. Under
    ``torch.no_grad()``, ``train`` is plain first-order training.

    Args:
        loss_fn: ``loss_fn(params, batch, hparams) -> scalar Tensor``. It must
            compute with the ``params`` it receives, e.g. via
            :func:`nestgrad.call`.
        params: initial weights, name -> Tensor, e.g.
            ``dict(model.named_parameters())``. Tensors with
            ``requires_grad=False`` are frozen: passed to ``loss_fn`` unchanged.
        optimizer: a :mod:`nestgrad.optim` optimizer.
        data: a sequence of batches (cycled), an iterator or iterable of
            batches, or a function ``step -> batch``.
        steps: number of updates, >= 1.
        hparams: a Tensor or any tuple/list/dict nesting of Tensors, passed to
            ``loss_fn`` as its third argument. Another level's trained weights
            are a fine ``hparams``: that is how levels compose.
        method: a :class:`~nestgrad.Method`; default :class:`~nestgrad.Unroll`.
        progress: show a tqdm progress bar over the steps.

    Returns:
        ``dict[str, Tensor]`` with the same names as ``params``.

    Example:
        >>> def loss_fn(p, batch, A):
        ...     x, y = batch
        ...     losses = F.cross_entropy(nestgrad.call(model, p, x), y, reduction="none")
        ...     return (A * losses).mean()
        >>> trained = nestgrad.train(loss_fn, dict(model.named_parameters()),
        ...                          nestgrad.optim.SGD(lr=0.1), [(x, y)], steps=50, hparams=A)
        >>> val = F.cross_entropy(nestgrad.call(model, trained, x_val), y_val)
        >>> (dA,) = torch.autograd.grad(val, A)
    """
    _check_params(params, "params", "nestgrad.train")
    if not isinstance(optimizer, Optimizer):
        hint = ""
        if isinstance(optimizer, torch.optim.Optimizer):
            hint = f" Use nestgrad.optim.{type(optimizer).__name__}(...) with the same arguments."
        raise TypeError(
            f"nestgrad.train: optimizer must be a nestgrad.optim optimizer; got {_describe(optimizer)}.{hint}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"nestgrad.train: steps must be an int >= 1; got {steps!r}.")
    method = Unroll() if method is None else method
    if not isinstance(method, Method):
        raise TypeError(
            f"nestgrad.train: method must be a nestgrad method object such as nestgrad.Unroll(); "
            f"got {_describe(method)}."
        )
    trainable = {k: v for k, v in params.items() if v.requires_grad}
    frozen = {k: v for k, v in params.items() if not v.requires_grad}
    if not trainable:
        raise ValueError(
            "nestgrad.train: every tensor in params has requires_grad=False, so there is nothing to "
            "train. Call .requires_grad_() on the weights to train (frozen ones may stay as they are)."
        )
    leaves = list(hparam_leaves(hparams)) if hparams is not None else []
    if leaves and torch.is_grad_enabled() and not any(t.requires_grad for _, t in leaves):
        names = ", ".join(p for p, _ in leaves[:3])
        warnings.warn(
            f"nestgrad.train: hparams were given ({names}) but none requires grad, so the trained "
            f"weights cannot be differentiated with respect to them, and torch.autograd.grad(..., "
            f"hparams) will fail. Call .requires_grad_() on them, or run under torch.no_grad() if "
            f"you only want the trained weights.",
            stacklevel=2,
        )
    check = bool(leaves) and torch.is_grad_enabled() and method.needs_path and any(t.requires_grad for _, t in leaves)
    problem = Problem(loss_fn, optimizer, method.batches(data, steps), steps, hparams, frozen, progress, check)
    trained = method.run(problem, trainable)
    return {k: trained[k] if k in trained else v for k, v in params.items()}
