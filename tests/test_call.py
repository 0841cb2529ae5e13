"""``nestgrad.call``: run any ``nn.Module`` with the weights you give it."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel

import nestgrad as ng

Params = dict[str, Tensor]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )  # fmt: skip


def perturbed(module: nn.Module, scale: float = 0.3, seed: int = 1) -> Params:
    """New tensors for every parameter of ``module``, visibly different from its own."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach() + scale * torch.randn(v.shape, generator=g) for k, v in module.named_parameters()}


def loaded(module: nn.Module, tensors: Params) -> nn.Module:
    """A deep copy of ``module`` whose tensors named in ``tensors`` hold those values."""
    out = copy.deepcopy(module)
    _, unexpected = out.load_state_dict(tensors, strict=False)
    assert not unexpected
    return out


def snapshot(module: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Every parameter and buffer: the object itself and a copy of its value."""
    items = [*module.named_parameters(), *module.named_buffers()]
    return {k: (v, v.detach().clone()) for k, v in items}


def assert_untouched(module: nn.Module, before: dict[str, tuple[Tensor, Tensor]]) -> None:
    after = dict([*module.named_parameters(), *module.named_buffers()])
    assert after.keys() == before.keys()
    for k, (obj, value) in before.items():
        assert after[k] is obj, f"{k} was replaced"
        assert torch.equal(obj, value), f"{k} changed value"
        assert obj.grad is None, f"{k} received a gradient"


# ---------------------------------------------------------------------- MLP
def test_mlp_own_params_match_module() -> None:
    model = mlp()
    x = torch.randn(5, 4)
    out = ng.call(model, dict(model.named_parameters()), x)
    assert torch.equal(out, model(x))


def test_mlp_other_params_match_a_module_holding_them() -> None:
    model = mlp()
    x = torch.randn(5, 4)
    before = snapshot(model)
    params = perturbed(model)
    out = ng.call(model, params, x)
    assert not torch.allclose(out, model(x))
    torch.testing.assert_close(out, loaded(model, params)(x), rtol=0, atol=0)
    assert_untouched(model, before)


def test_mlp_gradients_flow_to_passed_params(float64: None) -> None:
    model = mlp().double()
    x = torch.randn(5, 4)
    names = [k for k, _ in model.named_parameters()]
    leaves = [v.detach().clone().requires_grad_() for v in perturbed(model).values()]

    def f(*ps: Tensor) -> Tensor:
        return ng.call(model, dict(zip(names, ps)), x)

    before = snapshot(model)
    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-7)
    assert_untouched(model, before)


def test_grads_equal_module_grads_for_the_same_values() -> None:
    model = mlp()
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    ours = torch.autograd.grad(((ng.call(model, params, x) - y) ** 2).sum(), list(params.values()))
    ((model(x) - y) ** 2).sum().backward()
    for (k, p), g in zip(model.named_parameters(), ours):
        assert p.grad is not None and g.abs().sum() > 0
        assert torch.equal(g, p.grad), k


def test_call_is_differentiable_twice() -> None:
    """Hessian-vector products through call: what train needs for hypergradients."""
    model = mlp()
    x = torch.randn(5, 4)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    loss = ng.call(model, params, x).pow(2).sum()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    hvp = torch.autograd.grad(sum(g.sum() for g in grads), list(params.values()))
    assert all(torch.isfinite(h).all() for h in hvp)
    assert any(h.abs().sum() > 0 for h in hvp)


# ---------------------------------------------------------- BatchNorm CNN
def test_batchnorm_train_mode_never_writes_module_buffers() -> None:
    """Unlike module(x), the module's own running statistics stay as they were: they run on a throwaway copy."""
    model = cnn().train()
    x = torch.randn(6, 3, 6, 6)
    params = perturbed(model)
    reference = loaded(model, params)
    before = snapshot(model)
    out = ng.call(model, params, x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)  # batch statistics, as module(x)
    assert_untouched(model, before)
    assert dict(reference.named_buffers())["1.num_batches_tracked"].item() == 1
    # Passing the module's own buffers is the same as not passing them: they are not written.
    own = {**params, **dict(model.named_buffers())}
    torch.testing.assert_close(ng.call(model, own, x), out, rtol=0, atol=0)
    assert_untouched(model, before)


def test_batchnorm_train_mode_updates_passed_buffers_not_module_buffers() -> None:
    model = cnn().train()
    x = torch.randn(6, 3, 6, 6)
    before = snapshot(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    passed = {k: v for k, v in buffers.items()}
    params = perturbed(model)
    out = ng.call(model, {**params, **buffers}, x)
    reference = loaded(model, params)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    assert_untouched(model, before)
    for k, v in reference.named_buffers():
        assert buffers[k] is passed[k]  # the caller's dict keeps its tensors, updated in place
        torch.testing.assert_close(buffers[k], v, rtol=0, atol=0, msg=k)
    assert buffers["1.num_batches_tracked"].item() == 1


def test_batchnorm_eval_mode_uses_running_stats() -> None:
    model = cnn().train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(6, 3, 6, 6) * 2 + 1)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    before = snapshot(model)
    out = ng.call(model, dict(model.named_parameters()), x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    # One example through eval-mode BatchNorm equals the batch: no batch statistics are used.
    torch.testing.assert_close(ng.call(model, dict(model.named_parameters()), x[:1]), out[:1])
    assert_untouched(model, before)

    # Running statistics passed in are read, not the module's own.
    stats = {"1.running_mean": torch.randn(4), "1.running_var": torch.rand(4) + 0.5}
    out2 = ng.call(model, stats, x)
    assert not torch.allclose(out2, out)
    torch.testing.assert_close(out2, loaded(model, stats)(x), rtol=0, atol=0)
    assert_untouched(model, before)


def test_cnn_gradients_match_module_grads() -> None:
    model = cnn().train()
    x = torch.randn(6, 3, 6, 6)
    reference = copy.deepcopy(model)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    ours = torch.autograd.grad(ng.call(model, params, x).pow(2).sum(), list(params.values()))
    reference(x).pow(2).sum().backward()
    for (k, p), g in zip(reference.named_parameters(), ours):
        assert p.grad is not None
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0, msg=k)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------- Hugging Face models
def tiny_bert(attn_implementation: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=50,
        max_position_embeddings=16, attn_implementation=attn_implementation,
    )  # fmt: skip
    model = BertModel(config).eval()
    assert model.config._attn_implementation == (attn_implementation or "sdpa")
    return model


def bert_inputs() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    return {"input_ids": torch.randint(0, 50, (2, 7), generator=g), "attention_mask": mask}


def test_hf_hidden_states_equal_module_outputs() -> None:
    model = tiny_bert()
    inputs = bert_inputs()
    before = snapshot(model)
    out = ng.call(model, dict(model.named_parameters()), **inputs, output_hidden_states=True)
    ref = model(**inputs, output_hidden_states=True)
    assert out.hidden_states is not None
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=0)
    assert_untouched(model, before)


