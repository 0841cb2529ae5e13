"""A differential fuzzer: drawn combinations of model, optimizer, hyperparameter form, method,
segments (``state=``), ``tasks=`` and ``parallel=``, each judged against a float64 oracle.

Every case ends in one of two outcomes only: the trained weights and the hypergradients equal
the oracle within the method's documented tolerance, or nestgrad raises one of its own errors for
a documented limitation (``space.refusals``). Anything else (another answer, a raw torch error,
a hang) fails, printing the seed and the configuration.

Budgets: ``QUICK`` cases in the quick suite, ``SLOW`` single-process and ``DISTRIBUTED`` data-parallel
cases under ``-m slow``; ``NESTGRAD_FUZZ_CASES=2000`` runs seeds 0..1999 instead of the quick set,
``NESTGRAD_FUZZ_SEED=123`` one seed (with ``NESTGRAD_FUZZ_WORLD=2`` on 2 ranks).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import case
import oracle
import space

import optim_db

QUICK = 300
SLOW = 2000
COMPILED = 40
DISTRIBUTED = {2: 40, 3: 20}
CASE_TIMEOUT_S = 60  # a hang fails the case instead of the suite

_many = int(os.environ.get("NESTGRAD_FUZZ_CASES", "0"))
_one = os.environ.get("NESTGRAD_FUZZ_SEED")
_world = int(os.environ.get("NESTGRAD_FUZZ_WORLD", "1"))


def _seeds(start: int, count: int) -> list[int]:
    if _one is not None:
        return [int(_one)] if start == 0 else []
    if _many:
        return list(range(_many)) if start == 0 else []
    return list(range(start, start + count))


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread after ``seconds``: a hanging case fails with its seed."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the case ran longer than {seconds} s (a hang?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check(seed: int, compiled: bool = False) -> None:
    cfg = space.draw(seed)
    if compiled:  # 4 more steps: steps 0-3 run eagerly (path and memory checks, Reverse's search for outside tensors)
        more = 0 if space.METHODS[cfg.method] == "implicit" else 4
        segments = (*cfg.segments[:-1], cfg.segments[-1] + more)
        cfg = dataclasses.replace(cfg, compiled=True, steps=cfg.steps + more, segments=segments)
        torch._dynamo.reset()  # every case has its own shapes: without a reset they share torch's 8-graph limit
    old = torch.get_default_dtype()
    try:
        with deadline(CASE_TIMEOUT_S):
            report = case.judge(cfg)
    except TimeoutError as err:
        report = case.describe(cfg, [str(err)], case.Outcome())
    finally:
        torch.set_default_dtype(old)
    if report is not None:
        pytest.fail(report, pytrace=False)


@pytest.mark.parametrize("seed", _seeds(0, QUICK), ids=lambda s: f"seed={s}")
def test_fuzz(seed: int) -> None:
    check(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", _seeds(10_000, SLOW), ids=lambda s: f"seed={s}")
def test_fuzz_slow(seed: int) -> None:
    check(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", _seeds(20_000, COMPILED), ids=lambda s: f"seed={s}")
def test_fuzz_compiled(seed: int) -> None:
    """The same judgement with train(compile=...): a compiled run gives the eager run's answer or raises."""
    check(seed, compiled=True)


# ------------------------------------------------------------------------------ the oracle itself
@pytest.mark.parametrize("entry", optim_db.cases(), ids=optim_db.case_id)
def test_oracle_matches_torch_optim(entry: tuple[optim_db.OptimInfo, dict[str, Any]], float64: None) -> None:
    """The oracle's hand-written updates equal torch.optim on every optim_db setting (6 steps, float64;
    torch.optim keeps scalar state such as NAdam's mu_product in the default dtype)."""
    info, kwargs = entry
    g = torch.Generator().manual_seed(0)
    w0 = {
        "a": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "b": torch.randn(3, generator=g, dtype=torch.float64),
    }
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in w0.items()} for _ in range(6)]
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in w0.items()}
    opt = info.torch_cls(list(torch_params.values()), **kwargs)
    hp = {**case.defaults(info.name), **kwargs}
    ours = dict(w0)
    state = {k: oracle.init(info.name, v, hp) for k, v in w0.items()}
    for t, step in enumerate(grads, 1):
        for k, p in torch_params.items():
            p.grad = step[k].clone()
        opt.step()
        for k in ours:
            ours[k], state[k] = oracle.update(info.name, t, ours[k], step[k], state[k], hp)
    for k, p in torch_params.items():
        torch.testing.assert_close(ours[k], p.detach(), rtol=1e-13, atol=1e-15)


