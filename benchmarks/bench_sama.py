"""SAMA (APPROXIMATE) against the exact hypergradient, with Adam inner optimizers, on three cases.

The demo, the online reweighting example and the seed pipeline train their inner models with SGD
with momentum, which SAMA does not support (it raises). This script builds an Adam variant of each
from their own pieces (data, models, losses, scores) and compares, on the same variant:

* (a) the digits demo's online hyper-cleaning (``learn_weights_online``: training + validation images
  in the inner set, minibatches of 100, k = 5 inner steps per outer step, outer Adam cosine-annealed);
* (b) ``examples/online_reweighting.py`` (training images only, k = 5, outer ``torch.optim.Adam``);
* (c) ``examples/seed_pipeline.py`` (two tiny Bert2Bert models; dL3/dA through both levels).

For (a) and (b): the cosine similarity of SAMA's hypergradient with the exact one (``Unroll`` through
the k-step segment) at the same point, every ``--every`` outer steps of the exact run; the end metric
of a whole run driven by each method (test accuracy of the running classifier, F1 of the learned
weights as a detector); the median time per outer step (without the dispatch mode; the median, as
the machine may be shared); and the tensor bytes a segment holds for its backward pass (tensors made
inside ``ng.train`` still alive when it returns, counted through a ``TorchDispatchMode``: no
allocator involved). All runs start from the same warm classifier (``--warmup`` plain Adam steps at
weight 0.5): SAMA assumes a warm optimizer state.

    python benchmarks/bench_sama.py                  # all three, about 1 minute on one thread
    python benchmarks/bench_sama.py --only seed --seed-steps 100  # about 5 minutes
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import nestgrad as ng
from nestgrad.demos import _demo as demo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

Params = dict[str, Tensor]


class Held(TorchDispatchMode):
    """Bytes of the tensors made inside the block that are still alive when asked (storages counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(x) for x in tree_flatten(out)[0] if isinstance(x, Tensor)]
        return out

    def bytes(self) -> int:
        gc.collect()
        storages = {}
        for r in self.refs:
            x = r()
            if x is not None:
                storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return sum(storages.values())


def cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def detach(state: ng.optim.OptState) -> ng.optim.OptState:
    return state.with_tensors([t.detach() for t in state.tensors()])


