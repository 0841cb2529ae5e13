"""Benchmark: what nestgrad itself costs on problems so small that its Python work could dominate.

Two cases, each against a hand-written plain-torch equivalent, timed side by side in one run
(alternating rounds, CPU time, medians; one thread):

(a) *Ridge, Implicit(CG)*: 100 features, 200 examples, 100 hyperparameters (one log ridge
    penalty per feature), float64. The hypergradient only (the training is not timed): the
    hand-written version takes the trained weights ``w*``, records the training gradient with
    its graph, runs CG on Hessian-vector products (``torch.autograd.grad`` with
    ``retain_graph=True``; one host read of the residual per iteration, as anyone would write
    it) for exactly the iterations that ``Implicit(CG)`` takes, then the final vector-Jacobian
    product for the hyperparameters. nestgrad's time is ``torch.autograd.grad`` of the same
    validation loss through ``ng.train(..., method=ng.Implicit(ng.CG(...)))`` (whose one
    training step from ``w*`` is untimed). The script first checks that both hypergradients
    agree to 1e-10 (relative).

(b) *Sinusoid task, Unroll*: the per-task loop of MAML on sinusoid regression (Finn et al.
    2017): a 1-40-40-1 ReLU MLP, 5 support points, 5 inner SGD steps (lr 0.01) from the
    meta-parameters, then the query loss and its gradient w.r.t. the meta-parameters, float32.
    Hand-written: ``torch.func.functional_call`` and ``torch.autograd.grad(create_graph=True)``;
    nestgrad: ``ng.train(..., method=ng.Unroll())`` with ``ng.call``. The table gives the
    microseconds per call of the inner run alone and of the whole meta-gradient, and nestgrad's
    overhead (the difference). The script first checks that the meta-gradients agree.

Usage::

    python benchmarks/bench_overhead.py               # ~1 minute
    python benchmarks/bench_overhead.py --quick       # smoke test, a few seconds
    python benchmarks/bench_overhead.py --profile     # cProfile of one nestgrad call of each case
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import math
import os
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

import nestgrad as ng

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unroll import machine

# ----------------------------------------------------------------------------- (a) ridge, Implicit(CG)
N_FEATURES = 100
N_EXAMPLES = 200
CG_TOL = 4e-6  # 31 iterations
X = "\N{MULTIPLICATION SIGN}"


class Ridge:
    """Ridge regression with one log penalty per feature: ``L = |Xw - y|^2 / 2n + sum(e^lam w^2) / 2``."""

    def __init__(self, d: int = N_FEATURES, n: int = N_EXAMPLES, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        dtype = torch.float64
        self.X = torch.randn(n, d, generator=g, dtype=dtype) * torch.linspace(0.3, 1.5, d, dtype=dtype)
        self.y = self.X @ torch.randn(d, generator=g, dtype=dtype) + 0.5 * torch.randn(n, generator=g, dtype=dtype)
        self.Xv = torch.randn(n, d, generator=g, dtype=dtype)
        self.yv = self.Xv @ torch.randn(d, generator=g, dtype=dtype) * 0.3 + torch.randn(n, generator=g, dtype=dtype)
        self.n, self.d = n, d
        self.lam = torch.full((d,), math.log(0.1), dtype=dtype, requires_grad=True)
        with torch.no_grad():
            H = self.X.T @ self.X / n + torch.diag(self.lam.exp())
            self.w_star = torch.linalg.solve(H, self.X.T @ self.y / n)
            self.lr = 1.0 / torch.linalg.eigvalsh(H)[-1].item()

    def loss(self, p: dict[str, Tensor], batch: Any, lam: Tensor) -> Tensor:
        r = self.X @ p["w"] - self.y
        return (r @ r) / (2 * self.n) + (lam.exp() * p["w"].square()).sum() / 2

    def val(self, w: Tensor) -> Tensor:
        r = self.Xv @ w - self.yv
        return (r @ r) / (2 * self.n)

    def trained(self, solver: ng.CG, on_solve: Callable[[ng.Solution], None] | None = None) -> Tensor:
        """``ng.train`` from ``w*`` for one step: the Implicit run whose backward pass is timed."""
        p = {"w": self.w_star.clone().requires_grad_()}
        method = ng.Implicit(solver, on_solve=on_solve)
        return ng.train(self.loss, p, ng.optim.SGD(lr=self.lr), [None], steps=1, hparams=self.lam, method=method)["w"]

    def nestgrad(self, w: Tensor) -> Tensor:
        """The timed part of nestgrad: the hypergradient of the validation loss through ``w``."""
        return torch.autograd.grad(self.val(w), self.lam)[0]

    def hand_written(self, w_trained: Tensor, iterations: int, tol: float = CG_TOL) -> Tensor:
        """The implicit hypergradient in plain torch: CG on Hessian-vector products, then one VJP."""
        w = w_trained.detach().requires_grad_()
        lam = self.lam.detach().requires_grad_()
        with torch.enable_grad():
            (v,) = torch.autograd.grad(self.val(w), w)
            (g,) = torch.autograd.grad(self.loss({"w": w}, None, lam), w, create_graph=True)
        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rr = r @ r
        stop = tol**2 * float(rr)
        for _ in range(iterations):
            (Ap,) = torch.autograd.grad(g, w, p, retain_graph=True)
            a = rr / (p @ Ap)
            x = x + a * p
            r = r - a * Ap
            rr_next = r @ r
            if float(rr_next) <= stop:
                break
            p = r + (rr_next / rr) * p
            rr = rr_next
        (dlam,) = torch.autograd.grad(g, lam, x)
        return -dlam


# ----------------------------------------------------------------------------- (b) sinusoid task, Unroll
HIDDEN = 40
SHOTS = 5
INNER_STEPS = 5
INNER_LR = 0.01


class Sinusoid:
    """One MAML task on sinusoid regression: 5 support and 5 query points, a 1-40-40-1 ReLU MLP."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(
            nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)
        )
        self.meta = {k: v.detach().clone().requires_grad_() for k, v in self.model.named_parameters()}
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.rand(2 * SHOTS, 1, generator=g) * 10 - 5
        y = 2.0 * torch.sin(x - 0.5)
        self.x, self.y, self.xq, self.yq = x[:SHOTS], y[:SHOTS], x[SHOTS:], y[SHOTS:]
        self.opt = ng.optim.SGD(lr=INNER_LR)

    def loss_fn(self, p: dict[str, Tensor], batch: tuple[Tensor, Tensor], _: Any) -> Tensor:
        return (ng.call(self.model, p, batch[0]) - batch[1]).pow(2).mean()

    def nestgrad_adapt(self) -> dict[str, Tensor]:
        return ng.train(self.loss_fn, self.meta, self.opt, [(self.x, self.y)], steps=INNER_STEPS)

    def hand_adapt(self) -> dict[str, Tensor]:
        w = dict(self.meta)
        for _ in range(INNER_STEPS):
            loss = (functional_call(self.model, w, (self.x,)) - self.y).pow(2).mean()
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            w = {k: v - INNER_LR * g for (k, v), g in zip(w.items(), grads)}
        return w

    def meta_gradient(self, adapted: dict[str, Tensor]) -> tuple[Tensor, ...]:
        query = (functional_call(self.model, adapted, (self.xq,)) - self.yq).pow(2).mean()
        return torch.autograd.grad(query, list(self.meta.values()))