def test_refusals_are_drawn_and_most_cases_are_answers() -> None:
    """The generator reaches every feature, and most drawn cases are answerable (not refusals)."""
    cfgs = [space.draw(s) for s in range(2000)]
    for attr, values in [
        ("model", space.MODELS),
        ("opt", space.OPTIMIZERS),
        ("lr_form", space.LR_FORMS),
        ("method", space.METHODS),
    ]:
        assert {getattr(c, attr) for c in cfgs} == set(values), attr
    assert any(len(c.segments) > 1 for c in cfgs) and any(c.tasks for c in cfgs) and any(c.meta for c in cfgs)
    refused = sum(bool(space.refusals(c)) for c in cfgs)
    assert refused < 0.3 * len(cfgs), refused


# -------------------------------------------------------------------------------- data-parallel
def _worker(rank: int, world: int, store: str, outdir: str, seeds: list[int]) -> None:
    """One rank: run every seed's case on this rank's shard; save the outcomes as they come."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent.parent))
    sys.path.insert(0, str(Path(__file__).parent))
    import case as c
    import space as s

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    results: dict[int, Any] = {}
    for seed in seeds:
        out = c.run_nestgrad(c.build(s.draw(seed, world)), world, rank)
        results[seed] = {
            "weights": out.weights,
            "grads": out.grads,
            "error": out.error,
            "nestgrad_error": out.nestgrad_error,
            "where": out.where,
            "init_error": out.init_error,
        }
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(world: int, seeds: list[int], folder: Path, timeout: float) -> tuple[list[dict[int, Any]], str]:
    import torch.multiprocessing as mp

    folder.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(
        _worker, args=(world, str(folder / "store"), str(folder), seeds), nprocs=world, join=False,
        start_method="spawn",
    )  # fmt: skip
    failure = ""
    end = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, end - time.monotonic())):
            if time.monotonic() > end:
                failure = f"the {world} ranks did not finish within {timeout} s (a hang?)"
                break
    except Exception as err:  # a rank died: the seeds it did not finish fail below
        failure = f"a rank failed: {err}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    ranks = []
    for r in range(world):
        path = folder / f"rank{r}.pt"
        ranks.append(torch.load(path, weights_only=False) if path.exists() else {})
    return ranks, failure


def _distributed_seeds(world: int) -> list[int]:
    if _one is not None:
        return [int(_one)] if _world == world else []
    return list(range(20_000 + 1000 * world, 20_000 + 1000 * world + DISTRIBUTED[world]))


_RUNS: dict[int, tuple[list[dict[int, Any]], str]] = {}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Any:
    def get(world: int) -> tuple[list[dict[int, Any]], str]:
        if world not in _RUNS:
            seeds = _distributed_seeds(world)
            _RUNS[world] = _spawn(world, seeds, tmp_path_factory.mktemp(f"fuzz{world}"), 40.0 * len(seeds) + 60)
        return _RUNS[world]

    return get


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo")
@pytest.mark.parametrize(
    ("world", "seed"), [(w, s) for w in DISTRIBUTED for s in _distributed_seeds(w)], ids=lambda x: f"{x}"
)
def test_fuzz_distributed(spawned: Any, world: int, seed: int) -> None:
    """On ``world`` gloo ranks: every rank holds the single-process oracle's weights and hypergradients
    (the sharded loss weights' gradient concatenated over ranks), or every rank raises a nestgrad error."""
    cfg = space.draw(seed, world)
    ranks, failure = spawned(world)
    got = [r.get(seed) for r in ranks]
    if any(g is None for g in got):
        pytest.fail(case.describe(cfg, [failure or "a rank saved no result"], case.Outcome()), pytrace=False)
    problems = []
    errors = [g["error"] for g in got]
    if any(errors) and not all(errors):
        problems.append(f"only some ranks raised: {errors}")
    merged = case.Outcome(
        weights=got[0]["weights"], error=got[0]["error"], nestgrad_error=got[0]["nestgrad_error"],
        where=got[0]["where"], init_error=got[0]["init_error"],
    )  # fmt: skip
    if merged.error is None:
        merged.grads = dict(got[0]["grads"])
        merged.grads["a"] = torch.cat([g["grads"]["a"] for g in got])
        for r, other in enumerate(got[1:], 1):
            for part in ("weights", "grads"):
                for k, v in got[0][part].items():
                    if k != "a" and not torch.equal(other[part][k], v):
                        problems.append(f"{part} {k!r} differs between rank 0 and rank {r}")
    ref = case.run_oracle(case.build(cfg))
    problems += case.compare(cfg, merged, ref)
    if problems:
        pytest.fail(case.describe(cfg, problems, merged), pytrace=False)