def test_hf_hidden_states_follow_passed_params() -> None:
    model = tiny_bert()
    inputs = bert_inputs()
    before = snapshot(model)
    params = perturbed(model, scale=0.05)
    base = model(**inputs, output_hidden_states=True).hidden_states
    out = ng.call(model, params, **inputs, output_hidden_states=True).hidden_states
    expected = loaded(model, params)(**inputs, output_hidden_states=True).hidden_states
    assert len(out) == len(expected) == model.config.num_hidden_layers + 1
    for ours, unperturbed, theirs in zip(out, base, expected, strict=True):
        assert not torch.allclose(ours, unperturbed)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert_untouched(model, before)


def test_hf_attentions_follow_passed_params() -> None:
    model = tiny_bert("eager")  # SDPA attention does not return attention weights
    inputs = bert_inputs()
    before = snapshot(model)
    params = perturbed(model, scale=0.05)
    base = model(**inputs, output_attentions=True).attentions
    own = ng.call(model, dict(model.named_parameters()), **inputs, output_attentions=True).attentions
    out = ng.call(model, params, **inputs, output_attentions=True).attentions
    expected = loaded(model, params)(**inputs, output_attentions=True).attentions
    n = model.config.num_hidden_layers
    assert len(base) == len(own) == len(out) == len(expected) == n
    for ours_own, ours, unperturbed, theirs in zip(own, out, base, expected, strict=True):
        assert ours.shape == (2, 2, 7, 7)
        torch.testing.assert_close(ours_own, unperturbed, rtol=0, atol=0)
        assert not torch.allclose(ours, unperturbed)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert_untouched(model, before)


