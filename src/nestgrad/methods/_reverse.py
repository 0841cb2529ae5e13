"""``Reverse``: exact reverse mode that stores the trajectory instead of the autograd graph."""

from __future__ import annotations

import dataclasses
import threading
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from .._data import Batches, ReplayError
from .._problem import is_out_of_memory
from .._rng import _RNG_DIFFERS, RngLog, RngState, replay_rng, rng_key, rng_state, threads_cause
from ..optim._base import OptState
from ._base import AdjointMethod
from ._memory import available_bytes, best_checkpoint_every, nbytes, size
from ._revolve import ADVANCE, FREE, RESTORE, STORE, backward_actions, optimal_advances, training_stores

if TYPE_CHECKING:
    from .._problem import Problem


@dataclass(frozen=True)
class Reverse(AdjointMethod):
    """Exact reverse mode without keeping the autograd graph of every step.

    The forward pass is plain first-order training that stores the weights and
    optimizer state before each step (or before every ``checkpoint_every``-th step),
    and the RNG state there when the steps that follow draw random numbers. The
    backward pass walks the steps in reverse: it recomputes each step with a graph,
    takes its vector-Jacobian product, and frees it. The result equals ``Unroll`` to float precision.

    Memory: ``T`` copies of weights and state, ``T/k + k`` with
    ``checkpoint_every=k`` (``k ≈ √T`` is the classic choice), or ``c`` with
    ``checkpoints=c``, against ``T`` full autograd graphs for ``Unroll``. Time: about
    one extra forward and backward per step (two with ``checkpoint_every``; with
    ``checkpoints=c``, each step runs at most ``r`` times without a graph, training's
    run included, where ``r`` is the smallest integer with ``C(c + r, c) >= T``:
    ``r = 4`` for ``T = 1000, c = 10``, 2.6 recomputations per step on average).

    Randomness (dropout) replays exactly; batches from sequences and callables are
    re-read (and checked against a fingerprint taken in training), and batches from
    iterators are stored. Attention runs on the math kernel in training as in the
    recomputation (which needs its double backward), so both compute the same thing.
    A recomputed step that differs from training raises a ``RuntimeError`` naming the
    cause where nestgrad can tell it: a different batch, other random numbers (another
    thread drawing from torch's global generator, or a dropout switched to ``.eval()``),
    else a different loss.

    Args:
        checkpoint_every: store the trajectory every ``k`` steps only and recompute
            the steps in between during the backward pass. ``None`` stores every step.
        checkpoints: hold at most ``c`` stored (weights, optimizer state) snapshots at
            once, the start included, and recompute the others in the backward pass on
            Griewank and Walther's binomial (revolve) schedule, which recomputes the fewest
            steps any schedule with ``c`` snapshots can: ``r·T - C(c + r, c + 1) - (T - 1)``
            steps without a graph, besides the ``T`` it reverses (``r`` as above). As revolve
            counts, the state being advanced is not a snapshot: until the last step is
            reversed, that is the last step's input, kept by reference when the schedule did
            not store it. ``c >= T`` is not an error: it stores every step, as ``Reverse()``
            does (no recomputation, from ``c = T - 1`` on); ``c = 1`` stores only the start and
            recomputes ``T(T - 1)/2 - (T - 1)`` steps. An int ``>= 1``; not together with
            ``checkpoint_every``.

    Examples:
        >>> trained = nestgrad.train(loss_fn, params, opt, data, steps=1000, hparams=A,
        ...                          method=nestgrad.Reverse(checkpoint_every=32))
        >>> trained = nestgrad.train(loss_fn, params, opt, data, steps=1000, hparams=A,
        ...                          method=nestgrad.Reverse(checkpoints=10))  # 10 snapshots
    """

    checkpoint_every: int | None = None
    checkpoints: int | None = None

    differentiates_state: ClassVar[bool] = True
    replays_steps: ClassVar[bool] = True
    nonfinite_hint: ClassVar[str] = (
        "The adjoint pulled back through the stored steps overflowed or met an infinite derivative: with "
        "Adam/RMSprop/Adagrad keep eps_root > 0 (the default 1e-30), since sqrt has an infinite derivative "
        "at 0; otherwise look for sqrt, norm or pow at exactly 0 in loss_fn, or lower a learning rate at "
        "which training is near divergence."
    )

    def __post_init__(self) -> None:
        k = self.checkpoint_every
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(
                f"nestgrad.Reverse: checkpoint_every must be None (store every step) or an int >= 1; got {k!r}."
            )
        c = self.checkpoints
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(_BAD_CHECKPOINTS.format(c=c))
        if c is not None and k is not None:
            raise ValueError(_BOTH.format(k=k, c=c))

    def batches(self, data: Any, steps: int) -> Batches:
        return Batches(data, steps, keep=True)

    def forward(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], OptState, Any]:
        problem = dataclasses.replace(problem, math_attention=True)  # the kernel the recomputation needs
        own = problem.state is None
        if self.checkpoints is not None:
            trajectory: _Trajectory = _Snapshots(problem.steps, self.checkpoints, own_state=own)
        else:
            trajectory = _Trajectory(problem.steps, self.checkpoint_every or 1, own_state=own)
        trained, state = problem.fit(params, before_step=trajectory.save, after_step=trajectory.save_loss)
        return trained, state, trajectory

    def backward(
        self, problem: Problem, saved: Any, grads: dict[str, Tensor], state_grads: list[Tensor | None] | None = None
    ) -> tuple[dict[str, Tensor | None], list[Tensor | None], list[Tensor | None]]:
        trajectory: _Trajectory = saved
        problem = dataclasses.replace(problem, math_attention=True)
        every = trajectory.every
        originals = problem.hparam_tensors()
        leaves = [h.detach().requires_grad_(h.requires_grad) for h in originals]
        live = problem.with_hparam_tensors(leaves)
        wanted = [h for h in leaves if h.requires_grad]
        grad_hp: list[Tensor | None] = [None] * len(wanted)
        owned = [False] * len(wanted)  # grad_hp[i] is a sum this pass allocated: later terms go in place
        grad_p: dict[str, Tensor | None] = dict(grads)
        # None: the final state does not reach the loss (unless it was returned and differentiated)
        grad_s: list[Tensor | None] | None = state_grads if any(g is not None for g in state_grads or []) else None
        if isinstance(trajectory, _Snapshots):
            grad_p, grad_s = _binomial(problem, live, trajectory, grad_p, grad_s, wanted, grad_hp, owned)
        segments = range(0, problem.steps, every) if every else range(0)  # none left after _binomial
        for start in reversed(segments):
            stop = min(start + every, problem.steps)
            segment = start // every
            first = trajectory.rngs.start(segment)
            p, s = trajectory.checkpoint(start)
            states = {start: (p, s, first)}
            losses, known = [], _SAME_INPUTS
            unset = rng_key(rng_state()) if first is None else None  # to see whether the replay draws anyway
            for t in range(start, stop - 1):  # recompute the states inside the segment, and their RNG states
                with replay_rng(states[t][2]), torch.no_grad():
                    p, s, loss = problem.step(p, s, t, create_graph=False)
                    p = {k: v.detach() for k, v in p.items()}
                    states[t + 1] = (p, s, None if first is None else rng_state())
                losses.append((t, loss))
            for t in reversed(range(start, stop)):
                p, s, rng = states.pop(t)
                grad_p, grad_s, step_hp, loss, end = _vjp(live, t, rng, p, s, grad_p, grad_s, wanted)
                _accumulate(grad_hp, step_hp, owned)
                del step_hp  # this step's terms: summed into grad_hp, not held through the next step
                if t == stop - 1:  # the whole segment has been replayed: first its RNG, then its losses
                    where = f"step {t}" if start == t else f"steps {start}-{t}"
                    if trajectory.rngs.check_end(segment, first, end, where, "Reverse"):
                        known = _NO_DRAWS.format(steps=where)
                    elif unset is not None and rng_key(end) != unset:
                        known = _NEW_DRAWS.format(steps=where)
                    for u, recomputed in losses:
                        _check_replay(u, recomputed, trajectory, known)
                _check_replay(t, loss, trajectory, known)
        if problem.state is not None:  # a given initial state: its tensors get the state's cotangents
            supply = iter(grad_hp)
            grad_state = grad_s if grad_s is not None else [None] * len(problem.state.tensors())
            return grad_p, [next(supply) if h.requires_grad else None for h in originals], grad_state
        if grad_s is not None and wanted:  # hyperparameters that shape the initial state (Rprop's lr, ...)
            with torch.enable_grad():
                init = live.optimizer.init(trajectory.checkpoint(0)[0]).tensors()
                pairs = [(x, g) for x, g in zip(init, grad_s, strict=True) if g is not None and x.requires_grad]
                if pairs:
                    outs, cots = zip(*pairs, strict=True)
                    got = torch.autograd.grad(outs, wanted, cots, allow_unused=True)
                    grad_hp = [a if b is None else b if a is None else a + b for a, b in zip(grad_hp, got, strict=True)]
        supply = iter(grad_hp)
        return grad_p, [next(supply) if h.requires_grad else None for h in originals], []


