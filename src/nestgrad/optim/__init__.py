"""Differentiable optimizers: pure, out-of-place twins of ``torch.optim``.

Each optimizer has ``init(params) -> state`` and
``update(grads, state, params) -> (params, state)`` over ``dict[str, Tensor]``,
takes ``torch.optim``'s argument names and defaults, and accepts any float
hyperparameter as a Tensor that requires grad: one value, one per element of each
parameter (Meta-SGD), a dict of parameter name -> value, or a ``Schedule`` of
one value per step.
"""

from ._adam import Adam, Adamax, AdamW, NAdam, RAdam
from ._adaptive import Adadelta, Adagrad, RMSprop, Rprop
from ._base import Optimizer, OptState
from ._schedule import Schedule
from ._sgd import ASGD, SGD

__all__ = [
    "ASGD",
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "OptState",
    "Optimizer",
    "RAdam",
    "RMSprop",
    "Rprop",
    "Schedule",
]