def test_hf_gradients_match_module_grads() -> None:
    model = tiny_bert()
    inputs = bert_inputs()
    reference = copy.deepcopy(model)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}

    def loss(out: object) -> Tensor:
        return sum(h.pow(2).mean() for h in out.hidden_states) + out.pooler_output.sum()  # type: ignore[attr-defined]

    ours = torch.autograd.grad(
        loss(ng.call(model, params, **inputs, output_hidden_states=True)), list(params.values()), allow_unused=True
    )
    loss(reference(**inputs, output_hidden_states=True)).backward()
    for (k, p), g in zip(reference.named_parameters(), ours, strict=True):
        assert (g is None) == (p.grad is None), k
        if g is not None:
            torch.testing.assert_close(g, p.grad, rtol=0, atol=0, msg=k)
    assert all(g is not None for g in ours)  # the loss uses every weight, the pooler included
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------- partial dicts
def test_partial_dict_falls_back_to_module_tensors() -> None:
    model = mlp()
    x = torch.randn(5, 4)
    before = snapshot(model)
    new_weight = torch.randn(8, 4)
    out = ng.call(model, {"0.weight": new_weight}, x)
    expected = torch.tanh(x @ new_weight.T + model[0].bias) @ model[2].weight.T + model[2].bias
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, loaded(model, {"0.weight": new_weight})(x), rtol=0, atol=0)
    assert not torch.allclose(out, model(x))
    assert torch.equal(ng.call(model, {}, x), model(x))
    assert_untouched(model, before)


def test_partial_dict_gradient_goes_to_passed_tensor_not_the_replaced_one() -> None:
    model = mlp()
    x = torch.randn(5, 4)
    w = model[2].weight.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(ng.call(model, {"2.weight": w}, x).sum(), [w])
    ng.call(model, {"2.weight": w}, x).sum().backward()
    assert torch.equal(w.grad, g)
    # The module's own tensors took part in the forward pass, so autograd reaches them too;
    # the passed tensor is never written into the module.
    assert model[2].weight.grad is None
    assert model[0].weight.grad is not None
    assert model[2].weight is not w


# ---------------------------------------------------------------- errors
def test_unknown_names_raise_key_error_listing_them() -> None:
    model = mlp()
    x = torch.randn(5, 4)
    bad = {"0.weight": model[0].weight, "0.wieght": torch.zeros(8, 4), "head.bias": torch.zeros(3)}
    with pytest.raises(KeyError) as info:
        ng.call(model, bad, x)
    message = str(info.value)
    assert "0.wieght" in message and "head.bias" in message
    assert "named_parameters" in message


def test_unknown_names_raise_after_a_successful_call() -> None:
    """The name cache must not let unknown names through."""
    model = mlp()
    x = torch.randn(5, 4)
    ng.call(model, dict(model.named_parameters()), x)
    with pytest.raises(KeyError, match="nope"):
        ng.call(model, {"nope": torch.zeros(1)}, x)
    with pytest.raises(KeyError, match="nope"):
        ng.call(model, {"0.weight": model[0].weight, "nope": torch.zeros(1)}, x)


