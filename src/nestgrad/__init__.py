"""nestgrad: differentiate through training.

The whole public API is listed here; implementations live in private modules.
"""

from . import optim
from ._call import call
from ._methods import AdjointMethod, Method, Unroll
from ._reverse import Reverse
from ._train import Problem, train

__version__ = "0.1.0"

__all__ = ["AdjointMethod", "Method", "Problem", "Reverse", "Unroll", "call", "optim", "train"]
