"""Reverse: exact reverse mode by recomputation, against Unroll in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nestgrad as ng
from nestgrad._data import Batches
from nestgrad._problem import Problem
from test_train import batches, problem, val_loss, weighted_loss

pytestmark = pytest.mark.usefixtures("float64")


def hypergrads(method, make_opt, model=None, data=None, eval_model=None, seed=0, steps=9):
    base, X, y = problem(seed)
    model = model or base
    data = data if data is not None else batches(X, y)
    A = torch.zeros(len(X), requires_grad=True)
    lr = torch.tensor(0.3, requires_grad=True)
    params = dict(model.named_parameters())
    torch.manual_seed(123)
    out = ng.train(weighted_loss(model), params, make_opt(lr), data, steps=steps, hparams=A, method=method)
    loss = val_loss(eval_model or model, out, X, y)
    return torch.autograd.grad(loss, [A, lr, *params.values()])


OPTIMIZERS = {
    "sgd-momentum": lambda lr: ng.optim.SGD(lr=lr, momentum=0.9, weight_decay=0.01),
    "adam": lambda lr: ng.optim.Adam(lr=lr * 0.1, amsgrad=True),
    "nadam": lambda lr: ng.optim.NAdam(lr=lr * 0.1),
}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("every", [None, 1, 3, 4, 9, 20])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_reverse_equals_unroll(opt, every):
    ref = hypergrads(ng.Unroll(), OPTIMIZERS[opt])
    ours = hypergrads(ng.Reverse(checkpoint_every=every), OPTIMIZERS[opt])
    assert all(r.abs().max() > 0 for r in ref)
    for a, b in zip(ours, ref):
        assert rel(a, b) <= 1e-10


def with_dropout(model: nn.Sequential, layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(model[0], layer, *model[1:])


def test_dropout_replays_exactly():
    base, _, _ = problem(0)
    train_model = with_dropout(base, nn.Dropout(0.3))
    eval_model = with_dropout(base, nn.Identity())  # same names, no dropout for validation
    make = OPTIMIZERS["adam"]
    ref = hypergrads(ng.Unroll(), make, model=train_model, eval_model=eval_model)
    ours = hypergrads(ng.Reverse(checkpoint_every=4), make, model=train_model, eval_model=eval_model)
    no_dropout = hypergrads(ng.Unroll(), make, model=eval_model)
    assert rel(ref[0], no_dropout[0]) > 1e-3  # dropout really acts
    for a, b in zip(ours, ref):
        assert rel(a, b) <= 1e-10


def test_changing_a_module_mode_before_backward_raises_instead_of_a_wrong_gradient():
    base, X, y = problem(0)
    model = with_dropout(base, nn.Dropout(0.3))
    A = torch.zeros(len(X), requires_grad=True)
    out = ng.train(weighted_loss(model), dict(model.named_parameters()), ng.optim.SGD(lr=0.3), batches(X, y), steps=5,
                   hparams=A, method=ng.Reverse())  # fmt: skip
    model.eval()
    with pytest.raises(RuntimeError, match=r"recomputing step 4.*\.train\(\) and \.eval\(\).*nestgrad.Unroll"):
        torch.autograd.grad(val_loss(model, out, X, y), A)


def test_iterator_batches_are_stored_and_replayed():
    _, X, y = problem(0)
    make = OPTIMIZERS["sgd-momentum"]
    ref = hypergrads(ng.Unroll(), make, data=batches(X, y) * 3, steps=9)
    ours = hypergrads(ng.Reverse(checkpoint_every=2), make, data=iter(batches(X, y) * 3), steps=9)
    for a, b in zip(ours, ref):
        assert rel(a, b) <= 1e-10


def test_memory_stores_one_checkpoint_every_k_steps():
    model, X, y = problem(0)
    A = torch.zeros(len(X))
    params = dict(model.named_parameters())
    for steps, every, expected in [(20, None, 20), (20, 5, 4), (20, 6, 4), (100, 10, 10)]:
        prob = Problem(weighted_loss(model), ng.optim.Adam(lr=0.01), Batches(batches(X, y), steps), steps, A, {})
        _, _, trajectory = ng.Reverse(checkpoint_every=every).forward(prob, params)
        assert len(trajectory.counts) == expected == math.ceil(steps / (every or 1))
        # The start is kept by reference, the later checkpoints in one preallocated buffer per tensor.
        assert all(b.shape[0] == expected - 1 for b in trajectory.buffers)
        assert trajectory.losses.shape[0] == steps
        assert trajectory.rngs.starts.numel() == 0  # no dropout: no RNG state stored (tests/test_replay.py)


def test_the_start_is_held_by_reference_and_a_given_state_is_copied():
    """T steps hold T copies of weights and state (as an unrolled graph does), not T + 1."""
    model, X, y = problem(0)
    A = torch.zeros(len(X))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = ng.optim.Adam(lr=0.01)
    prob = Problem(weighted_loss(model), opt, Batches(batches(X, y), 3), 3, A, {})
    _, _, trajectory = ng.Reverse().forward(prob, params)
    start, state = trajectory.checkpoint(0)
    assert all(start[k].data_ptr() == params[k].data_ptr() for k in params)
    given = opt.init(params)
    prob = Problem(weighted_loss(model), opt, Batches(batches(X, y), 3), 3, A, {}, state=given)
    _, _, trajectory = ng.Reverse().forward(prob, params)
    _, state = trajectory.checkpoint(0)
    for mine, theirs in zip(state.tensors(), given.tensors(), strict=True):
        assert mine.data_ptr() != theirs.data_ptr() and torch.equal(mine, theirs)


def test_levels_compose_with_unroll():
    """Level 1 by Reverse, level 2 by Unroll (and the other way round) equal all-Unroll."""
    g = torch.Generator().manual_seed(5)
    X, X2 = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5])
    A = torch.rand(16, generator=g).requires_grad_()

    def dL_dA(m1, m2):
        w1 = ng.train(lambda p, b, a: (a * (X @ p["w"] - y) ** 2).mean(), {"w": torch.zeros(3, requires_grad=True)},
                      ng.optim.SGD(lr=0.1, momentum=0.5), [None], steps=6, hparams=A, method=m1)  # fmt: skip
        w2 = ng.train(lambda q, b, w: ((torch.tanh(X2 @ q["v"]) - X2 @ w["w"]) ** 2).mean(),
                      {"v": torch.full((3,), 0.1, requires_grad=True)}, ng.optim.Adam(lr=0.05), [None], steps=6,
                      hparams=w1, method=m2)  # fmt: skip
        return torch.autograd.grad(((torch.tanh(X @ w2["v"]) - y) ** 2).mean(), A)[0]

    ref = dL_dA(ng.Unroll(), ng.Unroll())
    for m1, m2 in [(ng.Reverse(), ng.Unroll()), (ng.Unroll(), ng.Reverse(2)), (ng.Reverse(3), ng.Reverse())]:
        assert rel(dL_dA(m1, m2), ref) <= 1e-10


def test_no_grad_is_plain_training():
    model, X, y = problem(0)
    params = dict(model.named_parameters())
    opt = ng.optim.Adam(lr=0.01)
    with torch.no_grad():
        a = ng.train(lambda p, b, _: F.cross_entropy(ng.call(model, p, X), y), params, opt, [None], steps=4,
                     method=ng.Reverse())  # fmt: skip
        b = ng.train(lambda p, b, _: F.cross_entropy(ng.call(model, p, X), y), params, opt, [None], steps=4)
    assert all(torch.equal(a[k], b[k]) and not a[k].requires_grad for k in a)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_checkpoint_every_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="checkpoint_every"):
        ng.Reverse(checkpoint_every=bad)


@pytest.mark.parametrize(
    "make",
    [lambda h: ng.optim.Rprop(lr=h), lambda h: ng.optim.Adagrad(lr=0.1, initial_accumulator_value=h)],
    ids=["rprop-lr", "adagrad-initial-accumulator"],
)
def test_hparams_that_shape_the_initial_state_get_their_gradient(make):
    model, X, y = problem(2)
    params = dict(model.named_parameters())

    def grad(method):
        h = torch.tensor(0.05, requires_grad=True)
        out = ng.train(lambda p, b, _: F.cross_entropy(ng.call(model, p, X), y), params, make(h), [None], steps=5,
                       method=method)  # fmt: skip
        return torch.autograd.grad(val_loss(model, out, X, y), h)[0]

    ref = grad(ng.Unroll())
    assert ref.abs() > 1e-6
    assert rel(grad(ng.Reverse(checkpoint_every=2)), ref) <= 1e-10


def test_second_derivatives_through_an_adjoint_method_raise():
    model, X, y = problem(0)
    A = torch.zeros(len(X), requires_grad=True)
    out = ng.train(weighted_loss(model), dict(model.named_parameters()), ng.optim.SGD(lr=0.3), batches(X, y), steps=3,
                   hparams=A, method=ng.Reverse())  # fmt: skip
    (g,) = torch.autograd.grad(val_loss(model, out, X, y), A, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|not have been used in the graph"):
        torch.autograd.grad(g.sum(), A)


# ------------------------------------------------- a trajectory that cannot fit
def test_a_trajectory_that_cannot_fit_raises_before_the_first_step_with_the_memory_and_checkpoint_every():
    w = torch.zeros(2**20, dtype=torch.float64, requires_grad=True)  # 8 MiB of weights: 8 TiB for 10**6 steps
    A = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    calls = []

    def loss_fn(p, batch, A):
        calls.append(1)
        return A * p["w"].square().sum()

    pattern = (
        r"^nestgrad\.train \(Reverse\): the trajectory cannot fit in memory: with checkpoint_every=1 it stores "
        r"999999 copies .* 8\.0 MiB each, 7\.6 TiB in all, but .*Reverse\(checkpoint_every=1000\).* Forward\(\)"
    )
    with pytest.raises(torch.OutOfMemoryError, match=pattern):
        ng.train(loss_fn, {"w": w}, ng.optim.SGD(lr=0.1), [None], steps=10**6, hparams=A, method=ng.Reverse())
    assert not calls  # raised before step 0, not at an allocation inside it
