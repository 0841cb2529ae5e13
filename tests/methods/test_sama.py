"""SAMA (APPROXIMATE, Adam/AdamW): its formula against a torch.optim.Adam loop written by hand, its agreement
with the exact hypergradient on ridge and logistic problems, memory that does not grow with the steps, and
the errors where its assumptions do not hold."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import nestgrad as ng

pytestmark = pytest.mark.usefixtures("float64")


def ridge(seed: int = 0, n: int = 40, d: int = 8):
    """Least squares with a learned per-feature penalty 0.1 * exp(lam) * w**2, and a validation loss."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    w0 = torch.randn(d, generator=g)
    y = X @ w0 + 0.3 * torch.randn(n, generator=g)
    Xv = torch.randn(n, d, generator=g)
    yv = Xv @ w0 + 0.3 * torch.randn(n, generator=g)
    lam = torch.full((d,), 0.5).requires_grad_()

    def loss_fn(p, batch, lam):
        x, t = batch
        return ((x @ p["w"] - t) ** 2).mean() + 0.1 * (lam.exp() * p["w"] ** 2).sum()

    def val(p):
        return ((Xv @ p["w"] - yv) ** 2).mean()

    return loss_fn, {"w": torch.zeros(d, requires_grad=True)}, [(X, y)], lam, val


