"""Test settings: one torch thread.

The tests run tiny models, where a second thread costs more in synchronisation than it
saves (on a 2-core machine shared with other work, several times more).
"""

import torch

torch.set_num_threads(1)
