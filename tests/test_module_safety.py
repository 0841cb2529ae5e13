"""The user's module is never changed, and buffers follow one rule.

After any nestgrad call (``ng.call``, ``ng.train`` with every method and its backward pass,
``nestgrad.higher.innerloop_ctx``), also when ``loss_fn`` or ``forward`` raises, the module's
parameters and buffers (the objects and their values), train/eval modes and hooks are as before.

Buffers: a training run advances its copies of the running statistics once per training step, as
ordinary training does; the replays of a backward pass never advance them. Buffers passed in
``params`` come back trained under their names; the module's own are never written.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import nestgrad as ng
import nestgrad.higher as higher

Params = dict[str, Tensor]


# ------------------------------------------------------------------ snapshots
@dataclass
class ModuleState:
    """Everything about a module that nestgrad must leave as it found it."""

    slots: list[tuple[str, str, Tensor | None]]  # (module path, attribute, the object in the slot)
    values: list[Tensor | None]
    grads: list[Tensor | None]
    modes: list[bool]
    hooks: list[tuple[str, list[Any]]]


_HOOKS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_load_state_dict_pre_hooks",
)  # fmt: skip


def state_of(module: nn.Module) -> ModuleState:
    slots: list[tuple[str, str, Tensor | None]] = []
    for path, m in module.named_modules(remove_duplicate=False):
        slots += [(path, f"p:{k}", v) for k, v in m._parameters.items()]
        slots += [(path, f"b:{k}", v) for k, v in m._buffers.items()]
    return ModuleState(
        slots=slots,
        values=[None if t is None else t.detach().clone() for _, _, t in slots],
        grads=[None if t is None or t.grad is None else t.grad.clone() for _, _, t in slots],
        modes=[m.training for m in module.modules()],
        hooks=[(path, [list(getattr(m, h, {}).items()) for h in _HOOKS]) for path, m in module.named_modules()],
    )


def assert_same_state(module: nn.Module, before: ModuleState) -> None:
    after = state_of(module)
    assert [(p, a) for p, a, _ in after.slots] == [(p, a) for p, a, _ in before.slots]
    for (path, attr, old), (_, _, new), value in zip(before.slots, after.slots, before.values, strict=True):
        where = f"{path or '<root>'}.{attr[2:]}"
        assert new is old, f"{where} was replaced by another tensor"
        if value is not None:
            assert new is not None and torch.equal(new, value), f"{where} changed value"
    for (path, attr, t), grad in zip(before.slots, before.grads, strict=True):
        now = None if t is None else t.grad
        assert (now is None) == (grad is None), f"{path}.{attr[2:]}.grad changed"
    assert after.modes == before.modes, "train/eval modes changed"
    assert after.hooks == before.hooks, "hooks changed"


@contextmanager
def unchanged(module: nn.Module) -> Iterator[None]:
    before = state_of(module)
    yield
    assert_same_state(module, before)


# --------------------------------------------------------------------- models
class TiedSubmodule(nn.Module):
    """One Linear registered under two names: ``named_parameters`` lists it once, the module twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TiedParameter(nn.Module):
    """An embedding and an output layer that share one Parameter (an LM head tied to its embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(x))).mean(1)[:, :3]


def batchnorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).train()


class GPT2Head(nn.Module):
    """A tiny GPT-2 LM (lm_head tied to wte), built from a config with random weights."""

    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(
            n_embd=8, n_layer=1, n_head=2, vocab_size=10, n_positions=8, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        self.lm = GPT2LMHeadModel(config)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(ids).logits.mean(1)[:, :3]


class BertHead(nn.Module):
    """A tiny BERT (it has buffers: position_ids, token_type_ids) with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=10,
            max_position_embeddings=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.bert = BertModel(config)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.bert(ids).pooler_output)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "tied-submodule": TiedSubmodule,
    "tied-parameter": TiedParameter,
    "batchnorm": batchnorm_mlp,
    "gpt2": GPT2Head,
    "bert": BertHead,
}


