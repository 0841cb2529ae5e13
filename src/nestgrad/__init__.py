"""nestgrad: differentiate through training.

The whole public API is listed here. The layout of the package:

* the core: ``train()`` (``_train``), ``Problem`` (``_problem``), ``call()``,
  data and buffers, ``Tasks``, ``DataParallel`` and ``nestgrad.distributed``;
* ``nestgrad.optim``: the differentiable optimizers;
* ``nestgrad.methods``: how gradients get back through a run (``Unroll``, ``Reverse``, ...);
* ``nestgrad.diagnostics``: ``explain`` and ``check``;
* ``nestgrad.higher``: a drop-in for the ``higher`` library;
* ``nestgrad.demos``: the ``nestgrad`` command line.

Names are imported on first use (PEP 562), so ``import nestgrad`` and ``nestgrad --help`` do
not load torch; ``nestgrad.train`` and every other name below behave as ordinary attributes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it (relative to this package)
_NAMES: dict[str, str] = {
    "train": "._train",
    "LossFn": "._problem",
    "Problem": "._problem",
    "call": "._call",
    "Tasks": "._tasks",
    "DataParallel": "._distributed",
    "ReplayError": "._data",
    "NonFiniteError": "._nonfinite",
    "Compile": "._compile",
    "CompileReport": "._compile",
    "CompileError": "._compile",
    "Method": ".methods",
    "AdjointMethod": ".methods",
    "Unroll": ".methods",
    "Reverse": ".methods",
    "Forward": ".methods",
    "ForwardRun": ".methods",
    "Implicit": ".methods",
    "FiniteDiff": ".methods",
    "ZerothOrder": ".methods",
    "SAMA": ".methods",
    "CG": ".methods",
    "Neumann": ".methods",
    "FixedPoint": ".methods",
    "LinearSolver": ".methods",
    "Solution": ".methods",
    "ConvergenceWarning": ".methods",
    "check": ".diagnostics",
    "CheckResult": ".diagnostics",
    "explain": ".diagnostics",
    "tracking": ".diagnostics",
    "DisconnectedError": ".diagnostics",
    "PartialPathWarning": ".diagnostics",
    "PathReport": ".diagnostics",
}
_SUBMODULES = ("optim", "methods", "diagnostics", "higher", "distributed")

__all__ = sorted([*_NAMES, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'nestgrad' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API and the module's dunders; not the helpers this file imports (``importlib``, ``Any``)."""
    return sorted([*__all__, *(k for k in globals() if k.startswith("__") and k.endswith("__"))])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import diagnostics, distributed, higher, methods, optim
    from ._call import call
    from ._compile import Compile, CompileError, CompileReport
    from ._data import ReplayError
    from ._distributed import DataParallel
    from ._nonfinite import NonFiniteError
    from ._problem import LossFn, Problem
    from ._tasks import Tasks
    from ._train import train
    from .diagnostics import CheckResult, DisconnectedError, PartialPathWarning, PathReport, check, explain, tracking
    from .methods import (
        CG,
        SAMA,
        AdjointMethod,
        ConvergenceWarning,
        FiniteDiff,
        FixedPoint,
        Forward,
        ForwardRun,
        Implicit,
        LinearSolver,
        Method,
        Neumann,
        Reverse,
        Solution,
        Unroll,
        ZerothOrder,
    )
