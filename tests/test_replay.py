"""Replays see the same run: the same batches, the same random numbers, or a ReplayError that says which differs."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nestgrad as ng
from nestgrad._data import Batches, ReplayError
from nestgrad._problem import Problem
from test_reverse import OPTIMIZERS, hypergrads, rel, with_dropout
from test_train import batches, problem, val_loss, weighted_loss

pytestmark = pytest.mark.usefixtures("float64")

STATE_BYTES = torch.get_rng_state().numel()

REPLAYING = {
    "reverse": ng.Reverse(),
    "reverse-every-3": ng.Reverse(checkpoint_every=3),
    "zeroth-order": ng.ZerothOrder(samples=2, sigma=0.1, seed=0),
    "finite-diff": ng.FiniteDiff(),
    "implicit": ng.Implicit(ng.CG(max_steps=3)),
}


def train_and_differentiate(method, data, model=None, steps=9, opt=None, before_backward=None):
    base, X, y = problem(0)
    model = model or base
    A = torch.zeros(len(X), requires_grad=True)
    opt = opt or ng.optim.SGD(lr=0.3)
    out = ng.train(
        weighted_loss(model), dict(model.named_parameters()), opt, data, steps=steps, hparams=A, method=method
    )
    if before_backward is not None:
        before_backward()
    return torch.autograd.grad(val_loss(model, out, X, y), A)[0]


@pytest.mark.parametrize("name", list(REPLAYING))
def test_a_data_function_with_state_raises_on_replay(name):
    """data=lambda t: next(it) gave ZerothOrder other batches on its re-runs: an estimate off by 681x."""
    _, X, y = problem(0)
    it = itertools.cycle(batches(X, y))  # 3 batches: 10 steps do not bring the cycle back to the start
    message = r"data\(t\) \(the function .*a different batch for step \d+ on replay.*Pass a list of batches, an iter"
    with pytest.raises(ReplayError, match=message + r".*function of t alone"):
        train_and_differentiate(REPLAYING[name], lambda t: next(it), steps=10)


def test_a_function_of_t_and_one_that_samples_from_the_global_generator_replay_exactly():
    _, X, y = problem(0)
    fixed = batches(X, y)

    def sampled(t):  # draws from torch's global generator, which Reverse replays
        idx = torch.randint(0, len(X), (8,))
        return X[idx], y[idx], idx

    make = OPTIMIZERS["adam"]
    for data in (lambda t: fixed[t % len(fixed)], sampled):
        ref = hypergrads(ng.Unroll(), make, data=data)
        for every in (None, 4):
            for a, b in zip(hypergrads(ng.Reverse(checkpoint_every=every), make, data=data), ref):
                assert rel(a, b) <= 1e-10


def test_a_batch_changed_in_place_before_backward_raises():
    _, X, y = problem(0)
    data = batches(X, y)
    with pytest.raises(ReplayError, match=r"data\[t % len\(data\)\] \(a list\) returned a different batch for step 8"):
        train_and_differentiate(ng.Reverse(), data, before_backward=lambda: data[2][0].add_(1.0))


@pytest.mark.parametrize("every", [None, 6, 20])
def test_rng_state_is_stored_once_per_checkpoint_and_not_at_all_without_randomness(every):
    """Reverse(checkpoint_every=316) at T=1e5 reserved 482 MiB at step 0: 5 KB of RNG state for every step."""
    base, X, y = problem(0)
    steps = 60
    segments = math.ceil(steps / (every or 1))
    for model, rows in [(with_dropout(base, nn.Dropout(0.3)), segments), (base, 0)]:
        params = dict(model.named_parameters())
        prob = Problem(weighted_loss(model), ng.optim.Adam(lr=0.01), Batches(batches(X, y), steps), steps, X[:, 0], {})
        _, _, trajectory = ng.Reverse(checkpoint_every=every).forward(prob, params)
        log = trajectory.rngs
        assert log.starts.numel() == rows * STATE_BYTES  # O(T/k) bytes, and none when nothing is random
        assert len(log.ends) == rows and log.cuda == {}
        assert not hasattr(trajectory, "cuda")  # no per-step CUDA list either


@pytest.mark.parametrize("every", [2, 5, 7])
def test_dropout_with_checkpointing_equals_unroll(every):
    base, _, _ = problem(0)
    train_model = with_dropout(base, nn.Dropout(0.3))
    eval_model = with_dropout(base, nn.Identity())
    make = OPTIMIZERS["adam"]
    ref = hypergrads(ng.Unroll(), make, model=train_model, eval_model=eval_model, steps=20)
    ours = hypergrads(ng.Reverse(checkpoint_every=every), make, model=train_model, eval_model=eval_model, steps=20)
    for a, b in zip(ours, ref):
        assert rel(a, b) <= 1e-10


def test_segments_that_draw_no_random_numbers_store_none_and_replay_exactly():
    model, X, y = problem(0)
    # Dropout only in steps 3-5 and 9-11: segments 1 and 3 of checkpoint_every=3 draw, 0 and 2 do not.
    data = [(X[:8], y[:8], torch.arange(8), 0.3 if t // 3 in (1, 3) else 0.0) for t in range(12)]

    def loss_fn(params, batch, A):
        x, y, idx, p = batch
        h = F.dropout(torch.tanh(F.linear(x, params["0.weight"], params["0.bias"])), p)
        losses = F.cross_entropy(F.linear(h, params["2.weight"], params["2.bias"]), y, reduction="none")
        return (torch.sigmoid(A[idx]) * losses).mean()

    def grad(method):
        A = torch.zeros(len(X), requires_grad=True)
        torch.manual_seed(0)
        out = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.Adam(lr=0.03), data, steps=12, hparams=A,
                       method=method)  # fmt: skip
        return torch.autograd.grad(val_loss(model, out, X, y), A)[0]

    prob = Problem(loss_fn, ng.optim.Adam(lr=0.03), Batches(data, 12), 12, torch.zeros(len(X)), {})
    _, _, trajectory = ng.Reverse(checkpoint_every=3).forward(prob, dict(model.named_parameters()))
    assert sorted(trajectory.rngs.ends) == [1, 3]
    ref = grad(ng.Unroll())
    assert rel(grad(ng.Reverse(checkpoint_every=3)), ref) <= 1e-10
    assert rel(grad(ng.Reverse()), ref) <= 1e-10


class _Intruder:
    """Another thread, alive for the whole test, that draws from torch's global generator when told to."""

    def __init__(self) -> None:
        self.go, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        self.go.wait()
        torch.rand(7)
        self.done.set()

    def draw(self) -> None:
        self.go.set()
        self.done.wait()

    def __enter__(self) -> _Intruder:
        return self

    def __exit__(self, *exc) -> None:
        self.go.set()
        self.thread.join()


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (ng.Reverse(checkpoint_every=3), r"Reverse: recomputing steps 3-5 drew other random numbers"),
        (ng.Reverse(), r"Reverse: recomputing step 4 drew other random numbers"),
        (ng.ZerothOrder(samples=1, sigma=0.1, seed=0), r"ZerothOrder: a re-run .* drew other random numbers"),
    ],
)
def test_another_thread_drawing_random_numbers_during_training_raises_and_says_so(method, message):
    """Two threads running Reverse with dropout: the saved RNG state was not what the step used."""
    base, X, y = problem(0)
    model = with_dropout(base, nn.Dropout(0.3))
    calls = itertools.count()
    with _Intruder() as intruder:

        def loss_fn(params, batch, A):
            if next(calls) == 4:  # training's step 4 only: the replays run after it
                intruder.draw()
            return weighted_loss(model)(params, batch, A)

        A = torch.zeros(len(X), requires_grad=True)
        out = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.3), batches(X, y), steps=9,
                       hparams=A, method=method)  # fmt: skip
        with pytest.raises(ReplayError, match=message + r".*\d+ Python threads were running.*separate processes"):
            torch.autograd.grad(val_loss(model, out, X, y), A)


