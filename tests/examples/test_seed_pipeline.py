"""The forum seed's three-level pipeline, end to end, on tiny Bert2Bert models.

M1 trains on a loss whose per-example terms are weighted by ``A``. M2 trains on
M1's outputs: M1's last decoder hidden states are M2's ``decoder_inputs_embeds``
and M1's argmax predictions are M2's labels. ``L3`` is M2's validation loss, and
the quantity the user wanted is ``dL3/dA``.

Both models are in eval mode, so PyTorch picks the fused CPU SDPA kernel, which
has no double backward. ``nestgrad.train`` must switch to the math kernel while it
builds its graph; ``test_fused_attention_has_no_double_backward`` shows that
without that switch the computation fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

import nestgrad as ng

VOCAB = 13
SEQ = 5
BATCH = 4
STEPS1 = 3
STEPS2 = 2
ADAM = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, eps_root=1e-30)
SGD = dict(lr=0.2, momentum=0.9)

Params = dict[str, Tensor]
Caller = Callable[..., Any]  # caller(module, params, **inputs) -> module output


pytestmark = pytest.mark.usefixtures("float64_module")


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    size = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=VOCAB, max_position_embeddings=16,
    )  # fmt: skip
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**size), BertConfig(**size, is_decoder=True, add_cross_attention=True)
    )
    config.decoder_start_token_id = 1
    config.pad_token_id = 0
    model = EncoderDecoderModel(config=config).eval().double()
    assert model.config.encoder._attn_implementation == "sdpa"
    return model


@dataclass
class Pipeline:
    model1: nn.Module
    model2: nn.Module
    batch1: tuple[Tensor, ...]  # enc ids, enc mask, dec ids, dec mask, labels
    data2: list[Tensor]  # encoder inputs from which M1 generates M2's training data
    val: tuple[Tensor, ...]  # enc ids, dec ids, labels
    A: Tensor


def build_pipeline() -> Pipeline:
    model1, model2 = make_model(1), make_model(2)
    g = torch.Generator().manual_seed(0)

    def ids(n: int = BATCH) -> Tensor:
        return torch.randint(2, VOCAB, (n, SEQ), generator=g)

    enc_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    enc_mask[0, -2:] = 0  # some padding, so the attention masks are not trivial
    dec_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    dec_mask[1, -1] = 0
    batch1 = (ids(), enc_mask, ids(), dec_mask, ids())
    A = (0.5 + torch.rand(BATCH, generator=g)).requires_grad_()
    return Pipeline(model1, model2, batch1, [ids(), ids()], (ids(), ids(), ids()), A)


@pytest.fixture(scope="module")
def pipeline(float64_module: None) -> Pipeline:
    return build_pipeline()


# ------------------------------------------------------------ the user's losses
def ng_caller(module: nn.Module, params: Params, **inputs: Any) -> Any:
    return ng.call(module, params, **inputs)


def func_caller(module: nn.Module, params: Params, **inputs: Any) -> Any:
    return functional_call(module, params, (), inputs)


def loss1(call: Caller, pl: Pipeline, p1: Params, batch: tuple[Tensor, ...], A: Tensor) -> Tensor:
    """M1's training loss: per-example token cross-entropy, weighted by A."""
    enc, enc_mask, dec, dec_mask, labels = batch
    logits = call(
        pl.model1, p1, input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
    ).logits
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    per_example = (per_token * dec_mask).sum(1) / dec_mask.sum(1)
    return (A * per_example).mean()


def m1_outputs(call: Caller, pl: Pipeline, trained1: Params, x: Tensor) -> tuple[Tensor, Tensor]:
    """M2's training data made by M1: last decoder hidden states and argmax labels."""
    out = call(pl.model1, trained1, input_ids=x, decoder_input_ids=x, output_hidden_states=True)
    assert out.decoder_hidden_states is not None
    return out.decoder_hidden_states[-1], out.logits.argmax(-1)


def loss2(call: Caller, pl: Pipeline, p2: Params, x: Tensor, trained1: Params) -> Tensor:
    embeds, labels = m1_outputs(call, pl, trained1, x)
    logits = call(pl.model2, p2, input_ids=x, decoder_inputs_embeds=embeds).logits
    return F.cross_entropy(logits.transpose(1, 2), labels)


def loss3(call: Caller, pl: Pipeline, trained2: Params) -> Tensor:
    enc, dec, labels = pl.val
    logits = call(pl.model2, trained2, input_ids=enc, decoder_input_ids=dec).logits
    return F.cross_entropy(logits.transpose(1, 2), labels)


# ------------------------------------------------------------- via nestgrad
def make_opt(name: str) -> ng.optim.Optimizer:
    return ng.optim.Adam(**ADAM) if name == "adam" else ng.optim.SGD(**SGD)