@pytest.mark.parametrize(
    ("new_head", "stale"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 2)), {"1.weight": torch.zeros(2, 4), "1.bias": torch.zeros(2)}),
        (lambda: nn.Linear(4, 2, bias=False), {"1.bias": torch.full((2,), 100.0)}),
    ],
    ids=["head-wrapped", "bias-removed"],
)
def test_unknown_names_raise_after_the_module_changes(new_head: Callable[[], nn.Module], stale: Params) -> None:
    """Replacing a submodule after a call: names that no longer exist must be reported."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    fresh = copy.deepcopy(model)
    fresh[1] = new_head()
    with pytest.raises(KeyError, match=r"1\.(weight|bias)"):  # a module never called before
        ng.call(fresh, stale, x)

    ng.call(model, dict(model.named_parameters()), x)
    model[1] = new_head()
    with pytest.raises(KeyError, match=r"1\.(weight|bias)"):
        ng.call(model, stale, x)


@pytest.mark.parametrize(
    ("params", "hint"),
    [
        (lambda m: m.parameters(), "named_parameters"),
        (lambda m: list(m.parameters()), "named_parameters"),
        (lambda m: m, r"dict\(module\.named_parameters\(\)\)"),
        (lambda m: {"0.weight": 1.0}, "'0.weight'"),
        (lambda m: {0: m[0].weight}, "entry 0"),
    ],
    ids=["generator", "list", "module", "non-tensor value", "non-string key"],
)
def test_non_dict_params_raise_type_error(params: Callable[[nn.Module], object], hint: str) -> None:
    model = mlp()
    x = torch.randn(5, 4)
    with pytest.raises(TypeError, match=hint) as info:
        ng.call(model, params(model), x)  # type: ignore[arg-type]
    assert "nestgrad.call" in str(info.value)


def test_swapped_arguments_raise_type_error() -> None:
    model = mlp()
    with pytest.raises(TypeError, match=r"call\(module, params"):
        ng.call(dict(model.named_parameters()), model, torch.randn(5, 4))  # type: ignore[arg-type]


# ----------------------------------------------------------- tied weights
class Tied(nn.Module):
    """An embedding and an output layer that share one Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(ids)))


def test_tied_weights_use_the_passed_tensor_everywhere() -> None:
    torch.manual_seed(0)
    model = Tied()
    ids = torch.tensor([1, 2, 3, 7])
    assert list(dict(model.named_parameters())) == ["emb.weight"]
    before = snapshot(model)
    w = torch.randn(10, 4)
    expected = torch.tanh(w[ids]) @ w.T
    for params in ({"emb.weight": w}, {"out.weight": w}, {"emb.weight": w, "out.weight": w}):
        torch.testing.assert_close(ng.call(model, params, ids), expected)
    torch.testing.assert_close(ng.call(model, {"emb.weight": w}, ids), loaded(model, {"emb.weight": w})(ids))
    assert_untouched(model, before)


def test_tied_weights_gradient_sums_both_uses() -> None:
    torch.manual_seed(0)
    model = Tied()
    ids = torch.tensor([1, 2, 3, 7])
    w = torch.randn(10, 4, requires_grad=True)
    (g,) = torch.autograd.grad(ng.call(model, {"emb.weight": w}, ids).pow(2).sum(), [w])
    w2 = w.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad((torch.tanh(w2[ids]) @ w2.T).pow(2).sum(), [w2])
    torch.testing.assert_close(g, expected)
    # Rows never looked up still get a gradient from the output layer: both uses count.
    assert g[0].abs().sum() > 0


def test_tied_weights_with_conflicting_values_raise() -> None:
    model = Tied()
    w = torch.randn(10, 4)
    with pytest.raises(ValueError, match="tied"):
        ng.call(model, {"emb.weight": w, "out.weight": w + 1}, torch.tensor([1]))


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_rnn_weight_cache_is_restored_and_gradients_flow(cls: type[nn.RNNBase]):
    """RNNs keep their weights in ``_flat_weights``; after a call it must hold the module's own again."""
    torch.manual_seed(0)
    rnn = cls(3, 4, num_layers=2).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    own = list(rnn._flat_weights)
    fast = {k: (v * 1.5).detach().requires_grad_() for k, v in rnn.named_parameters()}
    out = ng.call(rnn, fast, x)[0]
    assert all(a is b for a, b in zip(rnn._flat_weights, own, strict=True))
    # The output is the one with the given weights, and gradients reach them.
    with torch.no_grad():
        copy = cls(3, 4, num_layers=2).double()
        for k, v in fast.items():
            getattr(copy, k).copy_(v)
    torch.testing.assert_close(out, copy(x)[0])
    grads = torch.autograd.grad(out.sum(), list(fast.values()))
    assert all(g.abs().sum() > 0 for g in grads)
