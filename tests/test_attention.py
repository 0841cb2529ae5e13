"""Attention inside ng.train: the math kernel, thread-locally, the same in training and in every replay."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import nestgrad as ng
from nestgrad._attention import _math_sdpa
from nestgrad._data import Batches
from nestgrad._problem import Problem


def flags() -> tuple[bool, bool, bool, bool]:
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled()


def encoder(d: int = 16, seed: int = 0, dropout: float = 0.0):
    """A TransformerEncoderLayer and a linear head, its loss with per-example weights, and data."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=dropout, batch_first=True)
    head = nn.Linear(d, 3)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(8, 6, d, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    params = {
        **{f"layer.{k}": v for k, v in layer.named_parameters()},
        **{f"head.{k}": v for k, v in head.named_parameters()},
    }

    def logits(p, x):
        h = ng.call(layer, {k[6:]: v for k, v in p.items() if k.startswith("layer.")}, x)
        return ng.call(head, {k[5:]: v for k, v in p.items() if k.startswith("head.")}, h.mean(1))

    def loss_fn(p, batch, A):
        x, y = batch
        return (torch.sigmoid(A) * F.cross_entropy(logits(p, x), y, reduction="none")).mean()

    return params, loss_fn, logits, X, y


def hypergrad(method, steps: int = 5, d: int = 16, check=None, setup=None):
    params, loss_fn, logits, X, y = setup or encoder(d)
    if check is not None:
        inner = loss_fn

        def loss_fn(p, batch, A):
            check()
            return inner(p, batch, A)

    A = torch.zeros(len(X), requires_grad=True)
    out = ng.train(loss_fn, params, ng.optim.Adam(lr=0.01), [(X, y)], steps=steps, hparams=A, method=method)
    return torch.autograd.grad(F.cross_entropy(logits(out, X), y), A)[0]


@pytest.mark.parametrize("method", [ng.Unroll(), ng.Reverse(checkpoint_every=2)], ids=["unroll", "reverse"])
def test_no_global_attention_flag_changes_during_or_after_a_run(method):
    before = flags()
    seen = []
    hypergrad(method, steps=3, check=lambda: seen.append(flags()))
    assert flags() == before
    assert seen and all(f == before for f in seen)  # not even inside loss_fn: another thread would see them


def test_two_threads_leave_the_flags_alone_and_both_get_the_right_hypergradient():
    before = flags()
    # One model per thread (functional_call swaps a module's weights in place), built here: seeding and
    # initializing in two threads at once would interleave on the global RNG.
    setups = [encoder(), encoder()]
    ref = hypergrad(ng.Unroll(), steps=4, setup=encoder())
    barrier = threading.Barrier(2)
    results: dict[int, list] = {0: [], 1: []}

    def work(i: int) -> None:
        barrier.wait()
        try:
            for _ in range(3):
                results[i].append(hypergrad(ng.Unroll(), steps=4, setup=setups[i]))
        except Exception as err:  # reported below, with the thread
            results[i].append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert flags() == before
    for got in results.values():
        assert len(got) == 3
        for g in got:
            assert isinstance(g, torch.Tensor), g
            assert torch.equal(g, ref)


def test_float32_encoder_with_adam_replays_with_reverse_and_matches_unroll():
    """Reverse trained on the fused kernel and replayed on the math one: 50 Adam steps failed the replay check."""
    ref = hypergrad(ng.Unroll(), steps=50)
    for every in (None, 7):
        got = hypergrad(ng.Reverse(checkpoint_every=every), steps=50)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_implicit_and_forward_get_a_double_backward_through_attention():
    with pytest.warns(ng.ConvergenceWarning):  # far from a fixed point after 3 steps; the solve runs all the same
        assert hypergrad(ng.Implicit(ng.FixedPoint(max_steps=3)), steps=3).abs().max() > 0
    assert torch.allclose(hypergrad(ng.Forward(), steps=3), hypergrad(ng.Unroll(), steps=3), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"attn_mask": "bool"}, {"attn_mask": "float"}, {"is_causal": True}, {"scale": 0.3}, {"dropout_p": 0.3}],
    ids=["plain", "bool-mask", "float-mask", "causal", "scale", "dropout"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_math_route_is_what_sdpa_kernel_math_computes(kwargs, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.rand(5, 5, generator=g) > 0.3
    mask[2] = False  # a row that attends to nothing
    if kwargs.get("attn_mask") == "bool":
        kwargs = {"attn_mask": mask}
    elif kwargs.get("attn_mask") == "float":
        kwargs = {"attn_mask": torch.randn(5, 5, generator=g, dtype=dtype)}
    torch.manual_seed(1)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.manual_seed(1)
    assert torch.equal(_math_sdpa(q, k, v, **kwargs), want)


def test_grouped_query_attention_takes_the_math_route():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(2))
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(_math_sdpa(q, k, v, enable_gqa=True), want)


def test_a_run_without_attention_drops_the_mode_after_its_first_loss():
    """The mode costs about 1 us per torch call in loss_fn; a run that calls no attention stops paying it."""
    params, loss_fn, _, X, y = encoder()
    A = torch.zeros(len(X), requires_grad=True)

    def mlp_loss(p, batch, A):
        x, y = batch
        return (torch.sigmoid(A) * F.cross_entropy(x.mean(1) @ p["head.weight"].T, y, reduction="none")).mean()

    for fn, seen in [(loss_fn, True), (mlp_loss, False)]:
        prob = Problem(fn, ng.optim.SGD(lr=0.1), Batches([(X, y)], 2), 2, A, {})
        ng.Unroll().run(prob, {k: v for k, v in params.items()})
        assert prob.attention.seen is seen
