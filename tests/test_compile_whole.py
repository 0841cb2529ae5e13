"""``Compile(whole_run=True)``: a run as one compiled graph equals the eager run and keeps its checks.

The first run of a loss_fn goes step by step (its first step eager, with every check); the
later ones run one graph of every step's gradient and optimizer update. ``aot_eager`` (dynamo,
torch.func and AOTAutograd without inductor's code generation) for the cases, inductor once.
All slow: each compiles for seconds.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nestgrad as ng

pytestmark = pytest.mark.slow


def _mlp(dropout: float = 0.0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(5, 7), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(7, 3)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


def _loss(model):
    def loss_fn(p, batch, w):
        xb, yb = batch
        return (w * F.cross_entropy(ng.call(model, p, xb), yb, reduction="none")).mean()

    return loss_fn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _hyper(model, x, y, opt, compile, loss_fn, data=None, steps=6, seed=None):
    A = torch.ones(12, dtype=torch.float64, requires_grad=True)
    if seed is not None:
        torch.manual_seed(seed)
    data = [(x, y)] if data is None else data
    trained = ng.train(loss_fn, dict(model.named_parameters()), opt, data, steps=steps, hparams=A, compile=compile)
    val = F.cross_entropy(ng.call(model, trained, x), y)
    return torch.cat([g.flatten() for g in torch.autograd.grad(val, [A, *opt.tensors()])])


OPTIMIZERS = {
    "sgd-momentum": lambda: ng.optim.SGD(lr=0.3, momentum=0.9),
    "adam-lr-tensor": lambda: ng.optim.Adam(lr=torch.tensor(0.05, dtype=torch.float64, requires_grad=True)),
    "adamw-schedule": lambda: ng.optim.AdamW(lr=ng.optim.Schedule(lambda t: 0.05 / t), weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unroll_whole_run_equals_eager_float64(name):
    """Hypergradients w.r.t. the loss weights and the optimizer's tensor hparams, step counts and schedules
    in the graph: the second run is one graph (no eager step), equal to eager to 1e-12."""
    model, x, y = _mlp()
    loss_fn = _loss(model)
    eager = _hyper(model, x, y, OPTIMIZERS[name](), False, loss_fn)
    c = ng.Compile(whole_run=True, backend="aot_eager", strict=True)
    first = _hyper(model, x, y, OPTIMIZERS[name](), c, loss_fn)  # step by step in the first test only
    second = _hyper(model, x, y, OPTIMIZERS[name](), c, loss_fn)
    assert c.last_run.eager_steps == 0 and c.last_run.compiled_steps == 6 and c.last_run.compiles <= 1
    third = _hyper(model, x, y, OPTIMIZERS[name](), c, loss_fn)
    assert c.last_run.compiles == 0 and c.last_run.compiled_steps == 6  # the graph is reused
    for got in (first, second, third):
        assert _rel(got, eager) <= 1e-12


def test_the_first_run_of_a_loss_fn_goes_step_by_step():
    """Its eager first step checks the loss function; the runs after it run one graph."""
    model, x, y = _mlp()

    def loss_fn(p, batch, w):  # a code object no other test runs
        xb, yb = batch
        return (w * F.mse_loss(ng.call(model, p, xb), F.one_hot(yb, 3).double(), reduction="none").mean(1)).mean()

    c = ng.Compile(whole_run=True, backend="aot_eager", strict=True)
    eager = _hyper(model, x, y, ng.optim.SGD(lr=0.3), False, loss_fn)
    first = _hyper(model, x, y, ng.optim.SGD(lr=0.3), c, loss_fn)
    assert (c.last_run.eager_steps, c.last_run.compiled_steps) == (1, 5)
    second = _hyper(model, x, y, ng.optim.SGD(lr=0.3), c, loss_fn, steps=6)
    assert (c.last_run.eager_steps, c.last_run.compiled_steps, c.last_run.compiles) == (0, 6, 1)
    assert _rel(first, eager) <= 1e-12 and _rel(second, eager) <= 1e-12
    unused = torch.ones(12, dtype=torch.float64, requires_grad=True)  # hparams the loss does not use: autograd says so
    trained = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.3), [(x, y)], steps=6,
                       hparams=unused.detach() * 1, compile=c)  # fmt: skip
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(trained["0.weight"].sum(), unused)


def test_plain_training_whole_run_equals_eager_and_state_resumes():
    model, x, y = _mlp()
    loss_fn = _loss(model)
    A = torch.ones(12, dtype=torch.float64)
    params = dict(model.named_parameters())
    opt = ng.optim.Adam(lr=0.05)

    def run(compile):
        with torch.no_grad():
            w, s = ng.train(loss_fn, params, opt, [(x, y)], steps=4, hparams=A, compile=compile, return_state=True)
            return ng.train(loss_fn, w, opt, [(x, y)], steps=4, hparams=A, compile=compile, state=s)

    eager = run(False)
    c = ng.Compile(whole_run=True, backend="aot_eager", strict=True)
    run(c)
    got = run(c)
    assert c.last_run.eager_steps == 0 and c.last_run.compiled_steps == 4
    for k in eager:
        assert not got[k].requires_grad
        assert _rel(got[k], eager[k]) <= 1e-12


def test_tasks_whole_run_equals_eager_maml_float64():
    """Second-order MAML over 4 tasks: one graph of the vectorised steps, first-order autograd over it."""
    model, x, y = _mlp()
    xs, ys = x.reshape(4, 3, 5), y.reshape(4, 3)

    def loss_fn(p, batch, h):
        xb, yb = batch
        return F.cross_entropy(ng.call(model, p, xb), yb)

    def meta(compile):
        w0 = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        fast = ng.train(loss_fn, w0, ng.optim.SGD(lr=0.4), [(xs, ys)], steps=5, tasks=4, compile=compile)
        query = torch.func.vmap(lambda p, a, b: loss_fn(p, (a, b), None))(fast, xs, ys).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(query, list(w0.values()))])

    eager = meta(False)
    c = ng.Compile(whole_run=True, backend="aot_eager", strict=True)
    meta(c)
    got = meta(c)
    assert c.last_run.eager_steps == 0 and c.last_run.compiled_steps == 5
    assert _rel(got, eager) <= 1e-12


def test_dropout_whole_run_draws_as_eager_does():
    model, x, y = _mlp(dropout=0.3)
    loss_fn = _loss(model)
    eager = _hyper(model, x, y, ng.optim.SGD(lr=0.3), False, loss_fn, seed=1)
    c = ng.Compile(whole_run=True, backend="aot_eager", strict=True)
    _hyper(model, x, y, ng.optim.SGD(lr=0.3), c, loss_fn, seed=1)
    got = _hyper(model, x, y, ng.optim.SGD(lr=0.3), c, loss_fn, seed=1)
    assert c.last_run.compiled_steps == 6
    assert _rel(got, eager) <= 1e-12


def test_nonfinite_step_of_a_whole_run_raises_at_its_step():
    """The graph's finite flags find the step; the run re-runs eagerly so that the error names it."""
    model, x, y = _mlp()
    loss_fn = _loss(model)
    c = ng.Compile(whole_run=True, backend="aot_eager", strict=True)
    good = [(x, y)] * 6
    _hyper(model, x, y, ng.optim.SGD(lr=0.3), c, loss_fn, data=good)
    bad = [(x, y)] * 4 + [(x * float("nan"), y)] + [(x, y)]
    with pytest.raises(ng.NonFiniteError, match="step 4"):
        _hyper(model, x, y, ng.optim.SGD(lr=0.3), c, loss_fn, data=bad)
    assert c.last_run.fallback == "step 4: not finite"


