"""``SAMA``: an APPROXIMATE hypergradient for Adam and AdamW, in a few first-order passes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .._data import Batches
from .._problem import detach_tree
from .._rng import replay_rng, rng_state
from ..optim._adam import Adam
from ..optim._base import OptState
from ._base import AdjointMethod
from ._finite_diff import _norm

if TYPE_CHECKING:
    from .._problem import Problem


_NOT_ADAM = (
    "nestgrad.SAMA: the inner optimizer is {got}, but SAMA (an APPROXIMATE method) adapts the hypergradient to "
    "the update of Adam or AdamW only: its preconditioner is the derivative of Adam's last update with respect to "
    "the gradient, read from the warm second moment. {why}Use nestgrad.optim.Adam / AdamW for the inner run, or an "
    "exact method (nestgrad.Reverse(), nestgrad.Unroll(), nestgrad.Forward()) with this optimizer."
)
_WHY_SGD = (
    "With SGD that derivative is the constant -lr, so SAMA would reduce to FiniteDiff evaluated at the trained "
    "weights (a one-step, DARTS-style estimate, which nestgrad.FiniteDiff() already gives). "
)
_COLD = (
    "nestgrad.SAMA: the optimizer state will have taken {count} step(s) by the end of this run ({start} in the "
    "given state= plus steps={steps}), fewer than warm_steps={warm}. SAMA is APPROXIMATE: it treats the trained "
    "weights as close to a stationary point of the training loss and Adam's second moment as a settled estimate, "
    "which a run this short from a fresh state is not. Train longer, continue from a warm state "
    "(train(..., state=previous_state)), use an exact method (nestgrad.Reverse(), nestgrad.Unroll()), or pass "
    "SAMA(warm_steps={count}) if you know the weights are near a stationary point."
)
_OPT_HPARAMS = (
    "nestgrad.SAMA: the optimizer's Tensor hyperparameter(s) {names} require grad, but SAMA (an APPROXIMATE "
    "method) only differentiates the training loss's hparams: under its stationary-point assumption the trained "
    "weights do not depend on Adam's own settings, so it has no estimate for them. Use an exact method "
    "(nestgrad.Reverse(), nestgrad.Unroll(), nestgrad.Forward()) to learn the optimizer's hyperparameters, or "
    "pass them as floats / tensors that do not require grad."
)
_PARALLEL = (
    "nestgrad.SAMA: parallel=DataParallel(...) is not supported by this APPROXIMATE method (its finite-difference "
    "passes would each read only this rank's batch, and that has not been tested). Use nestgrad.FiniteDiff() or an "
    "exact method with parallel=, or run SAMA on one process."
)


def _positive_float(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class SAMA(AdjointMethod):
    r"""APPROXIMATE hypergradient for Adam / AdamW: training plus two first-order passes (SAMA, Choe et al. 2023).

    It is not exact, and a run has to meet its assumptions (see Bias). Training runs as usual,
    first order, and keeps only what the backward pass needs: the trained weights
    ``\theta_T`` (the returned tensors themselves) and one weight-sized tensor ``D``.
    Memory does not grow with ``steps``; no trajectory and no graph are kept.

    Treat ``\theta_T`` as a fixed point of the optimizer's step
    ``\theta \mapsto \theta + \Delta(g(\theta, \lambda))``, with
    ``g = \nabla_\theta L_{\text{train}}``. The implicit function theorem gives
    ``d\theta/d\lambda = -(\partial\Delta/\partial\theta)^{-1}\,\partial\Delta/\partial\lambda``.
    SAMA replaces the base Jacobian ``\partial\Delta/\partial\theta`` by ``-I``. What is left,
    ``\partial\Delta/\partial\lambda = D\,\partial g/\partial\lambda``, keeps the adaptive
    optimizer's per-coordinate scaling
    ``D = \operatorname{diag}(\partial \theta_T / \partial g_T)``, the derivative of the last update
    with respect to its gradient. Given ``v = \partial L/\partial\theta_T``:

    ```text
    \frac{dL}{d\lambda} \approx \nabla^2_{\lambda\theta} L_{\text{train}}(\theta_T, \lambda)\, u
      \approx \frac{\nabla_\lambda L_{\text{train}}(\theta_T + \epsilon u)
                    - \nabla_\lambda L_{\text{train}}(\theta_T - \epsilon u)}{2\epsilon},
    \qquad u = D v,\quad \epsilon = \frac{\text{eps}}{\lVert u \rVert}.
    ```

    For nestgrad's Adam, with ``m_T, v_T`` the final moments, ``\hat g_T`` the gradient
    of the last step after ``maximize`` and coupled weight decay, ``s = \gamma/(1-\beta_1^T)``,
    ``r = \sqrt{(v_T + \epsilon_{root})/(1-\beta_2^T)}`` and ``d = r + \epsilon``:

    ```text
    D = \mp s\,\Big(\frac{1-\beta_1}{d} - \frac{(1-\beta_2)\, m_T\, \hat g_T}{(1-\beta_2^T)\, r\, d^2}\Big)
    ```

    (minus, or plus with ``maximize=True``). The first term is the familiar
    ``\gamma_T/(\sqrt{\hat v}+\epsilon)`` preconditioner; the second is the second
    moment's own dependence on the gradient. With AMSGrad it is dropped where the
    running maximum, not ``v_T``, was used. ``D`` is computed in training, by
    autograd through the last update (elementwise, so one vector-Jacobian product with
    ones gives the diagonal); the tests check it against this formula.

    Which batches: the mixed term is evaluated on the batches of the last ``last``
    steps (each with the RNG of its step, so dropout is replayed), at the trained
    weights, and averaged. ``last=1`` (the default) costs two gradient evaluations;
    each further batch costs two more and lowers the variance.

    Bias: this is an approximation, not an estimate that converges to the exact
    hypergradient. It assumes the trained weights are near a stationary point of the training
    loss and that the base Jacobian is close to ``-I`` (one step's worth of curvature). Its magnitude is that
    of one step, not of the whole run, so judge it by direction (cosine similarity) and tune
    the outer learning rate for it. Measured on this repository's cases (cosine similarity
    with the exact hypergradient): see the Methods page. Gradients with respect to the
    initial weights and to the optimizer's own hyperparameters are not given (asking raises).

    Raises (before training) where its assumptions do not hold: an optimizer other than
    Adam / AdamW, fewer than ``warm_steps`` optimizer steps by the end of the run (counting
    a given ``state=``), an optimizer hyperparameter that requires grad, and ``parallel=``.

    Args:
        eps: length of the finite-difference step in weight space. Too large:
            truncation error; too small (below about 1e-3 in float32): round-off.
        last: how many of the last steps' batches the mixed term is averaged over.
        warm_steps: the fewest optimizer steps (including those of a given ``state=``) for
            which the run counts as warm.

    Examples:
        >>> w = ng.train(train_loss, params, ng.optim.Adam(lr=1e-3), data, steps=500,
        ...              hparams=weights, method=ng.SAMA(eps=0.01))
        >>> (d_weights,) = torch.autograd.grad(val_loss(w), weights)  # APPROXIMATE

    References:
        Choe, Mehta, Ahn, Neiswanger, Xie, Strubell and Xing, "Making Scalable Meta Learning
        Practical", NeurIPS 2023.
    """

    eps: float = 0.01
    last: int = 1
    warm_steps: int = 100
    differentiates_params = False
    #: The backward pass reads the returned trained weights (it keeps no copy of them).
    rereads: ClassVar[frozenset[str]] = frozenset({"hparams", "frozen", "trained"})
    nonfinite_hint: ClassVar[str] = (
        "SAMA is APPROXIMATE; the training loss's gradient w.r.t. the hparams is not finite at the perturbed "
        "weights theta_T ± eps·u: lower eps, or look for log, sqrt or division in loss_fn that the perturbation "
        "pushes out of its domain."
    )

    def __post_init__(self) -> None:
        if not _positive_float(self.eps):
            raise ValueError(f"nestgrad.SAMA: eps must be a finite float > 0 (e.g. 0.01); got {self.eps!r}.")
        for name, low in (("last", 1), ("warm_steps", 0)):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int) or x < low:
                raise ValueError(f"nestgrad.SAMA: {name} must be an int >= {low}; got {x!r}.")

    def batches(self, data: Any, steps: int) -> Batches:
        return Batches(data, steps, keep=set(range(max(0, steps - self.last), steps)))

    def _check(self, problem: Problem, params: dict[str, Tensor]) -> None:
        opt = problem.optimizer
        if not isinstance(opt, Adam):
            name = type(opt).__name__
            why = _WHY_SGD if name == "SGD" else ""
            raise ValueError(_NOT_ADAM.format(got=f"nestgrad.optim.{name}", why=why))
        wanted = [n for n, x in zip(opt.tensor_names(), opt.tensors(), strict=True) if x.requires_grad]
        if wanted:
            raise ValueError(_OPT_HPARAMS.format(names=", ".join(wanted)))
        if problem.parallel is not None:
            raise ValueError(_PARALLEL)
        given = problem.state
        start = 0 if given is None else min((given.step.get(k, 0) for k in params), default=0)
        if start + problem.steps < self.warm_steps:
            count = start + problem.steps
            raise ValueError(_COLD.format(count=count, start=start, steps=problem.steps, warm=self.warm_steps))

    def forward(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], OptState, Any]:
        self._check(problem, params)
        t = problem.steps - 1
        first = max(0, problem.steps - self.last)
        rngs: dict[int, Any] = {}

        def keep_rng(s: int, p: dict[str, Tensor], state: OptState) -> None:
            if s >= first:
                rngs[s] = rng_state()

        w, state = problem.fit(params, stop=t, before_step=keep_rng)
        # The last step, as Problem.step does it, with a graph through the update alone: its
        # derivative with respect to the gradient is D (elementwise, so a VJP with ones gives it).
        rngs[t] = rng_state()
        p = {k: v.detach().requires_grad_() for k, v in w.items()}
        with torch.enable_grad():
            loss = problem.loss(p, t, detach_tree(problem.hparams), math_sdpa=False)
            g = problem.grads(p, loss, t, create_graph=False)
            leaves = {k: x.detach().requires_grad_() for k, x in g.items() if x is not None}
            new, final = problem.optimizer.update({k: leaves.get(k) for k in g}, state, w)
            moved = [k for k in leaves if new[k].requires_grad]
            ones = [torch.ones_like(new[k]) for k in moved]
            got = torch.autograd.grad([new[k] for k in moved], [leaves[k] for k in moved], ones) if moved else ()
        diag = {k: d.detach() for k, d in zip(moved, got, strict=True)}
        trained = {k: v.detach() for k, v in new.items()}
        final = final.with_tensors([x.detach() for x in final.tensors()])
        if problem.check_finite:
            problem._check_finite(t, (loss, p, g, trained, final))
            problem._read_flags()  # off the CPU the last step's flag waits on the device: read it now (one sync)
            problem._last = ()  # that step's tensors were kept for the message only
        return trained, final, (trained, diag, rngs)

    def backward(
        self, problem: Problem, saved: Any, grads: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor | None], list[Tensor | None]]:
        theta, diag, rngs = saved
        tensors = problem.hparam_tensors()
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in tensors]
        wanted = [x for x in leaves if x.requires_grad]
        result: list[Tensor | None] = [torch.zeros_like(x) for x in wanted]
        u = {k: d * grads[k] for k, d in diag.items() if grads.get(k) is not None}
        norm = _norm(list(u.values())) if u else None
        if wanted and norm is not None and norm > 0:
            live = problem.with_hparam_tensors(leaves)
            step = self.eps / norm

            def grad_hparams(t: int, sign: float) -> tuple[Tensor | None, ...]:
                p = {k: theta[k] + (sign * step).to(u[k]) * u[k] if k in u else theta[k] for k in theta}
                with torch.enable_grad(), replay_rng(rngs[t]):
                    loss = live.loss(p, t, math_sdpa=False)
                    if not loss.requires_grad:
                        return (None,) * len(wanted)
                    return torch.autograd.grad(loss, wanted, allow_unused=True)

            total: list[Tensor | None] = [None] * len(wanted)
            for t in sorted(rngs):
                plus, minus = grad_hparams(t, 1.0), grad_hparams(t, -1.0)
                for i, (a, b) in enumerate(zip(plus, minus, strict=True)):
                    if a is None or b is None:
                        continue
                    term = (a - b) / (2 * step * len(rngs)).to(a)
                    total[i] = term if total[i] is None else total[i] + term
            result = total
        supply = iter(result)
        return {}, [next(supply) if x.requires_grad else None for x in leaves]
