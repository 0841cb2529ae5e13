"""Mistakes a new user makes with the optimizers, tried as they would make them, and precision traps.

Each message must say what nestgrad expects and how to write it; the two back ends give the same bits.
"""

from __future__ import annotations

import pytest
import torch

import nestgrad as ng
from optim_db import case_id, cases


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def loss_fn(p, batch, h):
    return (p["weight"] ** 2).sum() + (p["bias"] ** 2).sum()


@pytest.mark.parametrize(
    "make, line",
    [
        (lambda m: ng.optim.SGD(m.parameters(), lr=0.1), "nestgrad.optim.SGD(lr=0.1)"),
        (lambda m: ng.optim.Adam(m.parameters()), "nestgrad.optim.Adam()"),
        (lambda m: ng.optim.SGD([m.weight], lr=0.1, momentum=0.9), "nestgrad.optim.SGD(lr=0.1, momentum=0.9)"),
        (lambda m: ng.optim.AdamW([{"params": [m.weight]}], lr=0.1), "nestgrad.optim.AdamW(lr=0.1)"),
        (lambda m: ng.optim.RMSprop(m), "nestgrad.optim.RMSprop()"),
    ],
    ids=["SGD(model.parameters(), lr=)", "Adam(model.parameters())", "SGD([tensor])", "param groups", "module"],
)
def test_passing_params_to_an_optimizer_says_it_takes_hyperparameters_only_with_the_corrected_line(make, line):
    with pytest.raises(TypeError) as info:
        make(model())
    text = str(info.value)
    assert "takes hyperparameters only" in text and f"opt = {line}" in text, text
    assert "nestgrad.train(loss_fn, dict(model.named_parameters()), opt" in text and "opt.init(" in text
    assert "multiple values" not in text and "generator object" not in text
    # A dict of name -> value stays a valid first argument: a per-parameter lr.
    opt = ng.optim.SGD({"weight": torch.tensor(0.1), "bias": 0.2})
    params = dict(model().named_parameters())
    new, _ = opt.update({k: torch.ones_like(v) for k, v in params.items()}, opt.init(params), params)
    assert torch.equal(new["bias"], params["bias"] - 0.2)


def test_a_torch_optim_class_says_which_nestgrad_optimizer_to_use():
    m = model()
    with pytest.raises(TypeError) as info:
        ng.train(loss_fn, dict(m.named_parameters()), torch.optim.Adam, [0], steps=1)
    text = str(info.value)
    assert "the class torch.optim.Adam" in text
    assert "use nestgrad.optim.Adam(lr=...) with the same hyperparameters" in text, text


def test_a_torch_optim_instance_is_described_in_one_line_not_by_its_repr():
    m = model()
    torch_opt = torch.optim.Adam(m.parameters(), lr=0.01)
    with pytest.raises(TypeError) as info:
        ng.train(loss_fn, dict(m.named_parameters()), torch_opt, [0], steps=1)
    text = str(info.value)
    assert "\n" not in text and "betas" not in text and "capturable" not in text, text
    assert "a torch.optim.Adam (lr=0.01, 1 param group)" in text
    assert "use nestgrad.optim.Adam(lr=0.01, ...) with the same hyperparameters" in text


def test_a_torch_optimizer_without_a_twin_lists_the_ones_there_are():
    m = model()
    with pytest.raises(TypeError, match=r"LBFGS.*which nestgrad.optim does not have.*Adam, AdamW"):
        ng.train(loss_fn, dict(m.named_parameters()), torch.optim.LBFGS(m.parameters()), [0], steps=1)


def test_a_nestgrad_optimizer_class_says_to_construct_it():
    m = model()
    with pytest.raises(TypeError, match=r"got the class nestgrad.optim.SGD. Construct it: nestgrad.optim.SGD\(lr="):
        ng.train(loss_fn, dict(m.named_parameters()), ng.optim.SGD, [0], steps=1)


# ------------------------------------------------------------------ float16 eps
@pytest.mark.parametrize("cls", [ng.optim.Adam, ng.optim.AdamW, ng.optim.Adamax, ng.optim.NAdam, ng.optim.RAdam])
@pytest.mark.parametrize("eps", [1e-8, torch.tensor(1e-8)], ids=["float", "tensor"])
def test_an_eps_that_rounds_to_zero_in_float16_is_named_with_the_smallest_value_and_the_fixes(cls, eps):
    params = {"w": torch.ones(3, dtype=torch.float16)}
    with pytest.raises(ValueError) as info:
        cls(eps=eps).init(params)
    text = str(info.value)
    assert "rounds to 0 in torch.float16" in text and "'w'" in text, text
    assert "5.96e-08" in text and "eps >= 6e-08" in text and "float32 master weights" in text


def test_the_smallest_eps_the_message_allows_keeps_float16_adam_finite_and_bfloat16_is_accepted():
    # eps=1e-8 gives [nan, -inf] here: 0/0 and 1e-5/0 (v = 1e-10 underflows); the check says so first.
    params = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    grads = {"w": torch.tensor([0.0, 1e-5], dtype=torch.float16)}
    with pytest.raises(ValueError, match="rounds to 0"):
        ng.optim.Adam(lr=0.1).init(params)
    opt = ng.optim.Adam(lr=0.1, eps=6e-8)
    new, _ = opt.update(grads, opt.init(params), params)
    assert torch.isfinite(new["w"]).all() and new["w"][0] == 1.0
    ng.optim.Adam().init({"w": torch.ones(3, dtype=torch.bfloat16), "v": torch.ones(3)})  # 1e-8 is no subnormal there


# ------------------------------------------------------------------ foreach
def trajectory(opt, dtype, steps=25):
    g = torch.Generator().manual_seed(0)
    shapes = [(), (3,), (4, 5), (33,), (7, 2, 3), (17, 9)]
    p = {f"p{i}": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(shapes)}
    state = opt.init(p)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in p.items()}
        p, state = opt.update(grads, state, p)
    return p, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_foreach_and_the_loop_give_the_same_bits_for_every_optimizer_and_setting(dtype):
    # torch.addcdiv rounds value * y / z in another order than foreach's y / z then a scaled add:
    # Adam, AdamW, Adamax and Adagrad differed in the last bit before the loop did the same.
    differ = []
    for info, kwargs in cases():
        with torch.no_grad():
            a, sa = trajectory(info.ours(**kwargs, foreach=True), dtype)
            b, sb = trajectory(info.ours(**kwargs, foreach=False), dtype)
        same = all(torch.equal(a[k], b[k]) for k in a) and all(
            torch.equal(v, sb.slots[slot][k]) for slot, values in sa.slots.items() for k, v in values.items()
        )
        if not same:
            differ.append(case_id((info, kwargs)))
    assert not differ, differ
