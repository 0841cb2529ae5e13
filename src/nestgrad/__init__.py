"""nestgrad: differentiate through training.

The whole public API is listed here; implementations live in private modules.
"""

from . import distributed, higher, optim
from ._call import call
from ._check import CheckResult, check
from ._data import ReplayError
from ._distributed import DataParallel
from ._explain import DisconnectedError, PartialPathWarning, PathReport, explain, tracking
from ._finite_diff import FiniteDiff
from ._forward import Forward
from ._implicit import Implicit
from ._methods import AdjointMethod, Method, Unroll
from ._nonfinite import NonFiniteError
from ._reverse import Reverse
from ._solvers import CG, ConvergenceWarning, FixedPoint, LinearSolver, Neumann, Solution
from ._tasks import Tasks
from ._train import LossFn, Problem, train
from ._zeroth_order import ZerothOrder

__version__ = "0.1.0"

__all__ = [
    "CG",
    "AdjointMethod",
    "CheckResult",
    "ConvergenceWarning",
    "DataParallel",
    "DisconnectedError",
    "FiniteDiff",
    "FixedPoint",
    "Forward",
    "Implicit",
    "LinearSolver",
    "LossFn",
    "Method",
    "Neumann",
    "NonFiniteError",
    "PartialPathWarning",
    "PathReport",
    "Problem",
    "ReplayError",
    "Reverse",
    "Solution",
    "Tasks",
    "Unroll",
    "ZerothOrder",
    "call",
    "check",
    "distributed",
    "explain",
    "higher",
    "optim",
    "tracking",
    "train",
]