def build(name: str) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """The model (with a forward hook, to check it survives) and five (x, y) batches."""
    torch.manual_seed(0)
    model = MODELS[name]()
    model.register_forward_hook(lambda m, i, o: None)
    g = torch.Generator().manual_seed(1)
    tokens = name in ("tied-parameter", "gpt2", "bert")
    inputs = [torch.randint(0, 10, (6, 5), generator=g) if tokens else torch.randn(6, 4, generator=g) for _ in range(5)]
    return model, [(x, torch.randn(6, 3, generator=g)) for x in inputs]


def loss_of(model: nn.Module) -> Callable[[Params, tuple[Tensor, Tensor], Tensor], Tensor]:
    def loss_fn(p: Params, batch: tuple[Tensor, Tensor], h: Tensor) -> Tensor:
        x, y = batch
        return h * F.mse_loss(ng.call(model, p, x), y)

    return loss_fn


METHODS: dict[str, Callable[[], ng.Method]] = {
    "Unroll": ng.Unroll,
    "Reverse": ng.Reverse,
    "Reverse-checkpointed": lambda: ng.Reverse(checkpoint_every=2),
    "Reverse-binomial": lambda: ng.Reverse(checkpoints=2),
    "Forward": ng.Forward,
    "Implicit": lambda: ng.Implicit(ng.CG(max_steps=3)),
    "FiniteDiff": ng.FiniteDiff,
    "ZerothOrder": lambda: ng.ZerothOrder(samples=2, sigma=0.1, seed=0),
}


def sgd() -> ng.optim.SGD:
    return ng.optim.SGD(lr=0.1)


def one() -> Tensor:
    """A hyperparameter (the loss's scale) to differentiate with respect to."""
    return torch.tensor(1.0, requires_grad=True)


def quietly(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and discarded-buffer warnings are tested elsewhere
        return fn()


# ------------------------------------------------------------------- ng.call
@pytest.mark.parametrize("name", MODELS)
def test_call_leaves_the_module_as_it_was(name: str) -> None:
    model, batches = build(name)
    x = batches[0][0]
    params = {k: v.detach() + 0.1 for k, v in model.named_parameters()}
    with unchanged(model):
        ng.call(model, params, x)
        ng.call(model, {}, x)
        ng.call(model, {**dict(model.named_parameters()), **dict(model.named_buffers())}, x)
    reference = copy.deepcopy(model)  # deepcopy works: the module holds only leaves
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt], ids=["exception", "KeyboardInterrupt"])
@pytest.mark.parametrize("name", MODELS)
def test_call_restores_the_module_when_forward_raises(name: str, error: type[BaseException]) -> None:
    model, batches = build(name)
    armed = [False]

    def hook(m: nn.Module, inputs: Any, output: Any) -> None:
        if armed[0]:
            raise error("from inside forward")

    last = list(model.modules())[-1]  # a submodule that runs late, after every tensor was swapped in
    last.register_forward_hook(hook)
    params = {k: v.detach() + 0.1 for k, v in model.named_parameters()}
    with unchanged(model):
        armed[0] = True
        with pytest.raises(error):
            ng.call(model, params, batches[0][0])
        armed[0] = False


