r"""``Implicit``: hypergradients from the implicit function theorem at the trained weights."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .._data import Batches
from .._rng import RngState, replay_rng, rng_state
from ..optim._base import Optimizer, OptState
from ..optim._ops import is_zero
from ._base import AdjointMethod
from ._solvers import CG, ConvergenceWarning, FixedPoint, LinearSolver, Solution, explain

if TYPE_CHECKING:
    from .._problem import Problem

_NOT_A_SOLVER = (
    "nestgrad.Implicit: solver must be a linear solver object: nestgrad.CG(max_steps, tol), "
    "nestgrad.Neumann(steps, alpha) or nestgrad.FixedPoint(max_steps, tol); got {got}.{hint}"
)

_NOT_A_GRADIENT_ZERO = (
    "nestgrad.Implicit({solver}): the optimizer has {terms}, so training does not converge to a zero of "
    "the gradient of loss_fn, which is the optimality condition {kind} differentiates; the hypergradient "
    "would be wrong. Either use nestgrad.Implicit(nestgrad.FixedPoint(...)), which differentiates the "
    "optimizer's own update and is right for any fixed point (and also gives gradients w.r.t. these "
    "optimizer hyperparameters), or move the term into loss_fn (e.g. weight_decay=0 and "
    "loss + wd / 2 * sum of squared weights)."
)

_MAXIMIZE = (
    "nestgrad.Implicit({solver}(...)): the optimizer has maximize=True, so the trained weights are a maximum of "
    "loss_fn, where the Hessian is negative definite and {solver} does not apply. Use "
    "nestgrad.Implicit(nestgrad.FixedPoint(...)), which differentiates the optimizer's own update, or minimize "
    "the negated loss instead."
)

_NOT_CONVERGED = (
    "nestgrad.Implicit: the linear solve of the backward pass {what} The hypergradient is approximate. "
    "The implicit function theorem holds only at a true optimum, where {optimality} is 0; here it is "
    "{distance:.3g}. If raising the solver's budget does not help, train longer (more steps, or a smaller "
    "learning rate) so that the trained weights are one."
)


@dataclass(frozen=True)
class Implicit(AdjointMethod):
    r"""Hypergradients by the implicit function theorem at the trained weights.

    The forward pass is plain first-order training. The backward pass assumes the trained
    weights ``W^*`` satisfy an optimality condition and differentiates that condition
    instead of the run, so its cost does not depend on the number of steps. With
    ``v = \partial \mathcal{L}/\partial W^*`` coming from the outer loss:

    *Gradient condition* (``solver`` = ``CG`` or ``Neumann``):
    ``\nabla_W L(W^*, \lambda) = 0``, with ``L`` the training loss on the condition
    batch. Solve ``H x = v`` with ``H = \nabla^2_W L(W^*, \lambda)`` using
    Hessian-vector products, then

    ```text
    \frac{d\mathcal{L}}{d\lambda} = -\nabla_\lambda \big(x^\top \nabla_W L(W^*, \lambda)\big).
    ```

    *Fixed-point condition* (``solver`` = ``FixedPoint``):
    ``(W^*, S^*) = \Phi(W^*, S^*, \lambda)``, where ``\Phi`` is one step of the
    optimizer itself (weights and state ``S``, e.g. momentum buffers). Solve
    ``x = (v, 0) + (\partial\Phi/\partial(W, S))^\top x`` by fixed-point iteration, then

    ```text
    \frac{d\mathcal{L}}{d\lambda} = \Big(\frac{\partial\Phi}{\partial\lambda}\Big)^\top x.
    ```

    This is right for any fixed point the optimizer converges to, also one that is not a
    zero of ``\nabla_W L`` (weight decay inside the optimizer, AdamW).

    The condition batch: ``batch`` if given, else the batch of the last training step
    (``t = steps - 1``, remembered even when ``data`` is an iterator). Randomness in
    ``loss_fn`` (dropout) replays that last step's RNG state, so the linear operator is
    fixed. With minibatch training, pass the full training set (or a large batch) as
    ``batch`` to differentiate the optimum of the full loss.

    Optimizer hyperparameters: under the gradient condition the optimum does not depend
    on them, so the gradient w.r.t. a Tensor ``lr``, ``momentum``, ... is exactly zero
    (returned as zeros). Under the fixed-point condition it is
    ``(\partial\Phi/\partial\lambda_{\mathrm{opt}})^\top x``: about zero for ``lr`` or
    ``momentum`` (they do not move the fixed point) and the true value for terms that do,
    such as ``weight_decay``. To tune the learning rate, use ``Unroll`` or
    ``Reverse``. The initial weights get no gradient: ``W*`` does not depend
    on them, and asking autograd for it raises.

    Args:
        solver: a ``CG`` (default, for a positive definite Hessian),
            ``Neumann`` or ``FixedPoint``. A solve that stops
            short warns (``ConvergenceWarning``) with the residual, the
            iterations and the fix.
        batch: the batch whose training loss defines the optimality condition; ``None`` for
            the last training step's batch.
        on_solve: called with the ``Solution`` of every backward solve, e.g.
            ``solutions.append``, to log iterations and residuals. Its ``value`` is a flat list:
            one tensor per trained weight the condition uses (then, for
            ``FixedPoint``, one per optimizer state slot).

    Examples:
        >>> trained = nestgrad.train(loss_fn, params, nestgrad.optim.SGD(lr=0.1), data, steps=2000,
        ...                          hparams=log_l2, method=nestgrad.Implicit(nestgrad.CG(max_steps=50)))
        >>> val_loss(trained).backward()  # log_l2.grad: the hypergradient at the optimum

    Cost: the forward pass is ``steps`` plain optimizer steps, nothing stored but the final
    weights and optimizer state. The backward pass takes ``k + 2`` gradient evaluations for
    ``k`` solver iterations: one gradient (or optimizer step) recorded with its graph, ``k``
    Hessian-vector (or vector-Jacobian) products through it, and one mixed product for
    ``\lambda``; each product costs about one gradient evaluation. This is independent
    of ``steps``. Memory: one recorded gradient graph.

    When to use: training runs to (near) convergence, long runs where ``Unroll``
    and ``Reverse`` are too slow or too big, and hyperparameters of the loss
    (regularization, example weights, another level's weights). Not for hyperparameters that
    act only through the path, e.g. the learning rate or the initialization, and not when
    training stops far from an optimum (early stopping): the result is then approximate in
    proportion to the remaining gradient.
    """

    solver: LinearSolver = field(default_factory=CG)
    batch: Any = field(default=None, repr=False, compare=False)
    on_solve: Callable[[Solution], None] | None = field(default=None, repr=False, compare=False)

    differentiates_params: ClassVar[bool] = False
    rereads: ClassVar[frozenset[str]] = frozenset({"hparams", "frozen", "trained"})
    nonfinite_hint: ClassVar[str] = (
        "The linear solve met a singular or indefinite system, or the mixed derivative at the trained weights "
        "is infinite: check that training converged (the implicit function theorem needs an optimum), try "
        "nestgrad.FixedPoint() or nestgrad.Neumann with a smaller alpha, and pass on_solve=print to see the "
        "residuals; with Adam/RMSprop keep eps_root > 0."
    )

    def __post_init__(self) -> None:
        s = self.solver
        if not isinstance(s, LinearSolver):
            hint = ""
            if isinstance(s, type) and issubclass(s, LinearSolver):
                hint = f" Call the class: nestgrad.{s.__name__}(...)."
            elif isinstance(s, str):
                name = {"cg": "CG", "neumann": "Neumann", "fixedpoint": "FixedPoint"}.get(s.lower().replace("_", ""))
                hint = f" Pass an object such as nestgrad.{name or 'CG'}(...), not a string."
            got = f"the class {s.__name__}" if isinstance(s, type) else f"{type(s).__name__} {s!r}"
            raise TypeError(_NOT_A_SOLVER.format(got=got, hint=hint))

    def batches(self, data: Any, steps: int) -> Batches:
        return Batches(data, steps, keep={steps - 1})

    @property
    def _fixed_point(self) -> bool:
        return isinstance(self.solver, FixedPoint)

    def forward(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], OptState, Any]:
        if not self._fixed_point:
            _check_gradient_condition(problem.optimizer, self.solver)
        problem = dataclasses.replace(problem, math_attention=True)  # the kernel of the backward pass
        rngs: list[RngState] = []

        def before_step(t: int, p: dict[str, Tensor], state: OptState) -> None:
            if t == problem.steps - 1:
                rngs.append(rng_state())

        trained, state = problem.fit(params, before_step=before_step)
        # Detached aliases: storing the outputs themselves would make a reference cycle through ctx.
        saved = ({k: v.detach() for k, v in trained.items()}, state, rngs[-1])
        return trained, state, saved

    def backward(
        self, problem: Problem, saved: Any, grads: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor | None], list[Tensor | None]]:
        trained, state, rng = saved
        originals = problem.hparam_tensors()
        leaves = [h.detach().requires_grad_(h.requires_grad) for h in originals]
        live = problem.with_hparam_tensors(leaves)
        if self.batch is not None:
            batch = self.batch
            live = dataclasses.replace(live, batches=Batches(lambda _t: batch, problem.steps))
        t = problem.steps - 1
        with torch.enable_grad(), replay_rng(rng):
            if self._fixed_point:
                got = self._fixed_point_backward(live, t, trained, state, grads, leaves)
            else:
                n_hparams = len(pytree.tree_leaves(problem.hparams))
                got = self._gradient_backward(live, t, trained, grads, leaves[:n_hparams])
                got += [torch.zeros_like(h) for h in leaves[n_hparams:]]  # the optimum ignores the optimizer
        return {}, [g if h.requires_grad else None for g, h in zip(got, leaves)]

    def _gradient_backward(
        self, problem: Problem, t: int, trained: dict[str, Tensor], grads: dict[str, Tensor], hparams: list[Tensor]
    ) -> list[Tensor]:
        """Solve ``H x = v`` and return ``-∇_λ (x · ∇_W L)`` for every tensor in ``hparams``."""
        p = {k: v.detach().requires_grad_() for k, v in trained.items()}
        loss = problem.loss(p, t)
        g = problem.grads(p, loss, t, create_graph=True)
        used = [k for k, gk in g.items() if gk is not None]  # weights the condition ignores stay put
        gs = [g[k] for k in used]
        ws = [p[k] for k in used]
        matvec = lambda xs: _vjp(gs, ws, xs)  # noqa: E731
        if problem.parallel is not None:  # data-parallel (_distributed.py): the Hessian of the ranks' mean loss
            matvec = problem.parallel.averaged(matvec)
        solution = self.solver._run(matvec, [grads[k] for k in used], None)
        self._report(solution, "the gradient of the training loss", gs)
        wanted = [h for h in hparams if h.requires_grad]
        supply = iter(_vjp(gs, wanted, solution.value))
        return [-next(supply) if h.requires_grad else torch.zeros_like(h) for h in hparams]

    def _fixed_point_backward(
        self,
        problem: Problem,
        t: int,
        trained: dict[str, Tensor],
        state: OptState,
        grads: dict[str, Tensor],
        hparams: list[Tensor],
    ) -> list[Tensor]:
        """Solve ``x = (v, 0) + Jᵀx`` for ``J = ∂Φ/∂(W, S)`` and return ``(∂Φ/∂λ)ᵀ x``."""
        p = {k: v.detach().requires_grad_() for k, v in trained.items()}
        s = state.with_tensors([x.detach().requires_grad_(x.is_floating_point()) for x in state.tensors()])
        new_p, new_s, _ = problem.step(p, s, t, create_graph=True)
        # Pairs (input, output) of the map; weights and slots the step leaves untouched are constants.
        pairs = [(p[k], new_p[k]) for k in p if new_p[k] is not p[k]]
        n_weights = len(pairs)
        pairs += [(a, b) for a, b in zip(s.tensors(), new_s.tensors()) if a.requires_grad and b is not a]
        ins = [a for a, _ in pairs]
        outs = [b for _, b in pairs]
        rhs = [grads[k] for k in p if new_p[k] is not p[k]] + [torch.zeros_like(a) for a in ins[n_weights:]]

        def matvec(xs: list[Tensor]) -> list[Tensor]:  # (I - Jᵀ) x
            return torch._foreach_sub(xs, _vjp(outs, ins, xs))

        if problem.parallel is not None:  # data-parallel (_distributed.py): the Jacobian of the averaged step
            matvec = problem.parallel.averaged(matvec)
        solution = self.solver._run(matvec, rhs, None)
        self._report(solution, "the optimizer's step Φ(W, S) - (W, S)", outs, ins)
        wanted = [h for h in hparams if h.requires_grad]
        supply = iter(_vjp(outs, wanted, solution.value))
        return [next(supply) if h.requires_grad else torch.zeros_like(h) for h in hparams]

    def _report(
        self, solution: Solution, optimality: str, residual: list[Tensor], minus: list[Tensor] | None = None
    ) -> None:
        """Pass ``solution`` to ``on_solve``; warn if it stopped short, with the optimality residual."""
        if self.on_solve is not None:
            self.on_solve(solution)
        if solution.converged:
            return
        if minus:
            residual = torch._foreach_sub(residual, minus)
        distance = math.sqrt(sum(float(r.detach().double().square().sum()) for r in residual))
        what = explain(self.solver, solution)
        warnings.warn(
            _NOT_CONVERGED.format(what=what, optimality=optimality, distance=distance),
            ConvergenceWarning,
            stacklevel=2,
        )


def _vjp(outputs: list[Tensor], inputs: list[Tensor], cotangents: list[Tensor]) -> list[Tensor]:
    """``Σ_i cotangents[i] · ∂outputs[i]/∂inputs``, keeping the graph; zeros where unconnected.

    Called once per solver iteration. For plain tensors whose cotangents match their outputs'
    shape, dtype and device (always, here), it runs the autograd engine as ``torch.autograd.grad``
    does, without that function's argument handling (``_make_grads`` compares shapes symbolically:
    about 6 us of the 38 us of a Hessian-vector product with 100 weights). Anything else takes
    ``torch.autograd.grad`` itself, with its checks and errors.
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs or not inputs:
        return [torch.zeros_like(x) for x in inputs]
    outs = tuple(o for o, _ in pairs)
    cots = tuple(c for _, c in pairs)
    if _ENGINE is not None and _plain(outs, cots, inputs):
        got = _ENGINE(outs, cots, True, False, tuple(inputs), True, False)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]
    return list(torch.autograd.grad(outs, inputs, cots, retain_graph=True, allow_unused=True, materialize_grads=True))


