"""``ng.train(..., tasks=...)``: a batch of tasks in one vectorised run equals a Python loop over the tasks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

import nestgrad as ng

N = 4  # tasks
K = 5  # support points per task
STEPS = 3


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def sinusoids(n: int = N, k: int = K, seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(n, generator=g, dtype=torch.float64) * 4.9 + 0.1
    phase = torch.rand(n, generator=g, dtype=torch.float64) * torch.pi
    xs = torch.rand(n, k, 1, generator=g, dtype=torch.float64) * 10 - 5
    xq = torch.rand(n, 2 * k, 1, generator=g, dtype=torch.float64) * 10 - 5
    ys = amp[:, None, None] * torch.sin(xs + phase[:, None, None])
    yq = amp[:, None, None] * torch.sin(xq + phase[:, None, None])
    return xs, ys, xq, yq


MODEL = mlp()


def loss_fn(p: dict[str, Tensor], batch: tuple[Tensor, Tensor], h: object) -> Tensor:
    x, y = batch
    return F.mse_loss(ng.call(MODEL, p, x), y)


def weighted_loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor], w: Tensor) -> Tensor:
    x, y = batch
    return (w * (ng.call(MODEL, p, x) - y).squeeze(-1) ** 2).mean()


def query(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(ng.call(MODEL, p, x), y)


def init() -> dict[str, Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in MODEL.named_parameters()}


def close(a: Tensor, b: Tensor, tol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------- MAML, every method
METHODS = {
    "Unroll": ng.Unroll,
    "Reverse": ng.Reverse,
    "Reverse(checkpoint_every=2)": lambda: ng.Reverse(checkpoint_every=2),
}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("opt", ["SGD", "Adam"])
def test_maml_meta_gradient_equals_a_loop_over_tasks(name: str, opt: str):
    xs, ys, xq, yq = sinusoids()
    optimizer = ng.optim.SGD(lr=0.05, momentum=0.9) if opt == "SGD" else ng.optim.Adam(lr=0.05)

    w0 = init()
    fast = ng.train(loss_fn, w0, optimizer, [(xs, ys)], steps=STEPS, tasks=N, method=METHODS[name]())
    assert all(v.shape == (N, *w0[k].shape) for k, v in fast.items())
    meta = vmap(query)(fast, xq, yq).sum()
    got = torch.autograd.grad(meta, list(w0.values()))

    ref_init = init()
    total, per_task = 0.0, []
    for i in range(N):
        w = ng.train(loss_fn, ref_init, optimizer, [(xs[i], ys[i])], steps=STEPS)
        per_task.append(w)
        total = total + query(w, xq[i], yq[i])
    want = torch.autograd.grad(total, list(ref_init.values()))

    for k in fast:
        close(fast[k].detach(), torch.stack([w[k] for w in per_task]).detach())
    for a, b in zip(got, want, strict=True):
        close(a, b)
    assert max(g.abs().max() for g in got) > 1e-3


def test_hand_written_vmap_maml_agrees():
    """An independent reference: torch.func.grad inside vmap, written out by hand (no nestgrad in the inner loop)."""
    xs, ys, xq, yq = sinusoids()
    w0 = init()
    fast = ng.train(loss_fn, w0, ng.optim.SGD(lr=0.05), [(xs, ys)], steps=STEPS, tasks=N)
    got = torch.autograd.grad(vmap(query)(fast, xq, yq).sum(), list(w0.values()))

    ref = init()

    def task(p: dict[str, Tensor], x: Tensor, y: Tensor, x_q: Tensor, y_q: Tensor) -> Tensor:
        for _ in range(STEPS):
            g = torch.func.grad(lambda q: F.mse_loss(torch.func.functional_call(MODEL, q, (x,)), y))(p)
            p = {k: p[k] - 0.05 * g[k] for k in p}
        return F.mse_loss(torch.func.functional_call(MODEL, p, (x_q,)), y_q)

    losses = vmap(task, in_dims=(None, 0, 0, 0, 0))(ref, xs, ys, xq, yq)
    want = torch.autograd.grad(losses.sum(), list(ref.values()))
    for a, b in zip(got, want, strict=True):
        close(a, b)


# ------------------------------------------------------- per-task weights and hyperparameters
@pytest.mark.parametrize(
    "method",
    [ng.Unroll(), ng.Reverse(), ng.Forward(), ng.FiniteDiff(eps=1e-4)],
    ids=["Unroll", "Reverse", "Forward", "FiniteDiff"],
)
def test_per_task_weights_and_per_task_hparams_equal_a_loop(method: ng.Method):
    """An ensemble: every task has its own initial weights and its own per-example loss weights."""
    xs, ys, xq, yq = sinusoids()
    torch.manual_seed(3)
    stacked = {
        k: (v.detach() + 0.1 * torch.randn(N, *v.shape, dtype=v.dtype)).requires_grad_()
        for k, v in MODEL.named_parameters()
    }
    A = torch.rand(N, K, dtype=torch.float64, requires_grad=True)
    opt = ng.optim.SGD(lr=0.02)
    spec = ng.Tasks(N, params=0, hparams=0)
    w = ng.train(weighted_loss, stacked, opt, [(xs, ys)], steps=STEPS, hparams=A, tasks=spec, method=method)
    (got,) = torch.autograd.grad(vmap(query)(w, xq, yq).sum(), A)

    A_ref = A.detach().clone().requires_grad_()
    total = 0.0
    for i in range(N):
        start = {k: v[i].detach().requires_grad_() for k, v in stacked.items()}
        wi = ng.train(weighted_loss, start, opt, [(xs[i], ys[i])], steps=STEPS, hparams=A_ref[i], method=method)
        close(torch.cat([wi[k].detach().flatten() for k in wi]), torch.cat([w[k][i].detach().flatten() for k in w]))
        total = total + query(wi, xq[i], yq[i])
    (want,) = torch.autograd.grad(total, A_ref)
    tol = 1e-6 if isinstance(method, ng.FiniteDiff) else 1e-11  # FiniteDiff: eps / norm of all tasks or one
    close(got, want, tol)
    assert got.abs().max() > 1e-4


def test_shared_learnable_learning_rate_and_meta_sgd_per_element_rates():
    """Optimizer Tensor hparams are shared by the tasks and broadcast against the stacked weights."""
    xs, ys, xq, yq = sinusoids()
    rates = {k: torch.full_like(v, 0.03, requires_grad=True) for k, v in MODEL.named_parameters()}
    w0 = init()
    fast = ng.train(loss_fn, w0, ng.optim.SGD(lr=rates), [(xs, ys)], steps=STEPS, tasks=N)
    got = torch.autograd.grad(vmap(query)(fast, xq, yq).sum(), [*w0.values(), *rates.values()])

    ref_w0 = init()
    ref_rates = {k: v.detach().clone().requires_grad_() for k, v in rates.items()}
    total = sum(
        query(ng.train(loss_fn, ref_w0, ng.optim.SGD(lr=ref_rates), [(xs[i], ys[i])], steps=STEPS), xq[i], yq[i])
        for i in range(N)
    )
    want = torch.autograd.grad(total, [*ref_w0.values(), *ref_rates.values()])
    for a, b in zip(got, want, strict=True):
        close(a, b)


def test_per_task_learning_rate_broadcasts_over_the_task_dimension():
    xs, ys, _, _ = sinusoids()
    lrs = torch.tensor([0.01, 0.02, 0.03, 0.04], dtype=torch.float64)
    per = {k: lrs.view(N, *([1] * v.ndim)) for k, v in MODEL.named_parameters()}
    with torch.no_grad():
        fast = ng.train(loss_fn, init(), ng.optim.SGD(lr=per), [(xs, ys)], steps=STEPS, tasks=N)
        for i in range(N):
            wi = ng.train(loss_fn, init(), ng.optim.SGD(lr=float(lrs[i])), [(xs[i], ys[i])], steps=STEPS)
            for k in wi:
                close(fast[k][i], wi[k])


def test_implicit_on_per_task_ridge_regression_matches_the_closed_form():
    """Per-task ridge with a shared per-feature penalty: Implicit's CG solves all tasks jointly."""
    g = torch.Generator().manual_seed(0)
    n, m, d = 3, 20, 5
    X = torch.randn(n, m, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, m, generator=g, dtype=torch.float64)
    Xv = torch.randn(n, m, d, generator=g, dtype=torch.float64)
    yv = torch.randn(n, m, generator=g, dtype=torch.float64)
    lam = torch.full((d,), 0.5, dtype=torch.float64, requires_grad=True)

    def ridge(p: dict[str, Tensor], batch: tuple[Tensor, Tensor], lam: Tensor) -> Tensor:
        x, t = batch
        return 0.5 * ((x @ p["w"] - t) ** 2).mean() + 0.5 * (lam * p["w"] ** 2).sum()

    w0 = {"w": torch.zeros(n, d, dtype=torch.float64, requires_grad=True)}
    method = ng.Implicit(ng.CG(max_steps=200, tol=1e-14))
    w = ng.train(
        ridge, w0, ng.optim.SGD(lr=0.5), [(X, y)], steps=400, hparams=lam, tasks=ng.Tasks(n, params=0), method=method
    )
    val = 0.5 * ((torch.einsum("nmd,nd->nm", Xv, w["w"]) - yv) ** 2).mean(1).sum()
    (got,) = torch.autograd.grad(val, lam)

    lam_ref = lam.detach().clone().requires_grad_()
    total = 0.0
    for i in range(n):
        H = X[i].T @ X[i] / m + torch.diag(lam_ref)
        wi = torch.linalg.solve(H, X[i].T @ y[i] / m)
        close(w["w"][i].detach(), wi.detach(), 1e-9)
        total = total + 0.5 * ((Xv[i] @ wi - yv[i]) ** 2).mean()
    (want,) = torch.autograd.grad(total, lam_ref)
    close(got, want, 1e-8)