def logistic(seed: int = 0, n: int = 60, d: int = 6):
    """Logistic regression with learned per-example weights sigmoid(A) and 10 flipped labels."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = (X[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).double()
    y[:10] = 1 - y[:10]
    Xv = torch.randn(n, d, generator=g)
    yv = (Xv[:, 0] > 0).double()
    A = torch.zeros(n).requires_grad_()

    def loss_fn(p, batch, A):
        x, t = batch
        losses = F.binary_cross_entropy_with_logits(x @ p["w"] + p["b"], t, reduction="none")
        return (torch.sigmoid(A) * losses).mean() + 1e-2 * (p["w"] ** 2).sum()

    def val(p):
        return F.binary_cross_entropy_with_logits(Xv @ p["w"] + p["b"], yv)

    params = {"w": torch.zeros(d, requires_grad=True), "b": torch.zeros((), requires_grad=True)}
    return loss_fn, params, [(X, y)], A, val


def hypergrad(case, opt, method, steps, **kw):
    loss_fn, params, data, h, val = case
    w = ng.train(loss_fn, params, opt, data, steps=steps, hparams=h, method=method, **kw)
    (g,) = torch.autograd.grad(val(w), h)
    return g


# --------------------------------------------------------------------------- the formula, by hand
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.05),
        dict(lr=0.05, weight_decay=0.1),
        dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.05, maximize=True),
    ],
    ids=["adam", "adam-coupled-wd", "adamw", "maximize"],
)
def test_equals_the_formula_over_a_torch_optim_adam_loop(kw):
    """D from torch.optim.Adam's final moments and last gradient, u = D v, and the mixed term in closed form.

    The ridge's hparam gradient 0.1 exp(lam) w**2 is quadratic in w, so the central difference is exact:
    SAMA must equal 0.2 exp(lam) * theta_T * u to rounding. (maximize=True trains away from the minimum,
    which is fine for a formula test: T is small.)
    """
    loss_fn, params, data, lam, val = case = ridge(1)
    T = 30
    got = hypergrad(case, ng.optim.Adam(**kw), ng.SAMA(eps=0.01, warm_steps=T), T)

    torch_kw = {k: v for k, v in kw.items() if k != "decoupled_weight_decay"}
    cls = torch.optim.AdamW if kw.get("decoupled_weight_decay") else torch.optim.Adam
    w = params["w"].detach().clone().requires_grad_()
    opt = cls([w], **torch_kw)
    for _ in range(T):
        prev = w.detach().clone()
        opt.zero_grad()
        loss_fn({"w": w}, data[0], lam.detach()).backward()
        g = w.grad.detach().clone()
        opt.step()
    state = opt.state[w]
    m, v2 = state["exp_avg"], state["exp_avg_sq"]
    b1, b2 = 0.9, 0.999
    lr, wd = kw["lr"], kw.get("weight_decay", 0.0)
    sign = -1.0
    gh = g.clone()
    if kw.get("maximize"):
        gh, sign = -gh, 1.0
    if wd and not kw.get("decoupled_weight_decay"):
        gh = gh + wd * prev
    bc2 = 1 - b2**T
    r = (v2 / bc2).sqrt()
    d = r + 1e-8
    D = sign * lr / (1 - b1**T) * ((1 - b1) / d - (1 - b2) * m * gh / (bc2 * r * d**2))

    theta = w.detach().requires_grad_()
    (v,) = torch.autograd.grad(val({"w": theta}), theta)
    want = 0.2 * lam.detach().exp() * theta.detach() * (D * v)
    assert want.abs().max() > 1e-6
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-14)


# ------------------------------------------------------------- agreement with the exact hypergradient
@pytest.mark.parametrize(
    ("make", "threshold"),
    [(ridge, 0.85), (logistic, 0.68)],  # measured: 0.8588 and 0.6904 (Adam), 0.8585 and 0.6905 (AdamW)
    ids=["ridge", "logistic"],
)
@pytest.mark.parametrize("adamw", [False, True], ids=["adam", "adamw"])
def test_cosine_similarity_with_unroll_after_long_training(make, threshold, adamw):
    T = 300
    opt = ng.optim.AdamW(lr=0.05, weight_decay=0.01) if adamw else ng.optim.Adam(lr=0.05)
    exact = hypergrad(make(), opt, ng.Unroll(), T)
    approx = hypergrad(make(), opt, ng.SAMA(), T)
    cos = F.cosine_similarity(approx, exact, dim=0).item()
    assert cos >= threshold, cos
    assert cos < 0.999  # it is an approximation: not the exact hypergradient
    # The forward pass is ordinary training: the trained weights are those of any other method.
    loss_fn, params, data, h, _ = make()
    a = ng.train(loss_fn, params, opt, data, steps=T, hparams=h, method=ng.SAMA())
    b = ng.train(loss_fn, params, opt, data, steps=T, hparams=h)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-13, atol=1e-15)


def test_averaging_over_the_last_batches_is_the_mean_of_the_mixed_terms():
    """last=2 over two alternating batches: the mean of the closed-form mixed term of each batch.

    The loss weights each example by exp(lam[i]) for the examples of its batch, so each batch's term differs.
    """
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(20, 3, generator=g), torch.randn(20, generator=g)
    lam = torch.zeros(20, requires_grad=True)
    data = [(X[:10], y[:10], torch.arange(10)), (X[10:], y[10:], torch.arange(10, 20))]

    def loss_fn(p, batch, lam):
        x, t, idx = batch
        return (lam[idx].exp() * (x @ p["w"] - t) ** 2).mean()

    w0 = {"w": torch.zeros(3, requires_grad=True)}
    T = 40
    w = ng.train(loss_fn, w0, ng.optim.Adam(lr=0.05), data, steps=T, hparams=lam, method=ng.SAMA(last=2, warm_steps=0))
    (got,) = torch.autograd.grad(w["w"].sum(), lam)
    one = ng.train(loss_fn, w0, ng.optim.Adam(lr=0.05), data, steps=T, hparams=lam, method=ng.SAMA(warm_steps=0))
    (last_only,) = torch.autograd.grad(one["w"].sum(), lam)
    assert last_only[:10].abs().max() == 0 and last_only[10:].abs().max() > 1e-6  # step T-1 reads batch 1
    # u = D v is the same in both runs (D comes from the last update); each batch's term is averaged.
    torch.testing.assert_close(got[10:], last_only[10:] / 2, rtol=1e-9, atol=1e-14)
    assert got[:10].abs().max() > 1e-6  # the other batch now contributes, half-weighted


# ------------------------------------------------------------------------------------- memory
class _Live(TorchDispatchMode):
    """The bytes of every tensor made inside the block that is still alive afterwards (no allocator needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(x) for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        return out

    def bytes(self) -> int:
        gc.collect()
        storages = {}
        for r in self.refs:
            x = r()
            if x is not None:
                storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return sum(storages.values())


def _live_bytes(method, steps):
    d = 50
    X, y, lam = torch.randn(20, d), torch.randn(20), torch.zeros(d, requires_grad=True)

    def loss_fn(p, batch, lam):
        return ((X @ p["w"] - y) ** 2).mean() + (lam.exp() * p["w"] ** 2).sum()

    live = _Live()
    with live:
        w = ng.train(loss_fn, {"w": torch.zeros(d, requires_grad=True)}, ng.optim.Adam(lr=0.01), [None],
                     steps=steps, hparams=lam, method=method)  # fmt: skip
    held = live.bytes()
    del w
    return held, d * 8


def test_memory_does_not_grow_with_the_steps():
    """What a run holds for its backward pass: the trained weights and D, at T = 10 and T = 100 alike."""
    held10, weights = _live_bytes(ng.SAMA(warm_steps=0), 10)
    held100, _ = _live_bytes(ng.SAMA(warm_steps=0), 100)
    assert held100 <= held10
    assert held100 <= 2 * weights + 64  # theta_T (returned) and D: no trajectory, no graph
    u10, _ = _live_bytes(ng.Unroll(), 10)
    u40, _ = _live_bytes(ng.Unroll(), 40)
    assert u40 > 3 * u10 > 3 * held100  # the measure does see a graph that grows


# ------------------------------------------------------------------------------------- misuse
@pytest.mark.parametrize(
    ("opt", "match"),
    [
        (lambda: ng.optim.SGD(lr=0.1), "With SGD that derivative is the constant -lr"),
        (lambda: ng.optim.SGD(lr=0.1, momentum=0.9), "nestgrad.optim.SGD"),
        (lambda: ng.optim.RMSprop(lr=0.01), "nestgrad.optim.RMSprop"),
    ],
    ids=["sgd", "sgd-momentum", "rmsprop"],
)
def test_another_optimizer_raises_with_the_reason(opt, match):
    with pytest.raises(ValueError, match=match) as err:
        hypergrad(ridge(), opt(), ng.SAMA(), 200)
    assert "Adam or AdamW only" in str(err.value) and "APPROXIMATE" in str(err.value)


def test_cold_start_raises_and_a_warm_state_passes():
    case = ridge()
    with pytest.raises(ValueError, match=r"taken 20 step\(s\).*fewer than warm_steps=100"):
        hypergrad(case, ng.optim.Adam(lr=0.05), ng.SAMA(), 20)
    loss_fn, params, data, lam, val = case
    opt = ng.optim.Adam(lr=0.05)
    with torch.no_grad():
        w, state = ng.train(loss_fn, params, opt, data, steps=90, hparams=lam, return_state=True)
    w = {k: v.requires_grad_() for k, v in w.items()}
    trained = ng.train(loss_fn, w, opt, data, steps=10, hparams=lam, state=state, method=ng.SAMA())  # 90 + 10
    (g,) = torch.autograd.grad(val(trained), lam)
    assert g.abs().max() > 0
    with pytest.raises(ValueError, match=r"\(90 in the given state= plus steps=5\)"):
        ng.train(loss_fn, w, opt, data, steps=5, hparams=lam, state=state, method=ng.SAMA())
    hypergrad(case, ng.optim.Adam(lr=0.05), ng.SAMA(warm_steps=20), 20)  # the user's own judgement


def test_optimizer_hparams_that_require_grad_raise():
    lr = torch.tensor(0.05, requires_grad=True)
    with pytest.raises(ValueError, match=r"hyperparameter\(s\) lr require grad"):
        hypergrad(ridge(), ng.optim.Adam(lr=lr), ng.SAMA(), 200)


@pytest.mark.parametrize("kw", [dict(eps=0.0), dict(eps=-1e-3), dict(eps=float("nan")), dict(last=0),
                                dict(warm_steps=-1), dict(eps=True)])  # fmt: skip
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError, match=r"nestgrad\.SAMA: "):
        ng.SAMA(**kw)