def test_whole_run_that_cannot_trace_goes_step_by_step_with_one_warning_or_raises_when_strict():
    """A schedule function that reads a tensor's value cannot be traced; per-step compiling runs it eagerly."""
    model, x, y = _mlp()
    base = torch.tensor(0.3, dtype=torch.float64)

    def make():
        return ng.optim.SGD(lr=ng.optim.Schedule(lambda t: base.item() / t))

    def loss_fn(p, batch, w):  # a code object no other test runs
        xb, yb = batch
        return (w * F.cross_entropy(ng.call(model, p, xb), yb, reduction="none")).sum() / 12

    eager = _hyper(model, x, y, make(), False, loss_fn)
    c = ng.Compile(whole_run=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = [_hyper(model, x, y, make(), c, loss_fn) for _ in range(3)]
    ours = [w for w in caught if "could not be traced as one graph" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert c.last_run.compiled_steps == 5 and c.last_run.eager_steps == 1  # step by step, as the first run
    assert all(_rel(got, eager) <= 1e-12 for got in runs)

    def loss2(p, batch, w):  # not known to fail yet
        xb, yb = batch
        return (w * F.cross_entropy(ng.call(model, p, xb), yb, reduction="none")).sum() / 12.0

    strict = ng.Compile(whole_run=True, backend="aot_eager", strict=True)
    _hyper(model, x, y, make(), strict, loss2)
    with pytest.raises(ng.CompileError, match="could not be traced as one graph"):
        _hyper(model, x, y, make(), strict, loss2)


def test_inductor_whole_run_equals_eager_float64():
    model, x, y = _mlp()
    loss_fn = _loss(model)
    eager = _hyper(model, x, y, ng.optim.SGD(lr=0.3, momentum=0.9), False, loss_fn)
    c = ng.Compile(whole_run=True, strict=True)
    _hyper(model, x, y, ng.optim.SGD(lr=0.3, momentum=0.9), c, loss_fn)
    got = _hyper(model, x, y, ng.optim.SGD(lr=0.3, momentum=0.9), c, loss_fn)
    assert c.last_run.compiled_steps == 6 and c.last_run.eager_steps == 0
    assert _rel(got, eager) <= 1e-12


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_whole_run_of_the_wrong_kind_raises(bad):
    with pytest.raises(TypeError, match="whole_run must be True or False"):
        ng.Compile(whole_run=bad)
