"""The demos' defaults, without torch: the command line reads them before anything heavy is imported."""

MODES = ("online", "full")
DEFAULT_MODE = "online"
DEFAULT_STEPS = 400
"""Outer steps of the default (online) mode."""
FULL_STEPS = 100
"""Outer steps of ``mode="full"``."""
DEFAULT_OUT = "nestgrad-demo"
DEFAULT_STEPS_3 = 40
"""Outer steps of ``nestgrad demo --levels 3``."""