# ----------------------------------------------------------------------------- timing
def _rounds(
    variants: dict[str, Callable[..., Any]],
    rounds: int,
    repeats: int,
    inputs: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """CPU seconds per call of each variant: ``rounds`` rounds, each variant once per round (rotated order),
    ``repeats`` calls per sample. A variant named in ``inputs`` is called on ``repeats`` fresh inputs made
    (untimed) by ``inputs[name]()`` before the sample."""
    inputs = inputs or {}
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(rounds):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            fn = variants[k]
            args = [inputs[k]() for _ in range(repeats)] if k in inputs else [None] * repeats
            t0 = time.process_time()
            for a in args:
                fn() if a is None else fn(a)
            times[k].append((time.process_time() - t0) / repeats)
    return times


def _ratios(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median and interquartile range of the per-round ratios ``num / den``."""
    r = sorted(a / b for a, b in zip(times[num], times[den]))
    q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0]] * 3
    return statistics.median(r), q[0], q[2]


def ridge_case(rounds: int, repeats: int) -> dict[str, Any]:
    problem = Ridge()
    solver = ng.CG(max_steps=200, tol=CG_TOL)
    solutions: list[ng.Solution] = []
    w = problem.trained(solver, solutions.append)
    got = problem.nestgrad(w)
    sol = solutions[-1]
    if not sol.converged:
        raise AssertionError(f"the benchmark's CG did not converge: {sol}")
    iterations = sol.steps
    ref = problem.hand_written(w, iterations)
    diff = ((got - ref).abs().max() / ref.abs().max()).item()
    if diff > 1e-10:
        raise AssertionError(f"Implicit(CG) and the hand-written hypergradient differ by {diff:.2e}")

    def hand() -> None:
        problem.hand_written(w, iterations)

    # nestgrad's timed part is the backward pass, through outputs of ng.train made before the sample.
    times = _rounds(
        {"hand": hand, "nestgrad": problem.nestgrad, "train": lambda: problem.trained(solver)},
        rounds,
        repeats,
        inputs={"nestgrad": lambda: problem.trained(solver)},
    )
    return {"iterations": iterations, "diff": diff, "times": times, "ratio": _ratios(times, "nestgrad", "hand")}


def sinusoid_case(rounds: int, repeats: int) -> dict[str, Any]:
    task = Sinusoid()
    a = task.meta_gradient(task.nestgrad_adapt())
    b = task.meta_gradient(task.hand_adapt())
    diff = max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))
    if diff > 1e-5:
        raise AssertionError(f"ng.train and the hand-written loop give meta-gradients that differ by {diff:.2e}")
    variants = {
        "hand": task.hand_adapt,
        "nestgrad": task.nestgrad_adapt,
        "hand+grad": lambda: task.meta_gradient(task.hand_adapt()),
        "nestgrad+grad": lambda: task.meta_gradient(task.nestgrad_adapt()),
    }
    return {"diff": diff, "times": _rounds(variants, rounds, repeats)}


def profile(n: int = 200) -> None:
    """cProfile of nestgrad's calls of each case, sorted by own time."""
    problem = Ridge()
    solver = ng.CG(max_steps=200, tol=CG_TOL)
    task = Sinusoid()
    for name, fn in (
        ("ridge: ng.train + hypergradient", lambda: problem.nestgrad(problem.trained(solver))),
        ("sinusoid: ng.train + meta-gradient", lambda: task.meta_gradient(task.nestgrad_adapt())),
    ):
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            fn()
        prof.disable()
        print(f"## {name} ({n} calls)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds per case (default 15)")
    p.add_argument("--quick", action="store_true", help="3 rounds of few calls: a smoke test")
    p.add_argument("--profile", action="store_true", help="print a cProfile of each nestgrad call instead")
    p.add_argument("--case", choices=["both", "ridge", "sinusoid"], default="both", help="which case to time")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("error", ng.ConvergenceWarning)
    if args.profile:
        profile()
        return
    rounds = 3 if args.quick else args.rounds
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench_overhead.py, {datetime.date.today()}, torch {torch.__version__}, {machine()}")
    print(f"one thread, {rounds} alternating rounds, medians of CPU time; load average {load:.1f}\n")
    if args.case in ("both", "ridge"):
        report_ridge(ridge_case(rounds, 2 if args.quick else 20))
    if args.case in ("both", "sinusoid"):
        report_sinusoid(sinusoid_case(rounds, 5 if args.quick else 100))


def report_ridge(ridge: dict[str, Any]) -> None:
    med = {k: statistics.median(v) for k, v in ridge["times"].items()}
    ratio, lo, hi = ridge["ratio"]
    print(
        f"(a) ridge, {N_FEATURES} features, {N_EXAMPLES} examples, {N_FEATURES} hparams, float64, "
        f"{ridge['iterations']} CG iterations; hypergradients agree to {ridge['diff']:.1e}\n"
    )
    print("| variant | ms per hypergradient | ratio |")
    print("|---|--:|--:|")
    times = f"**{ratio:.2f}{X}** ({lo:.2f}-{hi:.2f})"
    print(f"| hand-written CG on `autograd.grad` HVPs | {med['hand'] * 1e3:.2f} | 1.00{X} |")
    print(f"| `ng.Implicit(ng.CG(...))` backward | {med['nestgrad'] * 1e3:.2f} | {times} |")
    print(f"| (`ng.train`, 1 step, untimed above) | {med['train'] * 1e3:.2f} | |\n")


def report_sinusoid(sinus: dict[str, Any]) -> None:
    med = {k: statistics.median(v) for k, v in sinus["times"].items()}
    print(
        f"(b) sinusoid task, 1-{HIDDEN}-{HIDDEN}-1 MLP, {SHOTS} support points, {INNER_STEPS} SGD steps, "
        f"Unroll, float32; meta-gradients agree to {sinus['diff']:.1e}\n"
    )
    print("| per call | hand-written (µs) | `ng.train` (µs) | overhead (µs) |")
    print("|---|--:|--:|--:|")
    for label, h, n in (("inner run", "hand", "nestgrad"), ("inner run + meta-gradient", "hand+grad", "nestgrad+grad")):
        over = statistics.median(a - b for a, b in zip(sinus["times"][n], sinus["times"][h]))
        print(f"| {label} | {med[h] * 1e6:.0f} | {med[n] * 1e6:.0f} | {over * 1e6:.0f} |")


if __name__ == "__main__":
    main()
