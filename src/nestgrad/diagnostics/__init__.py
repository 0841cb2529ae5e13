"""Diagnostics: where a path from the hyperparameters is cut (``explain``); is a hypergradient right (``check``)."""

from ._check import CheckResult, check
from ._explain import DisconnectedError, PartialPathWarning, PathReport, explain, tracking

__all__ = ["CheckResult", "DisconnectedError", "PartialPathWarning", "PathReport", "check", "explain", "tracking"]