def test_dropout_switched_to_eval_before_backward_is_named():
    base, X, y = problem(0)
    model = with_dropout(base, nn.Dropout(0.3))
    with pytest.raises(ReplayError, match=r"step 4 gave the loss .*on replay loss_fn drew no random numbers: most "
                                          r"likely a dropout module was switched to \.eval\(\)"):  # fmt: skip
        train_and_differentiate(ng.Reverse(), batches(X, y), model=model, steps=5, before_backward=model.eval)


def test_dropout_switched_to_train_before_backward_is_named():
    base, X, y = problem(0)
    model = with_dropout(base, nn.Dropout(0.3)).eval()
    with pytest.raises(ReplayError, match=r"step 4 gave the loss .*drew no random numbers, but on replay the global "
                                          r"random number generator moved: most likely a dropout module was switched "
                                          r"to \.train\(\)"):  # fmt: skip
        train_and_differentiate(ng.Reverse(), batches(X, y), model=model, steps=5, before_backward=model.train)


def test_a_loss_that_changed_otherwise_says_the_batch_and_random_numbers_were_checked():
    base, X, y = problem(0)
    scale = [1.0]

    def loss_fn(params, batch, A):
        return scale[0] * weighted_loss(base)(params, batch, A)

    A = torch.zeros(len(X), requires_grad=True)
    out = ng.train(loss_fn, dict(base.named_parameters()), ng.optim.SGD(lr=0.3), batches(X, y), steps=3, hparams=A,
                   method=ng.Reverse())  # fmt: skip
    scale[0] = 2.0
    with pytest.raises(ReplayError, match=r"gave the loss .*nestgrad checked that the batch is the one training read"):
        torch.autograd.grad(val_loss(base, out, X, y), A)


def test_a_batch_of_another_shape_on_replay_raises():
    _, X, y = problem(0)
    size = [8]

    def data(t):  # reads state that changes after training
        return X[: size[0]], y[: size[0]], torch.arange(size[0])

    with pytest.raises(ReplayError, match=r"different batch for step 8 on replay .*its structure, shapes or dtypes"):
        train_and_differentiate(ng.FiniteDiff(), data, before_backward=lambda: size.__setitem__(0, 6))
