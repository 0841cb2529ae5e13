"""``FiniteDiff``: the DARTS one-step hypergradient, with a finite-difference mixed second derivative."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .._data import Batches
from .._problem import detach_tree
from .._rng import replay_rng, rng_state
from ..optim._base import OptState
from ._base import AdjointMethod

if TYPE_CHECKING:
    from .._problem import Problem


@dataclass(frozen=True)
class FiniteDiff(AdjointMethod):
    r"""The DARTS second-order approximation: differentiate the last step only, by finite differences.

    Training runs as usual. The hypergradient is taken through the last update
    ``W_T = U(w, g)`` alone, with ``w = W_{T-1}`` and the optimizer state
    held fixed and ``g = \nabla_w L_{\text{train}}(w, \lambda)``. For plain SGD,
    ``U = w - \xi g``, and given ``v = \partial L / \partial W_T``
    (Liu et al., 2019, eq. 7-8):

    ```text
    v^\top \frac{d W_T}{d\lambda} = -\xi\, \nabla^2_{\lambda, w} L_{\text{train}}(w, \lambda)\, v
    \approx -\xi\, \frac{\nabla_\lambda L_{\text{train}}(w^+, \lambda)
                          - \nabla_\lambda L_{\text{train}}(w^-, \lambda)}{2\epsilon},
    \qquad w^\pm = w \pm \epsilon v,\quad \epsilon = \frac{\text{eps}}{\lVert v\rVert}.
    ```

    Any other ``nestgrad.optim`` optimizer is handled by the same formula with
    ``-\xi v`` replaced by ``u = (\partial U / \partial g)^\top v``, the exact
    vector-Jacobian product of the last update with respect to its gradient input
    (cheap: the update is elementwise), and ``\epsilon = \text{eps}/\lVert u\rVert``.
    For SGD this is DARTS exactly (the same points ``w \mp \text{eps}\, v/\lVert v\rVert``),
    and for every optimizer the result is ``Unroll(truncate=1)`` up to
    ``O(\text{eps}^2)``. Gradients with respect to the optimizer's Tensor
    hyperparameters (``lr``, ``momentum``, ...) are the exact VJP of the last update,
    e.g. ``v^\top dW_T/d\xi = -v^\top g`` for SGD.

    Cost: the ordinary training run, plus 2 gradient evaluations of the training
    loss with respect to the hyperparameters (no second derivatives, no graph of
    the run). Memory: the weights, gradient and optimizer state before the last step.

    Bias: the one-step approximation ignores how the hyperparameters moved the
    weights during the first ``T - 1`` steps, so it is biased (often badly, and
    it can point the wrong way) unless training is close to a fixed point or
    ``steps == 1``; the finite difference adds an ``O(\text{eps}^2)`` error. There
    is no variance. Use it for DARTS-style alternating bilevel optimization, where
    the inner problem takes one or a few steps per outer step; use
    ``Unroll`` or ``Reverse`` for exact hypergradients.
    The gradient with respect to the initial weights is not computed
    (asking for it raises).

    Args:
        eps: length of the finite-difference step in weight space
            (DARTS uses 0.01). Too large: truncation error; too small (below about
            1e-3 in float32): round-off.

    Examples:
        >>> w = ng.train(train_loss, params, ng.optim.SGD(lr=0.025), [batch], steps=1,
        ...              hparams=alpha, method=ng.FiniteDiff(eps=0.01))
        >>> (d_alpha,) = torch.autograd.grad(val_loss(w), alpha)

    References:
        Liu, Simonyan and Yang, "DARTS: Differentiable Architecture Search", ICLR 2019.
    """

    eps: float = 0.01
    differentiates_params = False
    nonfinite_hint: ClassVar[str] = (
        "The training loss's gradient w.r.t. the hparams is not finite at the perturbed weights w ± eps·u: "
        "lower eps, or look for log, sqrt or division in loss_fn that the perturbation pushes out of its domain."
    )

    def __post_init__(self) -> None:
        e = self.eps
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not (math.isfinite(e) and e > 0):
            raise ValueError(f"nestgrad.FiniteDiff: eps must be a finite float > 0 (DARTS uses 0.01); got {e!r}.")

    def batches(self, data: Any, steps: int) -> Batches:
        return Batches(data, steps, keep={steps - 1})

    def forward(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], OptState, Any]:
        t = problem.steps - 1
        w, state = problem.fit(params, stop=t)
        if t == 0 and problem.state is not None:  # the caller's given state: the backward pass keeps its own copy
            state = state.with_tensors([x.detach().clone() for x in state.tensors()])
        # The last step, as Problem.step does it, but keeping its gradient for the backward pass.
        rng = rng_state()
        p = {k: v.detach().requires_grad_() for k, v in w.items()}
        with torch.enable_grad():
            loss = problem.loss(p, t, detach_tree(problem.hparams), math_sdpa=False)
            g = problem.grads(p, loss, t, create_graph=False)
        with torch.no_grad():
            trained, final = problem.optimizer.update(g, state, p)
        if problem.check_finite:
            problem._check_finite(t, (loss, p, g, trained, final))
        return {k: v.detach() for k, v in trained.items()}, final, (w, state, g, rng)

    def backward(
        self, problem: Problem, saved: Any, grads: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor | None], list[Tensor | None]]:
        w, state, g, rng = saved
        t = problem.steps - 1
        tensors = problem.hparam_tensors()
        n_loss = len(tensors) - len(problem.optimizer.tensors())

        # Exact VJP of the last update U(w, g; optimizer tensors) w.r.t. g and the optimizer tensors.
        opt_leaves = [x.detach().requires_grad_(x.requires_grad) for x in tensors[n_loss:]]
        opt_wanted = [x for x in opt_leaves if x.requires_grad]
        u, grad_opt = _update_vjp(problem, opt_leaves, opt_wanted, w, state, g, grads)

        # Mixed second derivative u^T d(grad_w L)/d(lambda) by central differences of grad_lambda L.
        loss_leaves = [x.detach().requires_grad_(x.requires_grad) for x in tensors[:n_loss]]
        wanted = [x for x in loss_leaves if x.requires_grad]
        grad_loss: list[Tensor | None] = [torch.zeros_like(x) for x in wanted]
        norm = _norm(list(u.values())) if u else None
        if wanted and norm is not None and norm > 0:
            live = problem.with_hparam_tensors([*loss_leaves, *tensors[n_loss:]])
            step = self.eps / norm

            def grad_hparams(sign: float) -> tuple[Tensor | None, ...]:
                p = {k: w[k] + (sign * step).to(u[k]) * u[k] if k in u else w[k] for k in w}
                with torch.enable_grad(), replay_rng(rng):
                    loss = live.loss(p, t, math_sdpa=False)
                    if not loss.requires_grad:
                        return (None,) * len(wanted)
                    return torch.autograd.grad(loss, wanted, allow_unused=True)

            plus, minus = grad_hparams(1.0), grad_hparams(-1.0)
            grad_loss = [
                None if a is None or b is None else (a - b) / (2 * step).to(a) for a, b in zip(plus, minus, strict=True)
            ]

        supply = iter([*grad_loss, *grad_opt])
        loss_or_opt = [*loss_leaves, *opt_leaves]
        return {}, [next(supply) if x.requires_grad else None for x in loss_or_opt]


def _norm(xs: list[Tensor]) -> Tensor:
    """The Euclidean norm of all of ``xs`` together, on the device of the first."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.detach()).to(xs[0].device) for x in xs]))


