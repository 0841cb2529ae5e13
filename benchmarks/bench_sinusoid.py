"""Benchmark: few-shot sinusoid regression (MAML, first-order MAML, Meta-SGD) against the papers.

The setup of Finn et al. 2017 (MAML, section 5.1) and Li et al. 2017 (Meta-SGD, section 4.1):

* a task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]``
  and inputs ``x ~ U[-5, 5]``;
* the learner is a 1-40-40-1 ReLU MLP; K = 5 or 10 support points per task, and K query
  points per task for the meta-loss (the mean squared error after adaptation);
* meta-batches of 25 tasks, inner SGD with lr alpha = 0.01, meta-optimizer Adam with lr 1e-3.

Methods (every one starts from the same initial network and sees the same stream of
training tasks at a given K):

* ``MAML-1``, ``MAML-10``: MAML with 1 and 10 inner SGD steps. The inner run is
  ``nestgrad.train`` with ``nestgrad.Unroll()`` from the meta-parameters, and the meta-gradient
  is one ``backward`` of the query loss through it.
* ``FOMAML``: first-order MAML, 1 inner step. The inner run is ``nestgrad.train`` under
  ``torch.no_grad()`` (plain training, no graph back to the meta-parameters); the gradient
  of the query loss is taken w.r.t. the adapted weights and applied to the meta-parameters.
* ``Meta-SGD``: one inner step ``w - lr_w * g`` with a learnable learning rate per weight
  element (initialized ``U[0.005, 0.1]``, as in Li et al.), meta-learned with the weights.

All tasks of a meta-batch adapt at once, with ``ng.train(..., tasks=25)``: the loss is written
for one task, nestgrad runs it on all of them with ``torch.func.vmap`` and trains the stacked
weights (an ``expand`` of the meta-parameters) with one optimizer, so that each task's weights
take exactly that task's own SGD steps. The script checks this against a plain per-task loop
(one ``nestgrad.train`` per task) before it trains, and prints the cost of both.

Evaluation: 600 fresh test tasks (the same ones for every method; at K = 5 the support set is
the first 5 points of the K = 10 one), each adapted with its K support points, then the mean
squared error on ``--eval-points`` (100) fresh inputs from U[-5, 5]; the table gives the mean
over tasks and a 95% interval, 1.96 * std / sqrt(600). MAML-1 is also evaluated after 10 steps
at test time, as in Finn et al. The papers meta-train for 70,000 iterations; this script does
``--meta-steps`` (default 10,000: the whole table takes about 9-10 minutes of CPU time on one
thread, 2026-11-30 on an AMD EPYC; wall time is longer on a loaded machine), 1/7 of that, so its
numbers are not converged, and the published ones are printed beside them for orientation.
MAML-10 takes about half of the time.

Usage::

    python benchmarks/bench_sinusoid.py                    # 10,000 meta-steps, K = 5 and 10: ~10 CPU minutes
    python benchmarks/bench_sinusoid.py --meta-steps 70000 # the papers' length (hours)
    python benchmarks/bench_sinusoid.py --quick            # tiny: smoke test, a few seconds
    python benchmarks/bench_sinusoid.py --shots 5 --methods maml-1,meta-sgd
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

import nestgrad as ng
from bench_unroll import machine

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
HIDDEN = 40
META_BATCH = 25
INNER_LR = 0.01
META_LR = 1e-3
META_SGD_LR_INIT = (0.005, 0.1)  # Li et al. 2017, section 4.1
N_TEST_TASKS = 600
EVAL_POINTS = 100
DEFAULT_META_STEPS = 10_000
PAPER_META_STEPS = 70_000

# Li et al. 2017 (Meta-SGD), Table 1, sinusoid regression, mean squared error over 600 test
# tasks with a 95% interval; both methods with one adaptation step.
PUBLISHED = {
    ("MAML-1", 1, 5): (1.13, 0.18),
    ("MAML-1", 1, 10): (0.85, 0.14),
    ("Meta-SGD", 1, 5): (0.90, 0.16),
    ("Meta-SGD", 1, 10): (0.53, 0.09),
}

Params = dict[str, Tensor]


# ----------------------------------------------------------------------------- tasks
@dataclasses.dataclass
class Tasks:
    """A batch of sinusoid tasks: support points (x, y), query points (xq, yq), each (tasks, points, 1)."""

    amplitude: Tensor
    phase: Tensor
    x: Tensor
    y: Tensor
    xq: Tensor
    yq: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def shots(self, k: int) -> Tasks:
        """The same tasks with only the first k support points."""
        return dataclasses.replace(self, x=self.x[:, :k], y=self.y[:, :k])


def _uniform(shape: Sequence[int], bounds: tuple[float, float], gen: torch.Generator) -> Tensor:
    lo, hi = bounds
    return torch.rand(*shape, generator=gen) * (hi - lo) + lo


def sample_tasks(n: int, k: int, k_query: int, gen: torch.Generator) -> Tasks:
    """n tasks with k support and k_query query points, in the default dtype."""
    amplitude = _uniform((n, 1, 1), AMPLITUDE, gen)
    phase = _uniform((n, 1, 1), PHASE, gen)
    x = _uniform((n, k + k_query, 1), X_RANGE, gen)
    y = amplitude * torch.sin(x - phase)
    return Tasks(amplitude.flatten(), phase.flatten(), x[:, :k], y[:, :k], x[:, k:], y[:, k:])


# ----------------------------------------------------------------------------- model
def make_model(seed: int = 0) -> nn.Sequential:
    """The 1-40-40-1 ReLU MLP of Finn et al., with PyTorch's default initialization."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def batched_call(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Run the model per task: ``params`` and ``x`` carry a leading task dimension."""
    return torch.func.vmap(lambda p, xt: ng.call(model, p, xt))(params, x)


