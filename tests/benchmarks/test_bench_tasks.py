"""Exactness and smoke tests for benchmarks/bench_tasks.py (per-task loops vs ``ng.train(..., tasks=n)``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_tasks.py"
sys.path.insert(0, str(_PATH.parent))  # as when it runs as a script: it imports bench_unroll's helpers
_spec = importlib.util.spec_from_file_location("bench_tasks", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_tasks"] = bench
_spec.loader.exec_module(bench)


def small(case: bench.Case, n: int) -> bench.Case:
    return bench.Case(
        case.name, case.model, case.xs[:n], case.ys[:n], case.xq[:n], case.yq[:n], case.steps, case.lr, case.loss
    )


@pytest.mark.parametrize("make", [bench.sinusoid_case, lambda: bench.omniglot_case(1)], ids=["sinusoid", "omniglot"])
def test_every_nestgrad_variant_equals_the_hand_written_loop_in_float64(make):
    case = small(make(), 3)
    if case.name.startswith("omniglot"):
        case.model = bench.conv_net(filters=8)
    diffs = bench.check(case, ["ng.train loop", "ng.train tasks"])
    assert set(diffs) == {"ng.train loop", "ng.train tasks"}
    assert all(d < 1e-12 for d in diffs.values()), diffs


def test_check_raises_when_a_nestgrad_variant_is_wrong(monkeypatch: pytest.MonkeyPatch):
    case = small(bench.sinusoid_case(), 2)
    wrong = lambda c: [1.01 * g for g in bench.hand_written_loop(c)]  # noqa: E731
    monkeypatch.setitem(bench.VARIANTS, "ng.train tasks", wrong)
    with pytest.raises(AssertionError, match=r"ng\.train tasks differs"):
        bench.check(case, ["ng.train tasks"])


def test_quick_run_prints_a_table(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(bench.CASES, "sinusoid", lambda: small(bench.sinusoid_case(), 3))
    before = torch.get_num_threads()
    try:
        bench.main(["--quick", "--variants", "hand-written loop,ng.train loop,ng.train tasks"])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "| ng.train tasks |" in out and "CPU vs hand-written loop" in out