def _update_vjp(
    problem: Problem,
    opt_leaves: list[Tensor],
    opt_wanted: list[Tensor],
    w: dict[str, Tensor],
    state: OptState,
    g: dict[str, Tensor | None],
    v: dict[str, Tensor],
) -> tuple[dict[str, Tensor], list[Tensor | None]]:
    """``v^T dU/dg`` (per param) and ``v^T dU/d(optimizer tensors)`` of the update ``U(w, g)``."""
    used = [k for k, gk in g.items() if gk is not None and v.get(k) is not None]
    if not used:
        return {}, [None] * len(opt_wanted)
    with torch.enable_grad():
        g_leaves = {k: g[k].detach().requires_grad_() for k in used}  # type: ignore[union-attr]
        optimizer = problem.optimizer.with_tensors(opt_leaves)
        new, _ = optimizer.update({k: g_leaves.get(k) for k in g}, state, w)
        outs = [k for k in used if new[k].requires_grad]
        if not outs:
            return {}, [None] * len(opt_wanted)
        inputs = [*g_leaves.values(), *opt_wanted]
        got = torch.autograd.grad([new[k] for k in outs], inputs, [v[k] for k in outs], allow_unused=True)
    u = {k: x for k, x in zip(used, got[: len(used)]) if x is not None}
    return u, list(got[len(used) :])