def task_losses(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Each task's mean squared error, shape (tasks,)."""
    return (batched_call(model, params, x) - y).pow(2).mean(dim=(1, 2))


def inner_loss(model: nn.Module) -> Callable[[Params, tuple[Tensor, Tensor], object], Tensor]:
    """The inner (adaptation) loss of one task, for ``ng.train(..., tasks=n)``: its MSE."""

    def loss_fn(params: Params, batch: tuple[Tensor, Tensor], _: object) -> Tensor:
        x, y = batch
        return (ng.call(model, params, x) - y).pow(2).mean()

    return loss_fn


def stacked(params: Params, n: int) -> Params:
    """The meta-parameters as n tasks' initial weights (a differentiable ``expand``, no copy)."""
    return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in params.items()}


# ----------------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True)
class Method:
    """A meta-learning method: its kind, inner steps in training, and inner steps at test time."""

    name: str
    kind: str  # "maml", "fomaml" or "meta-sgd"
    train_steps: int
    eval_steps: tuple[int, ...]


METHODS = [
    Method("MAML-1", "maml", 1, (1, 10)),
    Method("MAML-10", "maml", 10, (10,)),
    Method("FOMAML", "fomaml", 1, (1,)),
    Method("Meta-SGD", "meta-sgd", 1, (1,)),
]
BY_NAME = {m.name.lower(): m for m in METHODS}


def init_meta(model: nn.Module, method: Method, seed: int = 0) -> dict[str, Params]:
    """The meta-parameters: ``{"params": weights}``, plus ``{"lrs": per-element lrs}`` for Meta-SGD.

    The weights are copies of the model's (the same for every method); the module is never trained.
    """
    meta = {"params": {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}}
    if method.kind == "meta-sgd":
        gen = torch.Generator().manual_seed(seed + 1)
        meta["lrs"] = {
            k: _uniform(v.shape, META_SGD_LR_INIT, gen).to(v.dtype).requires_grad_() for k, v in meta["params"].items()
        }
    return meta


