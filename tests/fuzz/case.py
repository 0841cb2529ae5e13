"""One fuzz case: build the problem a ``Config`` describes, run it with nestgrad and with the oracle, judge.

``judge(cfg)`` returns ``None`` when the case ends in one of the two accepted outcomes (equal to
the float64 reference within the method's documented tolerance, or a nestgrad error that
``space.refusals`` allows), else a report of what happened, which the test prints with the
seed. The data-parallel tests call ``run_nestgrad`` on each rank and ``compare`` in the parent.
"""

from __future__ import annotations

import math
import re
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import oracle
import space
import torch
import torch.nn.functional as F
from space import RIDGE_MU, Config, N
from torch import Tensor, nn
from torch.func import functional_call

import nestgrad as ng


# ----------------------------------------------------------------------------------------- models
class Tied(nn.Module):
    """Linear(3, 4) -> tanh -> one Linear(4, 4) applied twice (tied: two modules, one weight) -> Linear(4, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.mid2, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.mid2.weight = self.mid.weight

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.mid2(torch.tanh(self.mid(h)))))


def make_model(name: str) -> nn.Module:
    if name == "mlp":
        m: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    elif name == "conv":
        m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 1))
    elif name == "batchnorm":
        # No bias before BatchNorm: its gradient would be round-off of 0, which Adam, RMSprop and Rprop
        # turn into O(lr) steps of random sign, so no two implementations could agree on it.
        m = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    elif name == "tied":
        m = Tied()
    elif name == "ridge":
        m = nn.Linear(3, 1)
    else:
        raise KeyError(name)
    return m.double()


# ---------------------------------------------------------------------------------------- problem
@dataclass
class Problem:
    """Everything a case needs, built deterministically from its seed (on every rank alike)."""

    cfg: Config
    model: nn.Module
    params: dict[str, Tensor]  # initial weights (stacked per task with Tasks(params=0))
    buffers: dict[str, Tensor]
    batches: list[tuple[Tensor, Tensor]]  # whole data, one batch per step ((tasks, N, ...) with tasks)
    a: Tensor  # per-example loss weights, the hparam
    xv: Tensor
    yv: Tensor
    opt_kwargs: dict[str, Any]  # the optimizer's arguments, Tensors included
    lr0: float
    tensors: dict[str, Tensor] = field(default_factory=dict)  # the optimizer's Tensor hparams, by name


def build(cfg: Config) -> Problem:
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model)
    g = torch.Generator().manual_seed(cfg.seed)
    shape = space.MODELS[cfg.model][0]
    lead = (cfg.tasks,) if cfg.tasks else ()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    if cfg.tasks and cfg.task_params == "stacked":
        params = {
            k: v + 0.1 * torch.randn((cfg.tasks, *v.shape), generator=g, dtype=v.dtype) for k, v in params.items()
        }
    params = {k: v.requires_grad_() for k, v in params.items()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    w_true = torch.randn(math.prod(shape), generator=g, dtype=torch.float64)

    scale = 0.5 if cfg.model == "ridge" else 1.0  # the ridge Hessian's eigenvalues in [1, 4]: SGD(lr=0.2) converges

    def batch() -> tuple[Tensor, Tensor]:
        x = scale * torch.randn((*lead, N, *shape), generator=g, dtype=torch.float64)
        y = torch.tanh(x.flatten(len(lead) + 1) @ w_true).unsqueeze(-1)
        return x, y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)

    if cfg.method.startswith("Implicit"):
        batches = [batch()] * cfg.steps  # full-batch: training converges to the optimum of this batch
    else:
        batches = [batch() for _ in range(cfg.steps)]
    xv, yv = batch()
    a = (0.5 + torch.rand(N, generator=g, dtype=torch.float64)).requires_grad_()
    kwargs = dict(cfg.kwargs)
    lr0 = float(kwargs.pop("lr"))
    prob = Problem(cfg, model, params, buffers, batches, a, xv, yv, kwargs, lr0)
    _optimizer_tensors(prob, g)
    return prob


def _optimizer_tensors(prob: Problem, g: torch.Generator) -> None:
    """Fill ``prob.opt_kwargs`` with the lr in its drawn form and the meta hparam as a Tensor."""
    cfg, kw, lr0 = prob.cfg, prob.opt_kwargs, prob.lr0
    first = next(iter(prob.params))

    def leaf(x: float | Tensor, name: str) -> Tensor:
        t = torch.as_tensor(x, dtype=torch.float64).clone().requires_grad_()
        prob.tensors[name] = t
        return t

    if cfg.lr_form == "float":
        kw["lr"] = lr0
    elif cfg.lr_form == "tensor":
        kw["lr"] = leaf(lr0, "lr")
    elif cfg.lr_form == "per_element":
        shapes = {
            k: v.shape[1:] if cfg.tasks and cfg.task_params == "stacked" else v.shape for k, v in prob.params.items()
        }
        kw["lr"] = {
            k: leaf(lr0 * (0.8 + 0.4 * torch.rand(s, generator=g, dtype=torch.float64)), f"lr[{k}]")
            for k, s in shapes.items()
        }
    elif cfg.lr_form == "schedule":
        kw["lr"] = ng.optim.Schedule(
            leaf(lr0 * (1 - 0.1 * torch.arange(cfg.steps, dtype=torch.float64)), "lr(schedule)")
        )
    elif cfg.lr_form == "schedule_fn":
        kw["lr"] = ng.optim.Schedule(lambda t: lr0 * 0.9**t)
    elif cfg.lr_form == "groups":
        kw["lr"], kw["groups"] = lr0, [{"params": [first], "lr": lr0 * 0.5}]
    elif cfg.lr_form == "groups_tensor":
        kw["lr"] = leaf(lr0, "lr")
        kw["groups"] = [{"params": [first], "lr": leaf(lr0 * 0.5, "groups[0].lr")}]
    if cfg.meta is not None:
        name, i = cfg.meta
        default = _default(cfg.opt, name)
        value = kw.get(name, default)
        if i is None:
            kw[name] = leaf(value, name)
        else:
            pair = list(value)
            pair[i] = leaf(pair[i], f"{name}[{i}]")
            kw[name] = tuple(pair)


def _default(opt: str, name: str) -> Any:
    import inspect

    return inspect.signature(getattr(ng.optim, opt).__init__).parameters[name].default


def hparams_at(prob: Problem, tensors: dict[str, Tensor]) -> oracle.HparamsAt:
    """The oracle's view of the optimizer's hyperparameters: ``(param name, step) -> values``,
    with the Tensors replaced by ``tensors`` (the oracle's own leaves, by name)."""
    cfg, kw = prob.cfg, prob.opt_kwargs
    first = next(iter(prob.params))
    base = {**defaults(cfg.opt), **{k: v for k, v in kw.items() if k not in ("lr", "groups")}}
    if cfg.meta is not None:
        name, i = cfg.meta
        label = name if i is None else f"{name}[{i}]"
        if i is None:
            base[name] = tensors[label]
        else:
            pair = list(base[name])
            pair[i] = tensors[label]
            base[name] = tuple(pair)

    def at(k: str, t: int) -> dict[str, Any]:
        f = cfg.lr_form
        if f == "float":
            lr: Any = prob.lr0
        elif f == "tensor":
            lr = tensors["lr"]
        elif f == "per_element":
            lr = tensors[f"lr[{k}]"]
        elif f == "schedule":
            lr = tensors["lr(schedule)"][t - 1]
        elif f == "schedule_fn":
            lr = prob.lr0 * 0.9**t
        elif f == "groups":
            lr = prob.lr0 * 0.5 if k == first else prob.lr0
        else:
            lr = tensors["groups[0].lr"] if k == first else tensors["lr"]
        return {**base, "lr": lr}

    return at


def defaults(opt: str) -> dict[str, Any]:
    """The optimizer's hyperparameters and flags with their defaults (torch.optim's)."""
    import inspect

    skip = ("self", "lr", "groups", "foreach", "unknown", "eps_root")
    sig = inspect.signature(getattr(ng.optim, opt).__init__).parameters.items()
    return {k: p.default for k, p in sig if k not in skip and p.default is not inspect.Parameter.empty}


# ------------------------------------------------------------------------------------------- loss
def loss_of(cfg: Config, out: Tensor, y: Tensor, a: Tensor, p: dict[str, Tensor]) -> Tensor:
    value = (a * (out - y).squeeze(-1) ** 2).mean()
    if cfg.model == "ridge":
        value = value + RIDGE_MU * sum((p[k] ** 2).sum() for k in ("weight", "bias"))
    return value


def val_loss(prob: Problem, weights: dict[str, Tensor], buffers: dict[str, Tensor], xv: Tensor, yv: Tensor) -> Tensor:
    """Outer loss: mean squared error on the validation batch (summed over tasks), by functional_call."""
    names = list(prob.params)
    if not prob.cfg.tasks:
        out = functional_call(prob.model, {**{k: weights[k] for k in names}, **_clones(buffers)}, (xv,))
        return F.mse_loss(out, yv)
    total = 0
    for i in range(prob.cfg.tasks):
        out = functional_call(prob.model, {**{k: weights[k][i] for k in names}, **_clones(buffers)}, (xv[i],))
        total = total + F.mse_loss(out, yv[i])
    return total


def _clones(buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in buffers.items()}


# ----------------------------------------------------------------------------------------- nestgrad
#: compiled cases trace with dynamo and AOTAutograd (the graphs nestgrad builds), without inductor's C++ codegen,
#: which takes seconds to a minute per graph on these CPUs (tests/test_compile.py covers inductor itself)
COMPILE = ng.Compile(backend="aot_eager")


def make_method(cfg: Config) -> ng.Method:
    arg = cfg.method_arg
    return {
        "Unroll": lambda: ng.Unroll(),
        "Unroll(truncate)": lambda: ng.Unroll(truncate=arg),
        "Reverse": lambda: ng.Reverse(),
        "Reverse(checkpoint_every)": lambda: ng.Reverse(checkpoint_every=arg),
        "Reverse(checkpoints)": lambda: ng.Reverse(checkpoints=arg),
        "Forward": lambda: ng.Forward(),
        "Implicit(CG)": lambda: ng.Implicit(ng.CG(max_steps=50, tol=1e-13)),
        "Implicit(FixedPoint)": lambda: ng.Implicit(ng.FixedPoint(max_steps=2000, tol=1e-13)),
        "FiniteDiff": lambda: ng.FiniteDiff(eps=arg),
        "ZerothOrder": lambda: ng.ZerothOrder(samples=arg, sigma=ZO_SIGMA, seed=0),
        "SAMA": lambda: ng.SAMA(warm_steps=0),  # the fuzzer's runs are short: no warm-up required
    }[cfg.method]()


ZO_SIGMA = 1e-6  # 400 times below the smallest drawn lr (4e-4): no direction leaves a range


@dataclass
class Outcome:
    weights: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    error: str | None = None  # "Type: message" of the first exception
    nestgrad_error: bool = False
    where: str = ""  # "train" or "backward"
    init_error: str | None = None  # what asking for d/d(initial weights) raised, where that is refused
    trace: str = ""


_OPT_NAMES = "|".join(space.OPTIMIZERS)
_OURS = re.compile(rf"^(nestgrad\b|({_OPT_NAMES}|Optimizer|OptState|Schedule)(\.\w+)?[:\s(])")


def is_nestgrad_error(err: BaseException) -> bool:
    """An exception nestgrad raised on purpose: its own type, or a message in nestgrad's style."""
    return type(err).__module__.startswith("nestgrad") or bool(_OURS.match(str(err)))


def run_nestgrad(prob: Problem, world: int = 1, rank: int = 0) -> Outcome:
    """Train with nestgrad as ``prob.cfg`` says (this rank's shard when ``world`` > 1); differentiate."""
    cfg = prob.cfg
    out = Outcome()
    model = prob.model

    def shard(t: Tensor) -> Tensor:
        return t.chunk(world)[rank] if world > 1 else t

    batches = [(shard(x), shard(y)) for x, y in prob.batches]
    a = shard(prob.a) if world > 1 else prob.a
    # a sharded hparam must be a leaf of this rank (its gradient is its slice of the global one)
    a_leaf = a.detach().clone().requires_grad_() if world > 1 else prob.a

    def loss_fn(p: dict[str, Tensor], batch: Any, h: Tensor) -> Tensor:
        x, y = batch
        return loss_of(cfg, ng.call(model, p, x), y, h, p)

    params: dict[str, Tensor] = dict(prob.params)
    if cfg.buffers:
        params |= prob.buffers
    parallel = ng.DataParallel(shard_hparams=True) if world > 1 else None
    out.where = "train"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warnings are allowed; this test judges answers and errors
            opt = getattr(ng.optim, cfg.opt)(**prob.opt_kwargs)
            state, offset, w = None, 0, params
            for i, s in enumerate(cfg.segments):
                last = i == len(cfg.segments) - 1
                tasks: Any = None
                if cfg.tasks:
                    stacked = cfg.task_params == "stacked" or i > 0
                    tasks = ng.Tasks(cfg.tasks, params=0 if stacked else None)
                got = ng.train(
                    loss_fn, w, opt, batches[offset : offset + s], steps=s, hparams=a_leaf,
                    method=make_method(cfg), state=state, return_state=not last, tasks=tasks, parallel=parallel,
                    compile=COMPILE if cfg.compiled else False,
                )  # fmt: skip
                w, state = (got, None) if last else got
                offset += s
            out.weights = {k: v.detach().clone() for k, v in w.items()}
            out.where = "backward"
            trained_buffers = {k: w[k] for k in prob.buffers} if cfg.buffers else prob.buffers
            local = val_loss(prob, w, trained_buffers, shard(prob.xv), shard(prob.yv))
            val = ng.distributed.mean(local) if world > 1 else local
            targets = {"a": a_leaf, **prob.tensors}
            if cfg.init_grad and not space.init_grad_refused(cfg):
                targets |= {f"W0.{k}": v for k, v in prob.params.items()}
            # allow_unused: a tensor the method documents as cut off (the steps before Unroll's truncation,
            # what FiniteDiff holds fixed) has no path; its zero is then compared with the oracle's.
            grads = torch.autograd.grad(val, list(targets.values()), retain_graph=True, allow_unused=True)
            out.grads = {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(targets.items(), grads)}
            if cfg.init_grad and space.init_grad_refused(cfg):
                out.where = "backward (initial weights)"
                try:
                    got0 = torch.autograd.grad(val, list(prob.params.values()))
                    out.init_error = f"no error: {[tuple(g.shape) for g in got0]}"
                except Exception as err:  # what the refusal says is judged below
                    out.init_error = f"{type(err).__name__}: {err}"
    except Exception as err:
        out.error = f"{type(err).__name__}: {err}"
        out.nestgrad_error = is_nestgrad_error(err)
        out.trace = traceback.format_exc()
    return out


# ----------------------------------------------------------------------------------------- oracle
def run_oracle(prob: Problem) -> Outcome:
    """The float64 reference: the hand-written loop (per task), the closed form for Implicit."""
    cfg = prob.cfg
    params = {k: v.detach().clone().requires_grad_() for k, v in prob.params.items()}
    tensors = {k: v.detach().clone().requires_grad_() for k, v in prob.tensors.items()}
    a = prob.a.detach().clone().requires_grad_()
    at = hparams_at(prob, tensors)
    kind = space.METHODS[cfg.method]
    cut: set[int] = set()
    if kind == "truncated":
        start = 0
        for s in cfg.segments:
            if s > cfg.method_arg:
                cut.add(start + s - cfg.method_arg)
            start += s
    elif kind == "onestep":
        cut = {cfg.steps - 1}

    def loss(out: Tensor, y: Tensor, h: Tensor, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        return loss_of(cfg, out, y, h, p)

    n = cfg.tasks or 0
    runs = []
    for i in range(max(n, 1)):
        p_i = params if not n else {k: v[i] if cfg.task_params == "stacked" else v for k, v in params.items()}
        b_i = prob.batches if not n else [(x[i], y[i]) for x, y in prob.batches]
        runs.append(oracle.reference(prob.model, loss, p_i, prob.buffers, cfg.opt, at, b_i, a, cut))
    if n:
        weights = {k: torch.stack([r[0][k] for r in runs]) for k in params}
    else:
        weights = runs[0][0]
    buffers = runs[0][1]
    res = Outcome(weights={k: v.detach() for k, v in weights.items()})
    if cfg.buffers:
        res.weights |= {k: v.detach() for k, v in buffers.items()}
    if kind == "implicit":  # d val(w*(a)) / da at the exact optimum of the full-batch ridge problem
        x, y = prob.batches[0]
        mu = RIDGE_MU + dict(cfg.kwargs).get("weight_decay", 0.0) / 2
        if n:
            opts = [oracle.ridge_optimum(x[i], y[i], a, mu) for i in range(n)]
            weights = {k: torch.stack([o[k] for o in opts]) for k in ("weight", "bias")}
        else:
            weights = oracle.ridge_optimum(x, y, a, mu)
        res.extra = {k: v.detach() for k, v in weights.items()}  # type: ignore[attr-defined]
    val = val_loss(prob, weights, buffers, prob.xv, prob.yv)
    targets = {"a": a, **tensors}
    if cfg.init_grad and not space.init_grad_refused(cfg):
        targets |= {f"W0.{k}": v for k, v in params.items()}
    grads = torch.autograd.grad(val, list(targets.values()), allow_unused=True)
    res.grads = {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(targets.items(), grads, strict=True)}
    if kind == "implicit":
        res.grads = {k: (torch.zeros_like(v) if k != "a" else v) for k, v in res.grads.items()}
    return res


# ---------------------------------------------------------------------------------------- judging
#: relative tolerance (of the largest entry) on the hypergradient, per kind of method
GRAD_TOL = {"exact": 1e-8, "truncated": 1e-8, "implicit": 1e-6}
WEIGHT_TOL = 1e-9


def grad_tol(cfg: Config) -> float | None:
    kind = space.METHODS[cfg.method]
    if kind == "onestep":  # O(eps^2): eps is in weight space, along the unit vector of the cotangent
        return max(1e-6, 100 * cfg.method_arg**2)
    return GRAD_TOL.get(kind)


ABS = 1e-14  # absolute round-off allowed on top (the drawn problems are O(1))


def rel_err(got: Tensor, ref: Tensor, floor: float = 1e-12) -> float:
    """(max |got - ref| - ABS) over max |ref|, or over ``floor`` where ref is smaller (round-off around 0)."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    return max(diff - ABS, 0.0) / max(scale, floor)


def compare(cfg: Config, ours: Outcome, ref: Outcome) -> list[str]:
    """What differs between nestgrad's outcome and the reference (empty: accepted)."""
    problems: list[str] = []
    if ours.error is not None:
        allowed = space.refusals(cfg)
        if ours.nestgrad_error and allowed:
            return []
        why = (
            "a nestgrad error, but no documented limitation applies" if ours.nestgrad_error else "not a nestgrad error"
        )
        return [f"raised in {ours.where} ({why}): {ours.error[:1500]}"]
    for k, r in ref.weights.items():
        if k not in ours.weights:
            problems.append(f"trained weights: {k!r} missing")
            continue
        g = ours.weights[k]
        if g.shape != r.shape or g.dtype != r.dtype:
            problems.append(f"trained {k!r}: {tuple(g.shape)} {g.dtype}, expected {tuple(r.shape)} {r.dtype}")
        elif not r.is_floating_point():
            if not torch.equal(g, r):
                problems.append(f"trained {k!r}: {g.tolist()} != {r.tolist()}")
        elif (e := rel_err(g, r)) > WEIGHT_TOL:
            problems.append(f"trained {k!r}: relative error {e:.3g} > {WEIGHT_TOL:g}")
    extra = getattr(ref, "extra", None)
    if extra:  # Implicit: training converged to the optimum, or the reference is not the right one
        for k, v in extra.items():
            if (e := rel_err(ours.weights[k], v)) > 1e-8:
                problems.append(f"(set-up) trained {k!r} is {e:.3g} from the optimum: raise IMPLICIT_STEPS")
    tol = grad_tol(cfg)
    # A gradient that is round-off of 0 (Adam's first step does not depend on beta2) is judged
    # against 1e-4 of the largest one (for exact methods, an absolute 1e-12 of it), or 1e-12 when all are
    # round-off (one Adagrad step moves by lr * sign(g), whatever the loss weights).
    floor = max(1e-4 * max([r.abs().max().item() for r in ref.grads.values() if r.numel()], default=0.0), 1e-12)
    for k, r in ref.grads.items():
        g = ours.grads.get(k)
        if g is None:
            problems.append(f"hypergradient d/d{k}: missing")
        elif g.shape != r.shape:
            problems.append(f"hypergradient d/d{k}: shape {tuple(g.shape)}, expected {tuple(r.shape)}")
        elif not torch.isfinite(g).all():
            problems.append(f"hypergradient d/d{k}: not finite, no error raised")
        elif tol is not None and (e := rel_err(g, r, floor)) > tol:
            problems.append(f"hypergradient d/d{k}: relative error {e:.3g} > {tol:g} (max |ref| {r.abs().max():.3g})")
    if cfg.init_grad and space.init_grad_refused(cfg):
        said = ours.init_error or ""
        if said.startswith("no error"):
            problems.append(f"d/d(initial weights) with {cfg.method} returned a value instead of raising: {said}")
        elif not (
            "appears to not have been used in the graph" in said or said.split(": ", 1)[-1].startswith("nestgrad")
        ):
            problems.append(f"d/d(initial weights) with {cfg.method}: unexpected error {said[:500]}")
    return problems


def judge(cfg: Config) -> str | None:
    """``None`` if the case ends in an accepted outcome, else a report to print with the seed."""
    prob = build(cfg)
    before = {k: v.detach().clone() for k, v in {**prob.params, **prob.buffers, **prob.tensors}.items()}
    ours = run_nestgrad(prob)
    changed = [k for k, v in {**prob.params, **prob.buffers, **prob.tensors}.items() if not torch.equal(v, before[k])]
    ref = run_oracle(build(cfg))
    problems = compare(cfg, ours, ref)
    if changed:
        problems.append(f"nestgrad changed the caller's tensors {changed} in place")
    if not problems:
        return None
    return describe(cfg, problems, ours)


def describe(cfg: Config, problems: list[str], ours: Outcome) -> str:
    lines = [f"fuzz case failed: {cfg.short()}", f"  reproduce: NESTGRAD_FUZZ_SEED={cfg.seed} (world={cfg.world})"]
    lines += [f"  {cfg!r}"] + [f"  - {p}" for p in problems]
    if ours.trace and not ours.nestgrad_error:
        lines.append("  traceback (last lines):\n" + "\n".join(ours.trace.strip().splitlines()[-8:]))
    return "\n".join(lines)
