"""Who writes the buffers a module updates in place (BatchNorm's running statistics).

The rule, for ``nestgrad.call()`` and ``nestgrad.train()`` alike: nestgrad never writes a
tensor that belongs to your module, nor one you passed to ``ng.train``. Outside a training run,
``ng.call`` runs the module's own buffers on throwaway copies, and updates in place only the
buffer tensors you pass it (as ``module(x)`` updates its own). Inside a run, ``Problem.loss``
installs a ``RunBuffers`` that ``ng.call`` reads: the module's own buffers, and the buffers
given to ``ng.train`` in ``params``, are replaced by copies the run owns. Training steps advance
those copies (once per step, as ordinary training does); replays of a step (Reverse's
recomputation, ZerothOrder's perturbed runs, the backward evaluations of Implicit and FiniteDiff)
get fresh throwaway copies, so they never advance anything.

Replays on throwaway copies give the losses of training as long as the loss does not read the
buffers it updates: true for BatchNorm in train mode, which normalizes with the batch's statistics
and only writes the running ones. Eval-mode BatchNorm reads them and writes nothing, so they stay
constant through the run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

_DISCARDED = (
    "nestgrad.train: a module updated buffers in place during training: {names} changed (BatchNorm in "
    "train mode also updates running_mean and running_var). They were not in params, so the run updated "
    "copies of them, which are now discarded: your module's buffers are unchanged. To get the trained "
    "buffers, pass them in params, e.g. params={{**dict(model.named_parameters()), "
    "**dict(model.named_buffers())}}: ng.train then returns them under their names. If they should not "
    "move, use eval mode (model.eval()), where BatchNorm normalizes with its running statistics."
)


@dataclass
class _Copy:
    original: Tensor  # kept alive so that its id() stays unique while the run lasts
    copy: Tensor
    version: int  # copy._version when it was made: a later value means it was written
    name: str


class RunBuffers:
    """The buffer copies of one training run, keyed by the identity of the tensor they replace.

    Args:
        given: the tensors passed to ``ng.train`` without ``requires_grad`` (frozen weights and
            buffers), by name. Those that a module uses as buffers are run on copies, and the
            trained copies are returned under these names.
    """

    def __init__(self, given: Mapping[str, Tensor] | None = None) -> None:
        self._given = dict(given or {})
        self._given_ids = {id(v): k for k, v in self._given.items()}
        self._copies: dict[int, _Copy] = {}
        #: The module weights ng.call ran with because params left them out: id -> (name, tensor).
        #: A method that re-runs steps in its backward pass reads them again (methods/_base.py ``Reads``).
        self.module_weights: dict[int, tuple[str, Tensor]] = {}

    def read(self, name: str, weight: Tensor) -> None:
        """Note that ``ng.call`` ran a module with its own ``weight`` (left out of the params it was given)."""
        if id(weight) not in self.module_weights:
            self.module_weights[id(weight)] = (name, weight)

    def owns(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` was given to ``ng.train``, so that the run must use its copy."""
        return id(tensor) in self._given_ids

    def copy(self, original: Tensor, name: str) -> Tensor:
        """The run's copy of ``original`` (made at its first use), which a module may write in place."""
        entry = self._copies.get(id(original))
        if entry is None or entry.original is not original:
            copy = original.detach().clone()
            entry = self._copies[id(original)] = _Copy(original, copy, _version(copy), name)
        return entry.copy

    def replaced(self, original: Tensor, new: Tensor) -> None:
        """Record that a module assigned ``new`` to the slot that held the run's copy of ``original``."""
        entry = self._copies.get(id(original))
        if entry is not None and new is not entry.copy:
            entry.copy, entry.version = new.detach(), -1

    def has_copies(self) -> bool:
        """Whether a module ran on buffer copies of this run (compiled steps do not advance them)."""
        return bool(self._copies)

    def throwaway(self) -> RunBuffers:
        """Fresh copies for one replay: the same tensors are replaced, nothing the run owns is written."""
        fresh = RunBuffers()
        fresh._given, fresh._given_ids = self._given, self._given_ids
        return fresh

    def trained(self) -> dict[str, Tensor]:
        """The run's copies of the tensors given to ``ng.train``, under their names there."""
        out = {}
        for key, entry in self._copies.items():
            name = self._given_ids.get(key)
            if name is not None and self._given[name] is entry.original:
                out[name] = entry.copy
        return out

    def warn_discarded(self) -> None:
        """Warn when buffers that the run does not return (they were not given) were written."""
        changed = [
            e.name for key, e in self._copies.items() if key not in self._given_ids and _version(e.copy) != e.version
        ]
        if changed:
            names = ", ".join(repr(n) for n in changed[:4]) + (
                f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            )
            warnings.warn(_DISCARDED.format(names=names), UserWarning, stacklevel=3)


def _version(t: Tensor) -> int:
    """``t._version``, a count of in-place writes (no device sync); inference tensors keep none."""
    return -2 if t.is_inference() else t._version


_current: ContextVar[RunBuffers | None] = ContextVar("nestgrad_run_buffers", default=None)


def current() -> RunBuffers | None:
    """The buffers of the training run whose ``loss_fn`` is running now, or ``None`` outside one.

    ``None`` while torch.compile traces a step (``_compile.py``): compiled steps run only where the
    run has no buffer copies, and the module weights ng.call reads were noted by the eager first step.
    """
    if torch.compiler.is_compiling():
        return None
    return _current.get()


@contextlib.contextmanager
def running(buffers: RunBuffers) -> Iterator[None]:
    """Make ``buffers`` the ones ``nestgrad.call()`` uses until the block exits."""
    token = _current.set(buffers)
    try:
        yield
    finally:
        _current.reset(token)
