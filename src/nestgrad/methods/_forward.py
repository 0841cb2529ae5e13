"""``Forward``: forward-mode hypergradients (RTRL), with memory independent of the number of steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from .._data import Batches
from .._problem import is_out_of_memory, out_of_memory
from .._rng import replay_rng, rng_state
from ..optim._base import OptState
from ._base import AdjointMethod

if TYPE_CHECKING:
    from .._problem import Problem

Tangent = Tensor | None  # None: the tangent is zero in every direction
Mode = Literal["auto", "forward", "double-backward"]
_MODES: tuple[str, ...] = ("auto", "forward", "double-backward")


class ForwardRun(NamedTuple):
    """How one ``Forward`` run pushed its tangents through the steps (``Forward.last_run``, ``on_run``).

    Attributes:
        forward_steps: steps whose tangents came from forward-mode AD (``torch.func.jvp``).
        double_backward_steps: steps whose tangents came from the double-backward trick.
        reason: why the double-backward trick ran; ``None`` when it did not. Either
            ``mode='double-backward'``, or the error that forward-mode AD raised at
            ``fallback_step`` (e.g. ``ZeroTensors are immutable`` from ``F.mse_loss``).
        fallback_step: the step at which ``mode="auto"`` switched to the double-backward trick
            for the rest of the run; ``None`` when it did not.
    """

    forward_steps: int
    double_backward_steps: int
    reason: str | None = None
    fallback_step: int | None = None

    @property
    def path(self) -> str:
        """``"forward-mode"``, ``"double-backward"``, or ``"mixed"`` (forward mode, then the fallback)."""
        if not self.double_backward_steps:
            return "forward-mode"
        return "mixed" if self.forward_steps else "double-backward"


class Jacobian(NamedTuple):
    """What ``Forward`` keeps for the backward pass: the trained weights' Jacobian, and no trajectory.

    Attributes:
        tangents: ``d trained[name] / d hparams`` as a ``[K, *shape]`` Tensor per weight,
            row ``i`` being the derivative along hyperparameter element ``i``; ``None`` where
            the weight does not depend on any hyperparameter.
        slices: for each of ``Problem.hparam_tensors()``, the rows ``(start, stop)`` of its
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


_PARALLEL = (
    "nestgrad.Forward(mode='forward'): data-parallel training (ng.train(..., parallel=...)) all-reduces each "
    "step's gradients across ranks, and forward-mode AD (torch.func.jvp) cannot carry that collective. Use "
    "Forward() (mode='auto', which runs the double-backward trick here) or Forward(mode='double-backward')."
)