def test_state_in_and_out_and_two_segments_equal_one_run():
    xs, ys, xq, yq = sinusoids()
    opt = ng.optim.Adam(lr=0.05)
    w0 = init()
    whole = ng.train(loss_fn, w0, opt, [(xs, ys)], steps=4, tasks=N)
    (g_whole,) = torch.autograd.grad(vmap(query)(whole, xq, yq).sum(), [w0["0.weight"]])

    w1 = init()
    mid, state = ng.train(loss_fn, w1, opt, [(xs, ys)], steps=2, tasks=N, return_state=True)
    spec = ng.Tasks(N, params=0)
    end = ng.train(loss_fn, mid, opt, [(xs, ys)], steps=2, tasks=spec, state=state)
    (g_two,) = torch.autograd.grad(vmap(query)(end, xq, yq).sum(), [w1["0.weight"]])
    for k in whole:
        close(whole[k].detach(), end[k].detach())
    close(g_whole, g_two)


def test_levels_compose_a_vectorised_level_feeds_the_next():
    """Level 1 trains N per-task feature scalings; level 2 trains each task's head on top, vectorised too."""
    xs, ys, xq, yq = sinusoids()
    s0 = torch.ones(N, 1, dtype=torch.float64, requires_grad=True)

    def scale_loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor], h: object) -> Tensor:
        x, y = batch
        return ((p["s"] * x).sin() - y / 5).pow(2).mean()

    def head_loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor], s: Tensor) -> Tensor:
        x, y = batch
        return F.mse_loss(ng.call(MODEL, p, s * x), y)

    def run(vectorised: bool) -> Tensor:
        s_start = s0.detach().clone().requires_grad_()
        w0 = init()
        if vectorised:
            s = ng.train(
                scale_loss, {"s": s_start}, ng.optim.SGD(lr=0.1), [(xs, ys)], steps=2, tasks=ng.Tasks(N, params=0)
            )
            spec = ng.Tasks(N, hparams=0)
            w = ng.train(head_loss, w0, ng.optim.SGD(lr=0.02), [(xs, ys)], steps=2, hparams=s["s"], tasks=spec)
            total = vmap(lambda p, x, y, sc: query(p, sc * x, y))(w, xq, yq, s["s"]).sum()
        else:
            total = 0.0
            for i in range(N):
                si = ng.train(scale_loss, {"s": s_start[i]}, ng.optim.SGD(lr=0.1), [(xs[i], ys[i])], steps=2)
                wi = ng.train(head_loss, w0, ng.optim.SGD(lr=0.02), [(xs[i], ys[i])], steps=2, hparams=si["s"])
                total = total + query(wi, si["s"] * xq[i], yq[i])
        return torch.cat([g.flatten() for g in torch.autograd.grad(total, [s_start, *w0.values()])])

    close(run(True), run(False))