def test_tied_submodule_keeps_its_weights_and_maml_reaches_them() -> None:
    """pytorch#164759: functional_call's tying left the module holding the fast weights."""
    model, batches = build("tied-submodule")
    x, y = batches[0]
    expected = model(x).detach()
    fast = {k: v.detach() + 1.0 for k, v in model.named_parameters()}
    ng.call(model, fast, x)
    assert all(p.is_leaf and isinstance(p, nn.Parameter) for p in model.parameters())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # a second inner loop works too
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(F.mse_loss(fmodel(x), y))
            F.mse_loss(fmodel(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_tied_submodule_alias_names_are_one_tensor() -> None:
    model, batches = build("tied-submodule")
    x = batches[0][0]
    fast = {k: v.detach() + 1.0 for k, v in model.named_parameters()}
    aliased = {k.replace("a.", "b.", 1): v for k, v in fast.items()}  # the same weights under the other name
    torch.testing.assert_close(ng.call(model, aliased, x), ng.call(model, fast, x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'a\.weight', 'b\.weight'.*one tensor"):
        ng.call(model, {"a.weight": fast["a.weight"], "b.weight": fast["a.weight"] + 1}, x)


@pytest.mark.parametrize(
    ("name", "bad", "expected"),
    [("0.weight", (6, 5), (6, 4)), ("1.running_mean", (5,), (6,))],
    ids=["parameter", "buffer"],
)
def test_wrong_shape_names_the_tensor_and_both_shapes(
    name: str, bad: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    model, batches = build("batchnorm")
    kind = "buffer" if "running" in name else "parameter"
    with unchanged(model), pytest.raises(ValueError) as info:
        ng.call(model, {name: torch.zeros(bad)}, batches[0][0])
    message = str(info.value)
    assert f"params[{name!r}] has shape {bad}" in message
    assert f"{kind} {name!r} has shape {expected}" in message


# ------------------------------------------------------------------ ng.train
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_train_and_backward_leave_the_module_as_it_was(name: str, method: str) -> None:
    model, batches = build(name)
    loss_fn = loss_of(model)
    h = torch.tensor(1.0, requires_grad=True)
    with unchanged(model):
        for params in (
            dict(model.named_parameters()),
            {**dict(model.named_parameters()), **dict(model.named_buffers())},
        ):
            trained = quietly(
                lambda p=params: ng.train(loss_fn, p, sgd(), batches, steps=3, hparams=h, method=METHODS[method]())
            )  # fmt: skip
            val = loss_fn({k: trained[k] for k, _ in model.named_parameters()}, batches[0], torch.tensor(1.0))
            quietly(lambda v=val: torch.autograd.grad(v, h))


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt], ids=["exception", "KeyboardInterrupt"])
@pytest.mark.parametrize("method", ["Unroll", "Reverse", "ZerothOrder"])
@pytest.mark.parametrize("name", ["tied-submodule", "batchnorm", "gpt2"])
def test_train_leaves_the_module_as_it_was_when_loss_fn_raises(
    name: str, method: str, error: type[BaseException]
) -> None:
    model, batches = build(name)
    inner = loss_of(model)

    def loss_fn(p: Params, batch: tuple[Tensor, Tensor], h: Tensor) -> Tensor:
        if batch is batches[2]:
            raise error("from inside loss_fn")
        return inner(p, batch, h)

    h = torch.tensor(1.0, requires_grad=True)
    with unchanged(model), pytest.raises(error):
        ng.train(loss_fn, dict(model.named_parameters()), sgd(), batches, steps=4, hparams=h, method=METHODS[method]())


@pytest.mark.parametrize("method", METHODS)
def test_loss_fn_writing_its_params_in_place_raises_and_never_reaches_the_callers_tensors(method: str) -> None:
    model, batches = build("tied-submodule")
    inner = loss_of(model)

    def under_no_grad(p: Params, batch: tuple[Tensor, Tensor], h: Tensor) -> Tensor:
        with torch.no_grad():
            p["head.weight"].mul_(0.5)
        return inner(p, batch, h)

    def with_grad(p: Params, batch: tuple[Tensor, Tensor], h: Tensor) -> Tensor:
        p["head.weight"].add_(1.0)  # on a leaf: torch's own error, which nestgrad explains
        return inner(p, batch, h)

    h = torch.tensor(1.0, requires_grad=True)
    head = r"params\['head.weight'\]"
    for loss_fn, what in [(under_no_grad, head), (with_grad, rf"(one of the params|{head})")]:
        with unchanged(model), pytest.raises(RuntimeError, match=rf"at step 0, loss_fn changed {what} in place"):
            ng.train(loss_fn, dict(model.named_parameters()), sgd(), batches, steps=2, hparams=h,
                     method=METHODS[method]())  # fmt: skip


def test_gradient_reaches_the_initial_params_through_the_run(float64: None) -> None:
    """MAML: the clone that protects the caller's tensors is differentiable."""
    model, batches = build("tied-submodule")
    model.double()
    batches = [(x.double(), y.double()) for x, y in batches]
    loss_fn = loss_of(model)
    trained = ng.train(loss_fn, dict(model.named_parameters()), sgd(), batches, steps=2, hparams=one())
    F.mse_loss(ng.call(model, trained, batches[0][0]), batches[0][1]).backward()
    got = [p.grad.clone() for p in model.parameters()]

    ps = [p.detach().clone().requires_grad_() for p in model.parameters()]
    names = [k for k, _ in model.named_parameters()]
    w = ps
    for x, y in batches[:2]:
        grads = torch.autograd.grad(F.mse_loss(ng.call(model, dict(zip(names, w)), x), y), w, create_graph=True)
        w = [a - 0.1 * g for a, g in zip(w, grads)]
    expected = torch.autograd.grad(F.mse_loss(ng.call(model, dict(zip(names, w)), batches[0][0]), batches[0][1]), ps)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_loss_fn_writing_a_frozen_tensor_raises() -> None:
    model, batches = build("batchnorm")
    inner = loss_of(model)
    scale = torch.tensor(1.0)

    def loss_fn(p: Params, batch: tuple[Tensor, Tensor], h: Tensor) -> Tensor:
        p["scale"].add_(1.0)
        return inner({k: v for k, v in p.items() if k != "scale"}, batch, h)

    params = {**dict(model.named_parameters()), "scale": scale}
    with pytest.raises(RuntimeError, match=r"wrote params\['scale'\] in place"):
        quietly(lambda: ng.train(loss_fn, params, sgd(), batches, steps=2, hparams=one()))


# -------------------------------------------------------------------- higher
@pytest.mark.parametrize("name", MODELS)
def test_innerloop_ctx_leaves_the_module_as_it_was(name: str) -> None:
    model, batches = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches[0]
    before = state_of(model)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for xb, yb in batches[:2]:
            diffopt.step(F.mse_loss(fmodel(xb), yb))
        fmodel.eval()
        meta = F.mse_loss(fmodel(x), y)
    assert_same_state(model, before)
    meta.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    assert_same_state(model, before)


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt], ids=["exception", "KeyboardInterrupt"])
@pytest.mark.parametrize("name", ["tied-submodule", "batchnorm", "bert"])
def test_innerloop_ctx_restores_the_module_when_forward_raises(name: str, error: type[BaseException]) -> None:
    model, batches = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    armed = [False]

    def hook(m: nn.Module, inputs: Any, output: Any) -> None:
        if armed[0]:
            raise error("from inside forward")

    list(model.modules())[-1].register_forward_hook(hook)
    with unchanged(model), pytest.raises(error):
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            diffopt.step(F.mse_loss(fmodel(batches[0][0]), batches[0][1]))
            fmodel.eval()  # fmodel's mode is set on the module during its calls, and restored
            armed[0] = True
            fmodel(batches[1][0])


# ------------------------------------------------------------------- buffers
def torch_loop(model: nn.Module, batches: list[tuple[Tensor, Tensor]], steps: int, lr: float) -> nn.Module:
    """Ordinary training of a copy: the reference for the trained buffers."""
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=lr)
    for t in range(steps):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        opt.step()
    return reference


