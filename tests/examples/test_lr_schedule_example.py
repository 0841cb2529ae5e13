"""examples/lr_schedule.py: a learned per-step learning-rate schedule lowers the validation loss."""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "examples"))
from lr_schedule import learn_schedule, plot


def test_the_learned_schedule_lowers_the_validation_loss(tmp_path):
    result = learn_schedule(steps=10, outer_steps=5, init_lr=0.05, outer_lr=0.1, seed=0)
    history = result["history"]
    assert len(history) == 6 and history[-1] < 0.95 * history[0]
    assert result["learned"].shape == (10,) and (result["learned"] > 0).all()
    assert not torch.allclose(result["learned"], result["initial"])  # the schedule moved
    plot(result, str(tmp_path / "schedule.png"))
    assert (tmp_path / "schedule.png").stat().st_size > 0
