"""Reverse(checkpoints=c): the binomial (revolve) schedule, counted, and its hypergradients against Unroll in float64.

References: the schedule's recomputations against a brute-force dynamic program over every split
(and that program against an exhaustive search over every schedule on tiny runs); the
hypergradients against ``Unroll`` to 1e-12.
"""

from __future__ import annotations

import heapq
import itertools
import warnings
from functools import cache
from math import comb

import pytest
import torch
import torch.nn.functional as F
from test_reverse import OPTIMIZERS, hypergrads, rel, with_dropout
from torch import nn

import nestgrad as ng
from nestgrad._data import Batches, ReplayError
from nestgrad._problem import Problem
from nestgrad.methods._revolve import (
    ADVANCE,
    FREE,
    RESTORE,
    REVERSE,
    STORE,
    backward_actions,
    optimal_advances,
    schedule,
    training_stores,
)
from test_train import batches, problem, val_loss, weighted_loss

TOL = 1e-12


# ------------------------------------------------------------------ the schedule, counted
@cache
def fewest(steps: int, snaps: int) -> int:
    """Brute force over every first split: the fewest forward steps to reverse ``steps`` from a stored start."""
    if steps == 1:
        return 0
    if snaps == 1:
        return steps * (steps - 1) // 2
    return min(m + fewest(steps - m, snaps - 1) + fewest(m, snaps) for m in range(1, steps))


def exhaustive(steps: int, snaps: int) -> int:
    """The fewest ADVANCEs of any valid schedule: a shortest path over (stored set, current state, steps left)."""
    start = (frozenset(), 0, steps)
    best = {start: 0}
    tie = itertools.count()  # heap entries never compare their states
    queue = [(0, next(tie), start)]
    while queue:
        cost, _, node = heapq.heappop(queue)
        if cost > best[node]:
            continue
        stored, cur, left = node
        if left == 0:
            return cost
        moves = []
        if cur is not None and cur < left - 1:
            moves.append((1, (stored, cur + 1, left)))
        if cur is not None and cur == left - 1:
            moves.append((0, (stored, None, left - 1)))
        if cur is not None and cur not in stored and len(stored) < snaps:
            moves.append((0, (stored | {cur}, cur, left)))
        moves += [(0, (stored, t, left)) for t in stored if t < left]
        moves += [(0, (stored - {t}, cur, left)) for t in stored]
        for step, nxt in moves:
            if cost + step < best.get(nxt, 1 << 60):
                best[nxt] = cost + step
                heapq.heappush(queue, (cost + step, next(tie), nxt))
    raise AssertionError("no schedule")


def run(actions: list[tuple[str, int]], steps: int, snaps: int, current: int | None = 0) -> tuple[int, list[int], int]:
    """Execute a schedule on positions: raise on any invalid action; return (advances, reversed order, most held)."""
    stored: set[int] = set()
    advances, order, most = 0, [], 0
    for kind, t in actions:
        if kind == STORE:
            assert current == t and t not in stored, (kind, t, current)
            stored.add(t)
        elif kind == ADVANCE:
            assert current == t and t < steps, (kind, t, current)
            current, advances = t + 1, advances + 1
        elif kind == RESTORE:
            assert t in stored, (kind, t)
            current = t
        elif kind == REVERSE:
            assert current == t, (kind, t, current)
            order.append(t)
            current = None
        else:
            assert kind == FREE and t in stored, (kind, t)
            stored.remove(t)
        most = max(most, len(stored))
    assert not stored
    return advances, order, most


def test_exhaustive_search_equals_the_dynamic_program_on_tiny_runs():
    for steps, snaps in itertools.product(range(1, 7), range(1, 4)):
        assert exhaustive(steps, snaps) == fewest(steps, snaps), (steps, snaps)


def test_closed_form_equals_the_dynamic_program():
    """Griewank's r·T - C(c + r, c + 1), r the least with C(c + r, c) >= T, over T <= 60 and c <= 8."""
    for steps, snaps in itertools.product(range(1, 61), range(1, 9)):
        assert optimal_advances(steps, snaps) == fewest(steps, snaps), (steps, snaps)
    assert optimal_advances(1000, 10) == 4 * 1000 - comb(14, 11) == 3636


