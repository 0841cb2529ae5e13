"""Benchmark: memory and time against the number of training steps T, for every hypergradient method.

The case is the MLP of ``bench_unroll.py``: a 64-256-256-10 tanh MLP trained for
``T`` full-batch SGD steps (lr 0.1, float32, one CPU thread) on the first 1000
examples of ``load_digits``, and the hypergradient of the validation loss (the
other 797 examples) with respect to the loss weights. For each ``T`` (10, 100,
1000 by default) and each method, it measures the time of ``train`` plus
``torch.autograd.grad`` (the hypergradient), and the peak memory of that call.

Methods and hyperparameters:

* 1000 per-example loss weights for ``Unroll``, ``Reverse``,
  ``Reverse(checkpoint_every=round(sqrt(T)))``, ``Reverse(checkpoints=10)`` (binomial
  checkpointing), ``Implicit(CG(max_steps=k))``,
  ``Implicit(FixedPoint(max_steps=k))``, ``FiniteDiff`` and ``ZerothOrder(samples=4)``;
* 10 per-class loss weights for ``Forward`` (its time grows linearly with the number
  of hyperparameter elements), and for a second ``Unroll`` to compare it with.

The Implicit solvers run with ``tol=0``, so each solve takes exactly ``k`` iterations
unless it breaks down (a Hessian that is not positive definite stops CG early); the
script counts the gradient passes of every backward pass (the ``torch.autograd.grad``
calls made inside it) next to the solver's own ``Solution.steps``.

Timing: at each T, in-process rounds that run every method once in a rotated order
(medians; 5 rounds at T=10, 3 at T=100, none above), then, per method, one call in a
fresh subprocess (``--one``) that measures the peak memory (``VmHWM`` reset through
``/proc/self/clear_refs``, as in ``bench_unroll.py``) and also times that call. Where
no in-process round runs (T=1000 by default), the time is that single fresh-process run.
Hypergradients are compared with the exact one (``Unroll`` with the same hyperparameters).

Memory: two peaks per method and T, both in a fresh process (``--one``). The *tensor* peak
is the most bytes held by torch tensors during the call, above those held before it, read
from the allocation events of torch's profiler: what the method itself keeps, exact and the
same in every run. The targets are checked on it. The *RSS* peak is what the operating
system saw; it adds the C allocator's free-but-unreleased memory. glibc's malloc raises its
mmap threshold at run time, after which the MLP's 1 MiB activations come from a heap that
fragments, so RSS peaks vary from run to run (``--mmap-threshold`` fixes the threshold in
the fresh processes, which removes most of that).

Usage::

    python benchmarks/bench_methods.py                     # T = 10, 100, 1000: about 34 minutes on 2 cores
    python benchmarks/bench_methods.py --steps 10,100      # about 5 minutes
    python benchmarks/bench_methods.py --quick             # T=10, 2 rounds: smoke test
    python benchmarks/bench_methods.py --methods unroll,reverse --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import nestgrad as ng
from bench_unroll import (
    HIDDEN,
    LR,
    N_TRAIN,
    Setup,
    _load,
    _reset_peak_rss,
    _status_kib,
    machine,
    make_setup,
    weighted_loss,
)

N_CLASSES = 10
SOLVER_STEPS = 20  # k: the solver iterations of the Implicit variants
ZO_SAMPLES = 4
ZO_SIGMA = 0.1
DEFAULT_STEPS = (10, 100, 1000)
BINOMIAL = 10  # c, the snapshots of the reverse-binomial variant


# ------------------------------------------------------------------- variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """One hypergradient method, with the hyperparameters it differentiates.

    ``make(T, k, on_solve)`` builds a fresh method object for a run of ``T`` steps,
    ``k`` solver iterations (Implicit only) and a callback for the solver's
    :class:`nestgrad.Solution`.
    """

    name: str
    label: str
    hparams: str  # "example": 1000 per-example weights; "class": 10 per-class weights
    reference: str  # the exact variant with the same hyperparameters
    make: Callable[[int, int, Callable[[ng.Solution], None]], ng.Method]


def _sqrt_every(steps: int) -> int:
    """The classic checkpoint spacing ``round(sqrt(T))``, at least 1."""
    return max(1, round(math.sqrt(steps)))


VARIANTS = [
    Variant("unroll", "`Unroll()`", "example", "unroll", lambda t, k, cb: ng.Unroll()),
    Variant("reverse", "`Reverse()`", "example", "unroll", lambda t, k, cb: ng.Reverse()),
    Variant(
        "reverse-sqrt", "`Reverse(checkpoint_every=√T)`", "example", "unroll",
        lambda t, k, cb: ng.Reverse(checkpoint_every=_sqrt_every(t)),
    ),
    Variant(
        "reverse-binomial", f"`Reverse(checkpoints={BINOMIAL})`", "example", "unroll",
        lambda t, k, cb: ng.Reverse(checkpoints=BINOMIAL),
    ),
    Variant(
        "implicit-cg", "`Implicit(CG(max_steps=k, tol=0))`", "example", "unroll",
        lambda t, k, cb: ng.Implicit(ng.CG(max_steps=k, tol=0.0), on_solve=cb),
    ),
    Variant(
        "implicit-fp", "`Implicit(FixedPoint(max_steps=k, tol=0))`", "example", "unroll",
        lambda t, k, cb: ng.Implicit(ng.FixedPoint(max_steps=k, tol=0.0), on_solve=cb),
    ),
    Variant("finite-diff", "`FiniteDiff(eps=0.01)`", "example", "unroll", lambda t, k, cb: ng.FiniteDiff(eps=0.01)),
    Variant(
        "zeroth-order", f"`ZerothOrder(samples={ZO_SAMPLES}, sigma={ZO_SIGMA})`", "example", "unroll",
        lambda t, k, cb: ng.ZerothOrder(samples=ZO_SAMPLES, sigma=ZO_SIGMA, seed=0),
    ),
    Variant("unroll-class", "`Unroll()`", "class", "unroll-class", lambda t, k, cb: ng.Unroll()),
    Variant("forward", "`Forward()`", "class", "unroll-class", lambda t, k, cb: ng.Forward()),
]  # fmt: skip
BY_NAME = {v.name: v for v in VARIANTS}
HPARAMS = {"example": f"{N_TRAIN} per-example", "class": f"{N_CLASSES} per-class"}


@dataclasses.dataclass
class Run:
    """One measured ``train`` + hypergradient call."""

    grad: Tensor
    wall: float  # seconds, train + hypergradient
    cpu: float  # CPU seconds (time.process_time), train + hypergradient
    backward_cpu: float  # CPU seconds of the torch.autograd.grad call alone
    passes: int | None = None  # torch.autograd.grad calls inside the backward pass (when counted)
    solver_steps: int | None = None  # Solution.steps of the Implicit solve
    solver_result: str | None = None
    solver_matvecs: int | None = None  # Solution.matvecs: every matvec, a breakdown's included


@contextlib.contextmanager
def counting_grad_calls() -> Iterator[list[int]]:
    """Count the calls of ``torch.autograd.grad`` made in the block (the counter is ``calls[0]``).

    nestgrad's backward passes call ``torch.autograd.grad`` (Implicit's solvers: autograd's engine
    directly, counted too) for every gradient, Hessian- or Jacobian-vector product they take, so
    the count inside the outer ``autograd.grad`` call (minus that call itself) is the number of
    gradient passes of the method's backward.
    """
    from nestgrad.methods import _implicit

    calls = [0]
    original = torch.autograd.grad
    engine = _implicit._ENGINE  # Implicit's solvers call autograd's engine directly (one product each)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    def counted_engine(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return engine(*args, **kwargs)  # type: ignore[misc]

    torch.autograd.grad = counted
    if engine is not None:
        _implicit._ENGINE = counted_engine
    try:
        yield calls
    finally:
        torch.autograd.grad = original
        _implicit._ENGINE = engine


def class_weights() -> Tensor:
    """The 10 per-class loss weights, all 1 (the hyperparameters of Forward)."""
    return torch.ones(N_CLASSES, requires_grad=True)


def hypergradient(
    s: Setup, cw: Tensor, variant: Variant, k: int, count: bool = False, on_loss: Callable[[], None] | None = None
) -> Run:
    """Train with ``variant`` for ``s.steps`` steps and return the hypergradient, timed.

    ``on_loss`` is called at every call of the training loss (for :func:`tensor_peak`).
    """
    solutions: list[ng.Solution] = []
    method = variant.make(s.steps, k, solutions.append)
    hparams = s.weights if variant.hparams == "example" else cw

    def loss_fn(params: dict[str, Tensor], batch: tuple[Tensor, Tensor], w: Tensor) -> Tensor:
        x, y = batch
        if on_loss is not None:
            on_loss()
        return weighted_loss(ng.call(s.model, params, x), y, w if variant.hparams == "example" else w[y])

    w0, c0 = time.perf_counter(), time.process_time()
    trained = ng.train(loss_fn, s.init, ng.optim.SGD(lr=LR), [(s.x, s.y)], steps=s.steps, hparams=hparams,
                       method=method)  # fmt: skip
    val = F.cross_entropy(ng.call(s.model, trained, s.x_val), s.y_val)
    c1 = time.process_time()
    with counting_grad_calls() if count else contextlib.nullcontext([1]) as calls:
        (grad,) = torch.autograd.grad(val, hparams)
    c2, w2 = time.process_time(), time.perf_counter()
    run = Run(grad, w2 - w0, c2 - c0, c2 - c1, calls[0] - 1 if count else None)
    if solutions:
        last = solutions[-1]
        run.solver_steps, run.solver_result, run.solver_matvecs = last.steps, last.result, last.matvecs
    return run


# --------------------------------------------------------------------- memory
class TensorPeak:
    """The peak of the bytes held by torch tensors in a block, above those held at its start, in MiB.

    It is read from the allocation and free events of torch's profiler (``profile_memory``):
    exact, the same in every run, and independent of the C allocator under torch. The
    profiler keeps every op event until it stops, at several KiB each: ``Forward``'s
    ~2000 events per step took 130 MiB per profiled step, 23 GB at T=1000. So :meth:`cut`
    stops it, folds its events into the running count, and starts it again.
    """

    def __init__(self) -> None:
        self.held = self.top = 0
        self.prof: Any = None

    def __enter__(self) -> TensorPeak:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    @property
    def peak(self) -> float:
        return self.top / 2**20

    def cut(self) -> None:
        self._stop()
        self._start()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def _stop(self) -> None:
        self.prof.__exit__(None, None, None)
        events = self.prof.profiler.kineto_results.events()
        for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
            self.held += nbytes
            self.top = max(self.top, self.held)
        self.prof = None


def tensor_peak(s: Setup, cw: Tensor, variant: Variant, k: int, cut_every: int = 1) -> float:
    """:class:`TensorPeak` of one hypergradient, the profiler cut every ``cut_every`` calls of the loss."""
    calls = 0
    with TensorPeak() as meter:

        def tick() -> None:
            nonlocal calls
            calls += 1
            if calls % cut_every == 0:
                meter.cut()

        hypergradient(s, cw, variant, k, on_loss=tick)
    return meter.peak


def measure_one(name: str, steps: int, k: int, save: str | None) -> dict[str, Any]:
    """Peak memory and time of one call of variant ``name``, in this (fresh) process.

    Two calls: the first is timed and gives the peak RSS; as in ``bench_unroll.py``, its
    baseline is the RSS after the imports, the setup and a one-step warm-up of the same
    variant, with the peak (VmHWM) reset to it. The second runs under torch's profiler and
    gives the peak of the tensors' bytes (:func:`tensor_peak`).
    """
    variant = BY_NAME[name]
    s = make_setup(steps)
    cw = class_weights()
    hypergradient(dataclasses.replace(s, steps=1), cw, variant, k)
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS")
    run = hypergradient(s, cw, variant, k, count=True)
    peak = _status_kib("VmHWM")
    if save:
        torch.save(run.grad, save)
    out = {f.name: getattr(run, f.name) for f in dataclasses.fields(run) if f.name != "grad"}
    del run
    gc.collect()
    tensors = tensor_peak(s, cw, variant, k)
    return {**out, "peak_mib": max(peak - before, 0) / 1024, "hwm_reset": reset, "tensor_mib": tensors}


def measure_memory(
    name: str, steps: int, k: int, save: str | None = None, mmap_threshold: int | None = None
) -> dict[str, Any]:
    """Run :func:`measure_one` in a fresh interpreter; its hypergradient is saved to ``save`` if given.

    ``mmap_threshold`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in that process, which also turns
    off glibc's dynamic raising of the threshold.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--steps", str(steps), "--solver-steps", str(k)]
    if save:
        cmd += ["--save", save]
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no output"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the runs
@dataclasses.dataclass
class Result:
    """Everything measured for one variant at one T."""

    runs: list[Run] = dataclasses.field(default_factory=list)  # in-process rounds
    fresh: dict[str, Any] = dataclasses.field(default_factory=dict)  # the subprocess measurement
    grad: Tensor | None = None

    def times(self) -> tuple[list[float], list[float], list[float]]:
        """Wall, CPU and backward-CPU seconds: the in-process rounds, else the fresh-process run."""
        if self.runs:
            return [r.wall for r in self.runs], [r.cpu for r in self.runs], [r.backward_cpu for r in self.runs]
        if "cpu" in self.fresh:
            return [self.fresh["wall"]], [self.fresh["cpu"]], [self.fresh["backward_cpu"]]
        return [], [], []

    def median(self, which: int) -> float | None:
        """Median of the wall (0), CPU (1) or backward-CPU (2) seconds; None if not measured."""
        values = self.times()[which]
        return statistics.median(values) if values else None

    @property
    def peak(self) -> float | None:
        """Peak RSS increase in MiB (fresh process), or None."""
        return self.fresh.get("peak_mib")

    @property
    def tensors(self) -> float | None:
        """Peak of the tensors' bytes in MiB (fresh process, torch's profiler), or None."""
        return self.fresh.get("tensor_mib")


def run_steps(
    steps: int, variants: list[Variant], repeats: int, memory: bool, k: int, mmap_threshold: int | None = None
) -> dict[str, Result]:
    """In-process timing rounds at this T, then one fresh-process measurement per variant."""
    results = {v.name: Result() for v in variants}
    s = make_setup(steps)
    cw = class_weights()
    if repeats:
        for v in variants:  # warm-up: lazy imports, kernels, allocator
            hypergradient(dataclasses.replace(s, steps=1), cw, v, k)
    for r in range(repeats):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            gc.collect()
            run = hypergradient(s, cw, v, k, count=r == 0)
            results[v.name].runs.append(run)
            if results[v.name].grad is None:
                results[v.name].grad = run.grad
            run.grad = torch.empty(0)  # keep one copy only
        done = ", ".join(f"{v.name} {results[v.name].runs[-1].cpu:.2f}s" for v in variants)
        print(f"T={steps} round {r + 1}/{repeats} (CPU): {done}", flush=True)
    del s
    gc.collect()
    if memory:
        with tempfile.TemporaryDirectory() as tmp:
            for v in variants:
                path = os.path.join(tmp, f"{v.name}.pt")
                res = results[v.name]
                res.fresh = measure_memory(v.name, steps, k, path, mmap_threshold)
                if res.grad is None and os.path.exists(path):
                    res.grad = torch.load(path)
                shown = (
                    f"{res.tensors:.1f} MiB tensors, {res.peak:.0f} MiB RSS, {res.fresh['cpu']:.2f}s CPU"
                    if res.peak is not None
                    else res.fresh
                )
                print(f"T={steps} fresh process: {v.name}: {shown}", flush=True)
    print()
    return results


# ------------------------------------------------------------------ reporting
def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def rel_error(a: Tensor | None, b: Tensor | None) -> tuple[float | None, float | None]:
    """Norm-wise relative error ``||a - b|| / ||b||`` and the cosine of the angle between ``a`` and ``b``."""
    if a is None or b is None:
        return None, None
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm()).item(), (a @ b / (a.norm() * b.norm())).item()


def passes_of(res: Result) -> int | None:
    """The counted gradient passes of the backward pass (first round, else the fresh run)."""
    if res.runs and res.runs[0].passes is not None:
        return res.runs[0].passes
    return res.fresh.get("passes")


def solver_of(res: Result) -> tuple[int | None, str | None, int | None]:
    """``Solution.steps``, ``Solution.result`` and ``Solution.matvecs`` of the Implicit solve."""
    if res.runs and res.runs[0].solver_steps is not None:
        run = res.runs[0]
        return run.solver_steps, run.solver_result, run.solver_matvecs
    return res.fresh.get("solver_steps"), res.fresh.get("solver_result"), res.fresh.get("solver_matvecs")


def print_tables(all_results: dict[int, dict[str, Result]], variants: list[Variant], k: int) -> None:
    """The markdown tables: CPU time, wall time and peak memory against T, then the details."""
    steps = sorted(all_results)
    head = "| Method | Hyperparameters | " + " | ".join(f"T={t}" for t in steps) + " |"
    rule = "|---|---|" + "--:|" * len(steps)
    for title, cell in (
        ("CPU seconds of train + hypergradient (median)", lambda r: _fmt(r.median(1), ".2f")),
        ("Wall-clock seconds of train + hypergradient (median)", lambda r: _fmt(r.median(0), ".2f")),
        ("Peak tensor memory of train + hypergradient (MiB held by torch tensors)", lambda r: _fmt(r.tensors, ".1f")),
        ("Peak RSS increase of train + hypergradient (MiB, fresh process)", lambda r: _fmt(r.peak, ".0f")),
    ):
        print(f"### {title}\n")
        print(head)
        print(rule)
        for v in variants:
            cells = " | ".join(cell(all_results[t][v.name]) for t in steps)
            print(f"| {v.label} | {HPARAMS[v.hparams]} | {cells} |")
        print()
    print("### Details\n")
    print("| T | Method | Timed runs | CPU s | CPU x Unroll | Backward CPU s | Tensor MiB | Memory x Unroll "
          "| RSS MiB | Backward gradient passes | Solver steps, matvecs (result) | Rel. error vs exact "
          "| Cosine |")  # fmt: skip
    print("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|")
    for t in steps:
        res = all_results[t]
        for v in variants:
            r = res[v.name]
            ref = res.get(v.reference)
            n = len(r.runs) or (1 if "cpu" in r.fresh else 0)
            where = f"{n}" if r.runs else f"{n} (fresh process)"
            cpu_ratio = _ratio(r.median(1), ref.median(1) if ref else None)
            mem_ratio = _ratio(r.tensors, ref.tensors if ref else None)
            err, cos = rel_error(r.grad, ref.grad if ref else None)
            st, result, matvecs = solver_of(r)
            solver = "" if st is None else f"{st}, {matvecs} ({result})"
            passes = passes_of(r)
            cells = [
                str(t), v.label, where, _fmt(r.median(1), ".3f"), _fmt(cpu_ratio, ".2f"), _fmt(r.median(2), ".3f"),
                _fmt(r.tensors, ".1f"), _fmt(mem_ratio, ".3f"), _fmt(r.peak, ".0f"),
                "n/a" if passes is None else str(passes), solver,
                _fmt(err, ".2e"), _fmt(cos, ".4f"),
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
    print()
    print(f"- k = {k} solver iterations. CPU x Unroll and Memory x Unroll compare with `Unroll()` on the same "
          f"hyperparameters (per-example, or per-class for `Forward`); memory: of the tensor peaks.")  # fmt: skip
    print("- Tensor MiB: the peak of the bytes held by torch tensors during the call, above those held before it, "
          "from the allocation events of torch's profiler: what the method itself keeps, exact and the same in "
          "every run. RSS MiB: the peak resident-set increase of the process, which adds the C allocator's free "
          "but unreleased memory; with glibc's default malloc it varies from run to run (see the README).")  # fmt: skip
    print("- Backward gradient passes: `torch.autograd.grad` calls inside the hypergradient's backward pass "
          "(each a gradient, Hessian- or Jacobian-vector product through one step's graph).")  # fmt: skip
    print("- Rel. error vs exact: `||g - g_Unroll|| / ||g_Unroll||` at the same T; for Implicit, FiniteDiff and "
          "ZerothOrder this is the approximation error of the method, not a bug.")  # fmt: skip
    for t in steps:
        for v in variants:
            fresh = all_results[t][v.name].fresh
            if "error" in fresh:
                print(f"- T={t} {v.name}: the fresh-process measurement failed: {fresh['error']}")
            elif fresh and not fresh.get("hwm_reset", True):
                print(f"- T={t} {v.name}: /proc/self/clear_refs not writable, VmHWM not reset (an upper bound)")
    print()


def reverse_memory_model(steps: list[int]) -> None:
    """What Reverse stores per step, and the memory that implies, to set against the measured peaks."""
    s = make_setup(1)
    param_bytes = sum(p.numel() * p.element_size() for p in s.model.parameters())
    state = ng.optim.SGD(lr=LR).init({k: v.detach() for k, v in s.model.named_parameters()})
    state_bytes = sum(x.numel() * x.element_size() for x in state.tensors())
    # The RNG state is stored only at checkpoints whose segment draws random numbers: this MLP draws none.
    per_step = param_bytes + state_bytes
    mib = 1024 * 1024
    print("### What Reverse stores\n")
    print(f"- per step: weights {param_bytes / 1024:.0f} KiB ({param_bytes // 4:,} float32), optimizer state "
          f"{state_bytes} B (SGD without momentum has none), no RNG state (nothing random), "
          f"one 0-d loss: {per_step / 1024:.0f} KiB in all")  # fmt: skip
    for t in steps:
        every = _sqrt_every(t)
        stored = (math.ceil(t / every) + every) * param_bytes
        print(f"- T={t}: `Reverse()` stores {t * per_step / mib:.1f} MiB; "
              f"`Reverse(checkpoint_every={every})` about {stored / mib:.1f} MiB "
              f"({math.ceil(t / every)} checkpoints + {every} recomputed states)")  # fmt: skip
    print()


def report_targets(all_results: dict[int, dict[str, Result]], k: int) -> None:
    """Check the three targets (reported, not asserted)."""
    print("## Targets (reported, not asserted; times are CPU medians)\n")

    def get(t: int, name: str) -> Result | None:
        return all_results.get(t, {}).get(name)

    # 1. Reverse against Unroll at T=100.
    rev, unr = get(100, "reverse"), get(100, "unroll")
    if rev is None or unr is None or rev.tensors is None or unr.tensors is None:
        print("- Reverse <= 0.15x Unroll's peak memory and <= 1.6x its time at T=100: not measured")
    else:
        mem = rev.tensors / unr.tensors
        cpu, wall = _ratio(rev.median(1), unr.median(1)), _ratio(rev.median(0), unr.median(0))
        ok = mem <= 0.15 and cpu is not None and cpu <= 1.6
        print(f"- Reverse at T=100: tensor memory {rev.tensors:.1f} / {unr.tensors:.1f} MiB = {mem:.3f}x Unroll "
              f"(target <= 0.15), time {_fmt(cpu, '.2f')}x CPU ({_fmt(wall, '.2f')}x wall) (target <= 1.6) -> "
              f"{'met' if ok else 'MISSED'}")  # fmt: skip
        if rev.peak is not None and unr.peak:
            ratio = rev.peak / unr.peak
            print(f"  - peak RSS: {rev.peak:.0f} / {unr.peak:.0f} MiB = {ratio:.3f}x (one fresh run each)")

    # 1b. Binomial Reverse against Unroll at T=1000 (issue 20).
    rev, unr = get(1000, "reverse-binomial"), get(1000, "unroll")
    if rev is None or unr is None or rev.tensors is None or unr.tensors is None:
        print(f"- Reverse(checkpoints={BINOMIAL}) <= 0.02x Unroll's peak memory and <= 3x its time at T=1000: "
              f"not measured")  # fmt: skip
    else:
        mem = rev.tensors / unr.tensors
        cpu, wall = _ratio(rev.median(1), unr.median(1)), _ratio(rev.median(0), unr.median(0))
        ok = mem <= 0.02 and cpu is not None and cpu <= 3
        print(f"- Reverse(checkpoints={BINOMIAL}) at T=1000: tensor memory {rev.tensors:.1f} / {unr.tensors:.1f} MiB "
              f"= {mem:.4f}x Unroll (target <= 0.02), time {_fmt(cpu, '.2f')}x CPU ({_fmt(wall, '.2f')}x wall) "
              f"(target <= 3) -> {'met' if ok else 'MISSED'}")  # fmt: skip

    # 2. Forward's memory flat in T.
    fwd = {t: get(t, "forward") for t in (10, 100, 1000)}
    lo, hi = fwd[10], fwd[1000] or fwd[100]
    if lo is None or hi is None or lo.tensors is None or hi.tensors is None:
        print("- Forward memory at T=1000 <= 1.1x T=10 (10 hparams): not measured")
    else:
        t_hi = 1000 if fwd[1000] is not None else 100
        ratio = hi.tensors / lo.tensors if lo.tensors else math.inf
        print(f"- Forward tensor memory (10 hparams): {hi.tensors:.1f} MiB at T={t_hi} vs {lo.tensors:.1f} MiB at "
              f"T=10 = {ratio:.3f}x (target <= 1.1 at T=1000) -> {'met' if ratio <= 1.1 else 'MISSED'}"
              f"{'' if t_hi == 1000 else ' so far (T=1000 not run)'}")  # fmt: skip
        if hi.peak is not None and lo.peak:
            print(f"  - peak RSS: {hi.peak:.0f} MiB vs {lo.peak:.0f} MiB = {hi.peak / lo.peak:.2f}x (one fresh run "
                  f"each; glibc's heap fragmentation makes these vary from run to run)")  # fmt: skip

    # 3. Implicit's backward cost: at most k+3 gradient passes, the same at every T.
    for name in ("implicit-cg", "implicit-fp"):
        counts = {t: passes_of(res[name]) for t, res in sorted(all_results.items()) if name in res}
        counts = {t: c for t, c in counts.items() if c is not None}
        if not counts:
            print(f"- {name}: backward gradient passes not measured")
            continue
        solver = {t: solver_of(all_results[t][name]) for t in counts}
        bounded = all(c <= k + 3 for c in counts.values())
        shown = ", ".join(
            f"T={t}: {c} (Solution.steps {solver[t][0]}, matvecs {solver[t][2]}, {solver[t][1]})"
            for t, c in counts.items()
        )
        accounted = all(c == (solver[t][2] or 0) + 2 for t, c in counts.items())
        print(f"- {name}: backward gradient passes {shown}; target <= k+3 = {k + 3} at every T -> "
              f"{'met' if bounded else 'MISSED'}; passes = matvecs + 2 at every T: {accounted}")  # fmt: skip
    print()


# ----------------------------------------------------------------------- main
def parse_steps(text: str) -> list[int]:
    """``"10,100"`` -> ``[10, 100]``."""
    try:
        steps = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be comma-separated ints, e.g. 10,100; got {text!r}") from None
    if not steps or steps[0] < 1:
        raise argparse.ArgumentTypeError(f"--steps must be ints >= 1; got {text!r}")
    return steps


def parse_methods(text: str) -> list[Variant]:
    """``"unroll,reverse"`` -> those variants, in the benchmark's order."""
    names = {x.strip() for x in text.split(",") if x.strip()}
    unknown = names - set(BY_NAME)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(BY_NAME)}")
    return [v for v in VARIANTS if v.name in names]


def default_repeats(steps: int) -> int:
    """In-process timing rounds at ``steps``: 5 at T <= 10, 3 at T <= 100, else 0 (the fresh-process run only)."""
    return 5 if steps <= 10 else 3 if steps <= 100 else 0


def main() -> None:
    """Parse the flags, then run one memory measurement (``--one``) or the whole benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=parse_steps, default=None,
                        help="comma-separated T values (default 10,100,1000; 10 with --quick)")  # fmt: skip
    parser.add_argument("--methods", type=parse_methods, default=None,
                        help=f"comma-separated subset of: {', '.join(BY_NAME)}")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None,
                        help="in-process timing rounds at every T (default 5 at T<=10, 3 at T<=100, 0 above: "
                             "then the single fresh-process run is the timing); 2 with --quick")  # fmt: skip
    parser.add_argument("--solver-steps", type=int, default=SOLVER_STEPS,
                        help=f"k, the solver iterations of Implicit (default {SOLVER_STEPS})")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke test: T=10, 2 rounds")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the fresh-process runs (no peak memory; at least one in-process round)")  # fmt: skip
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="MALLOC_MMAP_THRESHOLD_ for the fresh processes (default: glibc's, dynamic)")  # fmt: skip
    parser.add_argument("--one", choices=list(BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ng.ConvergenceWarning)  # the solves stop at k on purpose; the table says how
    k = args.solver_steps

    if args.one:
        steps = args.steps[0] if args.steps else 10
        print(json.dumps(measure_one(args.one, steps, k, args.save)), flush=True)
        # Stopping the profiler inside an autograd Function (TensorPeak.cut, from the loss of
        # an adjoint method's training) leaves torch's profiler callbacks dangling: torch warns
        # "Leaked callback handle", and the interpreter's final garbage collection can crash.
        # The measurement is complete here, so skip that teardown.
        os._exit(0)

    steps_list = args.steps or ([10] if args.quick else list(DEFAULT_STEPS))
    variants = args.methods or VARIANTS
    start = time.perf_counter()
    print(f"# nestgrad methods benchmark ({datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z})\n")
    print(f"- torch {torch.__version__}, nestgrad {ng.__version__}, Python {platform.python_version()}")
    print(f"- machine: {machine()}; torch threads: {torch.get_num_threads()}")
    print(f"- case: 64-{HIDDEN}-{HIDDEN}-10 tanh MLP, load_digits (train {N_TRAIN}, val rest), float32, full-batch "
          f"SGD (lr={LR}), T in {steps_list}; d(val loss)/d(loss weights); k={k}")  # fmt: skip
    threshold = "glibc default" if args.mmap_threshold is None else f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"
    print(f"- peak memory: fresh process per method and T ({threshold}): the RSS increase of a timed call, then the "
          f"tensors' bytes of a second call under torch's profiler")  # fmt: skip
    print(f"- load average at start: {_load()}")
    print()

    all_results: dict[int, dict[str, Result]] = {}
    for steps in steps_list:
        repeats = args.repeats if args.repeats is not None else (2 if args.quick else default_repeats(steps))
        if args.no_memory:
            repeats = max(repeats, 1)
        all_results[steps] = run_steps(steps, variants, repeats, not args.no_memory, k, args.mmap_threshold)

    print("## Results\n")
    print_tables(all_results, variants, k)
    if any(v.name.startswith("reverse") for v in variants):
        reverse_memory_model(steps_list)
    report_targets(all_results, k)
    print(f"Total time {time.perf_counter() - start:.0f} s; load average at the end: {_load()}")


if __name__ == "__main__":
    main()
