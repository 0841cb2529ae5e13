"""Benchmark: the peak memory of a ``higher``-style loop against the same run in ``ng.train``.

The case is a MAML-style meta-gradient with a learnable inner learning rate: a 32-256-256-1
tanh MLP (float32, one CPU thread) trained for ``T`` full-batch steps of SGD (lr 0.05 as a
Tensor, momentum 0.9) on 1000 random regression examples, and the gradient of a query loss
(500 other examples) with respect to the initial weights and the learning rate. Variants:

* ``higher-loop``: ``nestgrad.higher.innerloop_ctx`` with ``override={"lr": [lr]}`` and
  ``diffopt.step(loss)`` per step (every step recorded, as Unroll);
* ``higher-0.2.1``: the same loop with the ``higher`` package (skipped if not installed);
* ``train-unroll``, ``train-reverse``, ``train-reverse-10``: one ``ng.train`` call with
  ``Unroll()``, ``Reverse()`` and ``Reverse(checkpoint_every=10)``.

Each variant runs in a fresh subprocess (``--one``), after the setup and a one-step warm-up:
a first call is timed and gives the rise of the peak RSS (``VmHWM`` reset through
``/proc/self/clear_refs``); a second runs under torch's profiler and gives the *tensor peak*,
the most bytes torch tensors held at once above those held before the call (exact and the
same in every run; ``bench_methods.TensorPeak``). The meta-gradients are compared with the
``higher-loop`` one.

Usage::

    python benchmarks/bench_higher.py              # T=100: about a minute on 2 cores
    python benchmarks/bench_higher.py --steps 30
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad as ng
import nestgrad.higher
from bench_methods import TensorPeak
from bench_unroll import _reset_peak_rss, _status_kib, machine

VARIANTS = ["higher-loop", "higher-0.2.1", "train-unroll", "train-reverse", "train-reverse-10"]
LR, MOMENTUM = 0.05, 0.9


def setup() -> tuple[nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    x, xq = torch.randn(1000, 32), torch.randn(500, 32)
    w = torch.randn(32, 1) / 32**0.5
    return model, (x, torch.tanh(x @ w)), (xq, torch.tanh(xq @ w))


def meta_gradient(name: str, model: nn.Module, train, query, steps: int) -> list[Tensor]:
    """d query-loss / d (lr, initial weights) through ``steps`` SGD steps, by variant ``name``."""
    lr = torch.tensor(LR, requires_grad=True)
    weights = list(model.parameters())
    if name in ("higher-loop", "higher-0.2.1"):
        lib = nestgrad.higher if name == "higher-loop" else __import__("higher")
        opt = torch.optim.SGD(weights, lr=LR, momentum=MOMENTUM)
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.mse_loss(fmodel(train[0]), train[1]))
            meta = F.mse_loss(fmodel(query[0]), query[1])
    else:
        method = {"train-unroll": ng.Unroll(), "train-reverse": ng.Reverse()}.get(name) or ng.Reverse(
            checkpoint_every=10
        )

        def loss_fn(p, batch, hparams=None):
            return F.mse_loss(ng.call(model, p, batch[0]), batch[1])

        fast = ng.train(
            loss_fn,
            dict(model.named_parameters()),
            ng.optim.SGD(lr=lr, momentum=MOMENTUM),
            [train],
            steps=steps,
            method=method,
        )
        meta = F.mse_loss(ng.call(model, fast, query[0]), query[1])
    return list(torch.autograd.grad(meta, [lr, *weights]))


def measure_one(name: str, steps: int, save: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, train, query = setup()
    meta_gradient(name, model, train, query, 1)  # warm-up: lazy imports, kernels
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    grads = meta_gradient(name, model, train, query, steps)
    wall = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    torch.save(grads, save)
    del grads
    gc.collect()
    with TensorPeak() as meter:
        meta_gradient(name, model, train, query, steps)
    return {"wall_s": wall, "rss_mib": max(peak - before, 0) / 1024, "hwm_reset": reset, "tensor_mib": meter.peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.steps, args.save)))
        return
    print(f"{datetime.date.today()}, torch {torch.__version__}, {machine()}")
    print(f"T={args.steps}; MLP 32-256-256-1, 1000 examples, SGD(momentum=0.9), float32, one thread\n")
    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            if name == "higher-0.2.1":
                try:
                    import higher  # noqa: F401
                except ImportError:
                    print("higher is not installed: skipping higher-0.2.1")
                    continue
            save = os.path.join(tmp, f"{name}.pt")
            cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--save", save]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
            grads[name] = torch.load(save)
    ref = grads["higher-loop"]
    base = results["higher-loop"]["tensor_mib"]
    print("| variant | tensor peak (MiB) | vs higher-loop | peak RSS rise (MiB) | wall s | meta-gradient rel. diff |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        diff = max(((a - b).norm() / a.norm()).item() for a, b in zip(ref, grads[name]))
        print(
            f"| `{name}` | {r['tensor_mib']:.1f} | {r['tensor_mib'] / base:.3f}x | {r['rss_mib']:.0f} "
            f"| {r['wall_s']:.2f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