@dataclass(frozen=True)
class Forward(AdjointMethod):
    r"""Forward-mode hypergradients (real-time recurrent learning; "forward-HG" of Franceschi et al., 2017).

    During training, the derivatives of the weights and of the optimizer state with
    respect to every hyperparameter element are carried along with them, so that the
    trained weights leave the forward pass together with their Jacobian, and the
    backward pass is a single product. Nothing is stored per step: memory does not
    grow with the number of steps, and time grows linearly with the number of
    hyperparameter elements. The result equals ``Unroll`` to float
    precision.

    With one step ``(W_{t+1}, S_{t+1}) = \Phi_t(W_t, S_t, \lambda)`` of the
    optimizer, the tangents ``Z_t = dW_t/d\lambda`` and ``Y_t = dS_t/d\lambda``
    (one row per element of ``\lambda``) follow

    ```text
    Z_{t+1} &= \partial_W \Phi_t\, Z_t + \partial_S \Phi_t\, Y_t + \partial_\lambda \Phi_t \\
    Y_{t+1} &= \text{the same with the state outputs of } \Phi_t \\
    Z_0 &= 0, \quad Y_0 = dS_0/d\lambda \\
    \frac{dL}{d\lambda} &= Z_T^\top\, \nabla_{W_T} L
    ```

    where ``S_0`` is the optimizer's initial state, which may itself depend on a
    hyperparameter (``Adagrad(initial_accumulator_value=...)``, ``Rprop(lr=...)``).
    The hyperparameters are the leaves of ``hparams`` and the optimizer's Tensor
    hyperparameters that require grad; another level's trained weights are fine.

    Each step's Jacobian-vector products are forward-over-reverse: ``torch.func.jvp`` of
    the step (``torch.func.grad`` of the loss, then the optimizer update), ``torch.func.vmap``-ed
    over the hyperparameter directions, ``chunk_size`` at a time. It works on a separate
    evaluation of the step: the training step itself runs first, exactly as in plain
    training and with all of ``train``'s checks, and the forward-mode evaluation reuses its
    batch, its random-generator state and throwaway copies of the buffers, and must reach the
    same loss (to rounding), or it raises.

    Where forward-mode AD fails, the default ``mode="auto"`` switches, for that step and the
    rest of the run, to the **double-backward trick**, which works wherever double backward
    works: with a dummy cotangent ``u``, the step's vector-Jacobian product
    ``g(u) = J^\top u`` is built with a graph, and ``J v = \partial_u \langle g(u), v
    \rangle`` is one more backward pass, taken for many directions ``v`` at once
    (``is_grads_batched``). Both paths are exact (they agree with ``Unroll`` to
    rounding), so the switch never changes a result, only the time. ``Forward.last_run`` (or
    ``on_run``) says which ran and why (a ``ForwardRun``). On torch 2.13, forward mode fails,
    and the fallback runs, for:

    * ``F.mse_loss`` (``"ZeroTensors are immutable"``, pytorch#123996) and ``F.huber_loss``
      (no forward formula for ``huber_loss_backward``), and any other op without a
      forward-mode formula for its backward;
    * random ops (dropout): ``torch.func.vmap`` draws random numbers differently from
      training, so Forward lets vmap refuse them and falls back, which keeps the randomness
      training used (and consumes the random numbers ``Unroll`` would);
    * modules that write buffers in place (BatchNorm in train mode), which functorch refuses;
    * anything else that ``torch.func`` cannot transform (``torch.autograd.grad`` inside
      ``loss_fn``, data-dependent control flow on a tangent, ...).

    The double-backward trick has one torch 2.13 gap of its own: ``F.cross_entropy`` on
    (N, C, d) logits, the 2-D NLL loss, raises "grad_input must be contiguous" in this double
    backward (forward mode handles it); flatten to (N·d, C) logits and (N·d,) targets, which
    gives the same loss.

    Gradients are w.r.t. the hyperparameters only: the trained weights are not
    connected to the initial weights, and asking for that gradient raises. The backward
    pass treats the Jacobian as a constant, so it gives first derivatives only.

    Cost, with ``K`` hyperparameter elements and ``T`` steps: memory
    ``O((|W| + |S|)\,K)`` for the tangents, independent of ``T``; time ``O(K\,T)``
    step-JVPs. In forward mode a step costs two gradients (training's and the forward-mode
    evaluation's) plus ``K`` tangent passes, each about two gradients' worth of arithmetic
    (every matrix product of the forward and backward pass gets two tangent products), while
    ``Unroll`` costs about three gradients per step: Forward takes about
    ``(2 + 2K)/3`` times Unroll's time at best, 1.3x for one hyperparameter and 7x for ten
    (benchmarks/bench_forward.py; the double-backward trick is about 10% slower than forward
    mode there). Use it for long runs with few hyperparameters (learning rates, a few
    regularization weights, a small per-example weighting), where Unroll's memory is the
    problem; for many hyperparameters use ``Reverse`` or
    ``Implicit``.

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
            memory is tight. (These figures are for the double-backward trick; forward mode
            evaluates the step's gradient once per chunk, so there fewer, larger chunks are
            cheaper.)
        mode: ``"auto"`` (forward mode, falling back to the double-backward trick where it
            fails, see above), ``"forward"`` (forward mode only: raise where it fails) or
            ``"double-backward"`` (the double-backward trick for every step).
        on_run: called at the end of every run's forward pass with its ``ForwardRun``
            (which path ran, and why), e.g. ``runs.append``. ``Forward.last_run`` holds the
            latest one too.

    Examples:
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> method = nestgrad.Forward()
        >>> trained = nestgrad.train(loss_fn, params, nestgrad.optim.SGD(lr=lr, momentum=0.9),
        ...                          data, steps=10_000, hparams=A, method=method)
        >>> dA, dlr = torch.autograd.grad(val_loss(trained), [A, lr])
        >>> method.last_run.path  # "double-backward" where forward mode failed (see last_run.reason)
        'forward-mode'

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
    mode: Mode = "auto"
    on_run: Callable[[ForwardRun], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(
                f"nestgrad.Forward: mode must be one of {', '.join(map(repr, _MODES))}; got {self.mode!r}."
            )
        if self.on_run is not None and not callable(self.on_run):
            raise TypeError(f"nestgrad.Forward: on_run must be a callable (e.g. runs.append); got {self.on_run!r}.")
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
        if problem.parallel is not None and self.mode == "forward":
            # torch.func's transforms cannot run the all-reduce of the ranks' gradient tangents.
            raise ValueError(_PARALLEL)
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
        # Each step's batch is read once, then given to every evaluation of that step.
        # The training step and its forward-mode evaluation use the same attention kernel (the math one).
        live = dataclasses.replace(live, batches=Batches(_StepBatch(live.batches), live.steps), math_attention=True)
        wanted = [(h, s) for h, s in zip(leaves, slices, strict=True) if s is not None]
        chunk = self.chunk_size or count
        record = _Record(self.mode)
        if problem.parallel is not None and record.forward_mode:
            record.forward_mode = False
            record.reason = "data-parallel (parallel=...): the double-backward trick all-reduces the tangents"
        with torch.enable_grad():
            p = {k: v.detach() for k, v in params.items()}
            state = live.init_state(p)
            dp: list[Tangent] = [None] * len(p)
            given = problem.state is not None  # a given state is a constant here (one with a graph raised)
            ds = [None] * len(state.tensors()) if given else _tangents(state.tensors(), [], [], wanted, count, chunk)
            state = _detached(state)
            for t in live.range():
                if record.forward_mode:
                    p, state, dp, ds = _forward_step(live, t, p, state, dp, ds, wanted, count, chunk, record)
                else:
                    p, state, dp, ds = _step(live, t, p, state, dp, ds, wanted, count, chunk)
                    record.double_backward_steps += 1
        run = record.result()
        object.__setattr__(self, "_last_run", run)
        if self.on_run is not None:
            self.on_run(run)
        kept = ds if problem.returns_state else [None] * len(ds)  # the state's Jacobian only when it is returned
        return p, state, Jacobian(dict(zip(p, dp, strict=True)), slices, kept)

    @property
    def last_run(self) -> ForwardRun | None:
        """How the most recent run of this object pushed its tangents (``None`` before any run).

        Shared by every run of this object: with one ``Forward`` used by several threads at
        once, use ``on_run`` instead.
        """
        return getattr(self, "_last_run", None)

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


class _Record:
    """What a run did so far: which path the next step takes, and the counts for ``ForwardRun``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.forward_mode = mode != "double-backward"
        self.forward_steps = 0
        self.double_backward_steps = 0
        self.reason: str | None = "mode='double-backward'" if mode == "double-backward" else None
        self.fallback_step: int | None = None

    def fall_back(self, t: int, err: BaseException) -> None:
        self.forward_mode = False
        self.fallback_step = t
        self.reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    def result(self) -> ForwardRun:
        return ForwardRun(self.forward_steps, self.double_backward_steps, self.reason, self.fallback_step)


