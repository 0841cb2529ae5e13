"""Compiled runs (``train(..., compile=...)``) equal eager ones, keep their checks, and fall back loudly.

One quick smoke test (the ``aot_eager`` backend: dynamo, torch.func and AOTAutograd, without
inductor's code generation); the inductor cases are ``slow`` (seconds of compilation each).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nestgrad as ng


def _mlp(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    x = torch.randn(12, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


def _run(model, x, y, A, *, compile, optimizer=None, steps=6, method=None, grad=True, check_finite=True):
    def loss_fn(p, batch, w):
        xb, yb = batch
        return (w * F.cross_entropy(ng.call(model, p, xb), yb, reduction="none")).mean()

    opt = optimizer if optimizer is not None else ng.optim.SGD(lr=0.3, momentum=0.9)
    params = dict(model.named_parameters())
    if not grad:
        with torch.no_grad():
            return ng.train(loss_fn, params, opt, [(x, y)], steps=steps, hparams=A, compile=compile,
                            check_finite=check_finite)  # fmt: skip
    trained = ng.train(loss_fn, params, opt, [(x, y)], steps=steps, hparams=A, compile=compile, method=method,
                       check_finite=check_finite)  # fmt: skip
    val = F.cross_entropy(ng.call(model, trained, x), y)
    return torch.autograd.grad(val, A)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_compile_smoke_plain_training_equals_eager_float64():
    """Quick subset: plain training under no_grad, traced by dynamo and torch.func, equals eager."""
    model, x, y = _mlp()
    A = torch.ones(12, dtype=torch.float64, requires_grad=True)
    c = ng.Compile(backend="aot_eager", strict=True)
    trained = _run(model, x, y, A, compile=c, grad=False)
    assert c.last_run is not None and c.last_run.fallback is None
    assert c.last_run.compiled_steps == 5 and c.last_run.eager_steps == 1
    eager = _run(model, x, y, A, compile=False, grad=False)
    for k in eager:
        assert _rel(trained[k], eager[k]) <= 1e-12
    with pytest.raises(TypeError, match=r"compile must be True, False or a nestgrad\.Compile"):
        _run(model, x, y, A, compile="yes")


@pytest.mark.slow
@pytest.mark.parametrize("make_opt", [lambda: ng.optim.SGD(lr=0.3, momentum=0.9), lambda: ng.optim.Adam(lr=0.05)])
def test_inductor_float64_equals_eager_and_no_recompilation(make_opt):
    model, x, y = _mlp()
    A = torch.ones(12, dtype=torch.float64, requires_grad=True)
    c = ng.Compile(strict=True)
    got = _run(model, x, y, A, compile=c, optimizer=make_opt(), steps=8)
    assert c.last_run.compiles <= 1 and c.last_run.recompiled_at == [] and c.last_run.compiled_steps == 7
    assert _rel(got, _run(model, x, y, A, compile=False, optimizer=make_opt(), steps=8)) <= 1e-12
    trained = _run(model, x, y, A, compile=c, optimizer=make_opt(), steps=8, grad=False)
    eager = _run(model, x, y, A, compile=False, optimizer=make_opt(), steps=8, grad=False)
    for k in eager:
        assert _rel(trained[k], eager[k]) <= 1e-12
    _run(model, x, y, A, compile=c, optimizer=make_opt(), steps=8)  # a second call: the same graph, reused
    assert c.last_run.compiles == 0


@pytest.mark.slow
def test_inductor_float32_tolerance():
    """float32: compiled kernels round differently; the measured difference is about 1e-7 (documented)."""
    model, x, y = _mlp(torch.float32)
    A = torch.ones(12, requires_grad=True)
    got = _run(model, x, y, A, compile=ng.Compile(strict=True))
    assert _rel(got, _run(model, x, y, A, compile=False)) <= 1e-6  # 10x the measured 1.2-1.4e-7


@pytest.mark.slow
def test_nonfinite_is_found_at_its_step_on_a_compiled_run():
    model, x, y = _mlp()
    data = [(x, y)] * 3 + [(x * float("nan"), y)] + [(x, y)] * 4

    def loss_fn(p, batch, w):
        xb, yb = batch
        return (w * F.cross_entropy(ng.call(model, p, xb), yb, reduction="none")).mean()

    A = torch.ones(12, dtype=torch.float64, requires_grad=True)
    c = ng.Compile(strict=True)
    with pytest.raises(ng.NonFiniteError, match="step 3"):
        ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.1), data, steps=8, hparams=A, compile=c)
    assert c.last_run.compiled_steps == 2 and "step 3: the compiled step was not finite" in c.last_run.fallback


@pytest.mark.slow
def test_graph_break_falls_back_with_one_warning_or_raises_when_strict():
    model, x, y = _mlp()

    def loss_fn(p, batch, w):
        xb, yb = batch
        loss = (w * F.cross_entropy(ng.call(model, p, xb), yb, reduction="none")).mean()
        if loss.item() > 1e9:  # data-dependent Python control flow: a graph break
            loss = loss * 0
        return loss

    A = torch.ones(12, dtype=torch.float64, requires_grad=True)
    params = dict(model.named_parameters())
    c = ng.Compile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [(x, y)], steps=5, hparams=A, compile=c)
    ours = [w for w in caught if "could not be compiled" in str(w.message)]
    assert len(ours) == 1 and "step 1" in str(ours[0].message)
    assert c.last_run.fallback is not None and c.last_run.compiled_steps == 0 and c.last_run.eager_steps == 5
    eager = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [(x, y)], steps=5, hparams=A)
    for k in eager:
        assert torch.equal(trained[k], eager[k])
    again = ng.Compile()  # a later run of the same loss_fn does not pay for another attempt
    with pytest.warns(UserWarning, match="as in an earlier run of this loss_fn"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [(x, y)], steps=5, hparams=A, compile=again)
    assert again.last_run.compiles == 0 and again.last_run.compiled_steps == 0
    with pytest.raises(ng.CompileError, match="step 1 could not be compiled"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [(x, y)], steps=5, hparams=A, compile=ng.Compile(strict=True))


@pytest.mark.slow
def test_module_with_buffers_runs_eagerly_with_a_warning():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)

    def loss_fn(p, batch, a):
        return (ng.call(model, p, batch) ** 2).mean() * a

    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with pytest.warns(UserWarning, match="buffers"):
        trained = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [x], steps=3, hparams=a, compile=True)
    eager = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [x], steps=3, hparams=a)
    for k in eager:
        assert torch.equal(trained[k], eager[k])


@pytest.mark.slow
def test_reverse_forward_run_compiled_equals_eager_float64():
    """Reverse's training steps and its replays (a vjp through the compiled step) compile, but the O(log T) searched."""
    model, x, y = _mlp()
    A = torch.ones(12, dtype=torch.float64, requires_grad=True)
    c = ng.Compile(strict=True)
    got = _run(model, x, y, A, compile=c, steps=12, method=ng.Reverse())
    # steps 5, 6, 7, 9, 10 (not 0-4, 8: powers of 2, and 11: the last), in training and in the replays
    assert c.last_run.compiled_steps == 10
    assert _rel(got, _run(model, x, y, A, compile=False, steps=12, method=ng.Reverse())) <= 1e-12


