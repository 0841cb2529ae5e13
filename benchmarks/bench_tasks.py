"""Benchmark: one MAML meta-gradient over a batch of tasks, per-task loops against ``ng.train(..., tasks=n)``.

Two cases, second-order MAML, one meta-gradient (inner adaptation of every task on its
support set, then ``backward`` of the summed query losses to the shared initial weights):

* ``sinusoid``: 25 tasks, 5 inner SGD steps (lr 0.01), a 1-40-40-1 ReLU MLP, 10 support and
  10 query points per task (Finn et al. 2017).
* ``omniglot-1shot`` / ``omniglot-5shot``: 5-way classification shaped like Omniglot, 32
  tasks, 1 inner SGD step (lr 0.4), the 4-block conv net of Finn et al. (64 filters 3x3,
  BatchNorm with batch statistics, ReLU, 2x2 max-pool), random 28x28 images, 1 or 5 support
  and 5 query images per class. Convolutions dominate here.

Variants (every one is checked to give the same meta-gradient before timing):

* ``hand-written loop``: per task, ``torch.func.functional_call`` and
  ``torch.autograd.grad(create_graph=True)`` steps written out by hand. The 1.000x reference.
* ``ng.train loop``: per task, ``ng.train(..., method=ng.Unroll())``.
* ``ng.train tasks``: one ``ng.train(..., tasks=n)`` call for all tasks (``torch.func.vmap``
  over the per-task loss, one optimizer on the stacked weights).
* ``hand-written vmap``: ``torch.func.vmap`` over ``torch.func.grad`` steps, by hand: the
  fastest code seen for this, offered by no library.
* ``higher``: per task, ``higher.innerloop_ctx`` (if installed).
* ``TorchOpt``: per task, ``torchopt.MetaSGD`` with ``extract_state_dict``/``recover_state_dict``
  (if installed).

One torch thread; rounds alternate the variants in a rotated order; the table gives medians of
CPU time (``time.process_time``) and wall time per meta-gradient, and the ratio of CPU times to
the hand-written loop.

Usage::

    python benchmarks/bench_tasks.py                 # all cases, 7 rounds: about 2 minutes
    python benchmarks/bench_tasks.py --quick         # 2 rounds, sinusoid only
    python benchmarks/bench_tasks.py --cases omniglot-5shot --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

import nestgrad as ng
from bench_unroll import machine

Params = dict[str, Tensor]


@dataclass
class Case:
    name: str
    model: nn.Module
    xs: Tensor  # (n, support, ...)
    ys: Tensor
    xq: Tensor  # (n, query, ...)
    yq: Tensor
    steps: int
    lr: float
    loss: Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> scalar, for one task

    @property
    def n(self) -> int:
        return self.xs.shape[0]


def sinusoid_case(seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    n, k = 25, 10
    amp = torch.rand(n, generator=g) * 4.9 + 0.1
    phase = torch.rand(n, generator=g) * torch.pi
    xs = torch.rand(n, k, 1, generator=g) * 10 - 5
    xq = torch.rand(n, k, 1, generator=g) * 10 - 5
    ys = amp[:, None, None] * torch.sin(xs - phase[:, None, None])
    yq = amp[:, None, None] * torch.sin(xq - phase[:, None, None])
    return Case("sinusoid", model, xs, ys, xq, yq, steps=5, lr=0.01, loss=F.mse_loss)


def conv_net(ways: int = 5, filters: int = 64) -> nn.Module:
    blocks: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        blocks += [
            nn.Conv2d(channels, filters, 3, padding=1),
            nn.BatchNorm2d(filters, track_running_stats=False),  # batch statistics, as in MAML
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = filters
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(filters, ways))


def omniglot_case(shots: int, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, ways, query = 32, 5, 5
    xs = torch.rand(n, ways * shots, 1, 28, 28, generator=g)
    xq = torch.rand(n, ways * query, 1, 28, 28, generator=g)
    ys = torch.arange(ways).repeat_interleave(shots).expand(n, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(query).expand(n, -1).contiguous()
    return Case(f"omniglot-{shots}shot", conv_net(ways), xs, ys, xq, yq, steps=1, lr=0.4, loss=F.cross_entropy)


CASES: dict[str, Callable[[], Case]] = {
    "sinusoid": sinusoid_case,
    "omniglot-1shot": lambda: omniglot_case(1),
    "omniglot-5shot": lambda: omniglot_case(5),
}


# ----------------------------------------------------------------------------- variants
def meta_params(case: Case) -> Params:
    return {k: v.detach().clone().requires_grad_() for k, v in case.model.named_parameters()}


def hand_written_loop(case: Case) -> list[Tensor]:
    w0 = meta_params(case)
    total = 0.0
    for i in range(case.n):
        p = dict(w0)
        for _ in range(case.steps):
            loss = case.loss(functional_call(case.model, p, (case.xs[i],)), case.ys[i])
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - case.lr * g for (k, v), g in zip(p.items(), grads, strict=True)}
        total = total + case.loss(functional_call(case.model, p, (case.xq[i],)), case.yq[i])
    return list(torch.autograd.grad(total, list(w0.values())))


def _ng_loss(case: Case) -> Callable[[Params, tuple[Tensor, Tensor], object], Tensor]:
    def loss_fn(p: Params, batch: tuple[Tensor, Tensor], h: object) -> Tensor:
        x, y = batch
        return case.loss(ng.call(case.model, p, x), y)

    return loss_fn


def ng_loop(case: Case) -> list[Tensor]:
    w0, loss_fn, opt = meta_params(case), _ng_loss(case), ng.optim.SGD(lr=case.lr)
    total = 0.0
    for i in range(case.n):
        fast = ng.train(loss_fn, w0, opt, [(case.xs[i], case.ys[i])], steps=case.steps)
        total = total + case.loss(ng.call(case.model, fast, case.xq[i]), case.yq[i])
    return list(torch.autograd.grad(total, list(w0.values())))


def ng_tasks(case: Case) -> list[Tensor]:
    w0, loss_fn, opt = meta_params(case), _ng_loss(case), ng.optim.SGD(lr=case.lr)
    fast = ng.train(loss_fn, w0, opt, [(case.xs, case.ys)], steps=case.steps, tasks=case.n)
    query = vmap(lambda p, x, y: case.loss(ng.call(case.model, p, x), y))(fast, case.xq, case.yq).sum()
    return list(torch.autograd.grad(query, list(w0.values())))


def hand_written_vmap(case: Case) -> list[Tensor]:
    w0 = meta_params(case)

    def task(p: Params, x: Tensor, y: Tensor, x_q: Tensor, y_q: Tensor) -> Tensor:
        for _ in range(case.steps):
            g = torch.func.grad(lambda q: case.loss(functional_call(case.model, q, (x,)), y))(p)
            p = {k: p[k] - case.lr * g[k] for k in p}
        return case.loss(functional_call(case.model, p, (x_q,)), y_q)

    losses = vmap(task, in_dims=(None, 0, 0, 0, 0))(w0, case.xs, case.ys, case.xq, case.yq)
    return list(torch.autograd.grad(losses.sum(), list(w0.values())))


def higher_loop(case: Case) -> list[Tensor]:
    import higher

    model = case.model
    for p in model.parameters():
        p.grad = None
    opt = torch.optim.SGD(model.parameters(), lr=case.lr)
    for i in range(case.n):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(case.steps):
                diffopt.step(case.loss(fmodel(case.xs[i]), case.ys[i]))
            case.loss(fmodel(case.xq[i]), case.yq[i]).backward()
    return [p.grad.clone() for p in model.parameters()]


def torchopt_loop(case: Case) -> list[Tensor]:
    import torchopt

    model = case.model
    for p in model.parameters():
        p.grad = None
    inner = torchopt.MetaSGD(model, lr=case.lr)
    start = torchopt.extract_state_dict(model)
    for i in range(case.n):
        for _ in range(case.steps):
            inner.step(case.loss(model(case.xs[i]), case.ys[i]))
        case.loss(model(case.xq[i]), case.yq[i]).backward()
        torchopt.recover_state_dict(model, start)
    return [p.grad.clone() for p in model.parameters()]


VARIANTS: dict[str, Callable[[Case], list[Tensor]]] = {
    "hand-written loop": hand_written_loop,
    "ng.train loop": ng_loop,
    "ng.train tasks": ng_tasks,
    "hand-written vmap": hand_written_vmap,
    "higher": higher_loop,
    "TorchOpt": torchopt_loop,
}


def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    skipped = {}
    for name, module in (("higher", "higher"), ("TorchOpt", "torchopt")):
        if name in names:
            try:
                __import__(module)
            except Exception as err:
                skipped[name] = f"{type(err).__name__}: {err}"
    return [n for n in names if n not in skipped], skipped


def in_float64(case: Case) -> Case:
    model = copy.deepcopy(case.model).double()
    floats = [t.double() if t.is_floating_point() else t for t in (case.xs, case.ys, case.xq, case.yq)]
    return Case(case.name, model, *floats, steps=case.steps, lr=case.lr, loss=case.loss)


def check(case: Case, names: list[str]) -> dict[str, float]:
    """Every variant's meta-gradient against the hand-written loop, in float64: the largest relative differences.

    Raises for a nestgrad variant that differs by more than 1e-9; a peer's difference is reported.
    """
    case = in_float64(case)
    ref = torch.cat([g.flatten() for g in hand_written_loop(case)])
    diffs = {}
    for name in names:
        got = torch.cat([g.flatten() for g in VARIANTS[name](case)])
        diffs[name] = ((got - ref).abs().max() / ref.abs().max()).item()
        if name.startswith("ng.") and not diffs[name] < 1e-9:
            raise AssertionError(f"{case.name}: {name} differs from the hand-written loop by {diffs[name]:.2e}")
    return diffs


def time_case(case: Case, names: list[str], repeats: int) -> dict[str, tuple[float, float]]:
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            c0, w0 = time.process_time(), time.perf_counter()
            VARIANTS[name](case)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {n: (statistics.median(cpu[n]), statistics.median(wall[n])) for n in names}


def report(case: Case, times: dict[str, tuple[float, float]], diffs: dict[str, float], skipped: dict[str, str]) -> str:
    base = times["hand-written loop"][0]
    lines = [
        f"### {case.name}: {case.n} tasks, {case.steps} inner step(s); float32 times, float64 check",
        "",
        "| variant | CPU ms | wall ms | CPU vs hand-written loop | meta-gradient vs hand-written loop (float64) |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, (c, w) in times.items():
        diff = "reference" if name == "hand-written loop" else f"{diffs[name]:.1e}"
        lines.append(f"| {name} | {1000 * c:.1f} | {1000 * w:.1f} | {c / base:.3f}x | {diff} |")
    peers = [times[p][0] for p in ("higher", "TorchOpt") if p in times]
    if peers:
        ours = times["ng.train tasks"][0]
        lines.append("")
        ratio = min(peers) / ours
        verdict = f"{ratio:.1f}x faster than" if ratio >= 1 else f"{1 / ratio:.1f}x slower than"
        lines.append(f"`ng.train tasks` is {verdict} the fastest peer (CPU time).")
    for name, why in skipped.items():
        lines.append(f"{name} skipped: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 rounds, sinusoid only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = ["sinusoid"] if args.quick else args.cases.split(",")
    repeats = 2 if args.quick else args.repeats
    names, skipped = available(args.variants.split(","))
    if "hand-written loop" not in names:
        names.insert(0, "hand-written loop")
    print(f"# bench_tasks.py, {datetime.date.today()}, torch {torch.__version__}, {machine()}, one thread")
    print(f"# command: python {' '.join(sys.argv)}\n")
    for name in cases:
        case = CASES[name]()
        diffs = check(case, [n for n in names if n != "hand-written loop"])
        print(report(case, time_case(case, names, repeats), diffs, skipped), "\n", flush=True)


if __name__ == "__main__":
    main()
