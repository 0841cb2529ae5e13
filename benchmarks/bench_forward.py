"""Benchmark: ``Forward`` (forward-mode hypergradients) against ``Unroll``, and its two ways of pushing tangents.

The case of ``bench_unroll.py``: a 64-256-256-10 tanh MLP trained for ``T`` full-batch SGD
steps (lr 0.1) on the first 1000 examples of sklearn's ``load_digits`` (standardized), float32,
one CPU thread, and the hypergradient of the validation loss (the other 797 examples). The
hyperparameters are ``K`` group loss weights: class ``c`` belongs to group ``c % K``, and each
example's cross-entropy is scaled by its group's weight (``K = 10``: one weight per class).

Three variants, timed side by side in one process, in alternating rounds (every round runs
each variant once, in a rotated order), medians of CPU time (``time.process_time``) and wall time:

* ``unroll``: ``nestgrad.Unroll()`` (reverse mode through the stored graph of every step).
* ``forward``: ``nestgrad.Forward()``, which pushes the tangents by forward-mode AD
  (``torch.func.jvp`` of the step, vmapped over the K directions); the script checks that
  it did (``Forward.last_run.path == "forward-mode"``).
* ``double-backward``: ``nestgrad.Forward(mode="double-backward")``, the double-backward
  trick that ``Forward`` falls back to (and used for every run before).

Before timing, the script checks that the three hypergradients agree. Then it measures the
peak memory of each variant against ``T`` in fresh subprocesses (``--one``), as
``bench_unroll.py`` does: the rise of the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) above the RSS before one call, after the imports, the setup and a
one-step warm-up. glibc keeps freed blocks of the many differently sized temporaries resident
(``bench_methods.py`` measured Forward's RSS at T=10 anywhere from 107 to 199 MiB), so the
subprocesses run with ``MALLOC_MMAP_THRESHOLD_=131072`` (large blocks are returned to the OS
when freed) unless ``--default-malloc`` is given.

Usage::

    python benchmarks/bench_forward.py                      # T=100, K=10, 3 rounds; memory at T=10,100,300
    python benchmarks/bench_forward.py --quick              # T=10, 2 rounds, memory at T=10,30: smoke test
    python benchmarks/bench_forward.py --ks 1,3,10 --no-memory
    python benchmarks/bench_forward.py --memory-steps 10,100,1000
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

import nestgrad as ng

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unroll import LR, Setup, _load, _reset_peak_rss, _status_kib, machine, make_setup, weighted_loss

N_CLASSES = 10


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    make: Callable[[], ng.Method]
    path: str | None  # the ForwardRun.path the run must report (None: not a Forward)


VARIANTS = [
    Variant("unroll", "`Unroll()`", ng.Unroll, None),
    Variant("forward", "`Forward()` (forward-mode AD)", ng.Forward, "forward-mode"),
    Variant("double-backward", '`Forward(mode="double-backward")`', lambda: ng.Forward(mode="double-backward"),
            "double-backward"),
]  # fmt: skip
BY_NAME = {v.name: v for v in VARIANTS}


def hypergradient(s: Setup, variant: Variant, k: int) -> Tensor:
    """Train with ``variant`` for ``s.steps`` steps and return d(validation loss)/d(the K group weights)."""
    weights = torch.ones(k, requires_grad=True)
    group = s.y % k

    def loss_fn(params: dict[str, Tensor], batch: tuple[Tensor, Tensor], w: Tensor) -> Tensor:
        x, y = batch
        return weighted_loss(ng.call(s.model, params, x), y, w[group])

    method = variant.make()
    trained = ng.train(loss_fn, s.init, ng.optim.SGD(lr=LR), [(s.x, s.y)], steps=s.steps, hparams=weights,
                       method=method)  # fmt: skip
    (grad,) = torch.autograd.grad(F.cross_entropy(ng.call(s.model, trained, s.x_val), s.y_val), weights)
    if variant.path is not None:
        run = method.last_run  # type: ignore[attr-defined]
        if run is None or run.path != variant.path:
            raise RuntimeError(f"{variant.name}: expected the {variant.path} path, got {run}")
    return grad


def time_rounds(s: Setup, k: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (CPU seconds, wall seconds) per variant over ``repeats`` rotated rounds."""
    cpu: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()
            hypergradient(s, v, k)
            cpu[v.name].append(time.process_time() - c0)
            wall[v.name].append(time.perf_counter() - w0)
    return {n: (statistics.median(cpu[n]), statistics.median(wall[n])) for n in cpu}