@pytest.mark.slow
def test_a_param_the_loss_does_not_use_runs_eagerly_with_a_warning():
    """Its eager gradient is None (left unchanged, weight decay included); a compiled one would be 0."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    params = {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True),
              "spare": torch.ones(2, dtype=torch.float64, requires_grad=True)}  # fmt: skip
    A = torch.ones(10, dtype=torch.float64, requires_grad=True)

    def loss_fn(p, batch, a):
        xb, yb = batch
        return (a * (xb @ p["w"] - yb) ** 2).mean()

    opt = ng.optim.SGD(lr=0.1, weight_decay=0.5)
    with pytest.warns(UserWarning, match="does not use params \\['spare'\\]"):
        trained = ng.train(loss_fn, params, opt, [(x, y)], steps=4, hparams=A, compile=True)
    assert torch.equal(trained["spare"], params["spare"].detach())
    eager = ng.train(loss_fn, params, opt, [(x, y)], steps=4, hparams=A)
    assert torch.equal(trained["w"], eager["w"])


@pytest.mark.slow
def test_tasks_step_compiled_equals_eager_and_names_a_diverging_task():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    xs = torch.randn(4, 6, 1, generator=g, dtype=torch.float64)
    ys = torch.sin(xs)
    params = dict(model.named_parameters())

    def loss_fn(p, batch, h=None):
        xb, yb = batch
        return ((ng.call(model, p, xb) - yb) ** 2).mean()

    def meta(compile, data):
        trained = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), data, steps=5, tasks=4, compile=compile)
        return torch.autograd.grad(sum(v.sum() for v in trained.values()), list(params.values()))

    c = ng.Compile(strict=True)
    got = meta(c, [(xs, ys)])
    assert c.last_run.compiled_steps == 4
    for a, b in zip(got, meta(False, [(xs, ys)]), strict=True):
        assert _rel(a, b) <= 1e-12
    bad = xs.clone()
    bad[2, 0, 0] = float("nan")  # task 2 diverges at step 3, a compiled step: the eager re-run names it
    data = [(xs, ys)] * 3 + [(bad, ys)] * 2
    with pytest.raises(ng.NonFiniteError, match=r"step 3.*the loss is not finite for task 2 of 4"):
        meta(ng.Compile(strict=True), data)


@pytest.mark.slow
@pytest.mark.parametrize("method", [ng.Unroll, ng.Reverse])
def test_dropout_compiled_equals_eager_float64(method):
    """Random ops in a compiled step draw as eager ones do: Reverse's replays match its run (no ReplayError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    A = torch.ones(12, dtype=torch.float64, requires_grad=True)

    def loss_fn(p, batch, w):
        xb, yb = batch
        return (w * F.cross_entropy(ng.call(model, p, xb), yb, reduction="none")).mean()

    def hyper(compile):
        torch.manual_seed(1)
        trained = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.3), [(x, y)], steps=12,
                           hparams=A, method=method(), compile=compile)  # fmt: skip
        return torch.autograd.grad(sum(v.sum() for v in trained.values()), A)[0]

    c = ng.Compile(strict=True)
    got = hyper(c)
    assert c.last_run.compiled_steps >= 5
    assert _rel(got, hyper(False)) <= 1e-12


