"""Saving and replaying the random number generators, so that a step can be recomputed exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

RngState = tuple[Tensor, list[Tensor]]


def rng_state() -> RngState:
    """The CPU RNG state, and the CUDA ones when CUDA is in use."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replay_rng(state: RngState) -> Iterator[None]:
    """Run the block with the RNG as it was at ``state``, and restore the current RNG afterwards."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=range(len(cuda))):
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        yield