def meta_sgd_adapt(
    model: nn.Module, params: Params, lrs: Params, x: Tensor, y: Tensor, steps: int, create_graph: bool
) -> Params:
    """Meta-SGD's inner loop, hand-written: ``w <- w - lr_w * grad`` with one lr per weight element.

    Not ``ng.train(..., ng.optim.SGD(lr={name: tensor}))``, which runs the same update: Li et al.'s
    ``alpha`` is a vector of any sign (a direction as well as a rate), and meta-training does drive
    some entries below 0 (seen in the quick run), where ``SGD`` rejects a negative learning rate. To
    use ``ng.optim.SGD``, keep the rates positive by construction (``lr = log_lr.exp()``).
    """
    with torch.enable_grad():
        if not create_graph:  # evaluation: detached leaves, so no graph reaches the meta-parameters
            params = {k: v.detach().requires_grad_() for k, v in params.items()}
            lrs = {k: v.detach() for k, v in lrs.items()}
        w = stacked(params, x.shape[0])
        for _ in range(steps):
            loss = task_losses(model, w, x, y).sum()  # the sum: each task's slice gets its own gradient
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=create_graph)
            w = {k: v - lrs[k] * g for (k, v), g in zip(w.items(), grads)}
    return w if create_graph else {k: v.detach() for k, v in w.items()}


def maml_adapt(model: nn.Module, params: Params, x: Tensor, y: Tensor, steps: int) -> Params:
    """``steps`` inner SGD steps on every task at once; differentiable w.r.t. ``params`` unless under no_grad."""
    opt = ng.optim.SGD(lr=INNER_LR)
    return ng.train(inner_loss(model), params, opt, [(x, y)], steps=steps, tasks=x.shape[0])


def adapt(model: nn.Module, method: Method, meta: dict[str, Params], x: Tensor, y: Tensor, steps: int) -> Params:
    """Adapted weights for evaluation (no graph), per task: each tensor has a leading task dimension."""
    if method.kind == "meta-sgd":
        return meta_sgd_adapt(model, meta["params"], meta["lrs"], x, y, steps, create_graph=False)
    with torch.no_grad():
        return maml_adapt(model, meta["params"], x, y, steps)


def meta_gradient(model: nn.Module, method: Method, meta: dict[str, Params], tasks: Tasks) -> tuple[Tensor, dict]:
    """The meta-loss (mean query MSE over the tasks after adaptation) and its meta-gradient.

    Returns ``(loss, grads)`` with ``grads`` nested like ``meta``.
    """
    if method.kind == "maml":
        adapted = maml_adapt(model, meta["params"], tasks.x, tasks.y, method.train_steps)
        loss = task_losses(model, adapted, tasks.xq, tasks.yq).mean()
        leaves = list(meta["params"].values())
        return loss.detach(), {"params": dict(zip(meta["params"], torch.autograd.grad(loss, leaves)))}
    if method.kind == "fomaml":
        # First-order MAML: adapt without a graph (ng.train under no_grad is plain training) ...
        with torch.no_grad():
            adapted = maml_adapt(model, meta["params"], tasks.x, tasks.y, method.train_steps)
        adapted = {k: v.requires_grad_() for k, v in adapted.items()}
        loss = task_losses(model, adapted, tasks.xq, tasks.yq).mean()
        # ... then the gradient of the query loss w.r.t. the *adapted* weights, applied to the
        # meta-parameters as if d(adapted)/d(meta) were the identity. Every task's initial weights
        # are the same meta-parameters, so their gradient is the sum of the tasks' slices (the
        # loss is already the mean over tasks).
        grads = torch.autograd.grad(loss, list(adapted.values()))
        return loss.detach(), {"params": {k: g.sum(0) for k, g in zip(adapted, grads)}}
    if method.kind == "meta-sgd":
        adapted = meta_sgd_adapt(
            model, meta["params"], meta["lrs"], tasks.x, tasks.y, method.train_steps, create_graph=True
        )
        loss = task_losses(model, adapted, tasks.xq, tasks.yq).mean()
        names = [(group, k) for group in ("params", "lrs") for k in meta[group]]
        grads = torch.autograd.grad(loss, [meta[group][k] for group, k in names])
        out: dict[str, Params] = {"params": {}, "lrs": {}}
        for (group, k), g in zip(names, grads):
            out[group][k] = g
        return loss.detach(), out
    raise ValueError(f"unknown method kind {method.kind!r}")


