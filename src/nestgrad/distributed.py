"""Data-parallel helpers: ``ng.train(..., parallel=ng.DataParallel())`` and the outer loss's collectives.

* ``DataParallel``: the option of ``ng.train`` (also ``nestgrad.DataParallel``).
* ``mean()``: the mean over ranks of each rank's outer loss, the global objective to backpropagate from.
* ``replicated()``: a tensor shared by all ranks whose gradient is summed over ranks (for uses outside
  ``ng.train``).
* ``RankFailedError``: raised on every other rank when one rank of a data-parallel run fails, naming it.

See ``DataParallel`` and the README's "Distributed" section for the convention.
"""

from ._distributed import DataParallel, RankFailedError, mean, replicated

__all__ = ["DataParallel", "RankFailedError", "mean", "replicated"]
