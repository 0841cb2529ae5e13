"""Benchmark: the hypergradient through an unrolled SGD run, nestgrad against the alternatives.

The case: 1000 per-example loss weights ``w`` (the hyperparameters), a
64-256-256-10 tanh MLP trained for ``T`` full-batch SGD steps on the first 1000
examples of sklearn's ``load_digits`` (standardized), and the hypergradient
``d(validation loss after training) / dw`` on the remaining 797 examples.
Float32, one CPU thread.

Five variants run side by side in one process, in alternating rounds (every
round runs each variant once, in a rotated order) so that drifts of the machine
hit all of them alike; the table reports medians:

* ``plain``: ``torch.optim.SGD`` training, no hypergradient (the reference for training).
* ``nestgrad-plain``: ``nestgrad.train`` under ``torch.no_grad()``, first-order training.
* ``hand-written``: an expert's unroll with ``torch.func.functional_call`` and
  ``torch.autograd.grad(create_graph=True)`` (the reference for hypergradients).
* ``nestgrad-unroll``: ``nestgrad.train(..., method=nestgrad.Unroll())``.
* ``higher``: ``higher.innerloop_ctx`` with ``torch.optim.SGD``, when importable.

Before timing, the script checks that the three hypergradients agree (and that
both training variants reach the same weights): a benchmark of wrong answers
would be worthless. Peak memory is measured per variant in a fresh subprocess
(``--one VARIANT``) from ``/proc/self/status``, as CPU torch has no memory counter.

Usage::

    python benchmarks/bench_unroll.py              # T=100, 5 rounds
    python benchmarks/bench_unroll.py --quick      # T=10, 2 rounds: smoke test
    python benchmarks/bench_unroll.py --steps 50 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import nestgrad as ng

LR = 0.1
N_TRAIN = 1000
HIDDEN = 256
SEED = 0


# ---------------------------------------------------------------------- setup
@dataclasses.dataclass
class Setup:
    """Data, model and hyperparameters shared by every variant."""

    model: nn.Module
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor
    weights: Tensor
    steps: int
    scratch: nn.Module = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.scratch = copy.deepcopy(self.model)  # trained in place by torch.optim

    @property
    def init(self) -> dict[str, Tensor]:
        """The initial weights: the module's own parameters (leaves that require grad)."""
        return dict(self.model.named_parameters())