class _StepBatch:
    """``data(t)`` read once per step: every evaluation of step ``t`` gets the same batch object."""

    def __init__(self, source: Callable[[int], Any]) -> None:
        self.source = source
        self.t: int | None = None
        self.batch: Any = None

    def __call__(self, t: int) -> Any:
        if t != self.t:
            self.batch, self.t = self.source(t), t
        return self.batch


_NO_FORWARD_MODE = (
    "nestgrad.Forward(mode='forward'): forward-mode AD (torch.func.jvp of the training step, vmapped over the "
    "hyperparameter directions) failed at step {t}: {error}. Common causes on torch 2.13: F.mse_loss "
    '("ZeroTensors are immutable"), F.huber_loss (no forward formula for huber_loss_backward), dropout or other '
    "random ops (torch.func.vmap draws random numbers differently from training), and modules that update "
    "buffers in place (BatchNorm in train mode). Use nestgrad.Forward() (mode='auto'), which falls back to the "
    "exact double-backward trick for such runs, or nestgrad.Forward(mode='double-backward')."
)

_OTHER_POINT = (
    "nestgrad.Forward: at step {t}, the forward-mode pass computed another training loss than training did "
    "({other!r} against {loss!r}), so its tangents would belong to another run. loss_fn must compute "
    "the same loss each time it is called for a step: randomness from Python's random or NumPy, or any state "
    "kept between calls, breaks that. Draw random numbers with torch (dropout, torch.rand), or use "
    "nestgrad.Forward(mode='double-backward'), which differentiates the training step itself."
)


