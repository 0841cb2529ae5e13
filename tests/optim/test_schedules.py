"""Schedules: indexed by the training step (as torch.optim with LambdaLR), and checked as they produce values.

References: torch.optim + torch.optim.lr_scheduler.LambdaLR in float64.
"""

from __future__ import annotations

import re

import pytest
import torch

import nestgrad as ng
from nestgrad.optim import Schedule

pytestmark = pytest.mark.usefixtures("float64")

STEPS = 8


def lr_at(t: int) -> float:
    return 0.1 * 0.8**t


def start():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, generator=g), "b": torch.randn(2, generator=g)}


def grad_at(t: int, p):
    """The gradients at training step t (from 1): b receives none for the first 3 steps."""
    g = torch.Generator().manual_seed(10 + t)
    out = {"a": torch.randn(3, generator=g) + p["a"]}
    if t > 3:
        out["b"] = torch.randn(2, generator=g) + p["b"] ** 2
    return out


def torch_reference(torch_cls, **kwargs):
    p = {k: v.clone().requires_grad_() for k, v in start().items()}
    opt = torch_cls(list(p.values()), lr=0.1, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_at(e + 1) / 0.1)  # step t uses epoch t - 1
    for t in range(1, STEPS + 1):
        opt.zero_grad(set_to_none=True)
        for k, g in grad_at(t, {k: v.detach() for k, v in p.items()}).items():
            p[k].grad = g
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in p.items()}


def ours(opt):
    p = start()
    state = opt.init(p)
    for t in range(1, STEPS + 1):
        p, state = opt.update(grad_at(t, p), state, p)
    return p, state


CASES = [
    (ng.optim.SGD, torch.optim.SGD, {"momentum": 0.9}),
    (ng.optim.Adam, torch.optim.Adam, {}),
    (ng.optim.RMSprop, torch.optim.RMSprop, {"momentum": 0.5}),
]


@pytest.mark.parametrize("form", ["function", "values"])
@pytest.mark.parametrize("cls, torch_cls, kwargs", CASES, ids=[c[0].__name__ for c in CASES])
def test_a_schedule_is_indexed_by_the_training_step_as_torch_optim_with_lambda_lr(cls, torch_cls, kwargs, form):
    # b first gets a gradient at step 4: it must use lr_at(4), lr_at(5), ... (not entries 1, 2, ...), while
    # Adam's bias correction for b counts its own updates (1, 2, ...), as torch.optim does.
    lr = Schedule(lr_at) if form == "function" else Schedule(torch.tensor([lr_at(t) for t in range(1, STEPS + 1)]))
    p, state = ours(cls(lr=lr, **kwargs))
    ref = torch_reference(torch_cls, **kwargs)
    for k in ref:
        torch.testing.assert_close(p[k], ref[k], rtol=1e-12, atol=1e-14)
    assert state.step == {"a": STEPS, "b": STEPS - 3} and state.count == STEPS