def meta_gradient_per_task(
    model: nn.Module, method: Method, meta: dict[str, Params], tasks: Tasks
) -> tuple[Tensor, dict]:
    """The same meta-gradient with one adaptation per task (the plain loop), to check the batched one."""
    losses = []
    fo_grads: dict[str, Tensor] = {}
    for t in range(len(tasks)):
        one = Tasks(*(f[t : t + 1] for f in dataclasses.astuple(tasks)))
        if method.kind == "meta-sgd":
            w = meta_sgd_adapt(model, meta["params"], meta["lrs"], one.x, one.y, method.train_steps, True)
            w = {k: v[0] for k, v in w.items()}
        else:

            def loss_fn(p: Params, batch: tuple[Tensor, Tensor], _: object) -> Tensor:
                return (ng.call(model, p, batch[0]) - batch[1]).pow(2).mean()

            opt = ng.optim.SGD(lr=INNER_LR)
            data = [(one.x[0], one.y[0])]
            if method.kind == "fomaml":
                with torch.no_grad():
                    w = ng.train(loss_fn, meta["params"], opt, data, steps=method.train_steps)
                w = {k: v.requires_grad_() for k, v in w.items()}
            else:
                w = ng.train(loss_fn, meta["params"], opt, data, steps=method.train_steps)
        loss = (ng.call(model, w, one.xq[0]) - one.yq[0]).pow(2).mean() / len(tasks)
        if method.kind == "fomaml":
            for k, g in zip(w, torch.autograd.grad(loss, list(w.values()))):
                fo_grads[k] = fo_grads.get(k, 0) + g
        losses.append(loss)
    loss = torch.stack(losses).sum()
    if method.kind == "fomaml":
        return loss.detach(), {"params": fo_grads}
    names = [(group, k) for group in meta for k in meta[group]]
    grads = torch.autograd.grad(loss, [meta[group][k] for group, k in names])
    out: dict[str, Params] = {group: {} for group in meta}
    for (group, k), g in zip(names, grads):
        out[group][k] = g
    return loss.detach(), out


# ----------------------------------------------------------------------------- training and evaluation
@dataclasses.dataclass
class Run:
    """One meta-training run and its evaluation."""

    method: Method
    shots: int
    meta_steps: int
    cpu_per_step: float
    train_loss_start: float  # mean meta-loss over the first 10% of the meta-steps
    train_loss_end: float  # and over the last 10%
    test_mse: dict[int, tuple[float, float]]  # inner steps at test time -> (mean, 95% half-width)


def meta_train(
    model: nn.Module,
    method: Method,
    shots: int,
    meta_steps: int,
    meta_batch: int = META_BATCH,
    seed: int = 0,
) -> tuple[dict[str, Params], float, list[float]]:
    """Meta-train with Adam; returns the meta-parameters, CPU seconds per meta-step and the meta-losses.

    The task stream depends on ``seed`` and ``shots`` only: every method sees the same tasks.
    """
    meta = init_meta(model, method, seed)
    leaves = [v for group in meta.values() for v in group.values()]
    opt = torch.optim.Adam(leaves, lr=META_LR)
    gen = torch.Generator().manual_seed(1000 * seed + shots)
    losses = []
    start = time.process_time()
    for _ in range(meta_steps):
        tasks = sample_tasks(meta_batch, shots, shots, gen)
        loss, grads = meta_gradient(model, method, meta, tasks)
        for group, params in meta.items():
            for k, v in params.items():
                v.grad = grads[group][k]
        opt.step()
        losses.append(loss.item())
    return meta, (time.process_time() - start) / max(meta_steps, 1), losses


def evaluate(
    model: nn.Module, method: Method, meta: dict[str, Params], tasks: Tasks, steps: int
) -> tuple[float, float, Tensor]:
    """Mean test MSE after ``steps`` adaptation steps, its 95% half-width 1.96 std / sqrt(n), and per-task MSEs."""
    adapted = adapt(model, method, meta, tasks.x, tasks.y, steps)
    with torch.no_grad():
        mse = task_losses(model, adapted, tasks.xq, tasks.yq)
    return mse.mean().item(), 1.96 * mse.std().item() / math.sqrt(len(tasks)), mse


def untrained_mse(model: nn.Module, tasks: Tasks, steps: int) -> tuple[float, float, Tensor]:
    """The reference: the untrained network (no meta-training) adapted by ``steps`` SGD steps."""
    return evaluate(model, METHODS[0], init_meta(model, METHODS[0]), tasks, steps)


