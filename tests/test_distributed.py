"""``ng.train(..., parallel=ng.DataParallel())`` on 2 and 3 gloo ranks equals one process on the whole data.

The ranks are spawned by the tests (``torch.multiprocessing``, a file store in a temporary folder, a
60 s timeout on every collective); one spawn runs many cases and saves their results, which the test
process compares with single-process runs of the same cases (``tests/distributed_cases.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import distributed_cases as cases
import nestgrad as ng

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)

TWO_RANKS = [f"method:{m}" for m in cases.METHODS] + ["sum:Unroll", "pipeline", "seed", "outside", "misuse"]
THREE_RANKS = [f"method:{m}" for m in cases.METHODS]
_SPAWNED = cases._SPAWNED  # the processes of every spawn, to check that none outlives its test
spawn = cases.spawn


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(2, TWO_RANKS, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(3, THREE_RANKS, tmp_path_factory.mktemp("three"))


def gathered(ranks: list[dict[str, Any]], job: str) -> dict[str, torch.Tensor]:
    """One result per key: the sharded gradient ``da`` concatenated over ranks; every other key must be
    bitwise the same on every rank (the ranks stay in sync)."""
    out = {}
    for key, value in ranks[0][job].items():
        if key == "da":
            out[key] = torch.cat([r[job][key] for r in ranks])
            continue
        for r, other in enumerate(ranks[1:], 1):
            assert torch.equal(other[job][key], value), f"{job}: {key} differs between rank 0 and rank {r}"
        out[key] = value
    return out


def assert_matches(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = 1e-12) -> float:
    assert got.keys() == ref.keys()
    worst = 0.0
    for key, r in ref.items():
        g = got[key]
        assert g.shape == r.shape, key
        err = float((g - r).abs().max() / r.abs().max().clamp_min(1e-300))
        assert err <= tol, f"{key}: relative error {err:.3g} > {tol:g}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("method", list(cases.METHODS))
def test_two_ranks_equal_one_process(two: list[dict[str, Any]], method: str) -> None:
    """Trained weights and hypergradients w.r.t. the sharded per-example weights, the shared feature weights,
    the optimizer's lr and the initial weights equal one process on the concatenated data."""
    job = f"method:{method}"
    assert "error" not in two[0], two[0].get("error")
    got = gathered(two, job)
    ref = cases.run_method(method, 1, 0)
    assert_matches(got, ref)
    assert got["da"].abs().max() > 0 and got["ds"].abs().max() > 0  # a comparison of zeros would prove nothing


@pytest.mark.parametrize("job", THREE_RANKS)
def test_three_ranks_equal_one_process(three: list[dict[str, Any]], job: str) -> None:
    assert_matches(gathered(three, job), cases.run_method(job.partition(":")[2], 1, 0))


def test_reduce_sum_with_global_normalization(two: list[dict[str, Any]]) -> None:
    """reduce="sum": each rank's loss is its examples' sum over the global count; equals one process's mean."""
    assert_matches(gathered(two, "sum:Unroll"), cases.run_method("Unroll", 1, 0))


def test_two_level_pipeline_both_levels_data_parallel(two: list[dict[str, Any]]) -> None:
    """W1 = train(A) by Reverse, W2 = train(W1) by Unroll, outer loss of W2 and W1: dL/dA and the initial weights."""
    got = gathered(two, "pipeline")
    assert_matches(got, cases.run_pipeline(1, 0))
    assert got["da"].abs().max() > 0


def test_the_forum_pipeline_with_both_training_levels_data_parallel(two: list[dict[str, Any]]) -> None:
    """The seed's three levels (two tiny Bert2Bert models): dL3/dA on 2 ranks equals one process to 1e-10."""
    got, ref = gathered(two, "seed"), cases.run_seed(1, 0)
    assert ref["da"].abs().max() > 0
    assert_matches(got, ref, tol=1e-10)


def test_replicated_hparam_used_outside_train(two: list[dict[str, Any]]) -> None:
    assert_matches(gathered(two, "outside"), cases.run_replicated_outside(1, 0))


MISUSE = {
    "steps": "ranks disagree on steps: rank 0 has 2, rank 1 has 3",
    "shapes": "ranks disagree on params",
    "values": "different values on different ranks",
    "empty": "rank 1 cannot train: its shard of the data is empty",
    "seed": "Pass ng.ZerothOrder(..., seed=...) with the same seed on every rank",
    "forward_mode": "forward-mode AD (torch.func.jvp) cannot carry that collective",
    "mixed": "computed both from the output of a data-parallel computation",
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_bad_setups_raise_on_every_rank(two: list[dict[str, Any]], case: str) -> None:
    for r, ranks in enumerate(two):
        message = ranks["misuse"][case]
        assert message.startswith("ValueError") and MISUSE[case] in message, f"rank {r}: {message}"


def test_uneven_shards_with_reduce_mean_warn_on_every_rank(two: list[dict[str, Any]]) -> None:
    for r, ranks in enumerate(two):
        message = ranks["misuse"]["uneven"]
        assert "different numbers of rows (rank 0: 6, rank 1: 5)" in message, (r, message)
        assert "reduce='sum'" in message, (r, message)


def test_ranks_stay_in_step_after_errors_and_ddp_call_unwraps(two: list[dict[str, Any]]) -> None:
    for ranks in two:
        assert ranks["misuse"]["after"] == "no error"
        assert ranks["misuse"]["ddp"] == "same"


def test_not_initialized_raises() -> None:
    assert not torch.distributed.is_initialized()
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"no initialized process group.*torchrun"):
        ng.train(
            lambda p, b, h: (p["w"] ** 2).sum(),
            {"w": w},
            ng.optim.SGD(lr=0.1),
            [None],
            steps=1,
            parallel=ng.DataParallel(),
        )
    with pytest.raises(ValueError, match="reduce must be 'mean'"):
        ng.DataParallel(reduce="avg")


def test_failing_rank_ends_the_spawn_and_its_peers(tmp_path: Path) -> None:
    """Rank 1 raises while rank 0 waits for it in a collective: the spawn fails fast and no process is left."""
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="fails on purpose"):
        spawn(2, ["fail:1"], tmp_path, timeout=90)
    assert time.monotonic() - start < 90
    assert _SPAWNED and not any(p.is_alive() for p in _SPAWNED)