def test_norm_layers_without_running_stats_work_per_task():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(1, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.ReLU(), nn.Linear(6, 1)
    ).double()
    xs, ys, _, _ = sinusoids()

    def bn_loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor], h: object) -> Tensor:
        x, y = batch
        return F.mse_loss(ng.call(net, p, x), y)

    w0 = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    fast = ng.train(bn_loss, w0, ng.optim.SGD(lr=0.05), [(xs, ys)], steps=2, tasks=N)
    for i in range(N):
        wi = ng.train(bn_loss, w0, ng.optim.SGD(lr=0.05), [(xs[i], ys[i])], steps=2)
        for k in wi:
            close(fast[k][i].detach(), wi[k].detach())


# ------------------------------------------------------------------------------------- misuse
def test_running_statistics_raise_clearly():
    net = nn.Sequential(nn.Linear(1, 6), nn.BatchNorm1d(6), nn.Linear(6, 1)).double()
    xs, ys, _, _ = sinusoids()

    def bn_loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor], h: object) -> Tensor:
        return F.mse_loss(ng.call(net, p, batch[0]), batch[1])

    w0 = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    with pytest.raises(RuntimeError, match="track_running_stats=False"):
        ng.train(bn_loss, w0, ng.optim.SGD(lr=0.05), [(xs, ys)], steps=1, tasks=N)
    assert torch.equal(net[1].running_mean, torch.zeros(6, dtype=torch.float64))