@pytest.mark.parametrize("snaps", [1, 2, 3, 4, 6, 10, 40])
def test_schedule_is_valid_optimal_and_holds_at_most_c(snaps):
    for steps in [*range(1, 80), 200, 1000]:
        advances, order, most = run(schedule(steps, snaps), steps, snaps)
        assert order == list(reversed(range(steps)))  # every step reversed once, last first
        assert most <= snaps
        assert advances == optimal_advances(steps, min(snaps, steps))
        if steps < 80:
            assert advances == fewest(steps, snaps), (steps, snaps)


def test_a_long_run_schedule_is_optimal_too():
    advances, order, most = run(schedule(20000, 12), 20000, 12)
    assert advances == optimal_advances(20000, 12) and most <= 12 and order[0] == 19999 and order[-1] == 0


@pytest.mark.parametrize(("steps", "snaps"), [(1, 1), (2, 1), (7, 1), (9, 2), (30, 3), (30, 30), (30, 100)])
def test_training_stores_and_backward_actions_make_the_whole_schedule(steps, snaps):
    """Training advances 0 -> T - 1 storing ``training_stores``; the backward pass starts from state T - 1."""
    stores = training_stores(steps, snaps)
    first_sweep = [a for t in range(steps - 1) for a in ([(STORE, t)] if t in stores else []) + [(ADVANCE, t)]]
    first_sweep += [(STORE, steps - 1)] if steps - 1 in stores else []
    whole = schedule(steps, snaps)
    assert whole[: len(first_sweep)] == first_sweep
    rest = list(backward_actions(steps, snaps))
    assert rest[0] == (RESTORE, steps - 1) and rest[1:] == whole[len(first_sweep) :]
    recomputed = sum(kind == ADVANCE for kind, _ in rest)
    assert recomputed == optimal_advances(steps, min(snaps, steps)) - (steps - 1)
    if snaps >= steps - 1:
        assert recomputed == 0


def test_schedule_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="steps >= 1 and snapshots >= 1"):
        schedule(5, 0)
    with pytest.raises(ValueError, match="steps >= 1 and snapshots >= 1"):
        optimal_advances(0, 3)


# ------------------------------------------------------------------ hypergradients against Unroll
in_float64 = pytest.mark.usefixtures("float64")


@in_float64
@pytest.mark.parametrize("snaps", [1, 2, 3, 5])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_binomial_reverse_equals_unroll(opt, snaps):
    ref = hypergrads(ng.Unroll(), OPTIMIZERS[opt], steps=11)
    ours = hypergrads(ng.Reverse(checkpoints=snaps), OPTIMIZERS[opt], steps=11)
    assert all(r.abs().max() > 0 for r in ref)
    for a, b in zip(ours, ref, strict=True):
        assert rel(a, b) <= TOL


@in_float64
@pytest.mark.parametrize("snaps", [1, 3])
def test_dropout_replays_exactly_at_the_recomputed_steps(snaps):
    base, _, _ = problem(0)
    train_model = with_dropout(base, nn.Dropout(0.3))
    eval_model = with_dropout(base, nn.Identity())
    make = OPTIMIZERS["adam"]
    ref = hypergrads(ng.Unroll(), make, model=train_model, eval_model=eval_model, steps=10)
    ours = hypergrads(ng.Reverse(checkpoints=snaps), make, model=train_model, eval_model=eval_model, steps=10)
    no_dropout = hypergrads(ng.Unroll(), make, model=eval_model, steps=10)
    assert rel(ref[0], no_dropout[0]) > 1e-3  # dropout really acts
    for a, b in zip(ours, ref, strict=True):
        assert rel(a, b) <= TOL


def counting(loss_fn):
    calls = [0]

    def counted(p, batch, A):
        calls[0] += 1
        return loss_fn(p, batch, A)

    return counted, calls


@in_float64
@pytest.mark.parametrize(("steps", "snaps"), [(12, 1), (12, 3), (20, 4), (12, 11), (12, 12), (12, 50)])
def test_backward_recomputes_exactly_revolves_optimum(steps, snaps):
    """loss_fn calls in the backward pass: the T reversed steps plus r·T - C(c + r, c + 1) - (T - 1).

    ``c >= T - 1`` stores every step: no recomputation, and the same hypergradient as Reverse().
    """
    model, X, y = problem(0)
    A = torch.zeros(len(X), requires_grad=True)
    loss_fn, calls = counting(weighted_loss(model))
    grads = {}
    for method in (ng.Reverse(checkpoints=snaps), ng.Reverse()):
        out = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.3, momentum=0.9), batches(X, y),
                       steps=steps, hparams=A, method=method)  # fmt: skip
        assert calls[0] == steps
        calls[0] = 0
        grads[method] = torch.autograd.grad(val_loss(model, out, X, y), A)[0]
        extra = optimal_advances(steps, min(snaps, steps)) - (steps - 1) if method.checkpoints else 0
        assert calls[0] == steps + extra
        calls[0] = 0
    if snaps >= steps - 1:
        assert extra == 0
    a, b = grads.values()
    assert rel(a, b) <= TOL


