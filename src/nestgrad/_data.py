"""Batches for a training run: one ``batch(t)`` call whatever ``data`` is."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from typing import Any

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
    """

    def __init__(self, data: Any, steps: int, keep: bool | Container[int] = False) -> None:
        self.steps = steps
        self.keep = keep
        self.seen: dict[int, Any] = {}
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
        if self._sequence is not None:
            return self._sequence[t % len(self._sequence)]
        if self._function is not None:
            return self._function(t)
        if t in self.seen:
            return self.seen[t]
        batch = self._next(t)
        if self.keep is True or (not isinstance(self.keep, bool) and t in self.keep):
            self.seen[t] = batch
        return batch

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