def nestgrad_trained1(pl: Pipeline, A: Tensor, opt: str) -> Params:
    return ng.train(
        lambda p, b, a: loss1(ng_caller, pl, p, b, a),
        dict(pl.model1.named_parameters()),
        make_opt(opt),
        [pl.batch1],
        steps=STEPS1,
        hparams=A,
    )


def nestgrad_run(pl: Pipeline, A: Tensor, opt: str) -> tuple[Tensor, list[Tensor]]:
    """L3, and the argmax labels M1 made for M2 (for the finite-difference test)."""
    trained1 = nestgrad_trained1(pl, A, opt)
    trained2 = ng.train(
        lambda p, x, t1: loss2(ng_caller, pl, p, x, t1),
        dict(pl.model2.named_parameters()),
        make_opt(opt),
        pl.data2,
        steps=STEPS2,
        hparams=trained1,
    )
    with torch.no_grad():
        labels = [m1_outputs(ng_caller, pl, trained1, x)[1] for x in pl.data2]
    return loss3(ng_caller, pl, trained2), labels


def nestgrad_L3(pl: Pipeline, A: Tensor, opt: str) -> Tensor:
    return nestgrad_run(pl, A, opt)[0]


@pytest.fixture(scope="module", params=["adam", "sgd"])
def nestgrad_grad(request: pytest.FixtureRequest, pipeline: Pipeline) -> tuple[str, Tensor]:
    (grad,) = torch.autograd.grad(nestgrad_L3(pipeline, pipeline.A, request.param), pipeline.A)
    return request.param, grad


# ---------------------------------------------- the same thing, by hand
def ref_adam(p: Tensor, g: Tensor, state: dict[str, Tensor], k: int, eps_root: float = ADAM["eps_root"]) -> Tensor:
    """torch.optim.Adam's single-tensor formula, out of place, plus eps_root inside the square root."""
    beta1, beta2 = ADAM["betas"]
    m = torch.lerp(state.get("m", torch.zeros_like(p)), g, 1 - beta1)
    v = torch.addcmul(state.get("v", torch.zeros_like(p)) * beta2, g, g, value=1 - beta2)
    state["m"], state["v"] = m, v
    step_size = ADAM["lr"] / (1 - beta1**k)
    denom = (v + eps_root).sqrt() / math.sqrt(1 - beta2**k) + ADAM["eps"]
    return torch.addcdiv(p, m, denom, value=-step_size)


def ref_sgd(p: Tensor, g: Tensor, state: dict[str, Tensor], k: int) -> Tensor:
    """torch.optim.SGD's formula with momentum (no dampening, no Nesterov)."""
    buf = g if k == 1 else SGD["momentum"] * state["buf"] + g
    state["buf"] = buf
    return p - SGD["lr"] * buf


def ref_unroll(
    loss_fn: Callable[[Params, Any], Tensor], params: Params, data: Sequence[Any], steps: int, opt: str
) -> Params:
    """Differentiable unrolled training with functional_call and autograd.grad(create_graph=True)."""
    update = ref_adam if opt == "adam" else ref_sgd
    names = list(params)
    ps = [params[n] for n in names]
    states: list[dict[str, Tensor]] = [{} for _ in ps]
    counts = [0] * len(ps)
    for t in range(steps):
        with sdpa_kernel(SDPBackend.MATH):
            loss = loss_fn(dict(zip(names, ps)), data[t % len(data)])
        grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:  # unused weights (M1's encoder pooler) stay put, as in torch.optim
                counts[i] += 1
                ps[i] = update(ps[i], g, states[i], counts[i])
    return dict(zip(names, ps))


