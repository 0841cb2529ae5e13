"""Saving and replaying the random number generators, so that a step can be recomputed exactly.

torch has one global generator per device, shared by every thread. nestgrad cannot give a
training run its own (dropout takes no generator), so it checks instead: it records where the
generator stood before and after the steps it will replay, and a replay that leaves the
generator somewhere else drew other random numbers than training did, and raises.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from ._data import ReplayError

RngState = tuple[Tensor, list[Tensor]]


def rng_state() -> RngState:
    """The CPU RNG state, and the CUDA ones when CUDA is in use."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def rng_key(state: RngState) -> bytes:
    """``state`` as bytes, to compare two states (host memory only: no device sync)."""
    cpu, cuda = state
    return b"".join(x.numpy().tobytes() for x in (cpu, *cuda))


@contextlib.contextmanager
def replay_rng(state: RngState | None) -> Iterator[None]:
    """Run the block with the RNG as it was at ``state``, and restore the current RNG afterwards.

    ``None`` (a step that drew no random numbers in training) leaves the RNG alone.
    """
    if state is None:
        yield
        return
    cpu, cuda = state
    with torch.random.fork_rng(devices=range(len(cuda))):
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        yield


_RNG_DIFFERS = (
    "nestgrad.{method}: recomputing {steps} drew other random numbers than training did (the global "
    "generator ended in another state), so the recomputed steps, and the hypergradient, would differ from "
    "training. {cause}"
)

_THREADS = (
    "{n} Python threads were running during training or now. torch's global generator is shared by all "
    "threads: when another thread draws from it (dropout, torch.rand, a random augmentation, or another "
    "run's replay) while a step runs, the numbers the step got depend on timing, and no replay can "
    "reproduce them. Run concurrent trainings in separate processes, give the other thread's sampling its "
    "own torch.Generator, or use nestgrad.Unroll() or nestgrad.Forward(), which do not replay steps. "
    "(If no other thread draws random numbers: a module switched between .train() and .eval() since "
    "training also changes what loss_fn draws; keep the modes until backward() returns.)"
)

_ONE_THREAD = (
    "Only this thread was running, so loss_fn itself drew a different amount of random numbers: most "
    "likely a module switched between .train() and .eval() (dropout draws only in train mode) between "
    "ng.train(...) and the backward call, or what loss_fn samples depends on state that changed. Keep the "
    "modes as they were until backward() returns, or use nestgrad.Unroll(), which records the graph "
    "instead of recomputing it."
)


def threads_cause(threads: int) -> str:
    """The likely cause of a replay that drew other random numbers, given how many threads ran."""
    threads = max(threads, threading.active_count())
    return _THREADS.format(n=threads) if threads > 1 else _ONE_THREAD


class RngLog:
    """Where the global generators stood at the start and end of each segment of ``every`` steps.

    Training calls ``record()`` before every step ``t`` and once after the last one
    (``t = steps``). Only the start of a segment that drew random numbers is stored
    (about 5 KB of CPU state, plus 16 bytes per CUDA device), with a hash of its end
    state; a segment that drew none stores nothing, and its replay leaves the
    generator alone. Replaying a segment from its start regenerates the states in
    between, in order. Storage: ``ceil(steps / every)`` rows at most, allocated once,
    when the first segment that drew random numbers ends.
    """

    def __init__(self, steps: int, every: int) -> None:
        self.steps, self.every = steps, every
        self.segments = -(-steps // every)
        self.starts = torch.empty(0, dtype=torch.uint8)  # (segments, CPU state bytes), allocated lazily
        self.cuda: dict[int, list[Tensor]] = {}
        self.ends: dict[int, int] = {}  # segment -> hash of the end state, for the segments that drew
        self.threads = 1  # the most Python threads seen running during training
        self._pending: tuple[int, bytes, RngState] | None = None

    def record(self, t: int) -> None:
        """Note the generators before step ``t`` (``t = steps``: after the last step)."""
        self.threads = max(self.threads, threading.active_count())
        if t % self.every and t != self.steps:
            return
        state = rng_state()
        key = rng_key(state)
        if self._pending is not None:
            segment, start, started = self._pending
            if key != start:  # the segment drew random numbers: keep where it started
                self._store(segment, started, hash(key))
        self._pending = (t // self.every, key, state) if t < self.steps else None

    def _store(self, segment: int, state: RngState, end: int) -> None:
        cpu, cuda = state
        if self.starts.numel() == 0:
            self.starts = cpu.new_empty((self.segments, cpu.numel()))
        self.starts[segment].copy_(cpu)
        if cuda:
            self.cuda[segment] = cuda
        self.ends[segment] = end

    def start(self, segment: int) -> RngState | None:
        """The state to replay ``segment`` from; ``None`` when it drew no random numbers in training."""
        if segment not in self.ends:
            return None
        return self.starts[segment].clone(), self.cuda.get(segment, [])  # a clone: set_rng_state on a view crashes

    def check_end(self, segment: int, start: RngState | None, end: RngState, steps: str, method: str) -> bool:
        """Raise if replaying ``segment`` from ``start`` drew other random numbers than training.

        Returns whether the replay drew no random numbers although training moved the
        generator. Such a replay is not an error here: with no random numbers, it does not
        matter where the generator stood (the loss comparison still runs, and can say why).
        """
        if start is None:
            return False
        key = rng_key(end)
        if key == rng_key(start):
            return True
        if hash(key) == self.ends[segment]:
            return False
        raise ReplayError(_RNG_DIFFERS.format(method=method, steps=steps, cause=threads_cause(self.threads)))

    def drew(self, segment: int) -> bool:
        """Whether ``segment`` drew random numbers in training (or another thread did meanwhile)."""
        return segment in self.ends