def _forward_step(
    problem: Problem,
    t: int,
    params: dict[str, Tensor],
    state: OptState,
    dp: list[Tangent],
    ds: list[Tangent],
    wanted: list[tuple[Tensor, tuple[int, int]]],
    count: int,
    chunk: int,
    record: _Record,
) -> tuple[dict[str, Tensor], OptState, list[Tangent], list[Tangent]]:
    """Step ``t`` as in training (with every check), then its tangents by forward-mode AD.

    The training step runs first, as ``Problem.fit()`` runs it (with a graph only while the
    path from the hyperparameters to the loss is still being checked). Then the tangents are
    pushed through an evaluation of the same step on the same batch, random generator state and
    throwaway buffers; when forward-mode AD fails there, ``mode="auto"`` replays the step with a
    graph and uses the double-backward trick, for this step and the rest of the run.
    """
    before = rng_state()
    if problem.check_path:  # the path check reads the live hyperparameters in the loss's graph
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        new_p, new_s, loss = problem.step(leaves, state, t, create_graph=True)
        new_p, new_s = {k: v.detach() for k, v in new_p.items()}, _detached(new_s)
    else:
        new_p, new_s, loss = problem.step(params, state, t, create_graph=False)
    skip = {k for k in params if new_s.step[k] == state.step[k]}  # no gradient at this step: left as they are
    replay = dataclasses.replace(problem, replay=True, check_path=False, strict=False, check_finite=False)
    try:
        with replay_rng(before):
            losses, tangents = _jvp_tangents(replay, t, params, state, dp, ds, skip, wanted, count, chunk)
    except (RuntimeError, NotImplementedError) as err:
        if is_out_of_memory(err):
            raise out_of_memory("Forward", f"at step {t} of {problem.steps} (chunk_size limits it)") from err
        cause = _transform_error(err)
        if cause is None:
            raise
        if record.mode == "forward":
            raise RuntimeError(_NO_FORWARD_MODE.format(t=t, error=str(cause).splitlines()[0])) from err
        record.fall_back(t, cause)
        with replay_rng(before):
            _, _, dp, ds = _step(replay, t, params, state, dp, ds, wanted, count, chunk)
        record.double_backward_steps += 1
        return new_p, new_s, dp, ds
    for jvp_loss in losses:  # one per chunk of directions
        _check_same_point(t, loss, jvp_loss)
    record.forward_steps += 1
    n = len(params)
    return new_p, new_s, tangents[:n], tangents[n:]


def _transform_error(err: BaseException) -> BaseException | None:
    """The error of torch.func behind ``err``, raised by the forward-mode evaluation; ``None`` for nestgrad's own.

    The training step ran ``loss_fn`` just before without error, so what fails here is the transform.
    nestgrad's translations of such an error keep it as ``__cause__``: ``tasks=`` says what a vmap over the
    tasks refused, e.g. a random op, which here is the vmap over the directions refusing it (also under
    ``Tasks(randomness="different")``, which governs the tasks' vmap only). A nestgrad error without a
    torch cause is about the run itself and propagates.
    """
    if not str(err).startswith("nestgrad."):
        return err
    cause = err.__cause__
    if isinstance(cause, (RuntimeError, NotImplementedError)) and not str(cause).startswith("nestgrad."):
        return cause
    return None