class _Trajectory:
    """Checkpoints, RNG states and losses of a run, in buffers allocated once.

    Keeping one small tensor per step alive between each step's large, short-lived
    activations fragments the heap: glibc then holds 3-6 times the bytes stored. One
    buffer per tensor, written in place, does not. RNG states are kept per checkpoint,
    and only where the steps that follow draw random numbers (``RngLog``).

    The start of the run is kept by reference, not copied: the weights are ``train``'s
    private clones and a fresh optimizer state is the run's own, and neither is ever
    written in place (updates are out of place, and a write by ``loss_fn`` raises). So a
    run of ``T`` steps holds ``T`` copies of the weights and state, with the final ones,
    as an unrolled graph does. A state given to ``train`` is the caller's, so it is copied.
    """

    def __init__(self, steps: int, every: int, own_state: bool = True) -> None:
        self.steps, self.every, self.own_state = steps, every, own_state
        self.first: list[Tensor] = []
        self.buffers: list[Tensor] = []
        self.names: list[str] = []
        self.template: OptState | None = None
        self.counts: dict[int, dict[str, int]] = {}
        self.training_steps: dict[int, int | None] = {}  # OptState.count at each checkpoint (schedules)
        self.rngs = RngLog(steps, every)
        self.losses = torch.empty(steps, dtype=torch.float64)

    def save(self, t: int, params: dict[str, Tensor], state: OptState) -> None:
        tensors = [*params.values(), *state.tensors()]
        if t == 0:
            n = -(-self.steps // self.every) - 1  # checkpoints after the first
            self.buffers = self._allocate(n, tensors) if n else []
            self.names, self.template = list(params), state
            own = len(params) if not self.own_state else len(tensors)
            self.first = [x.detach() if i < own else x.detach().clone() for i, x in enumerate(tensors)]
        elif t % self.every == 0:
            for buffer, x in zip(self.buffers, tensors, strict=True):
                buffer[t // self.every - 1].copy_(x)
        if t % self.every == 0:
            self.counts[t] = dict(state.step)
            self.training_steps[t] = state.count
        self.rngs.record(t)

    def _allocate(self, n: int, tensors: list[Tensor]) -> list[Tensor]:
        """One buffer of ``n`` rows per tensor; raise before allocating when they cannot fit in memory."""
        per_copy = nbytes(tensors)
        device = tensors[0].device if tensors else torch.device("cpu")
        available = available_bytes(device)
        if available is not None and n * per_copy > available:
            why = f"{device} has {size(available)} available"
            raise torch.OutOfMemoryError(self._too_big(n, per_copy, why, available))
        try:
            return [x.new_empty((n, *x.shape)) for x in tensors]
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            raise torch.OutOfMemoryError(self._too_big(n, per_copy, "the allocation failed", None)) from err

    def _too_big(self, n: int, per_copy: int, why: str, available: int | None) -> str:
        k, copies = best_checkpoint_every(self.steps)
        fits = available is None or copies * per_copy <= available
        instead = _FEWER.format(k=k, copies=copies, need=size(copies * per_copy)) if fits else ""
        if not fits:
            instead = _NOT_EVEN.format(k=k, copies=copies, need=size(copies * per_copy))
        if available is not None and available >= 2 * per_copy:  # binomial checkpointing: any number of copies
            c = min(available // (2 * per_copy), self.steps)
            instead += _BINOMIAL_FITS.format(c=c, extra=optimal_advances(self.steps, c) - (self.steps - 1))
        return _TOO_BIG.format(
            n=n, per=size(per_copy), need=size(n * per_copy), why=why, steps=self.steps, every=self.every,
            instead=instead,
        )  # fmt: skip

    @property
    def threads(self) -> int:
        """The most Python threads seen running during training."""
        return self.rngs.threads

    def save_loss(self, t: int, loss: Tensor) -> None:
        if t == 0:
            self.losses = loss.new_empty(self.steps)
        self.losses[t] = loss
        if t == self.steps - 1:
            self.rngs.record(self.steps)

    def checkpoint(self, t: int) -> tuple[dict[str, Tensor], OptState]:
        assert self.template is not None
        values = self.first if t == 0 else [buffer[t // self.every - 1] for buffer in self.buffers]
        n = len(self.names)
        state = self.template.with_tensors(values[n:])
        state = OptState(self.counts[t], state.slots, self.training_steps[t])
        return dict(zip(self.names, values[:n], strict=True)), state


class _Snapshots(_Trajectory):
    """At most ``c`` stored states at once, on the binomial schedule (``_revolve.py``), in buffers allocated once.

    ``min(c, T) - 1`` rows per tensor besides the start (kept by reference, as in ``_Trajectory``):
    training stores the states the schedule stores before its first reversed step, and the
    backward pass reuses the rows it frees. The schedule counts, as revolve does, one working state
    besides the snapshots: at the end of training it is state ``T - 1``, the input of the last step,
    which is kept by reference until that step is reversed when the schedule did not store it
    (with ``c = 1``, or where the schedule's last part has one snapshot left). Each snapshot keeps the
    RNG state at its step (about 5 KB on the CPU), and training keeps a hash of the RNG state before
    every step and after the last, so that each recomputed step is checked against training on its own.
    """

    def __init__(self, steps: int, snapshots: int, own_state: bool = True) -> None:
        super().__init__(steps, 1, own_state)
        self.every = 0  # no segments: ``Reverse.backward`` runs ``_binomial`` instead
        self.snapshots = min(snapshots, steps)
        self.requested = snapshots
        self.stores = set(training_stores(steps, self.snapshots))
        self.rows: dict[int, int] = {}  # stored step -> its row in the buffers
        self.working: list[Tensor] | None = None  # state steps - 1 by reference, when not stored
        self.used = False  # whether a backward pass ran (and reused the rows training filled)
        self.free_rows: list[int] = []
        self.rng: dict[int, RngState] = {}
        self.hashes = array("q")  # hash of the RNG state before step t (t = steps: after the last), 8 bytes each
        self.max_threads = 1

    @property
    def threads(self) -> int:
        return self.max_threads

    def _record_rng(self) -> RngState:
        self.max_threads = max(self.max_threads, threading.active_count())
        state = rng_state()
        self.hashes.append(hash(rng_key(state)))
        return state

    def save(self, t: int, params: dict[str, Tensor], state: OptState) -> None:
        rng = self._record_rng()
        tensors = [*params.values(), *state.tensors()]
        if t == 0:
            n = self.snapshots - 1
            self.buffers = self._allocate(n, tensors) if n else []
            self.free_rows = list(reversed(range(n)))
            self.names, self.template = list(params), state
            own = len(params) if not self.own_state else len(tensors)
            self.first = [x.detach() if i < own else x.detach().clone() for i, x in enumerate(tensors)]
        self.keep(t, params, state, rng)

    def keep(self, t: int, params: dict[str, Tensor], state: OptState, rng: RngState) -> None:
        """What training keeps of state ``t``: a snapshot where the schedule stores one, else the working state."""
        if t in self.stores:
            self.store(t, params, state, rng)
        elif t == self.steps - 1:  # the working state the backward pass starts from
            self.working = [x.detach() for x in [*params.values(), *state.tensors()]]
            self.rng[t], self.counts[t], self.training_steps[t] = rng, dict(state.step), state.count

    def reset(self) -> None:
        """Drop every snapshot but the start's, to store training's again (a second backward pass)."""
        for t in [t for t in self.rng if t != 0]:
            self.free(t)
        self.working = None

    def store(self, t: int, params: dict[str, Tensor], state: OptState, rng: RngState) -> None:
        """Keep state ``t`` (weights, optimizer state, the RNG state before step ``t``) as a snapshot."""
        if t != 0:
            row = self.free_rows.pop()
            for buffer, x in zip(self.buffers, [*params.values(), *state.tensors()], strict=True):
                buffer[row].copy_(x)
            self.rows[t] = row
        self.rng[t] = rng
        self.counts[t] = dict(state.step)
        self.training_steps[t] = state.count

    def free(self, t: int) -> None:
        """Drop the snapshot of state ``t`` (the start stays: it is held by reference, and read at the end)."""
        if t != 0:
            if t in self.rows:
                self.free_rows.append(self.rows.pop(t))
            else:
                self.working = None
            del self.rng[t], self.counts[t], self.training_steps[t]

    def save_loss(self, t: int, loss: Tensor) -> None:
        if t == 0:
            self.losses = loss.new_empty(self.steps)
        self.losses[t] = loss
        if t == self.steps - 1:
            self._record_rng()

    def checkpoint(self, t: int) -> tuple[dict[str, Tensor], OptState]:
        assert self.template is not None
        if t == 0:
            values = self.first
        elif t in self.rows:
            values = [buffer[self.rows[t]] for buffer in self.buffers]
        else:
            assert self.working is not None and t == self.steps - 1
            values = self.working
        n = len(self.names)
        state = self.template.with_tensors(values[n:])
        state = OptState(self.counts[t], state.slots, self.training_steps[t])
        return dict(zip(self.names, values[:n], strict=True)), state

    def check(self, t: int, start: RngState, end: RngState, loss: Tensor) -> None:
        """Raise if recomputing step ``t`` from ``start`` drew other random numbers, or gave another loss."""
        known = _SAME_INPUTS
        if hash(rng_key(end)) != self.hashes[t + 1]:
            where = f"step {t}"
            drew = self.hashes[t] != self.hashes[t + 1]
            if drew and rng_key(end) == rng_key(start):
                known = _NO_DRAWS.format(steps=where)
            elif not drew:
                known = _NEW_DRAWS.format(steps=where)
            else:
                cause = threads_cause(self.threads)
                raise ReplayError(_RNG_DIFFERS.format(method="Reverse", steps=where, cause=cause))
        _check_replay(t, loss, self, known)

    def _too_big(self, n: int, per_copy: int, why: str, available: int | None) -> str:
        fit = self.snapshots // 2 if available is None else available // (2 * max(per_copy, 1))
        fit = max(1, min(fit, self.steps))
        extra = optimal_advances(self.steps, fit) - (self.steps - 1)
        return _SNAPSHOTS_TOO_BIG.format(
            c=self.requested, n=n, per=size(per_copy), need=size(n * per_copy), why=why, fit=fit, extra=extra,
            steps=self.steps,
        )  # fmt: skip


def _binomial(
    problem: Problem,
    live: Problem,
    trajectory: _Snapshots,
    grad_p: dict[str, Tensor | None],
    grad_s: list[Tensor | None] | None,
    wanted: list[Tensor],
    grad_hp: list[Tensor | None],
    owned: list[bool],
) -> tuple[dict[str, Tensor | None], list[Tensor | None] | None]:
    """Reverse's backward pass on the binomial schedule: pull the cotangents back to the start.

    Sums the hyperparameters' terms into ``grad_hp`` (in place) and returns the cotangents of the
    initial weights and state. Every recomputed step, with or without a graph, is checked against
    training (its RNG state and its loss) before the next one runs.
    """
    if trajectory.used:  # a second backward pass (retain_graph=True) reused training's rows: store them again
        _retrain(problem, trajectory)
    trajectory.used = True
    current: tuple[dict[str, Tensor], OptState, RngState] | None = None
    for kind, t in backward_actions(trajectory.steps, trajectory.snapshots):
        if kind == RESTORE:
            current = (*trajectory.checkpoint(t), trajectory.rng[t])
        elif kind == ADVANCE:
            assert current is not None
            p, s, rng = current
            with replay_rng(rng), torch.no_grad():
                p, s, loss = problem.step(p, s, t, create_graph=False)
                end = rng_state()
            current = None  # the step's inputs are freed before its outputs are checked and kept
            trajectory.check(t, rng, end, loss)
            current = ({k: v.detach() for k, v in p.items()}, s, end)
            del p, s
        elif kind == STORE:
            assert current is not None
            trajectory.store(t, *current)
        elif kind == FREE:
            trajectory.free(t)
        else:  # REVERSE
            assert current is not None
            p, s, rng = current
            current = None
            grad_p, grad_s, step_hp, loss, end = _vjp(live, t, rng, p, s, grad_p, grad_s, wanted)
            del p, s
            _accumulate(grad_hp, step_hp, owned)
            del step_hp  # this step's terms: summed into grad_hp, not held through the next step
            trajectory.check(t, rng, end, loss)
            if t == trajectory.steps - 1 and trajectory.working is not None:
                trajectory.free(t)  # the working state training left: reversed, no longer needed
    return grad_p, grad_s


def _retrain(problem: Problem, trajectory: _Snapshots) -> None:
    """Recompute training's first ``T - 1`` steps from the start, keeping what training kept (checked as replays)."""
    trajectory.reset()
    p, s = trajectory.checkpoint(0)
    rng = trajectory.rng[0]
    for t in range(trajectory.steps - 1):
        start = rng
        with replay_rng(start), torch.no_grad():
            p, s, loss = problem.step(p, s, t, create_graph=False)
            rng = rng_state()
        p = {k: v.detach() for k, v in p.items()}
        trajectory.check(t, start, rng, loss)
        trajectory.keep(t + 1, p, s, rng)


_BAD_CHECKPOINTS = (
    "nestgrad.Reverse: checkpoints must be None (no binomial checkpointing) or an int >= 1, the most "
    "(weights, optimizer state) snapshots held at once, the start included; got {c!r}. checkpoints=1 stores "
    "only the start; checkpoints >= steps stores every step, as Reverse() does."
)

_BOTH = (
    "nestgrad.Reverse: checkpoint_every={k} and checkpoints={c} were both given, but they are two ways of "
    "choosing which steps to store: checkpoint_every=k stores every k-th step and recomputes each segment "
    "once; checkpoints=c stores at most c snapshots on the binomial schedule. Give one of them."
)

_SNAPSHOTS_TOO_BIG = (
    "nestgrad.train (Reverse): the snapshots cannot fit in memory: with checkpoints={c} the {steps} steps "
    "store {n} copies of the weights and optimizer state besides the first, {per} each, {need} in all, but "
    "{why}. Reverse(checkpoints={fit}) holds {fit} (the start included; half of what is available) and "
    "recomputes {extra} steps in the backward pass; Forward() (few hyperparameters) and Implicit() (training "
    "to an optimum) keep memory independent of the number of steps; float32 instead of float64 weights need "
    "less."
)

_TOO_BIG = (
    "nestgrad.train (Reverse): the trajectory cannot fit in memory: with checkpoint_every={every} it stores "
    "{n} copies of the weights and optimizer state for {steps} steps (besides the first), {per} each, {need} "
    "in all, but {why}. {instead}Forward() (few hyperparameters) and Implicit() (training to an optimum) keep "
    "memory independent of the number of steps; fewer steps, or float32 instead of float64 weights, need less."
)

_FEWER = (
    "Reverse(checkpoint_every={k}) stores steps/{k} copies and recomputes the {k} steps in between in the "
    "backward pass: {copies} copies at its peak, {need}. "
)

_BINOMIAL_FITS = (
    "Reverse(checkpoints=c) holds at most c copies whatever the number of steps: checkpoints={c} takes half "
    "of what is available, and recomputes {extra} steps in the backward pass (fewer copies, more "
    "recomputation). "
)

_NOT_EVEN = (
    "Even Reverse(checkpoint_every={k}), which holds the fewest copies ({copies} at its peak: steps/{k} "
    "checkpoints and one segment of {k} steps), needs {need}. "
)


def _vjp(
    problem: Problem,
    t: int,
    rng: RngState | None,
    params: dict[str, Tensor],
    state: OptState,
    grad_p: dict[str, Tensor | None],
    grad_s: list[Tensor | None] | None,
    hparams: list[Tensor],
) -> tuple[dict[str, Tensor | None], list[Tensor | None], list[Tensor | None], Tensor, RngState]:
    """Recompute step ``t`` with a graph and pull the cotangents back through it.

    Returns the cotangents of the step's weights and state, the step's contribution to the
    gradients of ``hparams``, the loss, and the RNG state right after the step's loss and
    update (to check the replay).
    """
    with torch.enable_grad(), replay_rng(rng):
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        s = state.with_tensors([x.detach().requires_grad_(x.is_floating_point()) for x in state.tensors()])
        new_p, new_s, loss = problem.step(p, s, t, create_graph=True)
        end = rng_state()
        outs, cots = [], []
        for k, v in new_p.items():
            if grad_p.get(k) is not None and v.requires_grad:
                outs.append(v)
                cots.append(grad_p[k])
        for v, g in zip(new_s.tensors(), grad_s or [], strict=False):
            if g is not None and v.requires_grad:
                outs.append(v)
                cots.append(g)
        inputs = [*p.values(), *(x for x in s.tensors() if x.requires_grad), *hparams]
        # The recomputed weights and state are only where the pull-back starts: hand autograd their
        # graph edges and let the tensors go, so that they are not held while the gradients are made
        # (one copy of the weights less at the peak). The graph keeps any output it saved itself.
        roots: list[Any] = [v if v.grad_fn is None else get_gradient_edge(v) for v in outs]
        del outs, new_p, new_s
        got = torch.autograd.grad(roots, inputs, cots, allow_unused=True) if roots else [None] * len(inputs)
    n = len(p)
    new_grad_p = dict(zip(p, got[:n], strict=True))
    it = iter(got[n : len(inputs) - len(hparams)])
    new_grad_s = [next(it) if x.requires_grad else None for x in s.tensors()]
    return new_grad_p, new_grad_s, list(got[len(inputs) - len(hparams) :]), loss, end


def _accumulate(total: list[Tensor | None], step: list[Tensor | None], owned: list[bool]) -> None:
    """``total += step``, elementwise, in place where ``total`` holds a sum this pass allocated.

    A step's own gradient may alias another tensor of the pass (autograd passes gradients
    through identity-like ops), so it is never written; the first sum is a new tensor, and
    later terms are added into it: with a level's weights as hparams, no third copy of them.
    """
    for i, b in enumerate(step):
        a = total[i]
        if b is None:
            continue
        if a is None:
            total[i] = b
        elif owned[i] and not (a.requires_grad or b.requires_grad):
            a.add_(b)
        else:
            total[i], owned[i] = a + b, True


_NOT_REPLAYED = (
    "nestgrad.Reverse: recomputing step {t} gave the loss {now:.17g}, but training saw {then:.17g}. "
    "Reverse re-runs loss_fn during the backward pass, so loss_fn must compute the same thing "
    "then as during training. {known}Possible causes: a module switched between .train() and .eval() "
    "(dropout, BatchNorm) between ng.train(...) and the backward call; loss_fn reading state that "
    "changed since training (a global, a module attribute, a tensor updated in place); a "
    "nondeterministic kernel (torch.use_deterministic_algorithms(True) rules that out). Keep the "
    "modes as they were until backward() returns, or use nestgrad.Unroll(), which records the graph "
    "instead of recomputing it."
)

_SAME_INPUTS = (
    "nestgrad checked that the batch is the one training read, and that the step drew the same "
    "random numbers (or none), so neither is the cause. "
)

_SAME_BATCH = (
    "nestgrad checked that the batch is the one training read. The random number generator ended "
    "where it did in training, but that proves little here: "
)

_NO_DRAWS = (
    "In training, the global random number generator moved during {steps}, but on replay loss_fn drew "
    "no random numbers: most likely a dropout module was switched to .eval() since training (or "
    "another thread drew random numbers during training). "
)

_NEW_DRAWS = (
    "In training, {steps} drew no random numbers, but on replay the global random number generator "
    "moved: most likely a dropout module was switched to .train() since training (or another thread "
    "drew random numbers meanwhile). "
)


def _check_replay(t: int, now: Tensor, trajectory: _Trajectory, known: str) -> None:
    """Raise instead of returning a wrong gradient when a recomputed step differs from training.

    ``known``: what nestgrad could tell about the batch and the random numbers of the replay.
    """
    then = trajectory.losses[t]
    if torch.allclose(now, then, rtol=1e-6, atol=0.0, equal_nan=True):
        return
    threads = max(trajectory.threads, threading.active_count())
    if threads > 1:  # other threads setting and restoring the global generator can fool the RNG check
        known = (_SAME_BATCH if known is _SAME_INPUTS else known) + threads_cause(threads) + " "
    raise ReplayError(_NOT_REPLAYED.format(t=t, now=now.item(), then=then.item(), known=known))