@pytest.mark.parametrize("what", ["hparams", "trained"])
def test_a_tensor_changed_before_backward_raises(what):
    loss_fn, params, data, lam, val = ridge()
    w = ng.train(loss_fn, params, ng.optim.Adam(lr=0.05), data, steps=100, hparams=lam, method=ng.SAMA())
    out = val(w)
    with torch.no_grad():
        (lam if what == "hparams" else w["w"]).add_(0.1)
    with pytest.raises(RuntimeError, match=r"SAMA.*modified in place after nestgrad.train returned"):
        torch.autograd.grad(out if what == "hparams" else w["w"].sum(), lam)


def test_a_non_finite_last_step_raises_at_that_step():
    loss_fn, params, data, lam, _ = ridge()
    (X, y) = data[0]
    bad = (X, y.clone().fill_(float("nan")))
    with pytest.raises(ng.NonFiniteError, match=r"\(SAMA\): at step 99 of 100, the training loss is nan"):
        ng.train(loss_fn, params, ng.optim.Adam(lr=0.05), lambda t: bad if t == 99 else data[0], steps=100,
                 hparams=lam, method=ng.SAMA())  # fmt: skip


def test_initial_params_are_not_differentiated():
    loss_fn, params, data, lam, val = ridge()
    w = ng.train(loss_fn, params, ng.optim.Adam(lr=0.05), data, steps=100, hparams=lam, method=ng.SAMA())
    with pytest.raises(RuntimeError):
        torch.autograd.grad(val(w), params["w"])
    # A start that carries a graph (the output of an earlier computation) would lose that path: train raises.
    base = torch.ones(8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"\(SAMA\): params\['w'\] carries a graph"):
        ng.train(loss_fn, {"w": 0.1 * base}, ng.optim.Adam(lr=0.05), data, steps=100, hparams=lam, method=ng.SAMA())


def test_tasks_equal_a_loop_over_the_tasks():
    """Two ridge tasks with their own weights and penalties: each task's hypergradient is its own run's.

    The central difference is exact for the ridge (quadratic hparam gradient), so the joint step size
    (eps over the norm of all tasks' u) does not matter here.
    """
    cases = [ridge(s) for s in (0, 1)]
    loss_fn = cases[0][0]
    X = torch.stack([c[2][0][0] for c in cases])
    y = torch.stack([c[2][0][1] for c in cases])
    lam = torch.stack([c[3].detach() for c in cases]).requires_grad_()
    w0 = {"w": torch.zeros(2, 8, requires_grad=True)}
    spec = ng.Tasks(2, params=0, hparams=0)
    w = ng.train(loss_fn, w0, ng.optim.Adam(lr=0.05), [(X, y)], steps=150, hparams=lam, tasks=spec, method=ng.SAMA())
    (got,) = torch.autograd.grad((w["w"] ** 2).sum(), lam)
    for i, c in enumerate(cases):
        li = c[3]
        wi = ng.train(c[0], c[1], ng.optim.Adam(lr=0.05), c[2], steps=150, hparams=li, method=ng.SAMA())
        (want,) = torch.autograd.grad((wi["w"] ** 2).sum(), li)
        torch.testing.assert_close(got[i], want, rtol=1e-9, atol=1e-14)