def make_test_tasks(n: int, max_shots: int, eval_points: int, seed: int = 0) -> Tasks:
    """The fixed test tasks: ``max_shots`` support points (use ``.shots(k)``) and ``eval_points`` query points."""
    return sample_tasks(n, max_shots, eval_points, torch.Generator().manual_seed(10_000 + seed))


# ----------------------------------------------------------------------------- the report
def _max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for group in a:
        for k in a[group]:
            x, y = a[group][k], b[group][k]
            worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item())
    return worst


def check_batched(model: nn.Module, methods: Sequence[Method], shots: int, meta_batch: int, repeats: int) -> None:
    """Print how far the batched meta-gradient is from the per-task loop's, and the CPU time of both."""
    print(f"## Batched vs per-task loop (one meta-batch of {meta_batch} tasks, K={shots}, float32)")
    print()
    print("| method | max rel. diff of the meta-gradient | CPU s / meta-step, batched | per-task loop | ratio |")
    print("|---|--:|--:|--:|--:|")
    tasks = sample_tasks(meta_batch, shots, shots, torch.Generator().manual_seed(123))
    for method in methods:
        meta = init_meta(model, method)
        times = {}
        for name, fn in (("batched", meta_gradient), ("loop", meta_gradient_per_task)):
            fn(model, method, meta, tasks)  # warm-up, and the answer to compare
            start = time.process_time()
            for _ in range(repeats):
                _, grads = fn(model, method, meta, tasks)
            times[name] = (time.process_time() - start) / repeats
            if name == "batched":
                batched = grads
        diff = _max_rel(batched, grads)
        print(
            f"| {method.name} | {diff:.1e} | {times['batched']:.4f} | {times['loop']:.4f} "
            f"| {times['loop'] / times['batched']:.1f}x |"
        )
        if diff > 1e-4:
            raise AssertionError(f"{method.name}: batched and per-task meta-gradients differ by {diff:.2e}")
    print()


def _fmt(value: tuple[float, float] | None) -> str:
    return "—" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


def report(
    runs: list[Run], reference: dict[tuple[int, int], tuple[float, float]], shots: Sequence[int], n_test: int
) -> None:
    """The markdown table: measured test MSE beside the published figures, and CPU time per meta-step."""
    meta_steps = runs[0].meta_steps if runs else 0
    print(f"## Meta-test MSE ({meta_steps} meta-steps; the papers: {PAPER_META_STEPS})")
    print()
    head = "| method | inner steps (train / test) |"
    rule = "|---|:-:|"
    for k in shots:
        head += f" K={k}: measured | K={k}: published |"
        rule += "--:|--:|"
    for k in shots:
        head += f" CPU s / meta-step, K={k} |"
        rule += "--:|"
    print(head)
    print(rule)
    for steps in sorted({s for (_, s) in reference}):
        row = f"| untrained network (no meta-training) | — / {steps} |"
        for k in shots:
            row += f" {_fmt(reference.get((k, steps)))} | — |"
        print(row + " — |" * len(shots))
    by_key = {(r.method.name, r.shots): r for r in runs}
    for method in dict.fromkeys(r.method for r in runs):
        for steps in method.eval_steps:
            row = f"| {method.name} | {method.train_steps} / {steps} |"
            for k in shots:
                run = by_key.get((method.name, k))
                published = PUBLISHED.get((method.name, steps, k))
                row += f" {_fmt(run.test_mse.get(steps) if run else None)} | {_fmt(published)} |"
            for k in shots:
                run = by_key.get((method.name, k))
                row += f" {run.cpu_per_step:.4f} |" if run else " — |"
            print(row)
    print()
    print(
        f"Measured: {n_test} test tasks shared by every method, mean ± 1.96 std / sqrt(n). "
        f"Published: Li et al. 2017 (Meta-SGD), Table 1, after {PAPER_META_STEPS} meta-iterations "
        f"(one adaptation step); Finn et al. 2017 give sinusoid results only as curves. Our runs are "
        f"{meta_steps / PAPER_META_STEPS:.2%} as long as the papers', so they are far from converged: "
        "compare the methods with each other, not with the published figures."
    )
    print()
    print("Meta-training loss (mean query MSE of the meta-batches, first 10% of meta-steps -> last 10%):")
    for r in runs:
        print(f"- {r.method.name}, K={r.shots}: {r.train_loss_start:.3f} -> {r.train_loss_end:.3f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=None, help=f"meta-iterations (default {DEFAULT_META_STEPS})")
    parser.add_argument("--shots", default="5,10", help="values of K, comma-separated (default 5,10)")
    parser.add_argument("--methods", default=",".join(BY_NAME), help=f"comma-separated, from {','.join(BY_NAME)}")
    parser.add_argument("--test-tasks", type=int, default=None, help=f"test tasks (default {N_TEST_TASKS})")
    parser.add_argument("--eval-points", type=int, default=None, help=f"query points per test task ({EVAL_POINTS})")
    parser.add_argument("--meta-batch", type=int, default=None, help=f"tasks per meta-step (default {META_BATCH})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial network and the task streams")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test: a few seconds")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.meta_steps is None:
        args.meta_steps = 50 if quick else DEFAULT_META_STEPS
    if args.test_tasks is None:
        args.test_tasks = 50 if quick else N_TEST_TASKS
    if args.eval_points is None:
        args.eval_points = 20 if quick else EVAL_POINTS
    if args.meta_batch is None:
        args.meta_batch = 5 if quick else META_BATCH
    args.shots = [int(s) for s in args.shots.split(",")]
    unknown = [m for m in args.methods.split(",") if m.lower() not in BY_NAME]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(BY_NAME)}")
    args.methods = [BY_NAME[m.lower()] for m in args.methods.split(",")]
    return args