def test_train_in_segments_and_reverse_index_schedules_by_the_training_step():
    lrs = torch.tensor([lr_at(t) for t in range(1, STEPS + 1)], requires_grad=True)
    opt = ng.optim.Adam(lr=Schedule(lrs))

    def loss_fn(p, t, h):
        loss = ((p["a"] - 1) ** 2).sum()
        return loss + ((p["b"] + 1) ** 2).sum() if t >= 3 else loss  # b gets gradients from step 4 (t = 3)

    p0 = {k: v.requires_grad_() for k, v in start().items()}
    with torch.no_grad():
        whole = ng.train(loss_fn, p0, opt, lambda t: t, steps=STEPS)
        half, state = ng.train(loss_fn, p0, opt, lambda t: t, steps=5, return_state=True)
        rest = ng.train(loss_fn, half, opt, lambda t: t + 5, steps=STEPS - 5, state=state)
    assert state.count == 5 and state.step == {"a": 5, "b": 2}
    for k in whole:
        assert torch.equal(rest[k], whole[k])

    # The torch reference: b untouched for 3 steps, then lr_at(4), ...
    p = {k: v.detach().clone().requires_grad_() for k, v in start().items()}
    topt = torch.optim.Adam(list(p.values()), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda e: lr_at(e + 1) / 0.1)
    for t in range(STEPS):
        topt.zero_grad(set_to_none=True)
        loss_fn(p, t, None).backward()
        topt.step()
        sched.step()
    for k in whole:
        torch.testing.assert_close(whole[k], p[k].detach(), rtol=1e-12, atol=1e-14)

    def hypergradient(method):
        w = ng.train(loss_fn, p0, opt, lambda t: t, steps=STEPS, method=method)
        return torch.autograd.grad(sum((v**2).sum() for v in w.values()), lrs)[0]

    unroll, reverse = hypergradient(ng.Unroll()), hypergradient(ng.Reverse(checkpoint_every=3))
    torch.testing.assert_close(reverse, unroll, rtol=1e-10, atol=1e-14)
    assert unroll[0] != 0 and unroll[-1] != 0


def test_a_state_without_a_training_step_count_still_loads_and_continues():
    opt = ng.optim.SGD(lr=Schedule(lr_at), momentum=0.9)
    _, state = ours(opt)
    saved = state.state_dict()
    assert saved["count"] == STEPS
    old = {"step": saved["step"], "slots": saved["slots"]}  # as saved before 'count' existed
    loaded = opt.init(start()).load_state_dict(old)
    assert loaded.count is None and loaded.training_step() == STEPS
    assert opt.init(start()).load_state_dict(saved).count == STEPS
    with pytest.raises(ValueError, match=r"training step count must be an int at least .* \(8\).*int 2"):
        opt.init(start()).load_state_dict({**saved, "count": 2})
    assert ng.optim.OptState(state.step, state.slots).training_step() == STEPS  # two-field construction works


# ------------------------------------------------------------- values that leave the range
@pytest.mark.parametrize("returns", ["float", "tensor"])
def test_a_function_schedule_that_goes_negative_raises_at_the_first_bad_step(returns):
    def fn(t):
        v = 0.1 * (1 - t / 5)
        return torch.tensor(v) if returns == "tensor" else v

    calls = []

    def loss_fn(p, t, h):
        calls.append(t)
        return ((p["w"] - 1) ** 2).sum()

    opt = ng.optim.SGD(lr=Schedule(fn))
    with pytest.raises(ValueError) as info:
        ng.train(loss_fn, {"w": torch.zeros(3, requires_grad=True)}, opt, lambda t: t, steps=8)
    text = str(info.value)
    assert "lr Schedule's function returned" in text and "for training step 6" in text, text
    assert re.search(r"returned (a Tensor holding )?-0\.0(2|19999)", text) and "lr must be >= 0 and finite" in text
    assert "max(0.0, " in text
    assert calls == [0, 1, 2, 3, 4, 5], "steps 1-5 (lr 0.08 ... 0.0) are valid; step 6 must not be applied"


def test_a_function_schedule_of_a_pair_or_a_dict_names_its_entry():
    p = {"w": torch.zeros(3), "b": torch.zeros(2)}
    grads = {k: torch.ones_like(v) for k, v in p.items()}
    opt = ng.optim.Adam(betas=(Schedule(lambda t: 0.9 + 0.05 * t), 0.999))
    state = opt.init(p)
    p1, state = opt.update(grads, state, p)  # beta1 = 0.95
    with pytest.raises(
        ValueError, match=r"betas\[0\] Schedule's function returned 1.0 for training step 2.*in \[0, 1\)"
    ):
        opt.update(grads, state, p1)
    opt = ng.optim.SGD(lr={"w": 0.1, "b": Schedule(lambda t: float("nan"))})
    with pytest.raises(ValueError, match=r"lr\['b'\] Schedule's function returned nan for training step 1"):
        opt.update(grads, opt.init(p), p)
