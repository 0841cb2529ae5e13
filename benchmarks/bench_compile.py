"""Benchmark: compiled training runs (``nestgrad.train(..., compile=True)``) against eager ones.

The case is ``bench_unroll.py``'s: a 64-256-256-10 tanh MLP trained for ``T`` full-batch SGD
steps on 1000 digits, with 1000 per-example loss weights as the hyperparameters; float32, one
CPU thread. Variants, side by side in one process, in alternating rounds (medians reported):

* ``torch.optim``: plain ``torch.optim.SGD`` training (the reference for training);
* ``plain eager`` / ``plain compiled``: ``nestgrad.train`` under ``torch.no_grad()``;
* ``hand-written``: ``functional_call`` + ``autograd.grad(create_graph=True)`` unroll, then the
  hypergradient (the reference for hypergradients);
* ``unroll eager`` / ``unroll compiled``: ``nestgrad.train(method=Unroll())``, then the hypergradient;
* ``reverse eager`` / ``reverse compiled``: the same with ``method=Reverse()`` (its training steps and
  its replays compiled).

Before timing, each compiled result is compared with its eager twin. Compile time is measured in
fresh processes (``--first``): ``cold`` with an empty inductor cache, ``warm`` with the cache the
cold process left; it is the first call's time minus a steady call's, and the table says how many
calls (meta-steps) repay it.

Usage::

    python benchmarks/bench_compile.py             # T=100, 5 rounds
    python benchmarks/bench_compile.py --quick     # T=10, 2 rounds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import nestgrad as ng

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_unroll as bu  # the same case, data and loss


def plain(s: bu.Setup, compile: bool | ng.Compile = False) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return ng.train(
            bu._nestgrad_loss(s), s.init, ng.optim.SGD(lr=bu.LR), [(s.x, s.y)],
            steps=s.steps, hparams=s.weights, compile=compile,
        )  # fmt: skip


def unroll(s: bu.Setup, compile: bool | ng.Compile = False, method: ng.Method | None = None) -> torch.Tensor:
    trained = ng.train(
        bu._nestgrad_loss(s), s.init, ng.optim.SGD(lr=bu.LR), [(s.x, s.y)],
        steps=s.steps, hparams=s.weights, compile=compile, method=method,
    )  # fmt: skip
    val = F.cross_entropy(ng.call(s.model, trained, s.x_val), s.y_val)
    (dw,) = torch.autograd.grad(val, s.weights)
    return dw


VARIANTS: dict[str, Callable[[bu.Setup], Any]] = {
    "torch.optim": bu.run_plain,
    "plain eager": plain,
    "plain compiled": lambda s: plain(s, True),
    "hand-written": bu.run_hand_written,
    "unroll eager": unroll,
    "unroll compiled": lambda s: unroll(s, True),
    "reverse eager": lambda s: unroll(s, False, ng.Reverse()),
    "reverse compiled": lambda s: unroll(s, True, ng.Reverse()),
}
PAIRS = [
    ("plain compiled", "plain eager"), ("plain compiled", "torch.optim"), ("unroll compiled", "unroll eager"),
    ("unroll compiled", "hand-written"), ("unroll eager", "hand-written"), ("plain eager", "torch.optim"),
    ("reverse compiled", "reverse eager"), ("reverse compiled", "hand-written"),
]  # fmt: skip


def first_call(name: str, steps: int) -> dict[str, float]:
    """In this (fresh) process: the first call's seconds and a steady call's (the median of 3)."""
    s = bu.make_setup(steps)
    fn = VARIANTS[name]
    t0 = time.perf_counter()
    fn(s)
    first = time.perf_counter() - t0
    steady = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn(s)
        steady.append(time.perf_counter() - t0)
    return {"first": first, "steady": statistics.median(steady)}


def compile_times(steps: int) -> dict[str, dict[str, dict[str, float]]]:
    """Cold (empty inductor cache) and warm (the cache the cold run left) first calls, in fresh processes."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for name in ("plain compiled", "unroll compiled", "reverse compiled"):
            out[name] = {}
            for kind in ("cold", "warm"):
                cmd = [sys.executable, os.path.abspath(__file__), "--first", name, "--steps", str(steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    out[name][kind] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}  # type: ignore[dict-item]
                    continue
                out[name][kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile-times", action="store_true", help="skip the cold/warm subprocesses")
    parser.add_argument("--first", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps if args.steps is not None else (10 if args.quick else 100)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    torch.set_num_threads(1)
    if args.first:
        print(json.dumps(first_call(args.first, steps)))
        return

    print(f"# nestgrad compile benchmark: torch {torch.__version__}, T={steps}, {repeats} rounds, 1 thread")
    print(f"- machine: {bu.machine()}; load average at start: {bu._load()}")
    s = bu.make_setup(steps)
    out = {name: fn(s) for name, fn in VARIANTS.items()}  # warm-up (compiles), and the answers to check
    for a, b in (("plain compiled", "plain eager"), ("plain eager", "torch.optim")):
        mx, _ = bu.rel_diff(bu._flat(out[a]), bu._flat(out[b]))
        print(f"- trained weights, {a} vs {b}: max rel diff {mx:.2e}")
    for a, b in (("unroll compiled", "unroll eager"), ("unroll eager", "hand-written"),
                 ("reverse compiled", "reverse eager")):  # fmt: skip
        mx, _ = bu.rel_diff(out[a], out[b])
        print(f"- hypergradient, {a} vs {b}: max rel diff {mx:.2e}")
    del out

    wall: dict[str, list[float]] = {n: [] for n in VARIANTS}
    cpu: dict[str, list[float]] = {n: [] for n in VARIANTS}
    names = list(VARIANTS)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            VARIANTS[name](s)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
        print(f"round {r + 1}/{repeats} done", flush=True)
    med = {n: statistics.median(v) for n, v in wall.items()}
    mcpu = {n: statistics.median(v) for n, v in cpu.items()}
    print("\n| variant | median wall (s) | median CPU (s) |\n|---|--:|--:|")
    for n in names:
        print(f"| {n} | {med[n]:.3f} | {mcpu[n]:.3f} |")
    print("\n| ratio | wall | CPU |\n|---|--:|--:|")
    for a, b in PAIRS:
        print(f"| {a} / {b} | {med[a] / med[b]:.3f}x | {mcpu[a] / mcpu[b]:.3f}x |")

    if args.no_compile_times:
        return
    times = compile_times(steps)
    print("\n| compiled variant | first call, cold cache (s) | first call, warm cache (s) | steady call (s) "
          "| compile cost cold / warm (s) | calls to repay, cold / warm |")  # fmt: skip
    print("|---|--:|--:|--:|--:|--:|")
    for name, kinds in times.items():
        eager = med[name.replace("compiled", "eager")]
        cold, warm = kinds.get("cold", {}), kinds.get("warm", {})
        if "first" not in cold or "first" not in warm:
            print(f"| {name} | error: {cold.get('error') or warm.get('error')} | | | | |")
            continue
        steady = warm["steady"]
        cost = [max(k["first"] - k["steady"], 0.0) for k in (cold, warm)]
        gain = eager - med[name]
        repay = [f"{c / gain:.0f}" if gain > 0 else "never" for c in cost]
        print(f"| {name} | {cold['first']:.1f} | {warm['first']:.1f} | {steady:.3f} | {cost[0]:.1f} / {cost[1]:.1f} "
              f"| {repay[0]} / {repay[1]} |")  # fmt: skip
    print(f"\nload average at the end: {bu._load()}")


if __name__ == "__main__":
    main()