def measure_one(name: str, steps: int, k: int) -> dict[str, float]:
    """Peak RSS increase (MiB) of one call of variant ``name`` in this (fresh) process."""
    variant = BY_NAME[name]
    s = make_setup(steps)
    hypergradient(replace(s, steps=1), variant, k)  # warm-up: lazy imports, kernels
    gc.collect()
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    c0 = time.process_time()
    hypergradient(s, variant, k)
    cpu = time.process_time() - c0
    return {"peak_mib": max(_status_kib("VmHWM") - before, 0) / 1024, "cpu": cpu}


def measure_memory(name: str, steps: int, k: int, default_malloc: bool) -> dict[str, float] | str:
    """:func:`measure_one` in a fresh interpreter; the error's last line if it failed."""
    env = dict(os.environ)
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--steps", str(steps), "--ks", str(k)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="T for the timing (default 100; 10 with --quick)")
    parser.add_argument("--ks", default="10", help="comma-separated K (number of group weights); default 10")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; 2 with --quick)")
    parser.add_argument("--memory-steps", default=None, help="T values for memory (default 10,100,300)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--default-malloc", action="store_true", help="do not set MALLOC_MMAP_THRESHOLD_")
    parser.add_argument("--quick", action="store_true", help="smoke test: T=10, 2 rounds, memory at T=10,30")
    parser.add_argument("--one", choices=list(BY_NAME), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = args.steps if args.steps is not None else (10 if args.quick else 100)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    ks = [int(x) for x in args.ks.split(",")]
    if any(not 1 <= k <= N_CLASSES for k in ks):
        parser.error(f"--ks: each K must be in 1..{N_CLASSES}")
    if args.one:
        print(json.dumps(measure_one(args.one, steps, ks[0])))
        return
    mem_steps = [int(x) for x in (args.memory_steps or ("10,30" if args.quick else "10,100,300")).split(",")]

    print(f"# nestgrad Forward benchmark ({datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z})")
    print(f"- torch {torch.__version__}, nestgrad {ng.__version__}, Python {platform.python_version()}")
    print(f"- machine: {machine()}; torch threads: {torch.get_num_threads()}")
    print(f"- case: 64-256-256-10 tanh MLP, load_digits (1000 train, 797 val), float32, full-batch SGD (lr {LR}), "
          f"hypergradient w.r.t. K group loss weights")  # fmt: skip
    print(f"- timing: T={steps}, {repeats} rotated rounds, medians; load average at start: {_load()}")
    print()
    s = make_setup(steps)
    rows = []
    for k in ks:
        grads = {v.name: hypergradient(s, v, k) for v in VARIANTS}  # also the warm-up
        ref = grads["unroll"]
        err = {n: float((g - ref).abs().max() / ref.abs().max()) for n, g in grads.items()}
        if max(err.values()) > 1e-4:
            raise RuntimeError(f"K={k}: the hypergradients disagree (max relative difference {err})")
        times = time_rounds(s, k, repeats)
        rows.append((k, times, err))

    print("## Time (median CPU seconds of train + hypergradient; wall seconds in brackets)\n")
    print("| K | variant | CPU s | wall s | ratio to Unroll (CPU) | max rel. diff. to Unroll |")
    print("|--:|---|--:|--:|--:|--:|")
    for k, times, err in rows:
        base = times["unroll"][0]
        for v in VARIANTS:
            c, w = times[v.name]
            print(f"| {k} | {v.label} | {c:.2f} | {w:.2f} | {c / base:.2f}x | {err[v.name]:.1e} |")
    print()

    if not args.no_memory:
        k = ks[-1]
        malloc = "default glibc malloc" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=131072"
        print(f"## Peak RSS increase (MiB), K={k}, one fresh process per cell ({malloc})\n")
        print("| variant | " + " | ".join(f"T={t}" for t in mem_steps) + " | largest / smallest T |")
        print("|---|" + "--:|" * (len(mem_steps) + 1))
        for v in VARIANTS:
            cells, peaks = [], []
            for t in mem_steps:
                got = measure_memory(v.name, t, k, args.default_malloc)
                if isinstance(got, str):
                    cells.append(f"error: {got}")
                else:
                    cells.append(f"{got['peak_mib']:.1f}")
                    peaks.append(got["peak_mib"])
            ratio = f"{peaks[-1] / peaks[0]:.2f}x" if len(peaks) == len(mem_steps) and peaks[0] > 0 else "-"
            print(f"| {v.label} | " + " | ".join(cells) + f" | {ratio} |")
        print()
    print(f"load average at the end: {_load()}")


if __name__ == "__main__":
    main()
