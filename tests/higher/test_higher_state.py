"""``fmodel.state_dict()`` / ``load_state_dict()`` hold the fast weights as ``higher``'s do (0.2.1: the reference)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad.higher as ours

try:
    import higher as real_higher
except ImportError:  # pragma: no cover - the reference is optional
    real_higher = None


@pytest.fixture(autouse=True)
def f64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def need_real_higher() -> None:
    if real_higher is None:
        pytest.skip("the reference package higher is not installed")


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # one weight under two names
        self.register_buffer("scratch", torch.ones(3), persistent=False)  # not in any state_dict

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x))) * self.scratch


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))


def batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)


def stepped(lib, model: nn.Module, steps: int = 2):
    """(fmodel, diffopt) after ``steps`` inner SGD steps."""
    x, y = batch()
    ctx = lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1))
    fmodel, diffopt = ctx.__enter__()
    for _ in range(steps):
        diffopt.step(F.mse_loss(fmodel(x), y))
    return fmodel, diffopt


def test_state_dict_after_inner_steps_holds_the_fast_weights_like_higher():
    need_real_higher()
    model = bn_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mine, _ = stepped(ours, model)
    ref, _ = stepped(real_higher, model)
    got, want = mine.state_dict(), ref.state_dict()
    assert list(got) == list(want)  # the weights and the buffers, in nn.Module's order
    assert "0.weight" in got and "1.running_mean" in got
    for k in want:
        assert torch.equal(got[k], want[k]), k  # DifferentiableSGD is bit-identical to higher's
        assert not got[k].requires_grad
    fast = dict(zip([n for n, _ in model.named_parameters()], mine.parameters(), strict=True))
    for k, v in fast.items():
        assert torch.equal(got[k], v) and not torch.equal(got[k], before[k])  # fast, not the model's
    assert int(got["1.num_batches_tracked"]) == 2  # the buffer copies, after two train-mode steps
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the model is untouched


def test_keep_vars_prefix_and_submodules_like_higher():
    need_real_higher()
    model = bn_mlp()
    mine, _ = stepped(ours, model)
    ref, _ = stepped(real_higher, model)
    kept = mine.state_dict(keep_vars=True)
    for (name, _), p in zip(model.named_parameters(), mine.parameters(), strict=True):
        assert kept[name] is p and p.grad_fn is not None  # the fast weights themselves, with their graph
    assert list(mine[0].state_dict()) == list(ref[0].state_dict()) == ["weight", "bias"]
    assert torch.equal(mine[3].state_dict()["weight"], ref[3].state_dict()["weight"])
    assert list(mine[1].state_dict(prefix="bn.")) == list(ref[1].state_dict(prefix="bn."))
    assert list(mine.parameters()) == list(mine.state_dict(keep_vars=True)[n] for n, _ in model.named_parameters())


def test_tied_weights_and_non_persistent_buffers_have_higher_keys():
    need_real_higher()
    torch.manual_seed(0)
    model = Tied()
    assert list(ours.monkeypatch(model).state_dict()) == list(real_higher.monkeypatch(model).state_dict())
    sd = ours.monkeypatch(model).state_dict(keep_vars=True)
    assert sd["a.weight"] is sd["b.weight"]


def test_load_state_dict_makes_the_values_current_and_steps_continue_like_higher():
    """Load the model's weights into a stepped fmodel, step again: equals higher doing the same."""
    need_real_higher()
    x, y = batch()
    model = bn_mlp()
    outs = []
    for lib in (ours, real_higher):
        fmodel, diffopt = stepped(lib, model)
        result = fmodel.load_state_dict(model.state_dict())
        assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
        fmodel.eval()
        torch.testing.assert_close(fmodel(x), model.eval()(x), rtol=0, atol=0)
        model.train()
        fmodel.train()
        diffopt.step(F.mse_loss(fmodel(x), y))
        outs.append([p.detach().clone() for p in fmodel.parameters()])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_checkpoint_round_trips_into_a_new_functional_model():
    x, _ = batch()
    model = bn_mlp()
    fmodel, _ = stepped(ours, model, steps=3)
    saved = {k: v.clone() for k, v in fmodel.state_dict().items()}
    fresh = ours.monkeypatch(model)
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh(x), fmodel(x), rtol=0, atol=0)
    assert all(p.requires_grad and p.grad_fn is None for p in fresh.parameters())  # detached leaves
    assert len(fresh._history) == 2  # a new version of the fast weights (parameters(time=1))


