"""How much memory a run will hold, measured before or at its first step, and how much the device has."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor


def available_bytes(device: torch.device) -> int | None:
    """Memory that ``device`` can still give, in bytes; ``None`` where nestgrad cannot tell.

    The CPU: ``MemAvailable`` of ``/proc/meminfo`` plus free swap (Linux), else the free pages of
    ``os.sysconf``. CUDA: the driver's free memory plus what torch's caching allocator holds unused.
    """
    if device.type == "cpu":
        return _cpu_available()
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except RuntimeError:
            return None
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return None


def _cpu_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        if "MemAvailable" in info:
            return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def nbytes(tensors: Iterable[Tensor]) -> int:
    """The bytes of the elements of ``tensors`` (shape times element size; no device sync)."""
    return sum(x.numel() * x.element_size() for x in tensors)


def size(n: float) -> str:
    """``n`` bytes for a message: ``"3.1 GiB"``, ``"512 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def best_checkpoint_every(steps: int) -> tuple[int, int]:
    """The ``k`` of ``Reverse(checkpoint_every=k)`` that stores the fewest copies, and how many it stores.

    The backward pass holds ``ceil(steps / k)`` checkpoints and the ``k`` states of the segment it
    replays: the sum is smallest near ``k = sqrt(steps)``.
    """
    k = max(1, round(math.sqrt(steps)))
    return k, -(-steps // k) + k


class SavedBytes:
    """Counts the bytes autograd saves for backward while the block runs (``saved_tensors_hooks``).

    Storages are counted once each, and those of ``exclude`` (tensors that exist anyway, such as
    the step's inputs and its batch) not at all: what is left is what recording the step adds.
    Meant for one step: the hook runs once per saved tensor.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.bytes = 0
        self._seen = {_key(x) for x in exclude}

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedBytes]:
        def pack(x: Tensor) -> Any:
            key = _key(x)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += _bytes(x)
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            yield self


def _bytes(x: Tensor) -> int:
    try:
        return x.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return x.numel() * x.element_size()


def _key(x: Tensor) -> tuple[Any, int]:
    try:
        return x.device, x.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (functorch wrappers): by identity
        return "id", id(x)
