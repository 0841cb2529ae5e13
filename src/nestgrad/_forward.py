"""``Forward``: forward-mode hypergradients (RTRL), with memory independent of the number of steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import Tensor

from ._methods import AdjointMethod
from .optim._base import OptState

if TYPE_CHECKING:
    from ._train import Problem

Tangent = Tensor | None  # None: the tangent is zero in every direction


class Jacobian(NamedTuple):
    """What :class:`Forward` keeps for the backward pass: the trained weights' Jacobian, and no trajectory.

    Attributes:
        tangents: ``d trained[name] / d hparams`` as a ``[K, *shape]`` Tensor per weight,
            row ``i`` being the derivative along hyperparameter element ``i``; ``None`` where
            the weight does not depend on any hyperparameter.
        slices: for each of :meth:`Problem.hparam_tensors`, the rows ``(start, stop)`` of its
            elements (flattened), or ``None`` for a tensor that does not require grad.
    """

    tangents: dict[str, Tangent]
    slices: list[tuple[int, int] | None]
    state_tangents: list[Tangent]  # d final state tensor / d hparams, in the order of ``OptState.tensors()``


_TOO_MANY = (
    "nestgrad.Forward: the hyperparameters that require grad have {count} elements in total, more than "
    "max_hparams={limit}. Forward mode carries one tangent of the weights and optimizer state per "
    "hyperparameter element, so this run would need about {count}x the memory of the weights and "
    "{count} Jacobian-vector products per step. For many hyperparameters use reverse mode: "
    "nestgrad.Reverse() (exact, memory grows with the number of steps) or nestgrad.Implicit() "
    "(approximate, memory independent of it). If you do want forward mode, raise the limit: "
    "nestgrad.Forward(max_hparams={count})."
)


@dataclass(frozen=True)
class Forward(AdjointMethod):
    r"""Forward-mode hypergradients (real-time recurrent learning; "forward-HG" of Franceschi et al., 2017).

    During training, the derivatives of the weights and of the optimizer state with
    respect to every hyperparameter element are carried along with them, so that the
    trained weights leave the forward pass together with their Jacobian, and the
    backward pass is a single product. Nothing is stored per step: memory does not
    grow with the number of steps, and time grows linearly with the number of
    hyperparameter elements. The result equals :class:`~nestgrad.Unroll` to float
    precision.

    With one step :math:`(W_{t+1}, S_{t+1}) = \Phi_t(W_t, S_t, \lambda)` of the
    optimizer, the tangents :math:`Z_t = dW_t/d\lambda` and :math:`Y_t = dS_t/d\lambda`
    (one row per element of :math:`\lambda`) follow

    .. math::
        Z_{t+1} &= \partial_W \Phi_t\, Z_t + \partial_S \Phi_t\, Y_t + \partial_\lambda \Phi_t \\
        Y_{t+1} &= \text{the same with the state outputs of } \Phi_t \\
        Z_0 &= 0, \quad Y_0 = dS_0/d\lambda \\
        \frac{dL}{d\lambda} &= Z_T^\top\, \nabla_{W_T} L

    where :math:`S_0` is the optimizer's initial state, which may itself depend on a
    hyperparameter (``Adagrad(initial_accumulator_value=...)``, ``Rprop(lr=...)``).
    The hyperparameters are the leaves of ``hparams`` and the optimizer's Tensor
    hyperparameters that require grad; another level's trained weights are fine.

    Each Jacobian-vector product uses the double-backward trick: with a dummy cotangent
    :math:`u`, the step's vector-Jacobian product :math:`g(u) = J^\top u` is built with a
    graph, and :math:`J v = \partial_u \langle g(u), v \rangle` is one more backward pass,
    taken for many directions :math:`v` at once (``is_grads_batched``). This works
    wherever double backward works. (One torch 2.13 gap: ``F.cross_entropy`` on (N, C, d)
    logits, the 2-D NLL loss, raises "grad_input must be contiguous" in this double backward;
    flatten to (N·d, C) logits and (N·d,) targets, which gives the same loss.) It was chosen
    over ``torch.autograd.forward_ad`` and
    ``torch.func.jvp``, which need a forward-mode formula for every backward op: on
    torch 2.13 forward-over-reverse fails through ``F.mse_loss`` (``"ZeroTensors are
    immutable"``, pytorch#123996) and ``F.huber_loss`` (no formula for
    ``huber_loss_backward``), and ``torch.func`` cannot trace the ``torch.autograd.grad``
    that every training step calls.

    Each step runs once, with a graph, and its tangents come from that same graph, so
    dropout and any other randomness is the one training used, and consumes the random
    numbers :class:`~nestgrad.Unroll` would.

    Gradients are w.r.t. the hyperparameters only: the trained weights are not
    connected to the initial weights, and asking for that gradient raises. The backward
    pass treats the Jacobian as a constant, so it gives first derivatives only.

    Cost, with :math:`K` hyperparameter elements and :math:`T` steps: memory
    :math:`O((|W| + |S|)\,K)` for the tangents, independent of :math:`T`; time
    :math:`O(K\,T)` step-JVPs (a batched backward through a double-backward graph of each
    step, so a few times the cost of :math:`K` training steps). Use it for long runs with
    few hyperparameters (learning rates, a few regularization weights, a small per-example
    weighting); for many hyperparameters use :class:`~nestgrad.Reverse` or
    :class:`~nestgrad.Implicit`.

    Args:
        max_hparams: refuse with a ``ValueError`` (instead of running out of memory)
            when the hyperparameters that require grad have more elements than this.
        chunk_size: hyperparameter directions pushed through each step in one batched
            backward pass, which needs about ``chunk_size`` times one step's activations.
            ``None`` pushes all of them at once. Batching saves per-pass overhead, which
            dominates for small models, but a large batch is slower than a few small ones
            for large activations. On one CPU thread, 200 hyperparameters: a 64-32-10 MLP
            took 0.34-0.68 s with ``chunk_size=1``, 0.07 s with 16, 0.08 s with 200; a
            64-256-10 MLP 0.55 s, 0.33-0.35 s and 0.78 s. With 10 hyperparameters, the
            benchmark MLP (1000 examples, 256 hidden units) took about 10% less time and 2.5x
            less memory (29 against 72 MiB) with ``chunk_size=1`` than with 10. Use 1 where
            memory is tight.

    Example:
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> trained = nestgrad.train(loss_fn, params, nestgrad.optim.SGD(lr=lr, momentum=0.9),
        ...                          data, steps=10_000, hparams=A, method=nestgrad.Forward())
        >>> dA, dlr = torch.autograd.grad(val_loss(trained), [A, lr])

    References:
        Franceschi, Donini, Frasconi, Pontil. Forward and Reverse Gradient-Based
        Hyperparameter Optimization. ICML 2017.
        Williams, Zipser. A Learning Algorithm for Continually Running Fully Recurrent
        Neural Networks. Neural Computation, 1989.
    """

    differentiates_params = False
    differentiates_state: ClassVar[bool] = True  # the final state's Jacobian is kept too
    rereads: ClassVar[frozenset[str]] = frozenset()  # the Jacobian is all the backward pass reads
    nonfinite_hint: ClassVar[str] = (
        "The tangents carried through training overflowed or met an infinite derivative: with "
        "Adam/RMSprop/Adagrad keep eps_root > 0 (the default 1e-30), since sqrt has an infinite derivative "
        "at 0; otherwise look for sqrt, norm or pow at exactly 0 in loss_fn, or lower a learning rate at "
        "which the run is near divergence."
    )

    max_hparams: int = 4096
    chunk_size: int | None = 16

    def __post_init__(self) -> None:
        for name, value, allow_none in (
            ("max_hparams", self.max_hparams, False),
            ("chunk_size", self.chunk_size, True),
        ):
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                none = " or None (all directions at once)" if allow_none else ""
                raise ValueError(f"nestgrad.Forward: {name} must be a positive int{none}; got {value!r}.")

    def forward(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], OptState, Jacobian]:
        originals = problem.hparam_tensors()
        slices: list[tuple[int, int] | None] = []
        count = 0
        for h in originals:
            if isinstance(h, Tensor) and h.requires_grad:
                slices.append((count, count + h.numel()))
                count += h.numel()
            else:
                slices.append(None)
        if count > self.max_hparams:
            raise ValueError(_TOO_MANY.format(count=count, limit=self.max_hparams))
        if count == 0:
            trained, state = problem.fit(params)
            return trained, state, Jacobian({k: None for k in params}, slices, [None] * len(state.tensors()))
        leaves = [h.detach().requires_grad_(h.requires_grad) if isinstance(h, Tensor) else h for h in originals]
        live = problem.with_hparam_tensors(leaves)
        wanted = [(h, s) for h, s in zip(leaves, slices, strict=True) if s is not None]
        chunk = self.chunk_size or count
        with torch.enable_grad():
            p = {k: v.detach() for k, v in params.items()}
            state = live.init_state(p)
            dp: list[Tangent] = [None] * len(p)
            given = problem.state is not None  # a given state is a constant here (one with a graph raised)
            ds = [None] * len(state.tensors()) if given else _tangents(state.tensors(), [], [], wanted, count, chunk)
            state = _detached(state)
            for t in live.range():
                p, state, dp, ds = _step(live, t, p, state, dp, ds, wanted, count, chunk)
        kept = ds if problem.returns_state else [None] * len(ds)  # the state's Jacobian only when it is returned
        return p, state, Jacobian(dict(zip(p, dp, strict=True)), slices, kept)

    def backward(
        self,
        problem: Problem,
        saved: Jacobian,
        grads: dict[str, Tensor],
        state_grads: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor | None], list[Tensor | None], list[Tensor | None]]:
        pairs = [(z, grads.get(name)) for name, z in saved.tangents.items()]
        pairs += list(zip(saved.state_tangents, state_grads or [], strict=False))  # a returned state, differentiated
        out: list[Tensor | None] = []
        with torch.no_grad():
            for h, rows in zip(problem.hparam_tensors(), saved.slices, strict=True):
                if rows is None:
                    out.append(None)
                    continue
                start, stop = rows
                total = torch.zeros(stop - start, dtype=h.dtype, device=h.device)
                for z, g in pairs:
                    if z is not None and g is not None:
                        total += (z[start:stop].reshape(stop - start, -1) @ g.flatten().to(z.dtype)).to(h.dtype)
                out.append(total.reshape(h.shape))
        given = [] if problem.state is None else problem.state.tensors()  # no gradient w.r.t. a given state
        return {}, out, [None] * len(given)


def _step(
    problem: Problem,
    t: int,
    params: dict[str, Tensor],
    state: OptState,
    dp: list[Tangent],
    ds: list[Tangent],
    wanted: list[tuple[Tensor, tuple[int, int]]],
    count: int,
    chunk: int,
) -> tuple[dict[str, Tensor], OptState, list[Tangent], list[Tangent]]:
    """Run step ``t`` once with a graph, push the tangents through it, and return everything detached."""
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    s = state.with_tensors([x.detach().requires_grad_(x.is_floating_point()) for x in state.tensors()])
    new_p, new_s, _ = problem.step(p, s, t, create_graph=True)
    inputs = [*p.values(), *s.tensors()]
    tangents = _tangents([*new_p.values(), *new_s.tensors()], inputs, [*dp, *ds], wanted, count, chunk)
    n = len(new_p)
    return {k: v.detach() for k, v in new_p.items()}, _detached(new_s), tangents[:n], tangents[n:]


def _detached(state: OptState) -> OptState:
    return state.with_tensors([x.detach() for x in state.tensors()])


def _tangents(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    tangents: Sequence[Tangent],
    wanted: list[tuple[Tensor, tuple[int, int]]],
    count: int,
    chunk: int,
) -> list[Tangent]:
    """``d outputs / d hparams`` from ``d inputs / d hparams`` (``[count, *shape]`` each), by the chain rule.

    The outputs depend on ``inputs`` and on the hyperparameter leaves in ``wanted``
    (each with its rows); this pushes the tangents of the inputs and the unit
    directions of the hyperparameters through the outputs' graph, ``chunk``
    directions per batched backward pass.
    """
    result: list[Tangent] = [None] * len(outputs)
    live = [i for i, o in enumerate(outputs) if o.requires_grad]
    sources = [(x, z) for x, z in zip(inputs, tangents, strict=True) if z is not None and x.requires_grad]
    if not live:
        return result
    # The double-backward trick: vjp(u) = J^T u is linear in the dummy cotangent u, and
    # the gradient of <vjp(u), v> with respect to u is J v.
    dummies = [torch.zeros_like(outputs[i], requires_grad=True) for i in live]
    ins = [x for x, _ in sources] + [h for h, _ in wanted]
    vjps = torch.autograd.grad([outputs[i] for i in live], ins, dummies, create_graph=True, allow_unused=True)
    n = len(sources)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        pairs: list[tuple[Tensor, Tensor]] = []
        for vjp, (_, z) in zip(vjps[:n], sources, strict=True):
            if vjp is not None and vjp.requires_grad:
                pairs.append((vjp, z[start:stop]))
        for vjp, (h, (a, b)) in zip(vjps[n:], wanted, strict=True):
            if vjp is not None and vjp.requires_grad and a < stop and b > start:
                pairs.append((vjp, _unit_directions(h, a, b, start, stop)))
        if not pairs:
            continue
        try:
            got = torch.autograd.grad(
                [v for v, _ in pairs],
                dummies,
                [d for _, d in pairs],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as err:
            if "grad_input must be contiguous" not in str(err):
                raise
            raise RuntimeError(_NLL_2D) from err
        for i, g in zip(live, got, strict=True):
            if g is None:
                continue
            full = result[i]
            if full is None:
                full = result[i] = g.new_zeros((count, *g.shape[1:]))
            full[start:stop] = g
    return result


_NLL_2D = (
    "nestgrad.Forward: torch 2.13 has no double backward for the 2-D NLL loss with the "
    'cotangents Forward uses ("grad_input must be contiguous"). It comes from '
    "F.cross_entropy / F.nll_loss on (N, C, d) logits, e.g. logits.transpose(1, 2) of a "
    "sequence model. Flatten the tokens instead, which gives the same loss: "
    "F.cross_entropy(logits.flatten(0, 1), labels.flatten()). Or use nestgrad.Unroll() or "
    "nestgrad.Reverse()."
)


def _unit_directions(h: Tensor, a: int, b: int, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of the identity over all hyperparameter elements, restricted to ``h`` (rows ``a:b``)."""
    directions = torch.zeros(stop - start, h.numel(), dtype=h.dtype, device=h.device)
    rows = torch.arange(max(a, start), min(b, stop), device=h.device)
    directions[rows - start, rows - a] = 1
    return directions.reshape(stop - start, *h.shape)
