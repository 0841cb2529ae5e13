"""Smoke and exactness tests for benchmarks/bench_sinusoid.py (MAML, FOMAML, Meta-SGD on sinusoids)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.func import functional_call

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sinusoid.py"
sys.path.insert(0, str(_PATH.parent))  # as when it runs as a script: it imports bench_unroll's helpers
_spec = importlib.util.spec_from_file_location("bench_sinusoid", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_sinusoid"] = bench
_spec.loader.exec_module(bench)

ALPHA = bench.INNER_LR


def tasks(n: int = 3, k: int = 5, seed: int = 7) -> bench.Tasks:
    return bench.sample_tasks(n, k, k, torch.Generator().manual_seed(seed))


def mse(model: torch.nn.Module, w: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return (functional_call(model, w, (x,)) - y).pow(2).mean()


def hand_maml(model: torch.nn.Module, meta: dict[str, Tensor], ts: bench.Tasks, steps: int) -> list[Tensor]:
    """MAML's meta-gradient by hand: per task, `steps` SGD steps with autograd.grad(create_graph=True)."""
    names, leaves = list(meta), list(meta.values())
    total = torch.zeros(())
    for t in range(len(ts)):
        ws = leaves
        for _ in range(steps):
            gs = torch.autograd.grad(mse(model, dict(zip(names, ws)), ts.x[t], ts.y[t]), ws, create_graph=True)
            ws = [w - ALPHA * g for w, g in zip(ws, gs)]
        total = total + mse(model, dict(zip(names, ws)), ts.xq[t], ts.yq[t]) / len(ts)
    return list(torch.autograd.grad(total, leaves))


def hand_fomaml(model: torch.nn.Module, meta: dict[str, Tensor], ts: bench.Tasks, steps: int) -> list[Tensor]:
    """First-order MAML by hand: adapt without a graph, then the query gradient at the adapted weights."""
    names = list(meta)
    out = [torch.zeros_like(v) for v in meta.values()]
    for t in range(len(ts)):
        ws = [v.detach().requires_grad_() for v in meta.values()]
        for _ in range(steps):
            gs = torch.autograd.grad(mse(model, dict(zip(names, ws)), ts.x[t], ts.y[t]), ws)
            ws = [(w - ALPHA * g).detach().requires_grad_() for w, g in zip(ws, gs)]
        gq = torch.autograd.grad(mse(model, dict(zip(names, ws)), ts.xq[t], ts.yq[t]) / len(ts), ws)
        out = [o + g for o, g in zip(out, gq)]
    return out


def max_rel(a: list[Tensor], b: list[Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_equals_hand_written_loop(float64: None, steps: int) -> None:
    model = bench.make_model()
    method = bench.Method(f"MAML-{steps}", "maml", steps, (steps,))
    meta = bench.init_meta(model, method)
    ts = tasks()
    _, grads = bench.meta_gradient(model, method, meta, ts)
    ours = list(grads["params"].values())
    expected = hand_maml(model, meta["params"], ts, steps)
    assert max_rel(ours, expected) < 1e-10
    # the second-order terms are there: first-order MAML differs from it
    assert max_rel(hand_fomaml(model, meta["params"], ts, steps), expected) > 1e-4


def test_fomaml_is_the_query_gradient_at_the_adapted_weights(float64: None) -> None:
    model = bench.make_model()
    method = bench.Method("FOMAML-2", "fomaml", 2, (2,))
    meta = bench.init_meta(model, method)
    ts = tasks()
    _, grads = bench.meta_gradient(model, method, meta, ts)
    assert max_rel(list(grads["params"].values()), hand_fomaml(model, meta["params"], ts, 2)) < 1e-10


def test_meta_sgd_gradients_by_hand(float64: None) -> None:
    """Meta-SGD, one step w' = w - lr * g: d/dw as in MAML, d/dlr = -(query gradient at w') * g."""
    model = bench.make_model()
    method = bench.BY_NAME["meta-sgd"]
    meta = bench.init_meta(model, method)
    lrs = meta["lrs"]
    flat = torch.cat([v.detach().flatten() for v in lrs.values()])
    assert 0.005 <= flat.min() and flat.max() <= 0.1 and flat.std() > 0.02  # per element, U[0.005, 0.1]
    ts = tasks()
    _, grads = bench.meta_gradient(model, method, meta, ts)
    names, leaves = list(meta["params"]), list(meta["params"].values())
    total = torch.zeros(())
    lr_grads = [torch.zeros_like(v) for v in leaves]
    for t in range(len(ts)):
        gs = torch.autograd.grad(mse(model, meta["params"], ts.x[t], ts.y[t]), leaves, create_graph=True)
        ws = [w - lrs[k] * g for k, w, g in zip(names, leaves, gs)]
        loss = mse(model, dict(zip(names, ws)), ts.xq[t], ts.yq[t]) / len(ts)
        gq = torch.autograd.grad(loss, ws, retain_graph=True)
        lr_grads = [acc - a * g.detach() for acc, a, g in zip(lr_grads, gq, gs)]
        total = total + loss
    assert max_rel(list(grads["params"].values()), list(torch.autograd.grad(total, leaves))) < 1e-10
    assert max_rel(list(grads["lrs"].values()), lr_grads) < 1e-10

    # with every lr equal to alpha, Meta-SGD's weight gradient is MAML-1's
    meta["lrs"] = {k: torch.full_like(v, ALPHA, requires_grad=True) for k, v in lrs.items()}
    _, same = bench.meta_gradient(model, method, meta, ts)
    _, maml = bench.meta_gradient(model, bench.BY_NAME["maml-1"], meta, ts)
    assert max_rel(list(same["params"].values()), list(maml["params"].values())) < 1e-10


@pytest.mark.parametrize("name", list(bench.BY_NAME))
def test_batched_meta_gradient_equals_per_task_loop(float64: None, name: str) -> None:
    model = bench.make_model()
    method = bench.BY_NAME[name]
    meta = bench.init_meta(model, method)
    ts = tasks(n=4)
    loss_b, batched = bench.meta_gradient(model, method, meta, ts)
    loss_l, loop = bench.meta_gradient_per_task(model, method, meta, ts)
    assert abs(loss_b - loss_l).item() < 1e-12
    for group in batched:
        assert max_rel(list(batched[group].values()), [loop[group][k] for k in batched[group]]) < 1e-10


def test_quick_run_beats_the_untrained_network(capsys: pytest.CaptureFixture[str]) -> None:
    """The whole script at tiny sizes: every meta-trained method adapts better than the untrained network."""
    args = bench.parse_args(["--quick", "--shots", "5"])
    runs, reference = bench.run(args)
    out = capsys.readouterr().out
    assert f"{args.meta_steps} meta-steps" in out and "| MAML-1 | 1 / 1 |" in out and "1.13 ± 0.18" in out
    assert {r.method.name for r in runs} == {m.name for m in bench.METHODS}
    for r in runs:
        for steps, (mean, _) in r.test_mse.items():
            assert mean < reference[(r.shots, steps)][0], (r.method.name, steps, mean, reference)
        assert r.cpu_per_step > 0
