"""Benchmark: time per hypergradient on 1 and 2 ranks (gloo, one thread per rank), and bytes all-reduced.

The case is the benchmark MLP of ``bench_methods.py``: a 64-256-256-10 tanh MLP (float32) trained for
``T`` full-batch SGD steps on the first 1000 images of ``load_digits``, with one loss weight per
training image (a sharded hparam), and the hypergradient of the validation loss (the other 797
images) w.r.t. those weights. On R ranks each holds 1000/R training images, their weights and 1/R of
the validation images. For each method the script times ``ng.train`` plus ``torch.autograd.grad``
(median of ``--repeats``) on:

* 1 rank, one process, without ``parallel=`` (the baseline);
* 2 ranks, ``parallel=ng.DataParallel()``, spawned on this machine with one torch thread each.

It counts every all-reduce nestgrad issues (by wrapping ``torch.distributed.all_reduce`` in the
benchmark processes only): calls and bytes per training step and per hypergradient, and the wall time
spent inside them, the communication share.

Usage::

    python benchmarks/bench_distributed.py                  # T=20; Unroll, Reverse, Implicit: about 2 minutes
    python benchmarks/bench_distributed.py --steps 50 --methods unroll,reverse
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import nestgrad as ng

METHODS = {
    "unroll": lambda: ng.Unroll(),
    "reverse": lambda: ng.Reverse(),
    "implicit": lambda: ng.Implicit(ng.Neumann(steps=10, alpha=0.1)),  # 10 products, whatever the curvature
    "finitediff": lambda: ng.FiniteDiff(),
}


def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16.0, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.long)
    return x[:1000], y[:1000], x[1000:], y[1000:]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))


class Counter:
    """Counts torch.distributed.all_reduce calls, bytes and time (installed in the benchmark processes)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.calls = self.bytes = 0
        self.seconds = 0.0
        original = dist.all_reduce

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = original(tensor, *args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return out

        dist.all_reduce = counted

    def reset(self) -> None:
        self.calls = self.bytes = 0
        self.seconds = 0.0


def hypergradient(method: str, steps: int, world: int, rank: int, counter: Counter | None) -> dict[str, float]:
    x, y, xv, yv = digits()
    x, y, xv, yv = (t.tensor_split(world)[rank] for t in (x, y, xv, yv))
    net = mlp()
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    a = torch.ones(len(y), requires_grad=True)

    def loss_fn(p: dict[str, torch.Tensor], batch: Any, w: torch.Tensor) -> torch.Tensor:
        xb, yb = batch
        return (w * F.cross_entropy(ng.call(net, p, xb), yb, reduction="none")).mean()

    parallel = ng.DataParallel(shard_hparams=True) if world > 1 else None
    start = time.perf_counter()
    trained = ng.train(
        loss_fn,
        params,
        ng.optim.SGD(lr=0.1),
        [(x, y)],
        steps=steps,
        hparams=a,
        method=METHODS[method](),
        parallel=parallel,
    )
    train_calls = counter.calls if counter else 0
    train_bytes = counter.bytes if counter else 0
    val = F.cross_entropy(ng.call(net, trained, xv), yv)
    if world > 1:
        val = ng.distributed.mean(val)
    torch.autograd.grad(val, a)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds}
    if counter is not None:
        out |= {
            "train_calls": train_calls,
            "train_bytes": train_bytes,
            "backward_calls": counter.calls - train_calls,
            "backward_bytes": counter.bytes - train_bytes,
            "comm_seconds": counter.seconds,
        }
    return out


def rank_main(rank: int, world: int, store: str, methods: list[str], steps: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    counter = Counter()
    results: dict[str, list[dict[str, float]]] = {}
    for method in methods:
        hypergradient(method, steps, world, rank, None)  # warm-up
        runs = []
        for _ in range(repeats):
            counter.reset()
            runs.append(hypergradient(method, steps, world, rank, counter))
        results[method] = runs
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="unroll,reverse,implicit")
    args = parser.parse_args()
    methods = args.methods.split(",")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # a short run is no optimum: Implicit's convergence warnings are expected
    n_weights = sum(p.numel() for p in mlp().parameters())
    print(
        f"MLP 64-256-256-10 (|W| = {n_weights} float32 = {4 * n_weights / 2**20:.2f} MiB), T = {args.steps}, "
        f"1000 training images (per-example weights, sharded), 797 validation images; one thread per rank"
    )

    one = {}
    for method in methods:
        hypergradient(method, args.steps, 1, 0, None)
        one[method] = statistics.median(
            hypergradient(method, args.steps, 1, 0, None)["seconds"] for _ in range(args.repeats)
        )

    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(
            rank_main,
            args=(2, os.path.join(folder, "store"), methods, args.steps, args.repeats, folder),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
        try:
            while not ctx.join(timeout=600):
                pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        ranks = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in range(2)]

    header = (
        f"{'method':<10} {'1 rank s':>9} {'2 ranks s':>9} {'speedup':>8} {'comm share':>10} "
        f"{'AR/step':>8} {'MiB/step':>9} {'AR bwd':>7} {'MiB bwd':>8}"
    )
    print(header)
    for method in methods:
        runs = ranks[0][method]
        two = max(statistics.median(r[method][i]["seconds"] for i in range(args.repeats)) for r in ranks)
        comm = statistics.median(r["comm_seconds"] / r["seconds"] for r in runs)
        last = runs[-1]
        print(
            f"{method:<10} {one[method]:>9.3f} {two:>9.3f} {one[method] / two:>7.2f}x {comm:>9.0%} "
            f"{last['train_calls'] / args.steps:>8.1f} {last['train_bytes'] / args.steps / 2**20:>9.3f} "
            f"{last['backward_calls']:>7d} {last['backward_bytes'] / 2**20:>8.2f}"
        )
    print(
        "AR/step, MiB/step: all-reduce calls and payload per training step (the bucketed gradients); "
        "AR bwd, MiB bwd: in the whole backward pass. Payload per call; a ring all-reduce sends about "
        "2(R-1)/R times it per rank."
    )


if __name__ == "__main__":
    main()
