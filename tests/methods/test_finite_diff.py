"""FiniteDiff (DARTS one-step approximation): O(eps²) agreement with a one-step / truncate=1 Unroll,
the DARTS formula for SGD, exact optimizer-hparam gradients, replay of batches and RNG, and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nestgrad as ng
from nestgrad._data import Batches
from nestgrad.methods._finite_diff import FiniteDiff
from test_train import batches, weighted_loss
from test_train import problem as mlp_problem

pytestmark = pytest.mark.usefixtures("float64")


def problem(seed: int = 0, n: int = 24):
    model, X, y = mlp_problem(seed, n)
    A = torch.randn(n, generator=torch.Generator().manual_seed(seed + 100)).requires_grad_()
    return model, X, y, A


def hypergrad(model, X, y, A, opt, method, steps, data=None):
    params = dict(model.named_parameters())
    data = batches(X, y) if data is None else data
    trained = ng.train(weighted_loss(model), params, opt, data, steps=steps, hparams=A, method=method)
    val = F.cross_entropy(ng.call(model, trained, X), y)
    wrt = [A, *(x for x in opt.tensors() if x.requires_grad)]
    return torch.autograd.grad(val, wrt)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


OPTIMIZERS = {
    "sgd": lambda: ng.optim.SGD(lr=0.5),
    "sgd-momentum-nesterov-wd": lambda: ng.optim.SGD(lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda: ng.optim.Adam(lr=0.05),
    "rmsprop": lambda: ng.optim.RMSprop(lr=0.01, momentum=0.5),
}


def test_one_step_equals_unroll_up_to_eps_squared():
    model, X, y, A = problem()
    opt = ng.optim.SGD(lr=0.5)
    (exact,) = hypergrad(model, X, y, A, opt, ng.Unroll(), steps=1)
    assert exact.norm() > 1e-3
    errs = [rel_err(hypergrad(model, X, y, A, opt, FiniteDiff(eps), steps=1)[0], exact) for eps in (0.1, 0.05)]
    assert errs[0] < 1e-2
    assert 3.6 < errs[0] / errs[1] < 4.4  # halving eps divides the error by 4: the error is O(eps²)
    (fine,) = hypergrad(model, X, y, A, opt, FiniteDiff(1e-5), steps=1)
    assert rel_err(fine, exact) < 1e-8


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_many_steps_equal_unroll_truncate_1_up_to_eps_squared(name):
    model, X, y, A = problem(1)
    opt = OPTIMIZERS[name]()
    (ref,) = hypergrad(model, X, y, A, opt, ng.Unroll(truncate=1), steps=5)
    (full,) = hypergrad(model, X, y, A, opt, ng.Unroll(), steps=5)
    assert rel_err(ref, full) > 1e-2  # the one-step approximation really differs from the exact gradient
    errs = [rel_err(hypergrad(model, X, y, A, opt, FiniteDiff(eps), steps=5)[0], ref) for eps in (0.1, 0.05)]
    assert 3.5 < errs[0] / errs[1] < 4.5, errs


def test_sgd_is_the_darts_formula():
    """-lr * (grad_A L(w + eps v/|v|) - grad_A L(w - eps v/|v|)) / (2 eps/|v|), written out by hand."""
    model, X, y, A = problem(2)
    data = batches(X, y)
    lr, eps, steps = 0.3, 0.02, 4
    (ours,) = hypergrad(model, X, y, A, ng.optim.SGD(lr=lr), FiniteDiff(eps), steps=steps)
    params = dict(model.named_parameters())
    with torch.no_grad():
        w = ng.train(weighted_loss(model), params, ng.optim.SGD(lr=lr), data, steps=steps - 1, hparams=A)
    w = {k: v.detach().requires_grad_() for k, v in w.items()}
    last = data[(steps - 1) % len(data)]
    loss = weighted_loss(model)
    gw = torch.autograd.grad(loss(w, last, A.detach()), list(w.values()))
    trained = {k: v - lr * g for (k, v), g in zip(w.items(), gw)}
    v = torch.autograd.grad(F.cross_entropy(ng.call(model, trained, X), y), list(trained.values()))
    step = eps / torch.sqrt(sum((x**2).sum() for x in v))
    grad_A = [
        torch.autograd.grad(loss({k: p + s * step * d for (k, p), d in zip(w.items(), v)}, last, A), A)[0]
        for s in (1, -1)
    ]
    darts = -lr * (grad_A[0] - grad_A[1]) / (2 * step)
    assert torch.allclose(ours, darts, rtol=1e-10, atol=1e-15)


def test_optimizer_tensor_hparams_get_the_exact_last_step_gradient():
    model, X, y, A = problem(3)
    lr = torch.tensor(0.4, requires_grad=True)
    momentum = torch.tensor(0.5, requires_grad=True)
    opt = ng.optim.SGD(lr=lr, momentum=momentum)
    ours = hypergrad(model, X, y, A, opt, FiniteDiff(0.01), steps=3)
    ref = hypergrad(model, X, y, A, opt, ng.Unroll(truncate=1), steps=3)
    assert rel_err(ours[0], ref[0]) < 1e-3
    for a, b in zip(ours[1:], ref[1:]):  # d W_T / d lr and d W_T / d momentum need no finite difference
        assert abs(b) > 1e-4
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-15)
    # Plain SGD: v^T dW_T/dlr = -v^T grad_w L(w), the lr gradient of Unroll(truncate=1).
    only_lr = ng.optim.SGD(lr=lr)
    ours = hypergrad(model, X, y, A, only_lr, FiniteDiff(0.01), steps=3)
    ref = hypergrad(model, X, y, A, only_lr, ng.Unroll(truncate=1), steps=3)
    assert torch.allclose(ours[1], ref[1], rtol=1e-10)


def test_zero_outer_gradient_gives_zero_hypergradients_not_nan():
    model, X, y, A = problem(4)
    lr = torch.tensor(0.4, requires_grad=True)
    params = dict(model.named_parameters())
    trained = ng.train(
        weighted_loss(model), params, ng.optim.SGD(lr=lr), batches(X, y), steps=3, hparams=A, method=FiniteDiff()
    )
    outer = sum((0.0 * v).sum() for v in trained.values())
    gA, glr = torch.autograd.grad(outer, [A, lr])
    assert torch.equal(gA, torch.zeros_like(A)) and torch.equal(glr, torch.zeros_like(lr))


def test_iterator_batches_and_loss_randomness_are_replayed():
    """The perturbed evaluations must see the last step's batch and its dropout masks."""
    model, X, y, A = problem(5)
    data = batches(X, y)

    def noisy(params, batch, a):
        x, yy, idx = batch
        x = F.dropout(x, p=0.3, training=True)
        return (torch.sigmoid(a[idx]) * F.cross_entropy(ng.call(model, params, x), yy, reduction="none")).mean()

    def grad(method, eps_data):
        torch.manual_seed(11)
        params = dict(model.named_parameters())
        trained = ng.train(noisy, params, ng.optim.Adam(lr=0.05), eps_data, steps=5, hparams=A, method=method)
        after = torch.get_rng_state()
        (g,) = torch.autograd.grad(F.cross_entropy(ng.call(model, trained, X), y), A)
        assert torch.equal(torch.get_rng_state(), after)  # the backward pass leaves the global RNG alone
        return g

    ref = grad(ng.Unroll(truncate=1), data)
    errs = [rel_err(grad(FiniteDiff(eps), iter(data * 2)), ref) for eps in (0.1, 0.05)]
    assert errs[1] < 1e-2
    assert 3.5 < errs[0] / errs[1] < 4.5, errs


