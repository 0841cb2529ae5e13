"""Cases for tests/test_distributed.py: each runs on one process (whole data) or on one rank (its shard).

Imported by the test (the single-process references) and by the spawned ranks.
"""

from __future__ import annotations

import datetime
import os
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad as ng

N, NV, D = 12, 6, 3  # training examples, validation examples, features (divisible by 2 and 3 ranks)
STEPS = 3


def dataset() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    xv = torch.randn(NV, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, 1, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(N, 1, generator=g, dtype=torch.float64)
    yv = torch.tanh(xv @ w)
    a = 0.5 + torch.rand(N, generator=g, dtype=torch.float64)
    return {"x": x, "y": y, "xv": xv, "yv": yv, "a": a}


def model(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Linear(D, 1).double()
    return nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def shard(t: Tensor, world: int, rank: int) -> Tensor:
    return t.chunk(world)[rank] if world > 1 else t


METHODS: dict[str, Callable[[], ng.Method]] = {
    "Unroll": ng.Unroll,
    "Reverse": ng.Reverse,
    "Reverse(checkpoint_every=2)": lambda: ng.Reverse(checkpoint_every=2),
    "Reverse(checkpoints=1)": lambda: ng.Reverse(checkpoints=1),
    "Forward": ng.Forward,
    "Implicit(CG)": lambda: ng.Implicit(ng.CG(max_steps=20, tol=1e-13)),
    "Implicit(FixedPoint)": lambda: ng.Implicit(ng.FixedPoint(max_steps=400, tol=1e-13)),
    "FiniteDiff": lambda: ng.FiniteDiff(eps=0.1),
    "ZerothOrder": lambda: ng.ZerothOrder(samples=3, sigma=0.1, seed=0),
}
IMPLICIT = ("Implicit(CG)", "Implicit(FixedPoint)")


def run_method(name: str, world: int, rank: int, reduce: str = "mean") -> dict[str, Tensor]:
    """Train with ``name``; return the trained weights and the hypergradients of the mean validation loss.

    ``world == 1`` is the single process on the whole data; otherwise this rank's shard, data-parallel.
    """
    d = dataset()
    implicit = name in IMPLICIT
    net = model("linear" if implicit else "mlp")
    x, y, a = (shard(d[k], world, rank) for k in ("x", "y", "a"))
    xv, yv = shard(d["xv"], world, rank), shard(d["yv"], world, rank)
    a = a.clone().requires_grad_()
    s = torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64, requires_grad=True)  # shared feature weights
    lr = torch.tensor(0.3 if implicit else 0.5, dtype=torch.float64, requires_grad=True)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    scale = N // world if reduce == "sum" else None  # "sum": each rank normalizes by the global count

    def loss_fn(p: dict[str, Tensor], batch: Any, h: Any) -> Tensor:
        xb, yb = batch
        weights, feat = h
        per = weights * (ng.call(net, p, xb * feat) - yb).squeeze(-1) ** 2
        loss = per.sum() / (scale * world) if scale else per.mean()
        if implicit:
            loss = loss + 0.05 * sum((v**2).sum() for v in p.values())
        return loss

    steps = 60 if implicit else STEPS
    opt = ng.optim.SGD(lr=lr) if implicit else ng.optim.SGD(lr=lr, momentum=0.9)
    parallel = ng.DataParallel(shard_hparams=(True, False), reduce=reduce) if world > 1 else None
    trained = ng.train(
        loss_fn, params, opt, [(x, y)], steps=steps, hparams=(a, s), method=METHODS[name](), parallel=parallel
    )
    local = F.mse_loss(ng.call(net, trained, xv), yv)
    val = ng.distributed.mean(local) if world > 1 else local
    wanted = {"a": a, "s": s}
    if not implicit:
        wanted["lr"] = lr
    if name in ("Unroll", "Reverse", "Reverse(checkpoint_every=2)", "Reverse(checkpoints=1)"):
        wanted |= {f"W0.{k}": v for k, v in params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Implicit's convergence warnings are not what is tested here
        got = torch.autograd.grad(val, list(wanted.values()))
    out = {f"d{k}": g for k, g in zip(wanted, got, strict=True)}
    out |= {f"trained.{k}": v.detach() for k, v in trained.items()}
    out["val"] = val.detach()
    return out


def run_pipeline(world: int, rank: int) -> dict[str, Tensor]:
    """Two levels, both data-parallel: W1 = train(A), W2 = train(W1), outer loss of W2; Reverse then Unroll."""
    d = dataset()
    x, y, a = (shard(d[k], world, rank) for k in ("x", "y", "a"))
    xv, yv = shard(d["xv"], world, rank), shard(d["yv"], world, rank)
    a = a.clone().requires_grad_()
    torch.manual_seed(2)
    enc = nn.Linear(D, D).double()
    head = nn.Linear(D, 1).double()
    p1 = {k: v.detach().clone().requires_grad_() for k, v in enc.named_parameters()}
    p2 = {k: v.detach().clone().requires_grad_() for k, v in head.named_parameters()}
    par1 = {"parallel": ng.DataParallel(shard_hparams=True)} if world > 1 else {}
    par2 = {"parallel": ng.DataParallel()} if world > 1 else {}

    def loss1(p: dict[str, Tensor], batch: Any, w: Tensor) -> Tensor:  # level 1: a weighted autoencoder-ish loss
        xb, yb = batch
        z = torch.tanh(ng.call(enc, p, xb))
        return (w * ((z - xb) ** 2).sum(-1)).mean() + ((z.sum(-1, keepdim=True) - yb) ** 2).mean()

    def loss2(p: dict[str, Tensor], batch: Any, w1: dict[str, Tensor]) -> Tensor:  # level 2 reads level 1's weights
        xb, yb = batch
        z = torch.tanh(ng.call(enc, w1, xb))
        return F.mse_loss(ng.call(head, p, z), yb)

    w1 = ng.train(loss1, p1, ng.optim.SGD(lr=0.2), [(x, y)], steps=2, hparams=a, method=ng.Reverse(), **par1)
    w2 = ng.train(loss2, p2, ng.optim.SGD(lr=0.3), [(x, y)], steps=2, hparams=w1, method=ng.Unroll(), **par2)
    local = F.mse_loss(ng.call(head, w2, torch.tanh(ng.call(enc, w1, xv))), yv)
    val = ng.distributed.mean(local) if world > 1 else local
    wanted = {"a": a, **{f"p1.{k}": v for k, v in p1.items()}, **{f"p2.{k}": v for k, v in p2.items()}}
    got = torch.autograd.grad(val, list(wanted.values()))
    return {f"d{k}": g for k, g in zip(wanted, got, strict=True)} | {"val": val.detach()}


def run_seed(world: int, rank: int) -> dict[str, Tensor]:
    """The forum thread's three-level pipeline (examples/seed_pipeline.py: two tiny Bert2Bert models, float64),
    both training levels data-parallel: every data tensor and A split by rows across the ranks."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import seed_pipeline as sp

    pl = sp.build(0, torch.float64)
    batch1 = tuple(shard(t, world, rank) for t in pl.batch1)
    data2 = [shard(x, world, rank) for x in pl.data2]
    pl.val = tuple(shard(t, world, rank) for t in pl.val)
    A = shard(pl.A.detach(), world, rank).clone().requires_grad_()
    par1 = {"parallel": ng.DataParallel(shard_hparams=True)} if world > 1 else {}
    par2 = {"parallel": ng.DataParallel()} if world > 1 else {}
    opt = ng.optim.SGD(lr=0.2, momentum=0.9)
    w1 = ng.train(lambda w, b, a: sp.loss1(pl, w, b, a), dict(pl.model1.named_parameters()), opt, [batch1],
                  steps=sp.STEPS1, hparams=A, **par1)  # fmt: skip
    w2 = ng.train(lambda w, x, h: sp.loss2(pl, w, x, h, "hidden"), dict(pl.model2.named_parameters()), opt, data2,
                  steps=sp.STEPS2, hparams=w1, **par2)  # fmt: skip
    local = sp.loss3(pl, w2)
    L3 = ng.distributed.mean(local) if world > 1 else local
    (da,) = torch.autograd.grad(L3, A)
    return {"da": da, "L3": L3.detach()}


def run_replicated_outside(world: int, rank: int) -> dict[str, Tensor]:
    """An hparam used inside ng.train and, wrapped with ng.distributed.replicated, in the outer objective."""
    d = dataset()
    net = model("mlp")
    x, y = shard(d["x"], world, rank), shard(d["y"], world, rank)
    xv, yv = shard(d["xv"], world, rank), shard(d["yv"], world, rank)
    s = torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64, requires_grad=True)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    par = {"parallel": ng.DataParallel()} if world > 1 else {}

    def loss_fn(p: dict[str, Tensor], batch: Any, feat: Tensor) -> Tensor:
        xb, yb = batch
        return F.mse_loss(ng.call(net, p, xb * feat), yb)

    trained = ng.train(loss_fn, params, ng.optim.SGD(lr=0.5), [(x, y)], steps=2, hparams=s, **par)
    # The validation loss reads s too, and a penalty on s: outside ng.train, s is wrapped.
    s_out = ng.distributed.replicated(s) if world > 1 else s
    local = F.mse_loss(ng.call(net, trained, xv * s_out), yv) + (s_out**2).sum()
    val = ng.distributed.mean(local) if world > 1 else local
    return {"ds": torch.autograd.grad(val, s)[0]}


# ------------------------------------------------------------------------------------------------- misuse
def _error(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as err:  # the message is what the test checks
        return f"{type(err).__name__}: {err}"
    return "no error"


def run_misuse(world: int, rank: int) -> dict[str, str]:
    """Bad set-ups; every rank must raise (and stay in step with the others for the next check)."""
    d = dataset()
    net = model("mlp")
    x, y = shard(d["x"], world, rank), shard(d["y"], world, rank)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}

    def loss_fn(p: dict[str, Tensor], batch: Any, h: Any) -> Tensor:
        xb, yb = batch
        return F.mse_loss(ng.call(net, p, xb), yb)

    def train(**kw: Any) -> Any:
        args = {"params": params, "data": [(x, y)], "steps": 2, "method": ng.Unroll()} | kw
        return ng.train(
            loss_fn,
            args["params"],
            ng.optim.SGD(lr=0.1),
            args["data"],
            steps=args["steps"],
            method=args["method"],
            parallel=ng.DataParallel(),
        )

    out = {
        "steps": _error(lambda: train(steps=2 + rank)),
        "shapes": _error(
            lambda: train(params={**params, "0.bias": torch.zeros(4 + rank, dtype=torch.float64, requires_grad=True)})
        ),
        "values": _error(lambda: train(params={k: v + rank for k, v in params.items()})),
        "empty": _error(lambda: train(data=[(x[: 0 if rank == world - 1 else None], y)])),
        "seed": _error(lambda: train(method=ng.ZerothOrder(samples=1, sigma=0.1))),
        "forward_mode": _error(lambda: train(method=ng.Forward(mode="forward"))),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(data=[(x[: len(x) - rank], y[: len(y) - rank])])  # uneven shards with reduce="mean"
    out["uneven"] = " | ".join(str(w.message) for w in caught) or "no warning"
    # After the errors the ranks are still in step: a good call works.
    out["after"] = _error(lambda: train())

    # An hparam computed from both a data-parallel output and a local leaf.
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    trained = train()

    def loss_h(p: dict[str, Tensor], batch: Any, h: Tensor) -> Tensor:
        xb, yb = batch
        return F.mse_loss(ng.call(net, p, xb) * h.sum(), yb)

    out["mixed"] = _error(
        lambda: ng.train(
            loss_h,
            params,
            ng.optim.SGD(lr=0.1),
            [(x, y)],
            steps=1,
            hparams=trained["0.bias"] * lr,
            parallel=ng.DataParallel(),
        )
    )
    # ng.call on a DDP-wrapped module runs the wrapped module.
    ddp = nn.parallel.DistributedDataParallel(model("mlp"))
    p_ddp = {k: v * 2 for k, v in ddp.named_parameters()}
    p_mod = {k: v * 2 for k, v in ddp.module.named_parameters()}
    same = torch.equal(ng.call(ddp, p_ddp, x), ng.call(ddp.module, p_mod, x))
    same = same and torch.equal(ng.call(ddp, p_mod, x), ng.call(ddp.module, p_mod, x))
    out["ddp"] = "same" if same else "differs"
    return out


# ------------------------------------------------------------------------------------------------- agreement
def run_agreement(world: int, rank: int, only: str = "") -> dict[str, str]:
    """Ranks that differ in one setting each: every rank must raise (and stay in step for the next case).

    ``only``: run that case alone (to see one case on its own, e.g. on an older nestgrad)."""
    d = dataset()
    net = model("mlp")
    x, y = shard(d["x"], world, rank), shard(d["y"], world, rank)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}

    def loss_fn(p: dict[str, Tensor], batch: Any, h: Any) -> Tensor:
        xb, yb = batch
        out = ng.call(net, {k: v for k, v in p.items() if k != "scale"}, xb) * p.get("scale", 1.0)  # scale: frozen
        return F.mse_loss(out * h if isinstance(h, Tensor) else out, yb)

    def train(opt: Any = None, **kw: Any) -> Any:
        args = {"params": params, "data": [(x, y)], "steps": 2, "method": ng.Unroll()} | kw
        par = args.pop("parallel", ng.DataParallel())
        return ng.train(
            loss_fn, args.pop("params"), opt or ng.optim.SGD(lr=0.1), args.pop("data"), parallel=par, **args
        )

    r = rank
    ones = torch.ones(2, dtype=torch.float64)
    warm = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1, momentum=0.9), [(x, y)], steps=2, return_state=True)
    warm_r = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1, momentum=0.9), [(x, y)], steps=2 + r, return_state=True)
    cases: dict[str, Callable[[], Any]] = {
        "lr": lambda: train(ng.optim.SGD(lr=0.1 if r == 0 else 0.2)),
        "betas": lambda: train(ng.optim.Adam(lr=0.1, betas=(0.9, 0.999 if r == 0 else 0.99))),
        "nesterov": lambda: train(ng.optim.SGD(lr=0.1, momentum=0.9, nesterov=r == 1)),
        "foreach": lambda: train(ng.optim.SGD(lr=0.1, foreach=r == 0)),
        "lr_tensor": lambda: train(ng.optim.SGD(lr=torch.tensor(0.1 if r == 0 else 0.2, dtype=torch.float64))),
        "groups": lambda: train(ng.optim.SGD(lr=0.1, groups=[{"params": ["0.*"], "lr": 0.05}] if r else None)),
        "group_lr": lambda: train(ng.optim.SGD(lr=0.1, groups=[{"params": ["0.*"], "lr": 0.05 * (r + 1)}])),
        "schedule_fn": lambda: train(ng.optim.SGD(lr=ng.optim.Schedule(lambda t: 0.1 / (t + r)))),
        "schedule_values": lambda: train(ng.optim.SGD(lr=ng.optim.Schedule(ones * 0.1 * (r + 1)))),
        # Each rank warmed up on its own shard: the momentum buffers differ.
        "state": lambda: train(ng.optim.SGD(lr=0.1, momentum=0.9), state=warm[1]),
        "state_steps": lambda: train(
            ng.optim.SGD(lr=0.1, momentum=0.9),
            state=_same_slots(warm_r[1]),
        ),
        "bucket_mb": lambda: train(parallel=ng.DataParallel(bucket_mb=25.0 if r == 0 else 1e-5)),
        "reduce": lambda: train(parallel=ng.DataParallel(reduce="mean" if r == 0 else "sum")),
        "shard_hparams": lambda: train(
            hparams=torch.ones(1, dtype=torch.float64), parallel=ng.DataParallel(shard_hparams=r == 1)
        ),
        "checkpoint_every": lambda: train(method=ng.Reverse(checkpoint_every=None if r == 0 else 1)),
        "solver": lambda: train(method=ng.Implicit(ng.CG(max_steps=5 + r))),
        "zo_unseeded": lambda: train(method=ng.ZerothOrder(samples=1, sigma=0.1)),
        "zo_seed": lambda: train(method=ng.ZerothOrder(samples=1, sigma=0.1, seed=r)),
        "zo_samples": lambda: train(method=ng.ZerothOrder(samples=1 + r, sigma=0.1, seed=0)),
        "check_finite": lambda: train(check_finite=r == 0),
        "return_state": lambda: train(return_state=r == 1),
        "tasks": lambda: train(tasks=2 if r == 1 else None),
        "frozen": lambda: train(params={**params, "scale": torch.full((1,), 1.0 + r, dtype=torch.float64)}),
        # One element one ulp apart: a float sum could miss it, the bits do not.
        "params_bits": lambda: train(
            params={**params, "0.bias": _one_ulp(params["0.bias"]) if r else params["0.bias"]}
        ),
    }
    out = {k: _error(fn) for k, fn in cases.items() if not only or k == only}
    if only and only != "nan":
        return out
    out["after"] = _error(lambda: train())  # the ranks are still in step

    # A NaN in rank 1's batch at step 1: rank 1 names its own loss, rank 0 says the gradient came from rank 1.
    xn = x.clone()
    if rank == 1:
        xn[0, 0] = float("nan")
    out["nan"] = _error(lambda: train(data=[(x, y), (xn, y)], steps=3))
    out["after_nan"] = _error(lambda: train())
    return out


def _same_slots(state: Any) -> Any:
    """``state`` with its step counts, and zeros in every slot (the same on every rank)."""
    return state.with_tensors([torch.zeros_like(t) for t in state.tensors()])


def _one_ulp(t: Tensor) -> Tensor:
    u = t.detach().clone()
    u[0] = torch.nextafter(u[0], torch.tensor(float("inf"), dtype=u.dtype))
    return u.requires_grad_()


def run_failing_data(world: int, rank: int) -> dict[str, str]:
    """Rank 1's data function raises at step 3; rank 0 waits for it in the all-reduce of step 3."""
    d = dataset()
    net = model("mlp")
    x, y = shard(d["x"], world, rank), shard(d["y"], world, rank)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}

    def data(t: int) -> Any:
        if rank == 1 and t == 3:
            raise RuntimeError(f"the loader of rank 1 cannot read shard file part-{t}.bin")
        return x, y

    def loss_fn(p: dict[str, Tensor], batch: Any, h: Any) -> Tensor:
        return F.mse_loss(ng.call(net, p, batch[0]), batch[1])

    message = _error(lambda: ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), data, steps=6, parallel=ng.DataParallel()))
    return {"message": message}