def test_at_most_c_snapshots_are_allocated():
    base, X, y = problem(0)
    for snaps, steps, rows in [(4, 30, 3), (1, 30, 0), (30, 30, 29), (100, 30, 29)]:
        params = dict(base.named_parameters())
        prob = Problem(weighted_loss(base), ng.optim.Adam(lr=0.01), Batches(batches(X, y), steps), steps, X[:, 0], {})
        _, _, trajectory = ng.Reverse(checkpoints=snaps).forward(prob, params)
        assert all(buffer.shape[0] == rows for buffer in trajectory.buffers), (
            snaps,
            [b.shape for b in trajectory.buffers],
        )
        assert len(trajectory.buffers) == (3 * len(params) if rows else 0)  # weights, exp_avg, exp_avg_sq
        assert len(trajectory.rng) <= min(snaps, steps) + 1  # an RNG state per snapshot (and the working state)


@in_float64
def test_batchnorm_buffers_advance_in_training_only_and_the_hypergradient_equals_unroll():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)) for _ in range(3)]

    def run_with(method):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).train()
        h = torch.tensor(1.0, requires_grad=True)
        lr = torch.tensor(0.1, requires_grad=True)

        def loss_fn(p, batch, h):
            x, y = batch
            return h * F.mse_loss(ng.call(model, p, x), y)

        weights = dict(model.named_parameters())
        params = {**weights, **dict(model.named_buffers())}  # the run's buffers come back in the trained dict
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ng.train(loss_fn, params, ng.optim.SGD(lr=lr, momentum=0.5), data, steps=7, hparams=h, method=method)
        kept = {k: out[k].clone() for k, _ in model.named_buffers()}
        trained = {k: out[k] for k in weights}
        loss = F.mse_loss(ng.call(model, trained, data[0][0]), data[0][1])
        grads = torch.autograd.grad(loss, [h, lr, *weights.values()])
        for k, v in kept.items():
            assert torch.equal(out[k], v), f"the backward pass changed the run's {k}"
        return grads, kept

    ref, ref_buffers = run_with(ng.Unroll())
    ours, buffers = run_with(ng.Reverse(checkpoints=2))
    for a, b in zip(ours, ref, strict=True):
        assert rel(a, b) <= TOL
    for k, v in ref_buffers.items():
        torch.testing.assert_close(buffers[k], v, rtol=TOL, atol=TOL)
    assert buffers["1.num_batches_tracked"].item() == 7  # training's seven steps, not the replays


# ------------------------------------------------------------------ state= segments and tasks=
def segment_problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g), torch.randn(20, generator=g)
    data = [(x[i : i + 5], y[i : i + 5], torch.arange(i, i + 5)) for i in range(0, 20, 5)]

    def loss_fn(p, batch, A):
        xb, yb, idx = batch
        return (torch.sigmoid(A[idx]) * (torch.tanh(xb @ p["w"] + p["b"]) - yb) ** 2).mean()

    def init():
        g = torch.Generator().manual_seed(1)
        return {"w": torch.randn(3, generator=g).requires_grad_(), "b": torch.zeros((), requires_grad=True)}

    return data, loss_fn, init


@in_float64
@pytest.mark.parametrize("second", ["binomial", "unroll"])
@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_two_segments_with_a_given_state_and_a_state_gradient_equal_the_whole_run(opt_name, second):
    data, loss_fn, init = segment_problem()
    kwargs = {"SGD": {"lr": 0.1, "momentum": 0.9}, "Adam": {"lr": 0.05}}[opt_name]
    lr = torch.tensor(kwargs.pop("lr"), requires_grad=True)
    opt = getattr(ng.optim, opt_name)(lr=lr, **kwargs)
    A = torch.linspace(-1, 1, 20).requires_grad_()

    def outer(w):
        return ((w["w"] - 1) ** 2).sum() + w["b"] ** 2

    whole = ng.train(loss_fn, init(), opt, data, steps=20, hparams=A)
    expected = torch.autograd.grad(outer(whole), [A, lr])
    # The first segment returns its state (differentiated through the second); the second is given it.
    w1, s1 = ng.train(loss_fn, init(), opt, data, steps=10, hparams=A, method=ng.Reverse(checkpoints=3),
                      return_state=True)  # fmt: skip
    method2 = ng.Reverse(checkpoints=2) if second == "binomial" else ng.Unroll()
    w2 = ng.train(loss_fn, w1, opt, data[2:] + data[:2], steps=10, hparams=A, state=s1, method=method2)
    got = torch.autograd.grad(outer(w2), [A, lr])
    for a, b in zip(got, expected, strict=True):
        assert rel(a, b) <= TOL


