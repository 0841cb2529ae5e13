"""Run by tests/test_first_use.py in a fresh interpreter: import nestgrad and use each public name for
the first time inside a context (``no_grad``, ``inference_mode``, ``float64``: ``set_default_dtype``).

``python tests/first_use.py CONTEXT PHASE`` prints one JSON object: name -> "ok" or the error.
PHASE ``inside``: every module is imported and every name used inside the context. PHASE ``after``:
every module is imported inside the context, then every name is used outside it (so a value made
at import time under the context cannot leak into later ordinary use).

Each use checks its answer against a hand-written reference; under ``inference_mode`` a use that
needs autograd must raise nestgrad's message instead.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import pkgutil
import sys
import traceback
import warnings

import torch

CONTEXT, PHASE = sys.argv[1], sys.argv[2]
CONTEXTS = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "float64": contextlib.nullcontext,  # set_default_dtype below
}
if CONTEXT == "float64":
    torch.set_default_dtype(torch.float64)
context = CONTEXTS[CONTEXT]

with context():
    import nestgrad as ng

    modules = [m.name for m in pkgutil.walk_packages(ng.__path__, "nestgrad.")]
    for name in modules:
        importlib.import_module(name)

active = context if PHASE == "inside" else contextlib.nullcontext
grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # outside any context: True
results: dict[str, str] = {}
INFERENCE = "inference_mode"


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    if not torch.allclose(a, b, rtol=tol, atol=tol):
        raise AssertionError(f"wrong answer: {a.flatten()[:4].tolist()} vs reference {b.flatten()[:4].tolist()}")


def use(name: str, fn) -> None:
    """Run one use inside the active context; record "ok" or the error it raised."""
    try:
        with active(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        results[name] = "ok"
    except Exception as err:
        results[name] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"


def inferring() -> bool:
    return torch.is_inference_mode_enabled()


# A linear regression: 3 SGD steps by hand are the reference for every method's trained weights.
g = torch.Generator().manual_seed(0)
X, Y = torch.randn(8, 3, generator=g), torch.randn(8, generator=g)


def loss_fn(p, batch, A):
    x, y = batch
    return (A.sigmoid() * (x @ p["w"] + p["b"] - y) ** 2).mean()


def reference(steps: int = 3, lr: float = 0.1) -> dict[str, torch.Tensor]:
    with torch.inference_mode(False), torch.enable_grad():
        w, b = torch.zeros(3, requires_grad=True), torch.zeros((), requires_grad=True)
        A = torch.zeros(8)
        for _ in range(steps):
            gw, gb = torch.autograd.grad(loss_fn({"w": w, "b": b}, (X, Y), A), (w, b))
            w, b = (w - lr * gw).detach().requires_grad_(), (b - lr * gb).detach().requires_grad_()
    return {"w": w.detach(), "b": b.detach()}


REF = reference()


def start() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    with torch.inference_mode(False):
        p = {"w": torch.zeros(3, requires_grad=True), "b": torch.zeros((), requires_grad=True)}
        A = torch.zeros(8, requires_grad=True)
    return p, A


def train_with(method_factory):
    def run() -> None:
        p, A = start()
        if inferring():
            try:
                ng.train(loss_fn, p, ng.optim.SGD(lr=0.1), [(X, Y)], steps=3, hparams=A, method=method_factory())
            except RuntimeError as err:
                if "use torch.no_grad() instead" not in str(err):
                    raise
                return
            raise AssertionError("ng.train ran inside inference_mode instead of raising nestgrad's message")
        out = ng.train(loss_fn, p, ng.optim.SGD(lr=0.1), [(X, Y)], steps=3, hparams=A, method=method_factory())
        close(out["w"], REF["w"])
        close(out["b"], REF["b"])
        if torch.is_grad_enabled():  # a hypergradient, checked against Unroll's
            (dA,) = torch.autograd.grad(((X @ out["w"] + out["b"]) ** 2).mean(), A)
            base = ng.train(loss_fn, p, ng.optim.SGD(lr=0.1), [(X, Y)], steps=3, hparams=A)
            (ref,) = torch.autograd.grad(((X @ base["w"] + base["b"]) ** 2).mean(), A)
            exact = type(method_factory()).__name__ in ("Unroll", "Reverse", "Forward")  # the others estimate
            if not torch.isfinite(dA).all() or (exact and (dA - ref).norm() > 1e-5 * ref.norm()):
                raise AssertionError(f"hypergradient {dA[:3].tolist()} vs Unroll's {ref[:3].tolist()}")

    return run


methods = {
    "Unroll": lambda: ng.Unroll(),
    "Reverse": lambda: ng.Reverse(),
    "Forward": lambda: ng.Forward(),
    "Implicit": lambda: ng.Implicit(),
    "CG": lambda: ng.Implicit(ng.CG()),
    "Neumann": lambda: ng.Implicit(ng.Neumann(steps=5, alpha=0.1)),
    "FixedPoint": lambda: ng.Implicit(ng.FixedPoint()),
    "FiniteDiff": lambda: ng.FiniteDiff(),
    "ZerothOrder": lambda: ng.ZerothOrder(samples=4, sigma=0.1, seed=0),
}
use("train", train_with(methods["Unroll"]))
for name, factory in methods.items():
    use(name, train_with(factory))


def use_tasks() -> None:
    p, A = start()
    if inferring():
        return
    out = ng.train(loss_fn, p, ng.optim.SGD(lr=0.1), [(X.expand(2, 8, 3), Y.expand(2, 8))], steps=3,
                   hparams=A, tasks=ng.Tasks(2))  # fmt: skip
    close(out["w"][1], REF["w"])


use("Tasks", use_tasks)


def use_call() -> None:
    with torch.inference_mode(False):
        model = torch.nn.Linear(3, 2)
    p = {k: v * 2 for k, v in model.named_parameters()}
    close(ng.call(model, p, X), X @ (2 * model.weight).T + 2 * model.bias)


use("call", use_call)


def use_nonfinite() -> None:
    p, A = start()
    if inferring():
        return
    bad = X.clone()
    bad[0, 0] = float("nan")
    try:
        ng.train(loss_fn, p, ng.optim.SGD(lr=0.1), [(bad, Y)], steps=3, hparams=A)
    except ng.NonFiniteError:
        return
    raise AssertionError("a NaN in the data trained without NonFiniteError")


use("NonFiniteError", use_nonfinite)


def use_check() -> None:
    p, A = start()

    def fn(A):
        out = ng.train(loss_fn, p, ng.optim.SGD(lr=0.1), [(X, Y)], steps=3, hparams=A)
        return ((X @ out["w"] + out["b"]) ** 2).mean()

    if inferring():  # its own message, also for an fn that trains nothing
        try:
            ng.check(lambda A: (A**2).sum(), A)
        except RuntimeError as err:
            if "nestgrad.check: called inside torch.inference_mode()" not in str(err):
                raise
            return
        raise AssertionError("ng.check ran inside inference_mode instead of raising")
    with torch.enable_grad():  # check computes the gradient it checks; under no_grad there is none
        result = ng.check(fn, A)
    if not result.passed:
        raise AssertionError(f"ng.check of an exact hypergradient did not pass: {result}")


use("check", use_check)


def use_explain() -> None:
    p, A = start()

    def fn(A):
        out = ng.train(loss_fn, p, ng.optim.SGD(lr=0.1), [(X, Y)], steps=2, hparams=A)
        return ((X @ out["w"] + out["b"]) ** 2).mean()

    if inferring():  # its own message, also for an fn that trains nothing
        try:
            ng.explain(lambda A: (A**2).sum(), A)
        except RuntimeError as err:
            if "nestgrad.explain: called inside torch.inference_mode()" not in str(err):
                raise
            return
        raise AssertionError("ng.explain ran inside inference_mode instead of raising")
    with torch.enable_grad():
        report = ng.explain(fn, A)
    if report.status != "connected":
        raise AssertionError(f"explain of a connected path: {report}")


use("explain", use_explain)


def use_optimizers() -> None:
    torch_of = {"SGD": {"momentum": 0.9}, "Adam": {}, "AdamW": {}, "Adamax": {}, "NAdam": {}, "RAdam": {},
                "RMSprop": {}, "Rprop": {}, "Adagrad": {}, "Adadelta": {}, "ASGD": {}}  # fmt: skip
    for name, kw in torch_of.items():
        with torch.inference_mode(False):
            w0 = torch.linspace(-1.0, 1.0, 5)
            gr = torch.linspace(0.5, -0.3, 5)
        opt = getattr(ng.optim, name)(lr=0.01, **kw)
        p = {"w": w0.clone()}
        state = opt.init(p)
        for _ in range(3):
            p, state = opt.update({"w": gr}, state, p)
        with torch.inference_mode(False), torch.no_grad():
            w = torch.nn.Parameter(w0.clone())
            ref = getattr(torch.optim, name)([w], lr=0.01, **kw)
            for _ in range(3):
                w.grad = gr.clone()
                ref.step()
        close(p["w"], w.detach())
    sched = ng.optim.SGD(lr=ng.optim.Schedule(torch.tensor([0.1, 0.2])))
    p2 = sched.update({"w": torch.ones(2)}, sched.init({"w": torch.zeros(2)}), {"w": torch.zeros(2)})[0]
    close(p2["w"], torch.full((2,), -0.1))


use("optim", use_optimizers)


def use_higher() -> None:
    if not torch.is_grad_enabled() or inferring():
        return  # higher's inner loop differentiates each step: it needs autograd, as the real higher does
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ng.higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(((fmodel(X).squeeze(-1) - Y) ** 2).mean())
        meta = ((fmodel(X).squeeze(-1) - Y) ** 2).mean()
    (gw,) = torch.autograd.grad(meta, model.weight)
    if not torch.isfinite(gw).all():
        raise AssertionError("higher meta-gradient not finite")


use("higher", use_higher)


def use_classes() -> None:
    ng.DataParallel()
    for name in ng.__all__:  # every public name resolves
        getattr(ng, name)
    for sub in ("optim", "methods", "diagnostics", "higher", "distributed"):
        for name in getattr(ng, sub).__all__:
            getattr(getattr(ng, sub), name)
    with torch.inference_mode(False):
        ng.tracking(torch.zeros(1, requires_grad=True))


use("names", use_classes)
print(json.dumps(results))
