"""nestgrad.higher.patch and nestgrad.higher.utils: functional models with higher's semantics."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import nestgrad as ng
from nestgrad.higher import utils
from nestgrad.higher.patch import FunctionalModel, buffer_sync, make_functional, monkeypatch

LR = 0.1


@pytest.fixture
def f64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


class Tied(nn.Module):
    """One submodule under two names: the case where patching the module used to leave fast weights in it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))

    def encode(self, x: Tensor) -> Tensor:
        return self.a(x)


class Wrap(nn.Module):
    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)


def tied_seq() -> nn.Sequential:
    proj = nn.Linear(3, 3)
    return nn.Sequential(proj, nn.Tanh(), proj, nn.Sigmoid(), nn.Linear(3, 2))


def bn_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))


def snapshot(model: nn.Module) -> list[Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def sgd_unroll(
    model: nn.Module, loss: Callable[[Callable[..., Tensor]], Tensor], steps: int, final: Callable[..., Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Gradients of the final loss w.r.t. the initial weights: via monkeypatch, and by hand with functional_call.

    Also checks that the model holds its own weights (and RNNs their own weight cache) afterwards.
    """
    before = snapshot(model)
    fmodel = monkeypatch(model)
    for _ in range(steps):
        grads = torch.autograd.grad(loss(fmodel), fmodel.parameters(), create_graph=True)
        fmodel.update_params([p - LR * g for p, g in zip(fmodel.parameters(), grads)])
    ours = torch.autograd.grad(final(fmodel), fmodel.parameters(time=0))
    assert same(snapshot(model), before) and all(type(p) is nn.Parameter for p in model.parameters())
    if isinstance(model, nn.RNNBase):
        assert all(a is getattr(model, n) for a, n in zip(model._flat_weights, model._flat_weights_names))

    names = [n for n, _ in model.named_parameters()]
    start = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ps = start
    for _ in range(steps):
        run = lambda *a, ps=ps: functional_call(model, dict(zip(names, ps)), a, tie_weights=False)  # noqa: E731
        grads = torch.autograd.grad(loss(run), ps, create_graph=True)
        ps = [p - LR * g for p, g in zip(ps, grads)]
    ref = torch.autograd.grad(
        final(lambda *a: functional_call(model, dict(zip(names, ps)), a, tie_weights=False)), start
    )
    return list(ours), list(ref)


# ------------------------------------------------------------------ forward, params=, history
def test_forward_matches_module_and_leaves_it_alone(f64: None) -> None:
    model = bn_mlp().train()
    before = snapshot(model)
    fmodel = monkeypatch(model)
    x = torch.randn(5, 3)
    assert isinstance(fmodel, nn.Module) and isinstance(fmodel, FunctionalModel)
    torch.testing.assert_close(fmodel(x), model(x))
    assert same(snapshot(model)[:4], before[:4])  # weights: model(x) above moved only its own BN stats
    assert [n for n, _ in fmodel.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(f is not p and torch.equal(f, p) for f, p in zip(fmodel.parameters(), model.parameters()))
    assert all(p.requires_grad and p.grad_fn is None for p in fmodel.parameters())


def test_params_keyword_becomes_current(f64: None) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    fmodel = monkeypatch(model)
    names = [n for n, _ in model.named_parameters()]
    other = [torch.randn_like(p) for p in model.parameters()]
    x = torch.randn(5, 3)
    torch.testing.assert_close(fmodel(x, params=other), ng.call(model, dict(zip(names, other)), x))
    assert fmodel.fast_params == other and fmodel.parameters(time=1) == other
    assert len(fmodel.parameters(time=0)) == 4 and fmodel.parameters(time=0)[0] is not other[0]


def test_history_time_and_init_fast_params(f64: None) -> None:
    model = nn.Linear(3, 2)
    fmodel = monkeypatch(model)
    versions = [fmodel.fast_params]
    for k in range(3):
        versions.append([p + k for p in fmodel.parameters()])
        fmodel.fast_params = versions[-1]
    for k, v in enumerate(versions):
        assert fmodel.parameters(time=k) == v
    assert fmodel.parameters(time=-2) == versions[-2]
    assert fmodel.init_fast_params == versions[0]
    assert fmodel.weight is versions[-1][0] and fmodel.bias is versions[-1][1]
    with pytest.raises(IndexError, match="holds 4 versions"):
        fmodel.parameters(time=4)


def test_track_higher_grads_false_keeps_latest_only(f64: None) -> None:
    model = nn.Linear(3, 1)
    fmodel = monkeypatch(model, track_higher_grads=False)
    x = torch.randn(4, 3)
    for _ in range(2):
        grads = torch.autograd.grad(fmodel(x).pow(2).sum(), fmodel.parameters())
        fmodel.update_params([(p - LR * g).detach().requires_grad_() for p, g in zip(fmodel.parameters(), grads)])
    assert fmodel.parameters(time=0) == fmodel.fast_params == fmodel.parameters(time=-1)
    with pytest.raises(ValueError, match="track_higher_grads=True"):
        fmodel.parameters(time=1)
    with pytest.raises(RuntimeError, match="init_fast_params is not kept"):
        fmodel.init_fast_params  # noqa: B018
    with pytest.raises(ValueError, match="must be a bool"):
        fmodel.track_higher_grads = 1  # type: ignore[assignment]
    on = monkeypatch(model)
    on.update_params([p * 2 for p in on.parameters()])
    on.track_higher_grads = False  # drops the earlier versions
    assert len(on._history) == 1 and not on.track_higher_grads


def test_copy_initial_weights_false_reaches_model(f64: None) -> None:
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    fmodel = monkeypatch(model, copy_initial_weights=False)
    assert all(f is p for f, p in zip(fmodel.parameters(), model.parameters()))
    grads = torch.autograd.grad(fmodel(x).pow(2).sum(), fmodel.parameters(), create_graph=True)
    fmodel.update_params([p - LR * g for p, g in zip(fmodel.parameters(), grads)])
    fmodel(x).sum().backward()
    w, b = (t.detach().clone().requires_grad_() for t in (model.weight, model.bias))
    gw, gb = torch.autograd.grad((x @ w.T + b).pow(2).sum(), (w, b), create_graph=True)
    ref = torch.autograd.grad((x @ (w - LR * gw).T + (b - LR * gb)).sum(), (w, b))
    torch.testing.assert_close(model.weight.grad, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.bias.grad, ref[1], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ shared weights
@pytest.mark.parametrize("build", [Tied, tied_seq], ids=["same-submodule", "tied-linear-in-sequential"])
def test_shared_weights_unroll_matches_hand_written(f64: None, build: Callable[[], nn.Module]) -> None:
    model = build()
    before = snapshot(model)
    xs = [torch.randn(5, 3) for _ in range(4)]
    loss = lambda f, x=xs: sum(f(xi).pow(2).sum() for xi in x[:3])  # noqa: E731
    ours, ref = sgd_unroll(model, loss, steps=3, final=lambda f: f(xs[3]).pow(2).sum())
    assert len(ours) == len(list(model.parameters())) == 4  # the tied weight is one parameter
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert same(snapshot(model), before)
    assert all(type(p) is nn.Parameter for p in model.parameters())  # no fast weight left in the model


# ------------------------------------------------------------------ RNNs
RNN_SEQ = 4


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_rnn_unroll_matches_hand_written(f64: None, cls: type[nn.RNNBase]) -> None:
    rnn = cls(3, 4, num_layers=2)
    x, xq = torch.randn(RNN_SEQ, 2, 3), torch.randn(RNN_SEQ, 2, 3)
    torch.testing.assert_close(monkeypatch(rnn)(x)[0], rnn(x)[0])
    ours, ref = sgd_unroll(rnn, lambda f: f(x)[0][-1].pow(2).sum(), steps=2, final=lambda f: f(xq)[0].pow(2).sum())
    assert len(ours) == 8
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
def test_rnn_cell_unroll_matches_hand_written(f64: None, cls: type[nn.Module]) -> None:
    cell = cls(3, 4)
    xs = [torch.randn(2, 3) for _ in range(RNN_SEQ)]

    def run(f: Callable[..., object]) -> Tensor:
        state = None
        for x in xs:
            state = f(x, state)
        return (state[0] if isinstance(state, tuple) else state).pow(2).sum()

    ours, ref = sgd_unroll(cell, run, steps=2, final=run)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ submodules, methods, modes
def test_submodule_views_run_with_fast_weights(f64: None) -> None:
    model = Wrap(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    fmodel = monkeypatch(model)
    fmodel.update_params([p * 3 for p in fmodel.parameters()])
    x = torch.randn(5, 3)
    torch.testing.assert_close(fmodel.f(x), fmodel(x))
    first = fmodel.f[0]
    assert first.weight is fmodel.fast_params[0] and first.parameters() == fmodel.fast_params[:2]
    torch.testing.assert_close(first(x), x @ first.weight.T + first.bias)
    assert [type(v).__name__ for v in fmodel.f] == ["FunctionalSubmodule"] * 3 and len(fmodel.f) == 3
    assert [n for n, _ in fmodel.f.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    new = torch.zeros(4, 3)
    fmodel.f[0].weight = new  # a new version of the fast weights
    assert fmodel.fast_params[0] is new and len(fmodel._history) == 3
    assert model.f[0].weight is not new and torch.count_nonzero(model.f[0].weight) > 0
    with pytest.raises(TypeError, match="slice"):
        fmodel.f[0:2]
    with pytest.raises(TypeError, match="takes a Tensor"):
        fmodel.f[0].weight = 1.0


def test_module_methods_run_with_fast_weights(f64: None) -> None:
    model = Tied()
    fmodel = monkeypatch(model)
    fmodel.update_params([p * 2 for p in fmodel.parameters()])
    x = torch.randn(5, 3)
    torch.testing.assert_close(fmodel.encode(x), x @ fmodel.a.weight.T + fmodel.a.bias)
    assert fmodel.b is not fmodel.a and fmodel.b.weight is fmodel.a.weight  # two views, one weight


def test_modes_are_fmodels_own_as_in_higher(f64: None) -> None:
    model = bn_mlp().train()
    model[1].eval()
    fmodel = monkeypatch(model)
    assert fmodel.training and not fmodel[1].training  # each flag taken from the model at creation
    x = torch.randn(6, 3)
    torch.testing.assert_close(fmodel(x), model(x))
    model.eval()  # after creation: fmodel keeps its own mode
    assert fmodel.training
    model.train()
    fmodel.eval()
    assert model.training and model[1].training and not fmodel[1].training
    expect = ng.call(model.eval(), {**dict(fmodel.named_parameters()), **dict(fmodel.named_buffers())}, x)
    model.train()
    torch.testing.assert_close(fmodel(x), expect)
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="expects a bool"):
        fmodel.train("no")  # type: ignore[arg-type]


# ------------------------------------------------------------------ buffers
def test_buffers_are_copies_and_buffer_sync_resets_them(f64: None) -> None:
    model = bn_mlp().train()
    before = snapshot(model)
    fmodel = monkeypatch(model)
    for _ in range(3):
        fmodel(torch.randn(6, 3))
    assert same(snapshot(model), before)
    stats = dict(fmodel.named_buffers())
    assert stats["1.num_batches_tracked"].item() == 3 and stats.keys() == dict(model.named_buffers()).keys()
    buffer_sync(model, fmodel)
    assert all(torch.equal(b, m) and b is not m for b, m in zip(fmodel.buffers(), model.buffers()))
    buffer_sync(model[1], fmodel[1])  # a submodule and its view
    with pytest.raises(KeyError, match="does not have"):
        buffer_sync(nn.BatchNorm1d(4), fmodel)
    with pytest.raises(TypeError, match="functional model"):
        buffer_sync(model, model)  # type: ignore[arg-type]


def test_make_functional_needs_params_until_given(f64: None) -> None:
    model = bn_mlp().eval()
    seen = []
    fmodel = make_functional(model, encapsulator=lambda f, m: seen.append((f, m)))
    assert seen == [(fmodel, model)] and fmodel.fast_params is None
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="no fast weights yet"):
        fmodel(x)
    params = utils.get_func_params(model)
    torch.testing.assert_close(fmodel(x, params=params), model(x))
    assert fmodel.fast_params == params and fmodel.buffers() == []
    buffer_sync(model, fmodel)
    assert len(fmodel.buffers()) == 3
    with pytest.raises(TypeError, match="already a functional model"):
        make_functional(fmodel)


# ------------------------------------------------------------------ nesting
def test_monkeypatch_of_a_functional_model_nests(f64: None) -> None:
    model = bn_mlp().train()
    outer = monkeypatch(model, copy_initial_weights=False)
    x = torch.randn(6, 3)
    outer.update_params([p * 1.5 for p in outer.parameters()])
    outer[1].eval()
    inner = monkeypatch(outer, copy_initial_weights=False)
    assert inner.fast_params == outer.fast_params and not inner[1].training and inner.training
    assert all(a is not b and torch.equal(a, b) for a, b in zip(inner.buffers(), outer.buffers()))
    inner(x).sum().backward()
    assert model[0].weight.grad is not None  # through both functional models
    detached = monkeypatch(outer)
    assert all(p.grad_fn is None and p.requires_grad for p in detached.parameters())
    sub = monkeypatch(outer[0])  # a submodule view: its own fast weights
    torch.testing.assert_close(sub(x), outer[0](x))


# ------------------------------------------------------------------ misuse
def test_misuse_is_loud(f64: None) -> None:
    model = nn.Linear(3, 2)
    fmodel = monkeypatch(model)
    with pytest.raises(ValueError, match="expected a list of 2 Tensors"):
        fmodel.update_params([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"shape \(3, 2\), but the model's has shape \(2, 3\)"):
        fmodel.update_params([torch.zeros(3, 2), torch.zeros(2)])
    with pytest.raises(TypeError, match="list of Tensors"):
        fmodel.update_params(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        monkeypatch(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        make_functional("model")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="device="):
        fmodel.double()
    with pytest.raises(TypeError, match="not subscriptable"):
        fmodel[0]
    model.extra = nn.Parameter(torch.zeros(1))
    with pytest.raises(RuntimeError, match="has 3 parameters now"):
        fmodel(torch.randn(1, 3))


# ------------------------------------------------------------------ utils
def test_utils_helpers() -> None:
    a, b = torch.randn(2, requires_grad=True), torch.randn(3)
    nested = {"x": [a, (b, 1)], "y": {"z": {2.0}}}
    assert utils.flatten(nested) == [a, b, 1, 2.0]
    doubled = utils._recursive_map(OrderedDict(nested), lambda t: t * 2 if isinstance(t, Tensor) else t)
    assert type(doubled) is OrderedDict and isinstance(doubled["x"][1], tuple)
    torch.testing.assert_close(doubled["x"][0], a * 2)
    copied = utils._recursive_copy_and_cast(nested, None)
    c = copied["x"][0]
    assert c is not a and c.requires_grad and c.grad_fn is None and torch.equal(c, a) and copied["y"] == {"z": {2.0}}
    assert utils._is_container([]) and utils._is_container({}) and not utils._is_container(a)
    assert utils._find_param_in_list(b, [a, b]) == 1 and utils._find_param_in_list(b.clone(), [a, b]) is None
    shared = tied_seq()
    seen: list[Tensor] = []
    assert utils._get_param_mapping(shared, seen, []) == [0, 1, 0, 1, 2, 3]
    assert len(seen) == 4 and seen[0] is shared[0].weight
    for safe in (True, False):
        p = utils.get_func_params(shared, safe_copy=safe)
        assert all(q.requires_grad and q.grad_fn is None and torch.equal(q, r) for q, r in zip(p, shared.parameters()))
        assert (p[0].data_ptr() == shared[0].weight.data_ptr()) is not safe
    assert utils._copy_tensor(b, True).requires_grad is False
    with pytest.raises(TypeError, match=r"nn\.Module"):
        utils.get_func_params([a])  # type: ignore[arg-type]