def test_dropout_needs_a_randomness_choice():
    net = nn.Sequential(nn.Linear(1, 6), nn.Dropout(0.5), nn.Linear(6, 1)).double()
    xs, ys, _, _ = sinusoids()

    def drop_loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor], h: object) -> Tensor:
        return F.mse_loss(ng.call(net, p, batch[0]), batch[1])

    w0 = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    with pytest.raises(RuntimeError, match="randomness='different'"):
        ng.train(drop_loss, w0, ng.optim.SGD(lr=0.05), [(xs, ys)], steps=1, tasks=N)
    out = ng.train(drop_loss, w0, ng.optim.SGD(lr=0.05), [(xs, ys)], steps=2, tasks=ng.Tasks(N, randomness="different"))
    assert out["0.weight"].shape == (N, 6, 1)
    assert not torch.equal(out["0.weight"][0], out["0.weight"][1])


def test_bad_shapes_and_arguments_raise_clearly():
    xs, ys, _, _ = sinusoids()
    w0 = init()
    opt = ng.optim.SGD(lr=0.1)
    with pytest.raises(
        ValueError, match=r"a Tensor in data \(leaf 0\) has shape \(3, 5, 1\).*leading task dimension of size 4"
    ):
        ng.train(loss_fn, w0, opt, [(xs[:3], ys[:3])], steps=1, tasks=N)
    with pytest.raises(ValueError, match=r"params\['0.weight'\] has shape \(8, 1\)"):
        ng.train(loss_fn, w0, opt, [(xs, ys)], steps=1, tasks=ng.Tasks(N, params=0))
    with pytest.raises(ValueError, match=r"one scalar per task.*shape \(5, 1\)"):
        ng.train(lambda p, b, h: (ng.call(MODEL, p, b[0]) - b[1]) ** 2, w0, opt, [(xs, ys)], steps=1, tasks=N)
    A = torch.ones(3, K, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="hparams"):
        ng.train(weighted_loss, w0, opt, [(xs, ys)], steps=1, hparams=A, tasks=ng.Tasks(N, hparams=0))
    with pytest.raises(TypeError, match="tasks must be the number of tasks"):
        ng.train(loss_fn, w0, opt, [(xs, ys)], steps=1, tasks="4")
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        ng.Tasks(0)
    with pytest.raises(ValueError, match="randomness must be one of"):
        ng.Tasks(2, randomness="per-task")
    with pytest.raises(KeyError, match="params names \\['nope'\\]"):
        ng.train(loss_fn, w0, opt, [(xs, ys)], steps=1, tasks=ng.Tasks(N, params={"nope": 0}))


def test_user_tensors_are_untouched_and_shared_init_gets_the_summed_gradient():
    xs, ys, xq, yq = sinusoids()
    w0 = init()
    before = {k: v.detach().clone() for k, v in w0.items()}
    fast = ng.train(loss_fn, w0, ng.optim.SGD(lr=0.05), [(xs, ys)], steps=1, tasks=N)
    for k in w0:
        assert torch.equal(w0[k].detach(), before[k])
    # With zero steps of effect (lr=0), the meta-gradient is the sum of the tasks' gradients at the init.
    zero = ng.train(loss_fn, w0, ng.optim.SGD(lr=0.0), [(xs, ys)], steps=1, tasks=N)
    got = torch.autograd.grad(vmap(query)(zero, xq, yq).sum(), list(w0.values()))
    want = torch.autograd.grad(sum(query(w0, xq[i], yq[i]) for i in range(N)), list(w0.values()))
    for a, b in zip(got, want, strict=True):
        close(a, b)
    assert fast["0.weight"].shape == (N, 8, 1)


def test_plain_training_under_no_grad_equals_a_loop():
    xs, ys, _, _ = sinusoids()
    w0 = init()
    with torch.no_grad():
        fast = ng.train(loss_fn, w0, ng.optim.Adam(lr=0.1), [(xs, ys)], steps=STEPS, tasks=N)
        assert not any(v.requires_grad for v in fast.values())
        for i in range(N):
            wi = ng.train(loss_fn, w0, ng.optim.Adam(lr=0.1), [(xs[i], ys[i])], steps=STEPS)
            for k in wi:
                close(fast[k][i], wi[k])


def test_a_diverging_task_is_named():
    xs, ys, _, _ = sinusoids()
    xs = xs.clone()
    xs[2, 0, 0] = float("nan")
    with pytest.raises(ng.NonFiniteError, match=r"the loss is not finite for task 2 of 4"):
        ng.train(loss_fn, init(), ng.optim.SGD(lr=0.05), [(xs, ys)], steps=2, tasks=N)