def _linear_problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    w0 = {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
    A = torch.ones(16, dtype=torch.float64, requires_grad=True)

    def loss_fn(p, batch, a):
        xb, yb = batch
        return (a[: len(yb)] * (xb @ p["w"] - yb) ** 2).mean()

    return x, y, w0, A, loss_fn


@pytest.mark.slow
def test_replay_fingerprints_on_a_compiled_reverse_run():
    """A batch changed in place before backward: the compiled replay's fingerprint check raises, as eagerly."""
    x, y, w0, A, loss_fn = _linear_problem()
    data = [(x[i : i + 4].clone(), y[i : i + 4].clone()) for i in range(0, 16, 4)]
    c = ng.Compile(strict=True)
    trained = ng.train(loss_fn, w0, ng.optim.SGD(lr=0.1), data, steps=12, hparams=A, method=ng.Reverse(), compile=c)
    assert c.last_run.compiled_steps > 0
    data[2][0].add_(1.0)
    with pytest.raises(ng.ReplayError, match=r"returned a different batch for step"):
        torch.autograd.grad(trained["w"].sum(), A)


@pytest.mark.slow
def test_version_counters_on_a_compiled_reverse_run():
    x, y, w0, A, loss_fn = _linear_problem()
    c = ng.Compile(strict=True)
    trained = ng.train(loss_fn, w0, ng.optim.SGD(lr=0.1), [(x, y)], steps=12, hparams=A, method=ng.Reverse(), compile=c)
    assert c.last_run.compiled_steps > 0
    with torch.no_grad():
        A.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"was modified in place after nestgrad.train returned"):
        torch.autograd.grad(trained["w"].sum(), A)


@pytest.mark.slow
def test_path_diagnostics_on_a_compiled_run():
    """hparams cut from the loss (detach) raise DisconnectedError on the first step, which runs eagerly."""
    x, y, w0, A, loss_fn = _linear_problem()

    def cut(p, batch, a):
        return loss_fn(p, batch, a.detach())

    with pytest.raises(ng.DisconnectedError):
        ng.train(cut, w0, ng.optim.SGD(lr=0.1), [(x, y)], steps=4, hparams=A, compile=ng.Compile(strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"strict": "yes"}, TypeError, "strict must be True or False"),
        ({"mode": 3}, TypeError, "mode must be None or a torch.compile mode"),
        ({"mode": "fastest"}, ValueError, r"mode must be None or one of \[.*'reduce-overhead'"),
        ({"backend": 123}, TypeError, "backend must be a torch.compile backend name"),
        ({"dynamic": "x"}, TypeError, "dynamic must be None, True or False"),
    ],
)
def test_compile_settings_of_the_wrong_kind_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ng.Compile(**kwargs)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_train_compile_of_the_wrong_kind_raises_before_training(bad):
    calls = []

    def loss_fn(p, batch, h):
        calls.append(1)
        return (p["w"] ** 2).sum()

    with pytest.raises(TypeError, match=r"compile must be True, False or a nestgrad.Compile"):
        ng.train(loss_fn, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=0.1), [0], steps=2, compile=bad)
    assert not calls
