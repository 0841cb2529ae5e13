"""Smoke test for benchmarks/bench_sama.py: every case runs end to end with tiny settings and prints its rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sama.py"
_spec = importlib.util.spec_from_file_location("bench_sama", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_sama"] = bench
_spec.loader.exec_module(bench)


@pytest.mark.slow  # about 20 s: the digits data, three online runs per case and the seed's two BERT models
def test_all_cases_run_and_report(capsys):
    bench.main(["--outer-steps", "2", "--every", "1", "--seed-steps", "2"])
    out = capsys.readouterr().out
    for row in ("(a) demo", "(b) example", "(c) seed pipeline", "cosine(SAMA(last=5), exact)", "SAMA/SAMA"):
        assert row in out, out
    assert "nan" not in out