def _check_same_point(t: int, loss: Tensor, jvp_loss: Tensor) -> None:
    """Raise unless the forward-mode pass evaluated step ``t``'s loss where training did.

    Both run the same operations on the same weights and batch, so the losses agree to rounding;
    a batch or random numbers other than training's give another loss. (The updated weights are
    not compared: Adam turns the rounding noise of a gradient that is 0 in exact arithmetic into
    a step of ``lr``, however the gradient was computed.)
    """
    eps = torch.finfo(loss.dtype).eps
    diff = (loss.detach() - jvp_loss.detach()).abs()
    if not diff <= min(1e3 * eps, 1e-2) * loss.detach().abs():  # also catches a NaN that only one of them has
        raise RuntimeError(_OTHER_POINT.format(t=t, loss=float(loss), other=float(jvp_loss)))


def _jvp_tangents(
    problem: Problem,
    t: int,
    params: dict[str, Tensor],
    state: OptState,
    dp: list[Tangent],
    ds: list[Tangent],
    skip: set[str],
    wanted: list[tuple[Tensor, tuple[int, int]]],
    count: int,
    chunk: int,
) -> tuple[list[Tensor], list[Tangent]]:
    """Step ``t``'s loss as each chunk evaluated it, and the tangents of the weights and state after the step.

    Forward-over-reverse: ``torch.func.jvp`` of the step (``torch.func.grad`` of the loss, then
    the optimizer update), ``torch.func.vmap``-ed over ``chunk`` directions at a time. The
    primal inputs are the weights and state slots that have tangents and the hyperparameter
    leaves with rows in the chunk; everything else is a constant of the step. ``skip`` names
    the params without a gradient at this step (the optimizer leaves them and their state).
    """
    names = list(params)
    p_vals = list(params.values())
    s_vals = state.tensors()
    live = problem.hparam_tensors()
    position = {id(h): i for i, h in enumerate(live)}
    consts = [h.detach() for h in live]  # detached: nothing is recorded at autograd's own level
    p_in = [i for i, z in enumerate(dp) if z is not None]
    s_in = [i for i, z in enumerate(ds) if z is not None]
    result: list[Tangent] = [None] * (len(p_vals) + len(s_vals))
    losses: list[Tensor] = []
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        h_in = [(position[id(h)], h, rows) for h, rows in wanted if rows[0] < stop and rows[1] > start]

        def step(
            pd: list[Tensor], sd: list[Tensor], hd: list[Tensor], h_in: list[Any] = h_in
        ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
            pv, sv, hv = list(p_vals), list(s_vals), list(consts)
            for i, x in zip(p_in, pd, strict=True):
                pv[i] = x
            for i, x in zip(s_in, sd, strict=True):
                sv[i] = x
            for (i, _, _), x in zip(h_in, hd, strict=True):
                hv[i] = x
            run = problem.with_hparam_tensors(hv)
            grads, loss = torch.func.grad_and_value(lambda q: run.loss(dict(zip(names, q, strict=True)), t))(pv)
            g = {k: None if k in skip else gk for k, gk in zip(names, grads, strict=True)}
            new, new_state = run.optimizer.update(g, state.with_tensors(sv), dict(zip(names, pv, strict=True)))
            return loss, list(new.values()), new_state.tensors()

        primals = ([p_vals[i] for i in p_in], [s_vals[i] for i in s_in], [consts[i] for i, _, _ in h_in])
        directions = (
            [dp[i][start:stop] for i in p_in],  # type: ignore[index]
            [ds[i][start:stop] for i in s_in],  # type: ignore[index]
            [_unit_directions(h.detach(), a, b, start, stop) for _, h, (a, b) in h_in],
        )
        (loss, _, _), (_, z_p, z_s) = torch.func.vmap(
            lambda d, primals=primals, step=step: torch.func.jvp(step, primals, d), out_dims=(None, 0)
        )(directions)
        losses.append(loss)
        for i, z in enumerate([*z_p, *z_s]):
            full = result[i]
            if full is None:
                full = result[i] = z.new_zeros((count, *z.shape[1:]))
            full[start:stop] = z
    return losses, result


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
