"""Test settings and shared fixtures.

One torch thread: the tests run tiny models, where a second thread costs more in
synchronisation than it saves (on a 2-core machine shared with other work, several times more).
"""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
# The tests mirror the package's tree (tests/methods, tests/optim, ...); their shared helpers
# (optim_db, distributed_cases) live here, at the top.
sys.path.insert(0, str(Path(__file__).parent))


def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def float64() -> Iterator[None]:
    """float64 as the default dtype for one test: exactness tests compare to 1e-10 and below.

    (torch.optim also keeps scalar state such as ``step`` in the default dtype.)
    """
    yield from _default_dtype(torch.float64)


@pytest.fixture(scope="module")
def float64_module() -> Iterator[None]:
    """float64 as the default dtype for a whole module, for module-scoped fixtures built in it."""
    yield from _default_dtype(torch.float64)