# torch.autograd.grad's own call into the engine (torch >= 2.1); None: always torch.autograd.grad.
_ENGINE: Callable[..., tuple[Tensor | None, ...]] | None = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _plain(outputs: tuple[Tensor, ...], cotangents: tuple[Tensor, ...], inputs: list[Tensor]) -> bool:
    """Whether ``torch.autograd.grad`` would pass these to the engine unchanged: plain Tensors (no
    ``__torch_function__``), each cotangent of its output's shape, dtype and device, no nested tensor."""
    for o, c in zip(outputs, cotangents):
        if type(o) is not Tensor or type(c) is not Tensor or o.is_nested or c.is_nested:
            return False
        if o.shape != c.shape or o.dtype != c.dtype or o.device != c.device:
            return False
    return all(type(x) is Tensor for x in inputs)


def _check_gradient_condition(optimizer: Optimizer, solver: LinearSolver) -> None:
    """Raise if the optimizer converges to something other than a zero of ∇L."""
    terms: list[str] = []
    for hp in [optimizer.defaults, *optimizer.groups]:
        merged = {**optimizer.defaults, **hp}
        for name in ("weight_decay", "lambd"):  # lambd: ASGD's decay of the weights
            value = merged.get(name, 0)
            if not is_zero(value):
                terms.append(f"{name}={value!r}")
        if merged.get("maximize", False):
            raise ValueError(_MAXIMIZE.format(solver=type(solver).__name__))
    if terms:
        kind = type(solver).__name__
        unique = ", ".join(dict.fromkeys(terms))
        raise ValueError(_NOT_A_GRADIENT_ZERO.format(solver=f"{kind}(...)", terms=unique, kind=kind))