@in_float64
def test_vectorised_tasks_equal_unroll():
    n, k = 4, 5
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(n, k, 1, generator=g, dtype=torch.float64) * 10 - 5
    ys = torch.sin(xs) * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    xq = torch.rand(n, 2 * k, 1, generator=g, dtype=torch.float64) * 10 - 5
    yq = torch.sin(xq)

    def loss_fn(p, batch, h):
        x, y = batch
        return F.mse_loss(ng.call(net, p, x), y)

    def meta(method):
        w0 = {kk: v.detach().clone().requires_grad_() for kk, v in net.named_parameters()}
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        opt = ng.optim.SGD(lr=lr, momentum=0.9)
        fast = ng.train(loss_fn, w0, opt, [(xs, ys)], steps=6, tasks=n, method=method)
        loss = torch.func.vmap(lambda p, x, y: F.mse_loss(torch.func.functional_call(net, p, (x,)), y))(fast, xq, yq)
        return torch.autograd.grad(loss.sum(), [lr, *w0.values()])

    ref = meta(ng.Unroll())
    for a, b in zip(meta(ng.Reverse(checkpoints=2)), ref, strict=True):
        assert rel(a, b) <= TOL


# ------------------------------------------------------------------ misuse and replay guarantees
@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "4", 2.0])
def test_checkpoints_below_one_or_not_an_int_raises(bad):
    with pytest.raises(ValueError, match=r"nestgrad.Reverse: checkpoints must be None .*an int >= 1.*got"):
        ng.Reverse(checkpoints=bad)


def test_checkpoints_with_checkpoint_every_raises():
    with pytest.raises(ValueError, match=r"checkpoint_every=2 and checkpoints=3 were both given.*Give one of them"):
        ng.Reverse(checkpoint_every=2, checkpoints=3)


@in_float64
def test_dropout_switched_to_eval_before_backward_raises_at_a_recomputed_step():
    base, X, y = problem(0)
    model = with_dropout(base, nn.Dropout(0.3))
    A = torch.zeros(len(X), requires_grad=True)
    out = ng.train(weighted_loss(model), dict(model.named_parameters()), ng.optim.SGD(lr=0.3), batches(X, y), steps=6,
                   hparams=A, method=ng.Reverse(checkpoints=2))  # fmt: skip
    model.eval()
    # The first thing the backward pass runs is a recomputation (c = 2 stores 0 and 3): step 3, without a graph.
    with pytest.raises(ReplayError, match=r"recomputing step \d gave the loss .*on replay loss_fn drew no random"):
        torch.autograd.grad(val_loss(model, out, X, y), A)


@in_float64
def test_a_loss_that_changed_since_training_raises():
    model, X, y = problem(0)
    A = torch.zeros(len(X), requires_grad=True)
    scale = [1.0]
    base = weighted_loss(model)

    def loss_fn(p, batch, A):
        return scale[0] * base(p, batch, A)

    out = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.3), batches(X, y), steps=6, hparams=A,
                   method=ng.Reverse(checkpoints=2))  # fmt: skip
    scale[0] = 1.5
    with pytest.raises(ReplayError, match=r"nestgrad.Reverse: recomputing step \d gave the loss .*but training saw"):
        torch.autograd.grad(val_loss(model, out, X, y), A)


@in_float64
def test_a_hyperparameter_changed_in_place_before_backward_raises():
    model, X, y = problem(0)
    A = torch.zeros(len(X), requires_grad=True)
    out = ng.train(weighted_loss(model), dict(model.named_parameters()), ng.optim.SGD(lr=0.3), batches(X, y),
                   steps=6, hparams=A, method=ng.Reverse(checkpoints=2))  # fmt: skip
    with torch.no_grad():
        A += 1
    with pytest.raises(RuntimeError, match=r"\(Reverse\): hparams.* was modified in place"):
        torch.autograd.grad(val_loss(model, out, X, y), A)