@pytest.fixture
def bn_problem(float64: None) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = batchnorm_mlp()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g) * 2 + 1, torch.randn(8, 3, generator=g)) for _ in range(5)]
    return model, batches


@pytest.mark.parametrize("method", METHODS)
def test_buffers_advance_once_per_training_step_with_every_method(
    bn_problem: tuple[nn.Module, list[tuple[Tensor, Tensor]]], method: str
) -> None:
    model, batches = bn_problem
    reference = torch_loop(model, batches, 5, 0.1)
    loss_fn = loss_of(model)
    h = torch.tensor(1.0, requires_grad=True)
    with unchanged(model):
        params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        trained = quietly(
            lambda: ng.train(loss_fn, params, sgd(), batches, steps=5, hparams=h, method=METHODS[method]())
        )
        kept = {k: trained[k].clone() for k, _ in model.named_buffers()}
        weights = {k: trained[k] for k, _ in model.named_parameters()}
        quietly(lambda: torch.autograd.grad(loss_fn(weights, batches[0], torch.tensor(1.0)), h))
    for k, v in reference.named_buffers():
        torch.testing.assert_close(trained[k], v, rtol=1e-12, atol=1e-12, msg=k)
        assert torch.equal(trained[k], kept[k]), f"the backward pass changed the trained {k}"
        assert trained[k] is not dict(model.named_buffers())[k]
    assert trained["1.num_batches_tracked"].item() == 5
    for k, v in reference.named_parameters():
        torch.testing.assert_close(trained[k], v, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("method", ["Reverse", "Reverse-checkpointed", "Forward"])
def test_batchnorm_hypergradients_equal_unroll(
    bn_problem: tuple[nn.Module, list[tuple[Tensor, Tensor]]], method: str
) -> None:
    model, batches = bn_problem
    loss_fn = loss_of(model)
    names = [k for k, _ in model.named_parameters()]

    def hypergradient(m: ng.Method) -> Tensor:
        h = torch.tensor(0.7, requires_grad=True)
        params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        trained = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1, momentum=0.5), batches, steps=5, hparams=h, method=m)
        (g,) = torch.autograd.grad(loss_fn({k: trained[k] for k in names}, batches[0], torch.tensor(1.0)), h)
        return g

    expected = hypergradient(ng.Unroll())
    assert expected.abs() > 1e-3
    torch.testing.assert_close(hypergradient(METHODS[method]()), expected, rtol=1e-10, atol=1e-10)