def run(args: argparse.Namespace) -> tuple[list[Run], dict[tuple[int, int], tuple[float, float]]]:
    """Meta-train and evaluate every method at every K; print the report; return the runs and the reference."""
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    print(f"# nestgrad sinusoid benchmark ({datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z})")
    print(f"- command: {shlex.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"- torch {torch.__version__}, nestgrad {ng.__version__}, Python {platform.python_version()}")
    print(f"- machine: {machine()}; torch threads: {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    print(
        f"- setup (Finn et al. 2017): A ~ U{list(AMPLITUDE)}, phase ~ U[0, pi], x ~ U{list(X_RANGE)}, "
        f"1-{HIDDEN}-{HIDDEN}-1 ReLU MLP, K support + K query points, meta-batch {args.meta_batch}, "
        f"inner SGD lr {INNER_LR}, Adam lr {META_LR}, Meta-SGD lrs ~ U{list(META_SGD_LR_INIT)}, float32"
    )
    print(
        f"- **{args.meta_steps} meta-steps** per method and K (the papers: {PAPER_META_STEPS}); "
        f"test: {args.test_tasks} tasks x {args.eval_points} query points, seed {args.seed}"
    )
    print()
    model = make_model(args.seed)
    check_batched(model, args.methods, min(args.shots), args.meta_batch, repeats=1 if args.quick else 3)

    tasks_all = make_test_tasks(args.test_tasks, max(args.shots), args.eval_points, args.seed)
    reference = {}
    for k in args.shots:
        for steps in (1, 10):
            mean, ci, _ = untrained_mse(model, tasks_all.shots(k), steps)
            reference[(k, steps)] = (mean, ci)
    runs = []
    for k in args.shots:
        for method in args.methods:
            meta, cpu, losses = meta_train(model, method, k, args.meta_steps, args.meta_batch, args.seed)
            tenth = max(1, len(losses) // 10)
            test_mse = {}
            for steps in method.eval_steps:
                mean, ci, _ = evaluate(model, method, meta, tasks_all.shots(k), steps)
                test_mse[steps] = (mean, ci)
            run = Run(
                method, k, args.meta_steps, cpu, sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth, test_mse
            )
            runs.append(run)
            print(
                f"- trained {method.name}, K={k}: {cpu:.4f} CPU s / meta-step; test MSE "
                + ", ".join(f"{_fmt(v)} ({s} steps)" for s, v in test_mse.items()),
                flush=True,
            )
    print()
    report(runs, reference, args.shots, args.test_tasks)
    print()
    print(
        f"Total: {time.process_time() - cpu_started:.0f} CPU s, {time.perf_counter() - started:.0f} s wall; "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )
    return runs, reference


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