# ------------------------------------------------------------------------ (a), (b): online reweighting
class Online:
    """One online reweighting setup: the inner loss, data, sampler, outer optimizer and scores."""

    def __init__(self, case: str, seed: int, inner_lr: float) -> None:
        self.case = case
        data = demo.load_data(seed)
        self.data = data
        n = len(data.y_train)
        self.n = n
        if case == "demo":  # the demo: training + validation images, the latter at weight 1
            self.model = demo.DEFAULT_RECIPE.model(seed)
            self.x, self.y, _ = demo.inner_data(data, torch.ones(n))
            self.outer_lr = demo.ONLINE_LR
        else:  # examples/online_reweighting.py: training images only
            import online_reweighting as ex

            args = ex.parse_args([])
            self.model = ex.make_model(args.hidden, seed)
            self.x, self.y = data.x_train, data.y_train
            self.outer_lr = args.outer_lr
        self.seed, self.inner_lr = seed, inner_lr

    def loss_fn(self, params: Params, batch: tuple[Tensor, Tensor, Tensor], weights: Tensor) -> Tensor:
        x, y, idx = batch
        losses = F.cross_entropy(ng.call(self.model, params, x), y, reduction="none")
        return (weights[idx] * losses).sum() / len(idx)

    def weights(self, logits: Tensor) -> Tensor:
        extra = torch.ones(len(self.y) - self.n)
        return torch.cat([torch.sigmoid(logits), extra])

    def score(self, params: Params, logits: Tensor) -> dict[str, float]:
        w = torch.sigmoid(logits.detach())
        if self.case == "demo":
            f1 = demo.detection_scores(w, self.data.flipped)["f1"]  # the demo's: "weight < 0.5" flags a flip
        else:
            import online_reweighting as ex

            f1 = ex.f1_clean(w, self.data.flipped)  # the example's: "weight > 0.5" marks a clean label
        acc = demo.accuracy(self.model, params, self.data.x_test, self.data.y_test)
        return {"test_acc": acc, "f1": f1}

    def start(self, warmup: int) -> tuple[Params, ng.optim.OptState, Callable[[], Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        order, pos = torch.randperm(len(self.y), generator=gen), 0

        def minibatch(size: int = 100) -> Tensor:
            nonlocal order, pos
            if pos + size > len(self.y):
                order, pos = torch.randperm(len(self.y), generator=gen), 0
            pos += size
            return order[pos - size : pos]

        opt = ng.optim.Adam(lr=self.inner_lr)
        params = {k: p.detach().clone().requires_grad_() for k, p in self.model.named_parameters()}
        with torch.no_grad():
            batches = [(self.x[i], self.y[i], i) for i in (minibatch() for _ in range(warmup))]
            half = self.weights(torch.zeros(self.n))
            params, state = ng.train(self.loss_fn, params, opt, batches, steps=warmup, hparams=half, return_state=True)
        return {k: v.detach() for k, v in params.items()}, detach(state), minibatch

    def segment(self, params: Params, state: Any, logits: Tensor, batches: list, method: ng.Method, k: int) -> Any:
        opt = ng.optim.Adam(lr=self.inner_lr)
        trained, end = ng.train(
            self.loss_fn, params, opt, batches, steps=k, hparams=self.weights(logits), state=state,
            return_state=True, method=method,
        )  # fmt: skip
        val = F.cross_entropy(ng.call(self.model, trained, self.data.x_val), self.data.y_val)
        (grad,) = torch.autograd.grad(val, logits)
        return grad, {n: p.detach() for n, p in trained.items()}, detach(end)

    def run(self, method: ng.Method, steps: int, k: int, warmup: int, every: int) -> dict[str, Any]:
        params, state, minibatch = self.start(warmup)
        logits = torch.zeros(self.n, requires_grad=True)
        if self.case == "demo":
            outer = demo.OuterAdam(logits, self.outer_lr, cosine_steps=steps)
            step = outer.step
        else:
            adam = torch.optim.Adam([logits], lr=self.outer_lr)

            def step(g: Tensor) -> None:
                logits.grad = g
                adam.step()

        others = {"SAMA": ng.SAMA(), f"SAMA(last={k})": ng.SAMA(last=k), "FiniteDiff": ng.FiniteDiff()}
        cos: dict[str, list[float]] = {name: [] for name in others}
        seconds: list[float] = []
        for s in range(steps):
            batches = [(self.x[i], self.y[i], i) for i in (minibatch() for _ in range(k))]
            t0 = time.perf_counter()
            grad, new_params, new_state = self.segment(params, state, logits, batches, method, k)
            seconds.append(time.perf_counter() - t0)
            if every and s % every == 0:  # the approximations at the same point (the hypergradient only)
                for name, other in others.items():
                    g_other, _, _ = self.segment(params, state, logits, batches, other, k)
                    cos[name].append(cosine(g_other, grad))
            params, state = new_params, new_state
            step(grad)
        held = Held()
        batches = [(self.x[i], self.y[i], i) for i in (minibatch() for _ in range(k))]
        opt, hparams = ng.optim.Adam(lr=self.inner_lr), self.weights(logits)
        with held:  # the batches and hparams are made outside: only what the run keeps is counted
            out = ng.train(self.loss_fn, params, opt, batches, steps=k, hparams=hparams, state=state, method=method)
        nbytes = held.bytes()
        del out
        return {
            **self.score(params, logits),
            "cos": cos,
            "s_per_outer": float(torch.tensor(seconds).median()),
            "held": nbytes,
        }


def online_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    setup = Online(case, args.seed, args.inner_lr)
    steps = args.outer_steps or (demo.DEFAULT_STEPS if case == "demo" else 200)  # each one's own default
    exact = setup.run(ng.Unroll(), steps, args.k, args.warmup, args.every)
    approx = setup.run(ng.SAMA(), steps, args.k, args.warmup, 0)
    last = setup.run(ng.SAMA(last=args.k), steps, args.k, args.warmup, 0)
    fd = setup.run(ng.FiniteDiff(), steps, args.k, args.warmup, 0)
    return {"exact": exact, "SAMA": approx, f"SAMA(last={args.k})": last, "FiniteDiff": fd, "steps": steps}


# ----------------------------------------------------------------------------- (c): the seed pipeline
def seed_case(args: argparse.Namespace) -> dict[str, Any]:
    import seed_pipeline as sp

    torch.manual_seed(0)
    pl = sp.build(args.seed, torch.float64)
    T = args.seed_steps

    def levels(method1: ng.Method, method2: ng.Method) -> Tensor:
        w1 = ng.train(lambda w, b, A: sp.loss1(pl, w, b, A), dict(pl.model1.named_parameters()),
                      ng.optim.Adam(lr=1e-3), [pl.batch1], steps=T, hparams=pl.A, method=method1)  # fmt: skip
        w2 = ng.train(lambda w, x, w1: sp.loss2(pl, w, x, w1, "hidden"), dict(pl.model2.named_parameters()),
                      ng.optim.Adam(lr=1e-3), pl.data2, steps=T, hparams=w1, method=method2)  # fmt: skip
        return sp.loss3(pl, w2)

    out: dict[str, Any] = {}
    for name, (m1, m2) in {
        "Unroll/Unroll": (ng.Unroll(), ng.Unroll()),
        "SAMA/SAMA": (ng.SAMA(warm_steps=T), ng.SAMA(warm_steps=T)),
        "Unroll/SAMA": (ng.Unroll(), ng.SAMA(warm_steps=T)),
    }.items():
        t0 = time.perf_counter()
        (g,) = torch.autograd.grad(levels(m1, m2), pl.A)
        seconds = time.perf_counter() - t0
        held = Held()  # a second forward pass, under the (slow) dispatch mode, for what it holds
        with held:
            L3 = levels(m1, m2)
        out[name] = {"grad": g, "s": seconds, "held": held.bytes()}
        del L3
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["demo", "example", "seed"], default=None)
    p.add_argument("--outer-steps", type=int, default=None, help="default: 400 (demo), 200 (example)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--inner-lr", type=float, default=3e-3)
    p.add_argument("--seed-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    for case in ("demo", "example"):
        if args.only not in (None, case):
            continue
        t0 = time.perf_counter()
        r = online_case(case, args)
        e, took = r["exact"], time.perf_counter() - t0
        label = "a" if case == "demo" else "b"
        print(f"({label}) {case}: Adam(lr={args.inner_lr}) inner, k={args.k}, "
              f"{r['steps']} outer steps after {args.warmup} warm-up steps ({took:.0f} s)")  # fmt: skip
        for name, values in e["cos"].items():
            c = torch.tensor(values)
            print(f"    cosine({name}, exact) at {len(c)} points of the exact run: mean {c.mean():.3f}, "
                  f"median {c.median():.3f}, min {c.min():.3f}, max {c.max():.3f}")  # fmt: skip
        rows = {"exact (Unroll)": e, **{n: x for n, x in r.items() if n not in ("exact", "steps")}}
        for name, x in rows.items():
            ms, kib = 1e3 * x["s_per_outer"], x["held"] / 2**10
            print(f"    {name:16s} test acc {x['test_acc']:.4f}  F1 {x['f1']:.4f}  "
                  f"{ms:.1f} ms/outer step (median)  held for backward {kib:.0f} KiB")  # fmt: skip
        for name in ("SAMA", f"SAMA(last={args.k})"):
            x = r[name]
            print(f"    {name}/exact: time {x['s_per_outer'] / e['s_per_outer']:.2f}x, "
                  f"memory held {x['held'] / e['held']:.3f}x")  # fmt: skip
    if args.only in (None, "seed"):
        t0 = time.perf_counter()
        r = seed_case(args)
        ref = r["Unroll/Unroll"]
        print(f"(c) seed pipeline (float64, Adam(lr=1e-3), {args.seed_steps} steps per level; "
              f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip
        for name, x in r.items():
            print(f"    {name:14s} cosine(dL3/dA, exact) {cosine(x['grad'], ref['grad']):+.3f}  "
                  f"time {x['s']:.2f} s ({x['s'] / ref['s']:.2f}x)  held {x['held'] / 2**20:.2f} MiB "
                  f"({x['held'] / ref['held']:.3f}x)")  # fmt: skip
    print(f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