def test_buffers_not_passed_are_discarded_with_a_warning_that_says_how_to_keep_them(
    bn_problem: tuple[nn.Module, list[tuple[Tensor, Tensor]]],
) -> None:
    model, batches = bn_problem
    with unchanged(model), pytest.warns(UserWarning, match=r"'1\.num_batches_tracked' changed") as record:
        trained = ng.train(loss_of(model), dict(model.named_parameters()), sgd(), batches, steps=5, hparams=one())
    (message,) = [str(w.message) for w in record if "buffers" in str(w.message)]
    assert "dict(model.named_buffers())" in message
    assert set(trained) == {k for k, _ in model.named_parameters()}
    # Passing them, or running in eval mode (nothing is written), gives no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        ng.train(loss_of(model), params, sgd(), batches, steps=5, hparams=one())
        model.eval()
        ng.train(loss_of(model), dict(model.named_parameters()), sgd(), batches, steps=5, hparams=one())


def test_call_updates_only_the_buffers_passed_to_it(bn_problem: tuple[nn.Module, list[tuple[Tensor, Tensor]]]) -> None:
    """Outside ng.train, ng.call updates the buffer tensors you pass, as module(x) updates its own."""
    model, batches = bn_problem
    x = batches[0][0]
    reference = copy.deepcopy(model)
    mine = {k: v.clone() for k, v in model.named_buffers()}
    with unchanged(model):
        out = ng.call(model, mine, x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    for k, v in reference.named_buffers():
        torch.testing.assert_close(mine[k], v, rtol=0, atol=0, msg=k)


def test_initial_params_changed_after_train_do_not_reach_the_backward_pass() -> None:
    """ZerothOrder re-runs training from the initial params: from its clone of them, not the caller's tensors."""
    model, batches = build("batchnorm")
    loss_fn = loss_of(model)

    def hypergradient(change: bool) -> Tensor:
        params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        h = one()
        method = ng.ZerothOrder(samples=2, sigma=0.1, seed=0)
        trained = quietly(lambda: ng.train(loss_fn, params, sgd(), batches, steps=3, hparams=h, method=method))
        if change:
            with torch.no_grad():
                params["0.weight"].mul_(0.5)
        val = loss_fn({k: trained[k] for k in params}, batches[0], torch.tensor(1.0))
        return torch.autograd.grad(val, h)[0]

    torch.testing.assert_close(hypergradient(True), hypergradient(False), rtol=0, atol=0)
