"""Data-parallel ranks that disagree: every setting and replicated value is compared before the first step.

Two gloo ranks (spawned, a 20 s collective timeout so that a regression to a hang fails fast) run one train
call per case of ``distributed_cases.run_agreement``, each differing between the ranks in one setting; every
rank must raise, naming what differs, and the ranks must stay in step for the next case. A second spawn has
rank 1's data function raise mid-run: rank 0 must raise a nestgrad error naming rank 1 and its error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

import distributed_cases as cases

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)

# Case -> a part of the message every rank must raise with (what differs, with both ranks' values).
AGREEMENT = {
    "lr": "the ranks disagree on optimizer lr: rank 0 has 0.1, rank 1 has 0.2",
    "betas": "optimizer betas[1]: rank 0 has 0.999, rank 1 has 0.99",
    "nesterov": "optimizer nesterov: rank 0 has False, rank 1 has True",
    "foreach": "optimizer foreach: rank 0 has True, rank 1 has False",
    "lr_tensor": "optimizer lr has different values on different ranks (optimizer lr: rank 0 has 0.1, rank 1 has 0.2)",
    "groups": "optimizer groups: rank 0 has [], rank 1 has [['0.*']]",
    "group_lr": "optimizer groups[0].lr: rank 0 has 0.05, rank 1 has 0.1",
    "schedule_fn": "optimizer lr: rank 0 has a Schedule of a function, with values at steps {1: 0.1, 2: 0.05}, "
    "rank 1 has a Schedule of a function, with values at steps {1: 0.05, 2: 0.03333333333333333}",
    "schedule_values": "optimizer lr (schedule) has different values on different ranks",
    "state": "state momentum_buffer['0.weight'], state momentum_buffer['0.bias']",
    "state_steps": "state step counts: rank 0 has [('0.bias', 2), ('0.weight', 2), ('2.bias', 2), ('2.weight', 2)], "
    "rank 1 has [('0.bias', 3),",
    "bucket_mb": "DataParallel bucket_mb: rank 0 has 25.0, rank 1 has 1e-05",
    "reduce": "DataParallel reduce: rank 0 has 'mean', rank 1 has 'sum'",
    "shard_hparams": "DataParallel shard_hparams: rank 0 has False, rank 1 has True",
    "checkpoint_every": "method checkpoint_every: rank 0 has None, rank 1 has 1",
    "solver": "method solver: rank 0 has CG(max_steps=5, tol=1e-06), rank 1 has CG(max_steps=6, tol=1e-06)",
    "zo_unseeded": "Pass ng.ZerothOrder(..., seed=...) with the same seed on every rank",
    "zo_seed": "method seed: rank 0 has 0, rank 1 has 1",
    "zo_samples": "method samples: rank 0 has 1, rank 1 has 2",
    "check_finite": "check_finite: rank 0 has True, rank 1 has False",
    "return_state": "return_state: rank 0 has False, rank 1 has True",
    "tasks": "rank 1 cannot train: it was called with tasks=",
    "frozen": "params['scale'] has different values on different ranks (params['scale']: rank 0 has 1.0, rank 1 has "
    "2.0)",
    "params_bits": "params['0.bias'] has different values on different ranks",
}


@pytest.fixture(scope="module")
def agreement(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """One spawn runs every case (about 5 s in all)."""
    ranks = cases.spawn(2, ["agreement"], tmp_path_factory.mktemp("agreement"), timeout=120, seconds=20)
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    return [r["agreement"] for r in ranks]


@pytest.mark.parametrize("case", list(AGREEMENT))
def test_ranks_that_differ_raise_on_every_rank_naming_what_differs(agreement: list[dict[str, str]], case: str) -> None:
    for r, out in enumerate(agreement):
        message = out[case]
        assert message.startswith("ValueError: nestgrad."), f"rank {r}: {message}"
        assert AGREEMENT[case] in message, f"rank {r}: {message}"
        assert "Every rank raises this error" in message, f"rank {r}: {message}"


def test_unseeded_zeroth_order_says_seed(agreement: list[dict[str, str]]) -> None:
    for out in agreement:
        assert "ZerothOrder without a seed" in out["zo_unseeded"] and "seed=0" in out["zo_unseeded"]


def test_ranks_stay_in_step_after_every_refusal(agreement: list[dict[str, str]]) -> None:
    assert [out["after"] for out in agreement] == ["no error", "no error"]
    assert [out["after_nan"] for out in agreement] == ["no error", "no error"]


def test_nonfinite_gradient_is_blamed_on_the_rank_whose_batch_produced_it(agreement: list[dict[str, str]]) -> None:
    """A NaN in rank 1's batch of step 1: rank 1 names its own loss; rank 0, whose loss and gradient are finite,
    says the all-reduced gradient's NaN came from rank 1 (not that its own loss_fn has an infinite derivative)."""
    zero, one = agreement[0]["nan"], agreement[1]["nan"]
    assert zero.startswith("NonFiniteError: nestgrad.train (Unroll): at step 1 of 3 on rank 0 of 2"), zero
    assert "this rank's own loss" in zero and "the non-finite values came from rank 1 (its loss was nan)" in zero
    assert "derivative is infinite" not in zero, zero
    assert one.startswith("NonFiniteError: nestgrad.train (Unroll): at step 1 of 3 on rank 1 of 2"), one
    assert "the training loss is nan" in one and "this rank's own loss on its batch of step 1" in one, one


def test_a_rank_that_fails_mid_run_makes_the_others_raise_naming_it(tmp_path: Path) -> None:
    """Rank 1's data function raises at step 3 while rank 0 waits in the all-reduce of step 3: rank 0 raises
    RankFailedError with rank 1's error text, within the 20 s collective timeout, and no process is left."""
    start = time.monotonic()
    ranks: list[dict[str, Any]] = cases.spawn(2, ["failing_data"], tmp_path, timeout=60, seconds=20)
    assert time.monotonic() - start < 60
    zero, one = ranks[0]["failing_data"]["message"], ranks[1]["failing_data"]["message"]
    assert one == "RuntimeError: the loader of rank 1 cannot read shard file part-3.bin", one
    assert zero.startswith("RankFailedError: nestgrad.train(parallel=DataParallel(...)): rank 1 of 2 failed: "), zero
    assert "RuntimeError: the loader of rank 1 cannot read shard file part-3.bin" in zero, zero
    assert "in the all-reduce of the gradients of step 3" in zero, zero
    assert cases._SPAWNED and not any(p.is_alive() for p in cases._SPAWNED)