@in_float64
def test_a_nonfinite_recomputed_step_raises():
    """A loss_fn that is finite in training and overflows on replay: NonFiniteError, not a NaN gradient."""
    model, X, y = problem(0)
    A = torch.zeros(len(X), requires_grad=True)
    blow = [False]
    base = weighted_loss(model)

    def loss_fn(p, batch, A):
        loss = base(p, batch, A)
        return loss * float("inf") if blow[0] else loss

    out = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.3), batches(X, y), steps=6, hparams=A,
                   method=ng.Reverse(checkpoints=2))  # fmt: skip
    blow[0] = True
    with pytest.raises(ng.NonFiniteError):
        torch.autograd.grad(val_loss(model, out, X, y), A)


def test_the_snapshots_that_cannot_fit_raise_before_training_and_name_a_c_that_fits():
    """With 10 MiB weights and 1000 snapshots asked, the estimate raises at step 0 and names what fits."""
    w = {"w": torch.zeros(10 * 2**20 // 4, requires_grad=True)}
    from nestgrad.methods._memory import available_bytes

    available = available_bytes(torch.device("cpu"))
    if available is None:
        pytest.skip("the available memory is unknown here")
    snaps = available // (10 * 2**20) + 50
    steps = snaps + 10

    def loss_fn(p, batch, A):
        return (p["w"] ** 2).sum() * A

    A = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(
        torch.OutOfMemoryError, match=r"\(Reverse\): the snapshots cannot fit.*Reverse\(checkpoints=\d+\)"
    ):
        ng.train(loss_fn, w, ng.optim.SGD(lr=0.1), [None], steps=steps, hparams=A, method=ng.Reverse(checkpoints=snaps))


def test_a_trajectory_that_cannot_fit_names_a_number_of_checkpoints_that_does():
    """Reverse() at 10**6 steps of 8 MiB weights: the message offers Reverse(checkpoints=c) with c copies that fit."""
    w = torch.zeros(2**20, dtype=torch.float64, requires_grad=True)
    A = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    from nestgrad.methods._memory import available_bytes

    if available_bytes(torch.device("cpu")) is None:
        pytest.skip("the available memory is unknown here")
    with pytest.raises(torch.OutOfMemoryError, match=r"Reverse\(checkpoints=c\) holds at most c copies") as info:
        ng.train(lambda p, b, A: A * p["w"].square().sum(), {"w": w}, ng.optim.SGD(lr=0.1), [None], steps=10**6,
                 hparams=A, method=ng.Reverse())  # fmt: skip
    c = int(str(info.value).split("checkpoints=")[2].split(" ")[0])
    assert 1 <= c and c * 8 * 2**20 <= available_bytes(torch.device("cpu"))


@in_float64
@pytest.mark.parametrize("snaps", [1, 2, 4])
def test_a_second_backward_pass_with_retain_graph_gives_the_same_hypergradient(snaps):
    """The first backward pass reuses training's snapshot rows; the second recomputes them from the start."""
    base, X, y = problem(0)
    model = with_dropout(base, nn.Dropout(0.3))
    A = torch.zeros(len(X), requires_grad=True)
    loss_fn, calls = counting(weighted_loss(model))
    out = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.3, momentum=0.9), batches(X, y),
                   steps=9, hparams=A, method=ng.Reverse(checkpoints=snaps))  # fmt: skip
    loss = val_loss(with_dropout(base, nn.Identity()), out, X, y)
    first = torch.autograd.grad(loss, A, retain_graph=True)[0]
    calls[0] = 0
    second = torch.autograd.grad(loss, A)[0]
    assert torch.equal(first, second)
    assert calls[0] == 8 + 9 + optimal_advances(9, snaps) - 8  # training's first T - 1 steps again, then the pass


@in_float64
def test_a_data_function_with_state_raises_at_a_recomputed_step():
    """data(t) that reads an iterator gives other batches on replay: the batch fingerprint check raises."""
    model, X, y = problem(0)
    it = itertools.cycle(batches(X, y))  # 3 batches: 10 steps do not bring the cycle back to the start
    A = torch.zeros(len(X), requires_grad=True)
    out = ng.train(weighted_loss(model), dict(model.named_parameters()), ng.optim.SGD(lr=0.3), lambda t: next(it),
                   steps=10, hparams=A, method=ng.Reverse(checkpoints=3))  # fmt: skip
    with pytest.raises(ReplayError, match=r"a different batch for step \d+ on replay"):
        torch.autograd.grad(val_loss(model, out, X, y), A)