def weighted_loss(logits: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Mean of the per-example cross-entropies, each scaled by its weight."""
    return (w * F.cross_entropy(logits, y, reduction="none")).mean()


def make_setup(steps: int) -> Setup:
    """Load and standardize the digits, and build the MLP and the loss weights."""
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x_all = torch.as_tensor(x_all, dtype=torch.float32)
    y_all = torch.as_tensor(y_all, dtype=torch.long)
    x, x_val = x_all[:N_TRAIN], x_all[N_TRAIN:]
    mean, std = x.mean(0), x.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # some border pixels are always 0
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10))
    weights = torch.ones(N_TRAIN, requires_grad=True)
    return Setup(model, (x - mean) / std, y_all[:N_TRAIN], (x_val - mean) / std, y_all[N_TRAIN:], weights, steps)


# ------------------------------------------------------------------- variants
def run_plain(s: Setup) -> dict[str, Tensor]:
    """``torch.optim.SGD`` training of a copy of the model, without hypergradient."""
    model = s.scratch
    model.load_state_dict(s.model.state_dict())  # in-place training starts from the shared initial weights
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    w = s.weights.detach()
    for _ in range(s.steps):
        opt.zero_grad()
        weighted_loss(model(s.x), s.y, w).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def _nestgrad_loss(s: Setup) -> Callable[[dict[str, Tensor], Any, Tensor], Tensor]:
    def loss_fn(params: dict[str, Tensor], batch: tuple[Tensor, Tensor], w: Tensor) -> Tensor:
        x, y = batch
        return weighted_loss(ng.call(s.model, params, x), y, w)

    return loss_fn


def run_nestgrad_plain(s: Setup, check_finite: bool = True) -> dict[str, Tensor]:
    """``nestgrad.train`` under ``torch.no_grad()``: first-order training."""
    with torch.no_grad():
        return ng.train(
            _nestgrad_loss(s), s.init, ng.optim.SGD(lr=LR), [(s.x, s.y)],
            steps=s.steps, hparams=s.weights, check_finite=check_finite,
        )  # fmt: skip


def run_hand_written(s: Setup) -> Tensor:
    """An idiomatic hand-written unroll: functional_call and autograd.grad(create_graph=True)."""
    params = s.init
    for _ in range(s.steps):
        loss = weighted_loss(functional_call(s.model, params, (s.x,)), s.y, s.weights)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {k: p - LR * g for (k, p), g in zip(params.items(), grads)}
    val = F.cross_entropy(functional_call(s.model, params, (s.x_val,)), s.y_val)
    (dw,) = torch.autograd.grad(val, s.weights)
    return dw


def run_nestgrad_unroll(s: Setup, method: ng.Method | None = None, check_finite: bool = True) -> Tensor:
    """``nestgrad.train(..., method=Unroll())`` (or ``method``), then the gradient of the validation loss."""
    trained = ng.train(
        _nestgrad_loss(s), s.init, ng.optim.SGD(lr=LR), [(s.x, s.y)],
        steps=s.steps, hparams=s.weights, method=method or ng.Unroll(), check_finite=check_finite,
    )  # fmt: skip
    val = F.cross_entropy(ng.call(s.model, trained, s.x_val), s.y_val)
    (dw,) = torch.autograd.grad(val, s.weights)
    return dw


def run_higher(s: Setup) -> Tensor:
    """``higher.innerloop_ctx`` with ``torch.optim.SGD``, then the gradient of the validation loss."""
    import higher

    opt = torch.optim.SGD(s.model.parameters(), lr=LR)
    with higher.innerloop_ctx(s.model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(s.steps):
            diffopt.step(weighted_loss(fmodel(s.x), s.y, s.weights))
        val = F.cross_entropy(fmodel(s.x_val), s.y_val)
        (dw,) = torch.autograd.grad(val, s.weights)
    return dw


@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmarked way of training (``kind="train"``) or of getting the hypergradient."""

    name: str
    label: str
    kind: str
    reference: str
    fn: Callable[[Setup], Any]


VARIANTS = [
    Variant("plain", "plain `torch.optim.SGD` training", "train", "plain", run_plain),
    Variant("nestgrad-plain", "`nestgrad.train` under `torch.no_grad()`", "train", "plain", run_nestgrad_plain),
    Variant("hand-written", "hand-written `functional_call` unroll", "hypergrad", "hand-written", run_hand_written),
    Variant("nestgrad-unroll", "`nestgrad.train(method=Unroll())`", "hypergrad", "hand-written", run_nestgrad_unroll),
    Variant("higher", "`higher.innerloop_ctx` + `torch.optim.SGD`", "hypergrad", "hand-written", run_higher),
    # The cost of nestgrad's checks (non-finite values every step; for Reverse also the search for
    # tensors outside hparams): each shipped default against the same call with check_finite=False.
    Variant("nestgrad-plain-unchecked", "`nestgrad.train` under `torch.no_grad()`, `check_finite=False`",
            "train", "nestgrad-plain", functools.partial(run_nestgrad_plain, check_finite=False)),
    Variant("nestgrad-unroll-unchecked", "`nestgrad.train(method=Unroll(), check_finite=False)`",
            "hypergrad", "nestgrad-unroll", functools.partial(run_nestgrad_unroll, check_finite=False)),
    Variant("nestgrad-reverse", "`nestgrad.train(method=Reverse())`", "hypergrad", "hand-written",
            functools.partial(run_nestgrad_unroll, method=ng.Reverse())),
    Variant("nestgrad-reverse-unchecked", "`nestgrad.train(method=Reverse(), check_finite=False)`",
            "hypergrad", "nestgrad-reverse",
            functools.partial(run_nestgrad_unroll, method=ng.Reverse(), check_finite=False)),
]  # fmt: skip
BY_NAME = {v.name: v for v in VARIANTS}


# --------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` such as ``VmRSS`` or ``VmHWM``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure_one(name: str, steps: int) -> dict[str, Any]:
    """Peak RSS increase of one call of variant ``name``, in this (fresh) process.

    The baseline is taken after imports, data and model setup and a one-step
    warm-up of the same variant (which loads its lazy imports and kernels).
    """
    variant = BY_NAME[name]
    s = make_setup(steps)
    variant.fn(dataclasses.replace(s, steps=1))
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = variant.fn(s)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    del out
    return {"peak_mib": max(peak - before, 0) / 1024, "seconds": seconds, "hwm_reset": reset}


def measure_memory(name: str, steps: int) -> dict[str, Any]:
    """Run :func:`measure_one` in a fresh interpreter and return its result (or the error)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- correctness
def rel_diff(a: Tensor, b: Tensor) -> tuple[float, float]:
    """``(max|a-b| / max|b|, ||a-b|| / ||b||)``: differences relative to the reference ``b``."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item(), ((a - b).norm() / b.norm()).item()


def _flat(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


# ------------------------------------------------------------------ reporting
def machine() -> str:
    """CPU model, core count and OS, for the report."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available ({os.cpu_count()} logical), {platform.system()} {platform.release()}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check_answers(s: Setup, outputs: dict[str, Any]) -> None:
    """Print how far each variant's answer is from its reference (they must agree)."""
    print("## Correctness")
    with torch.no_grad():
        val0 = F.cross_entropy(s.model(s.x_val), s.y_val).item()
        val1 = F.cross_entropy(functional_call(s.model, outputs["plain"], (s.x_val,)), s.y_val).item()
    print(f"- validation loss: {val0:.4f} before training, {val1:.4f} after {s.steps} steps")
    for name in ("nestgrad-plain", "nestgrad-plain-unchecked"):
        mx, nm = rel_diff(_flat(outputs[name]), _flat(outputs["plain"]))
        print(f"- trained weights, {name} vs torch.optim: max rel diff {mx:.2e} (norm-wise {nm:.2e})")
    ref = outputs["hand-written"]
    worst = 0.0
    for name in ("nestgrad-unroll", "nestgrad-unroll-unchecked", "nestgrad-reverse", "nestgrad-reverse-unchecked",
                 "higher"):  # fmt: skip
        if name in outputs:
            mx, nm = rel_diff(outputs[name], ref)
            worst = max(worst, mx)
            print(f"- hypergradient, {name} vs hand-written: max rel diff {mx:.2e} (norm-wise {nm:.2e})")
    verdict = "AGREE" if worst < 1e-4 else "DISAGREE: the timings below compare different answers"
    print(f"- hypergradient norm {ref.norm():.4e}; {verdict} (threshold 1e-4)")
    print()


def time_rounds(s: Setup, variants: list[Variant], repeats: int) -> tuple[dict[str, list[float]], ...]:
    """Wall-clock and CPU seconds of every variant, in ``repeats`` rounds of rotated order."""
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            v.fn(s)
            cpu[v.name].append(time.process_time() - c0)
            wall[v.name].append(time.perf_counter() - w0)
        done = ", ".join(f"{n} {wall[n][-1]:.3f}s ({cpu[n][-1]:.3f}s cpu)" for n in wall)
        print(f"round {r + 1}/{repeats}: {done}", flush=True)
    print()
    return wall, cpu


def report(
    wall: dict[str, list[float]], cpu: dict[str, list[float]], memory: dict[str, dict[str, Any]], steps: int
) -> None:
    """Print the markdown table and the targets."""
    med = {n: statistics.median(t) for n, t in wall.items()}
    mcpu = {n: statistics.median(t) for n, t in cpu.items()}
    print("## Results")
    print()
    print(
        "| Variant | Hypergradient | Median wall (s) | Median CPU (s) | Ratio, wall | Ratio, CPU | Peak memory (MiB) |"
    )
    print("|---|:-:|--:|--:|--:|--:|--:|")
    for v in VARIANTS:
        hyper = "yes" if v.kind == "hypergrad" else "no"
        if v.name not in med:
            print(f"| {v.label} | {hyper} | n/a | n/a | n/a | n/a | n/a |")
            continue
        mem = memory.get(v.name, {})
        mem_s = f"{mem['peak_mib']:.0f}" if "peak_mib" in mem else ("error" if "error" in mem else "not measured")
        print(f"| {v.label} | {hyper} | {med[v.name]:.3f} | {mcpu[v.name]:.3f} | "
              f"{med[v.name] / med[v.reference]:.3f}x {v.reference} | "
              f"{mcpu[v.name] / mcpu[v.reference]:.3f}x {v.reference} | {mem_s} |")  # fmt: skip
    if memory:
        print()
        print(f"Peak memory: increase of the peak RSS (VmHWM) over the RSS just before one T={steps} call, "
              f"in a fresh process after setup and a one-step warm-up.")  # fmt: skip
    for name, mem in memory.items():
        if "error" in mem:
            print(f"- memory of {name} failed: {mem['error']}")
        elif not mem.get("hwm_reset", True):
            print(f"- {name}: /proc/self/clear_refs not writable, VmHWM not reset (an upper bound)")
    print()

    print("## Targets (reported, not asserted; wall / CPU medians)")

    def target(text: str, a: str, b: str, limit: float, tie: float = 0.0) -> None:
        rw, rc = med[a] / med[b], mcpu[a] / mcpu[b]
        verdict = "met" if rc <= limit - tie else (f"tie (within {tie:.0%})" if rc <= limit + tie else "MISSED")
        print(f"- {text}: {rw:.3f}x wall, {rc:.3f}x CPU -> {verdict} (on CPU time)")

    target("nestgrad Unroll <= 1.05x hand-written", "nestgrad-unroll", "hand-written", 1.05)
    if "higher" in med:
        target("nestgrad Unroll faster than higher (< 1x)", "nestgrad-unroll", "higher", 1.0, tie=0.02)
    else:
        print("- nestgrad Unroll faster than higher: not measured (higher did not run)")
    target("nestgrad no_grad <= 1.25x plain torch.optim", "nestgrad-plain", "plain", 1.25)


def check_costs(s: Setup, pairs: int) -> None:
    """The cost of the shipped checks, measured in pairs: each default call next to the same call
    with ``check_finite=False``, in alternating order; the median of the per-pair CPU-time ratios
    cancels the drifts of a shared machine better than a ratio of medians."""
    print(f"## Cost of the checks ({pairs} pairs per method, alternating order, CPU time)")
    print()
    print("| method | median ratio, checked / unchecked | middle half of the ratios | target |")
    print("|---|--:|--:|---|")
    for kind in ("plain", "unroll", "reverse"):
        checked, unchecked = BY_NAME[f"nestgrad-{kind}"].fn, BY_NAME[f"nestgrad-{kind}-unchecked"].fn
        ratios = []
        for i in range(pairs):
            times = {}
            for name, fn in [("a", checked), ("b", unchecked)][:: 1 if i % 2 == 0 else -1]:
                gc.collect()
                c0 = time.process_time()
                fn(s)
                times[name] = time.process_time() - c0
            ratios.append(times["a"] / times["b"])
        q = statistics.quantiles(ratios, n=4)
        med = statistics.median(ratios)
        verdict = "met" if med <= 1.02 else "MISSED"
        print(f"| {kind} | {med:.3f}x | {q[0]:.3f}-{q[2]:.3f} | <= 1.02x: {verdict} |")
    print()


def main() -> None:
    """Parse the flags, then run either one memory measurement or the whole benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="SGD steps T (default 100; 10 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: T=10, 2 rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--pairs", type=int, default=None, help="pairs timed for the checks (15; 3 quick)")
    parser.add_argument("--one", choices=list(BY_NAME), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps if args.steps is not None else (10 if args.quick else 100)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    torch.set_num_threads(1)

    if args.one:
        print(json.dumps(measure_one(args.one, steps)))
        return

    print(f"# nestgrad unroll benchmark ({datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z})")
    print(f"- torch {torch.__version__}, nestgrad {ng.__version__}, higher {_version('higher')}, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(f"- machine: {machine()}; torch threads: {torch.get_num_threads()}")
    print(f"- case: 64-{HIDDEN}-{HIDDEN}-10 tanh MLP, load_digits (train {N_TRAIN}, val rest), float32, "
          f"T={steps} full-batch SGD steps (lr={LR}), d(val loss)/d(1000 per-example loss weights)")  # fmt: skip
    print(f"- timing: {repeats} rounds, each runs every variant once in a rotated order; medians reported")
    print(f"- load average at start: {_load()}")
    print()

    s = make_setup(steps)
    outputs: dict[str, Any] = {}  # the warm-up calls give the answers to check
    skipped: dict[str, str] = {}
    for v in VARIANTS:
        try:
            outputs[v.name] = v.fn(s)
        except Exception as e:  # higher may be missing or broken on this torch
            if v.name != "higher":
                raise
            skipped[v.name] = f"{type(e).__name__}: {e}"
            print(f"higher skipped: {skipped[v.name]}\n")
    check_answers(s, outputs)
    del outputs

    variants = [v for v in VARIANTS if v.name not in skipped]
    wall, cpu = time_rounds(s, variants, repeats)
    check_costs(s, args.pairs if args.pairs is not None else (3 if args.quick else 15))
    del s
    memory = {} if args.no_memory else {v.name: measure_memory(v.name, steps) for v in variants}
    report(wall, cpu, memory, steps)
    print(f"\nload average at the end: {_load()}")


def _load() -> str:
    """The 1-minute load average against the core count: above it, wall-clock times are contended."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    note = " (busy machine: trust the CPU-time columns more than wall-clock)" if load > cores - 0.5 else ""
    return f"{load:.2f} on {cores} cores{note}"


if __name__ == "__main__":
    main()