def test_strict_false_reports_missing_keys_like_higher_and_strict_raises():
    need_real_higher()
    torch.manual_seed(0)
    lin = nn.Linear(2, 2)
    mine, ref = ours.monkeypatch(lin), real_higher.monkeypatch(lin)
    partial = {"weight": torch.zeros(2, 2)}
    got, want = mine.load_state_dict(partial, strict=False), ref.load_state_dict(partial, strict=False)
    assert list(got.missing_keys) == list(want.missing_keys) == ["bias"]
    assert torch.equal(mine.weight, torch.zeros(2, 2)) and torch.equal(mine.bias, lin.bias.detach())
    with pytest.raises(RuntimeError, match=r"nestgrad.higher: FunctionalLinear.load_state_dict: missing keys"):
        mine.load_state_dict(partial)
    with pytest.raises(RuntimeError, match=r"unexpected keys \['extra'\]"):
        mine.load_state_dict({**lin.state_dict(), "extra": torch.zeros(1)})


def test_a_bad_load_loads_nothing():
    """A shape mismatch or tied weights given two values raise before anything is written
    (higher copies the keys it reached before it raises)."""
    torch.manual_seed(0)
    model = bn_mlp()
    fmodel = ours.monkeypatch(model)
    before = {k: v.clone() for k, v in fmodel.state_dict().items()}
    bad = {**{k: torch.zeros_like(v) for k, v in before.items()}, "3.weight": torch.zeros(2, 4)}
    with pytest.raises(RuntimeError, match=r"'3.weight' has shape \(2, 4\), but .* \(1, 4\).*Nothing was loaded"):
        fmodel.load_state_dict(bad)
    for k, v in fmodel.state_dict().items():
        assert torch.equal(v, before[k]), k
    tied = ours.monkeypatch(Tied())
    sd = {k: v.clone() for k, v in tied.state_dict().items()}
    sd["b.weight"] = sd["b.weight"] + 1
    with pytest.raises(RuntimeError, match=r"'a.weight' and 'b.weight' are one tied weight"):
        tied.load_state_dict(sd)


def test_assign_keeps_the_given_tensors_and_their_graph():
    torch.manual_seed(0)
    x, y = batch()
    lin = nn.Linear(3, 1)
    fmodel = ours.monkeypatch(lin)
    w = torch.randn(1, 3, requires_grad=True)
    fmodel.load_state_dict({"weight": w * 2, "bias": torch.zeros(1)}, assign=True)
    (g,) = torch.autograd.grad(F.mse_loss(fmodel(x), y), w)
    want = torch.func.grad(lambda w_: F.mse_loss(x @ (2 * w_).T, y))(w.detach())
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_no_fast_weights_yet_raises_clearly():
    fmodel = ours.patch.make_functional(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"nestgrad\.higher: this functional model has no fast weights yet"):
        fmodel.state_dict()


def test_a_submodule_view_loads_its_own_weights_and_buffers_like_higher():
    need_real_higher()
    x, _ = batch()
    outs = []
    for lib in (ours, real_higher):
        model = bn_mlp()
        fmodel = lib.monkeypatch(model, track_higher_grads=False)
        fmodel[3].load_state_dict({"weight": torch.ones(1, 4), "bias": torch.zeros(1)})
        fmodel[1].load_state_dict({**model[1].state_dict(), "running_mean": torch.full((4,), 3.0)})
        fmodel.eval()
        outs.append((fmodel(x), fmodel.state_dict()))
        assert torch.equal(model[1].running_mean, torch.zeros(4))  # the model's own buffer is untouched
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert list(outs[0][1]) == list(outs[1][1])
    for k in outs[1][1]:
        assert torch.equal(outs[0][1][k], outs[1][1][k]), k
