"""Batches for a training run: one ``batch(t)`` call whatever ``data`` is."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

_HOW = (
    "Pass a sequence of batches (cycled: data=[batch] trains on one batch every step), "
    "an iterator or iterable of batches (a DataLoader is cycled), or a function step -> batch."
)


class Batches:
    """``batches(t)`` is the batch for step ``t`` (0-based), fetched from ``data``.

    Sequences are indexed ``t % len(data)``; iterables that are not iterators
    (a ``DataLoader``) are re-iterated when an epoch ends; iterators are read
    once and raise a clear error when they run out before ``steps``; callables
    are called with ``t``. Batches from iterators are remembered when ``keep``
    is True, or for the steps in ``keep`` when it is a collection of steps, so
    that a method can read them again after training.

    A method that replays a step reads its batch again. Iterator batches are the
    stored objects; batches from a sequence or a function are re-read, so for the
    steps in ``keep`` the first read stores a fingerprint (the structure, shapes and
    dtypes, and two float64 reductions of every Tensor, computed on its device: no
    host sync) and every later read of that step compares with it, raising
    ``ReplayError`` when the batch differs (``data=lambda t: next(it)``).
    """

    def __init__(self, data: Any, steps: int, keep: bool | Container[int] = False) -> None:
        self.steps = steps
        self.keep = keep
        self.seen: dict[int, Any] = {}
        self._prints = _Fingerprints(steps if keep is True else len(keep) if isinstance(keep, Sized) else steps)
        self._iterator: Iterator[Any] | None = None
        self._iterable: Iterable[Any] | None = None
        self._sequence: Sequence[Any] | None = None
        self._function: Callable[[int], Any] | None = None
        if isinstance(data, Tensor):
            raise TypeError(
                f"nestgrad.train: data is a single Tensor of shape {tuple(data.shape)}, which is ambiguous. {_HOW}"
            )
        if isinstance(data, (str, bytes, Mapping)):
            raise TypeError(f"nestgrad.train: data is a {type(data).__name__}; if it is one batch, pass [data]. {_HOW}")
        if isinstance(data, tuple) and data and all(isinstance(x, Tensor) for x in data):
            shapes = ", ".join(str(tuple(x.shape)) for x in data)
            raise TypeError(
                f"nestgrad.train: data is a tuple of Tensors ({shapes}), which reads like one batch (x, y) "
                f"but would be taken as {len(data)} batches of one Tensor each. For one batch every step, "
                f"pass data=[(x, y)]; for several batches, pass a list of them."
            )
        if isinstance(data, Sequence):
            if len(data) == 0:
                raise ValueError(f"nestgrad.train: data is an empty {type(data).__name__}. {_HOW}")
            self._sequence = data
        elif isinstance(data, Iterator):
            self._iterator = data
        elif isinstance(data, Iterable):
            self._iterable = data
        elif callable(data):
            self._function = data
        else:
            raise TypeError(f"nestgrad.train: data must hold batches; got {type(data).__name__}. {_HOW}")

    def __call__(self, t: int) -> Any:
        if self._sequence is not None or self._function is not None:
            if self._function is not None:
                batch = self._function(t)
            else:
                assert self._sequence is not None
                batch = self._sequence[t % len(self._sequence)]
            if self._kept(t):
                self._prints.check(t, batch, self._source)
            return batch
        if t in self.seen:
            return self.seen[t]
        batch = self._next(t)
        if self._kept(t):
            self.seen[t] = batch
        return batch

    def _kept(self, t: int) -> bool:
        return self.keep is True or (not isinstance(self.keep, bool) and t in self.keep)

    def _source(self) -> str:
        if self._function is not None:
            return f"data(t) (the function {getattr(self._function, '__qualname__', type(self._function).__name__)})"
        return f"data[t % len(data)] (a {type(self._sequence).__name__})"

    def _next(self, t: int) -> Any:
        if self._iterable is not None:
            for _ in range(2):
                if self._iterator is None:
                    self._iterator = iter(self._iterable)
                try:
                    return next(self._iterator)
                except StopIteration:
                    self._iterator = None
            raise ValueError(f"nestgrad.train: data ({type(self._iterable).__name__}) yields no batches. {_HOW}")
        assert self._iterator is not None
        try:
            return next(self._iterator)
        except StopIteration:
            raise ValueError(
                f"nestgrad.train: the data iterator ran out after {t} batches, but steps={self.steps}. "
                f"Pass steps={t} or fewer, a list of batches (cycled), itertools.cycle(...), "
                f"or a function step -> batch."
            ) from None


class ReplayError(RuntimeError):
    """A replayed training step would not compute what training computed, so its hypergradient would be wrong."""


_BATCH_DIFFERS = (
    "nestgrad.train: {source} returned a different batch for step {t} on replay than during training "
    "({what}). A method that replays steps (Reverse, ZerothOrder, FiniteDiff, Implicit) reads each batch "
    "again after training, and would differentiate a run that never happened. Pass a list of batches, an "
    "iterator (nestgrad stores its batches), or a function of t alone: one that reads no state it "
    "changes, such as next(it), a counter or a shuffling that runs on every call. Randomness from torch's "
    "global generator is fine: it is replayed."
)

_SAMPLE = 1024  # elements of each Tensor in the position-weighted sum (the plain sum reads all of them)
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _Fingerprints:
    """A cheap fingerprint per step of the batch read in training, to check the batch read on replay.

    The structure (pytree spec, shapes, dtypes, devices, non-Tensor leaves) is hashed on
    the host. The values are two int64 numbers per batch, computed on the device of the
    batch and written into one preallocated buffer, so training does not wait for the
    device: the sum of the bits of every element of every Tensor (read as integers), and
    a position-weighted sum over up to 1024 evenly spaced elements of each, which a
    reordering changes; each Tensor is weighted by its position in the batch. Integer
    sums do not depend on the order of the additions, so the number of threads cannot
    change them. The comparison, at replay only, is exact.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.index: dict[int, int] = {}
        self.keys: list[int] = []
        self.values: Tensor | None = None
        self.weights: dict[tuple[torch.device, int], Tensor] = {}
        self.positions: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}

    def check(self, t: int, batch: Any, source: Callable[[], str]) -> None:
        key, values = self._print(batch)
        row = self.index.get(t)
        if row is None:  # the first read of step t, in training
            row = self.index[t] = len(self.keys)
            self.keys.append(key)
            if values is not None:
                if self.values is None:
                    self.values = torch.empty((self.rows, 2), dtype=torch.int64, device=values.device)
                self.values[row].copy_(values)
            return
        if key != self.keys[row]:
            what = "its structure, shapes or dtypes differ"
            raise ReplayError(_BATCH_DIFFERS.format(source=source(), t=t, what=what))
        if values is None:  # no Tensor elements: the structure and the other leaves, in the key, are the batch
            return
        assert self.values is not None
        if not torch.equal(self.values[row], values.to(self.values.device)):
            raise ReplayError(_BATCH_DIFFERS.format(source=source(), t=t, what="the values of its Tensors differ"))

    def _print(self, batch: Any) -> tuple[int, Tensor | None]:
        """The hash of the structure, and the two sums (``None`` when no Tensor has an element)."""
        leaves, spec = pytree.tree_flatten(batch)
        shape: list[Any] = [spec]
        sums: list[Tensor] = []
        positions: list[int] = []
        for i, x in enumerate(leaves):
            if isinstance(x, Tensor):
                shape.append((tuple(x.shape), x.dtype, x.device))
                if x.numel():
                    sums += self._reduce(x.detach())
                    positions.append(i + 1)
            else:
                shape.append(x if isinstance(x, (int, float, str, bool, type(None))) else type(x))
        if not sums:
            return hash(tuple(shape)), None
        device = sums[0].device
        stacked = torch.stack([v if v.device == device else v.to(device) for v in sums]).view(-1, 2)
        key = (device, tuple(positions))
        weights = self.positions.get(key)
        if weights is None:  # each Tensor weighted by its position in the batch (no int64 matmul on CUDA)
            weights = self.positions[key] = torch.tensor(positions, dtype=torch.int64, device=device)[:, None]
        return hash(tuple(shape)), (stacked * weights).sum(0)

    def _reduce(self, x: Tensor) -> list[Tensor]:
        """Two int64 sums of the bits of ``x``, wrapping around: exact, in any order of the additions."""
        flat = x.reshape(-1)
        if flat.numel() * flat.element_size() % 8 == 0:
            flat = flat.view(torch.int64)  # summed natively: 5x faster than upcasting
            total = flat.sum()
        else:
            flat = flat.view(_INTS.get(x.element_size(), torch.uint8))
            total = flat.sum(dtype=torch.int64)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[: step * _SAMPLE : step]
        key = (x.device, sample.numel())
        weights = self.weights.get(key)
        if weights is None:
            weights = self.weights[key] = torch.arange(1, sample.numel() + 1, dtype=torch.int64, device=x.device)
        return [total, (sample * weights).sum()]