def test_only_the_last_batch_of_an_iterator_is_kept():
    b = FiniteDiff().batches(iter(range(10)), steps=5)
    assert isinstance(b, Batches)
    assert [b(t) for t in range(5)] == [0, 1, 2, 3, 4]
    assert b.seen == {4: 4}
    assert b(4) == 4


def test_forward_is_ordinary_training_and_initial_params_are_not_differentiated():
    model, X, y, A = problem(6)
    params = dict(model.named_parameters())
    opt = ng.optim.Adam(lr=0.05)
    fd = ng.train(weighted_loss(model), params, opt, batches(X, y), steps=4, hparams=A, method=FiniteDiff())
    ref = ng.train(weighted_loss(model), params, opt, batches(X, y), steps=4, hparams=A)
    for k in fd:
        assert torch.allclose(fd[k], ref[k], rtol=1e-13, atol=1e-15)
    with torch.no_grad():
        plain = ng.train(weighted_loss(model), params, opt, batches(X, y), steps=4, hparams=A, method=FiniteDiff())
    assert all(torch.allclose(plain[k], ref[k], rtol=1e-13, atol=1e-15) for k in plain)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(F.cross_entropy(ng.call(model, fd, X), y), params["0.weight"])


def test_nested_hparams_give_none_where_no_grad_is_required():
    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(16, 3, generator=g), torch.randn(16, generator=g)
    hp = {"scale": torch.tensor(0.5, requires_grad=True), "shift": (torch.zeros(3), torch.ones(3, requires_grad=True))}

    def loss_fn(p, batch, h):
        return ((X @ p["w"] - y) ** 2).mean() + h["scale"] * ((p["w"] - h["shift"][0] - h["shift"][1]) ** 2).sum()

    def run(method):
        w = ng.train(loss_fn, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=0.1), [None], steps=3,
                     hparams=hp, method=method)  # fmt: skip
        return torch.autograd.grad(((X @ w["w"] - y) ** 2).mean(), [hp["scale"], hp["shift"][1]])

    for a, b in zip(run(FiniteDiff(1e-4)), run(ng.Unroll(truncate=1))):
        assert torch.allclose(a, b, rtol=1e-7)


@pytest.mark.parametrize("eps", [0, -0.1, math.inf, math.nan, "0.01", True])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        FiniteDiff(eps)