# ------------------------------------------------------------------------------------------------- worker
def worker(rank: int, world: int, store: str, outdir: str, jobs: list[str], seconds: float = 60.0) -> None:
    """One rank: run ``jobs`` and save the results to ``outdir/rank{rank}.pt`` (errors included)."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=seconds)
    )
    results: dict[str, Any] = {}
    try:
        for job in jobs:
            kind, _, arg = job.partition(":")
            if kind == "method":
                results[job] = run_method(arg, world, rank)
            elif kind == "sum":
                results[job] = run_method(arg, world, rank, reduce="sum")
            elif kind == "pipeline":
                results[job] = run_pipeline(world, rank)
            elif kind == "seed":
                results[job] = run_seed(world, rank)
            elif kind == "outside":
                results[job] = run_replicated_outside(world, rank)
            elif kind == "misuse":
                results[job] = run_misuse(world, rank)
            elif kind == "agreement":
                results[job] = run_agreement(world, rank, arg)
            elif kind == "failing_data":  # the last job: rank 1's group is out of step afterwards
                results[job] = run_failing_data(world, rank)
            elif kind == "fail" and rank == int(arg):
                raise RuntimeError("this rank fails on purpose")
            elif kind == "fail":
                dist.barrier()  # waits for the failed rank: must end by the timeout, or by the parent killing it
    except Exception:
        results["error"] = traceback.format_exc()
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        raise
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


_SPAWNED: list[Any] = []  # the processes of every spawn, to check that none outlives its test


def spawn(
    world: int, jobs: list[str], folder: Any, timeout: float = 150.0, seconds: float = 60.0
) -> list[dict[str, Any]]:
    """Run ``jobs`` on ``world`` spawned ranks (``seconds``: the collectives' timeout); return each rank's
    results. Kills every rank on any failure, and when ``timeout`` passes."""
    import time
    from pathlib import Path

    import torch.multiprocessing as mp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(
        worker,
        args=(world, str(folder / "store"), str(folder), jobs, seconds),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    _SPAWNED.extend(ctx.processes)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish {jobs} within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]