def reference_L3(pl: Pipeline, A: Tensor, opt: str) -> Tensor:
    trained1 = ref_unroll(
        lambda p, b: loss1(func_caller, pl, p, b, A), dict(pl.model1.named_parameters()), [pl.batch1], STEPS1, opt
    )
    trained2 = ref_unroll(
        lambda p, x: loss2(func_caller, pl, p, x, trained1), dict(pl.model2.named_parameters()), pl.data2, STEPS2, opt
    )
    return loss3(func_caller, pl, trained2)


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_reference_optimizers_match_torch_optim(opt: str) -> None:
    """The hand-written updates are torch.optim's (Adam with eps_root=0, which torch.optim lacks)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(3, 4, generator=g))
    p, state = weight.detach().clone(), dict[str, Tensor]()
    torch_opt: torch.optim.Optimizer
    if opt == "adam":
        torch_opt = torch.optim.Adam([weight], lr=ADAM["lr"], betas=ADAM["betas"], eps=ADAM["eps"])
    else:
        torch_opt = torch.optim.SGD([weight], **SGD)
    for k in range(1, 5):
        grad = torch.randn(3, 4, generator=g)
        grad[0, 0] = 0.0  # an entry that never gets a gradient, like unused embedding rows
        weight.grad = grad.clone()
        torch_opt.step()
        p = ref_adam(p, grad, state, k, eps_root=0.0) if opt == "adam" else ref_sgd(p, grad, state, k)
        torch.testing.assert_close(p, weight.detach(), rtol=1e-15, atol=1e-15)


def test_fused_attention_has_no_double_backward(pipeline: Pipeline) -> None:
    """One hand-written differentiable step through eval-mode M1 fails without the math kernel.

    The same computation under the math kernel succeeds, so the fused kernel is the only obstacle.
    """
    pl = pipeline
    params = dict(pl.model1.named_parameters())

    def hypergradient() -> Tensor:
        loss = loss1(func_caller, pl, params, pl.batch1, pl.A)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        stepped = {n: p if g is None else p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
        val = loss1(func_caller, pl, stepped, pl.batch1, torch.ones_like(pl.A))
        return torch.autograd.grad(val, pl.A)[0]

    with pytest.raises(RuntimeError, match=r"scaled_dot_product.*not implemented"):
        hypergradient()
    with sdpa_kernel(SDPBackend.MATH):
        grad = hypergradient()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_hypergradient_matches_hand_written_unroll(pipeline: Pipeline, nestgrad_grad: tuple[str, Tensor]) -> None:
    opt, grad = nestgrad_grad
    (expected,) = torch.autograd.grad(reference_L3(pipeline, pipeline.A, opt), pipeline.A)
    assert grad.shape == pipeline.A.shape == expected.shape
    rel = (grad - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-10, f"{opt}: relative difference {rel.item():.3e}\nnestgrad  {grad}\nreference {expected}"


def test_hypergradient_is_finite_and_nonzero(nestgrad_grad: tuple[str, Tensor]) -> None:
    opt, grad = nestgrad_grad
    assert torch.isfinite(grad).all(), f"{opt}: {grad}"
    assert grad.abs().min() > 0, f"{opt}: some example has exactly zero influence: {grad}"


def test_hypergradient_matches_finite_differences(pipeline: Pipeline, nestgrad_grad: tuple[str, Tensor]) -> None:
    """Central differences of L3, along the gradient itself and along random directions.

    L3 is computed by the same pipeline under ``torch.no_grad()``, where nestgrad
    trains first-order with the fused kernels. The error is measured relative to
    ``|dL3/dA|``, the largest directional derivative, so that a random direction
    nearly orthogonal to the gradient cannot inflate it.

    Adam's step ``m / (sqrt(v) + eps)`` is a smoothed sign of the gradient. For
    the weights whose A-weighted gradient nearly cancels, it turns over within
    ``|ΔA| ~ eps / |per-example gradient|``, which is ~1e-5 here, so L3 has large
    third derivatives: a plain central difference is off by up to ~3e-3 at h = 4e-6
    and ~2e-4 at h = 1e-6 (it does converge as h²). Richardson extrapolation of
    D(h) and D(h/2) cancels the h² term; with h = 1e-6 what is left, O(h⁴) plus
    rounding, is ~5e-8 here. For SGD, L3 is smooth and the plain D(h/2) is
    checked as well.
    """
    pl = pipeline
    opt, grad = nestgrad_grad
    h = 1e-6
    g = torch.Generator().manual_seed(1)
    directions = [grad] + [torch.randn(BATCH, generator=g) for _ in range(2)]
    with torch.no_grad():
        _, labels = nestgrad_run(pl, pl.A, opt)
        assert all(y.unique().numel() > 1 for y in labels)  # the argmax labels are not degenerate
        for v in directions:
            v = v / v.norm()
            central = {}
            for step in (h, h / 2):
                plus, labels_plus = nestgrad_run(pl, pl.A + step * v, opt)
                minus, labels_minus = nestgrad_run(pl, pl.A - step * v, opt)
                # M2's labels are a step function of A: the difference is meaningless if one flips.
                for y, y_plus, y_minus in zip(labels, labels_plus, labels_minus):
                    assert torch.equal(y_plus, y) and torch.equal(y_minus, y)
                central[step] = (plus - minus) / (2 * step)
            richardson = (4 * central[h / 2] - central[h]) / 3
            exact = v @ grad
            err = (richardson - exact).abs() / grad.norm()
            assert err <= 1e-6, f"{opt}: finite difference {richardson.item():.10e} vs v·grad {exact.item():.10e}"
            if opt == "sgd":
                err = (central[h / 2] - exact).abs() / grad.norm()
                assert err <= 1e-6, f"sgd: central difference {central[h / 2].item():.10e} vs {exact.item():.10e}"
