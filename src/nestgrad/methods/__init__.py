"""Hypergradient methods: how gradients get back through a training run, as small strategy objects.

Each method is passed to ``nestgrad.train()`` as ``method=...``; the base classes and
``Unroll`` live with the core (``_base``), one module per other method, and the
matrix-free linear solvers of ``Implicit`` in ``_solvers``.
"""

from ._base import AdjointMethod, Method, Unroll
from ._finite_diff import FiniteDiff
from ._forward import Forward, ForwardRun
from ._implicit import Implicit
from ._reverse import Reverse
from ._sama import SAMA
from ._solvers import CG, ConvergenceWarning, FixedPoint, LinearSolver, Neumann, Solution
from ._zeroth_order import ZerothOrder

__all__ = [
    "CG",
    "SAMA",
    "AdjointMethod",
    "ConvergenceWarning",
    "FiniteDiff",
    "FixedPoint",
    "Forward",
    "ForwardRun",
    "Implicit",
    "LinearSolver",
    "Method",
    "Neumann",
    "Reverse",
    "Solution",
    "Unroll",
    "ZerothOrder",
]
