"""``tasks=``: per-task optimizer hyperparameters whose shape is ambiguous raise with the shape to use;
what ``vmap`` forbids inside ``loss_fn`` and stacked weights passed as shared ones are named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad as ng

N = 3
STEPS = 3


def linear(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 4, bias=bias).double()  # weight (4, 3): stacked (3, 4, 3)


def data(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, 3, generator=g, dtype=torch.float64)
    return x, torch.randn(N, 6, 4, generator=g, dtype=torch.float64)


def loss_of(model: nn.Module):
    def loss_fn(p, batch, _):
        x, y = batch
        return F.mse_loss(ng.call(model, p, x), y)

    return loss_fn


def fresh(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}


def close(a: Tensor, b: Tensor, tol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ 4. per-task hyperparameter shapes
def test_a_per_task_lr_of_shape_n_for_a_stacked_matrix_raises_with_the_shape_to_use():
    """(3,) for a (4, 3) weight with tasks=3 broadcast along the weight's last dimension, silently."""
    model = linear(bias=False)
    lr = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"nestgrad.train\(tasks=3\): SGD's lr has shape \(3,\)") as info:
        ng.train(loss_of(model), fresh(model), ng.optim.SGD(lr=lr), [data()], steps=STEPS, tasks=N)
    text = str(info.value)
    assert "'weight' of shape (3, 4, 3)" in text
    assert "give it the shape (3, 1, 1)" in text  # one value per task
    assert "(1, 3)" in text  # the same per-element values in every task


def test_a_per_element_lr_of_the_weights_own_shape_is_not_ambiguous_and_equals_a_loop():
    """A (3, 4, 3) conv-like weight with tasks=3: an lr of exactly one task's weight shape is per element, as
    without tasks= (it was refused because its leading size equals the number of tasks; found by the fuzzer)."""
    torch.manual_seed(0)
    model = nn.Conv1d(4, 3, kernel_size=3, bias=False).double()  # weight (3, 4, 3): leading size 3 == N
    lr = torch.rand(3, 4, 3, dtype=torch.float64) * 0.1
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N, 2, 4, 5, generator=g, dtype=torch.float64), torch.randn(N, 2, 3, 3, generator=g,
                                                                                     dtype=torch.float64)  # fmt: skip
    got = ng.train(loss_of(model), fresh(model), ng.optim.SGD(lr=lr), [(x, y)], steps=STEPS, tasks=N)
    for i in range(N):
        one = ng.train(loss_of(model), fresh(model), ng.optim.SGD(lr=lr), [(x[i], y[i])], steps=STEPS)
        close(got["weight"][i], one["weight"])


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda lr: ng.optim.SGD(lr={"weight": lr, "bias": 0.1}), id="dict-per-name"),
        pytest.param(lambda lr: ng.optim.SGD(lr=ng.optim.Schedule(lr.expand(STEPS, N))), id="schedule"),
        pytest.param(lambda lr: ng.optim.Adam(lr=0.01, betas=(lr * 0 + 0.9, 0.999)), id="betas[0]"),
        pytest.param(lambda lr: ng.optim.SGD(lr=0.1, groups=[{"params": ["weight"], "weight_decay": lr}]), id="group"),
    ],
)
def test_every_kind_of_tensor_hparam_is_checked(make):
    model = linear()
    lr = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"leading size 3 equals the number of tasks.*'weight' of shape \(3, 4, 3\)"):
        ng.train(loss_of(model), fresh(model), make(lr), [data()], steps=STEPS, tasks=N)


def test_a_per_task_lr_for_a_bias_raises_too():
    """A (4,) bias stacked to (3, 4): (3,) would be one value per task alone, but it broadcasts from the right."""
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()  # bias (3,): stacked (3, 3), and (3,) broadcasts along the bias
    lr = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    x, y = torch.randn(N, 6, 3, dtype=torch.float64), torch.randn(N, 6, 3, dtype=torch.float64)
    opt = ng.optim.SGD(lr={"weight": lr.view(N, 1, 1), "bias": lr})
    with pytest.raises(ValueError, match=r"lr\['bias'\] has shape \(3,\).*give it the shape \(3, 1\)"):
        ng.train(loss_of(model), fresh(model), opt, [(x, y)], steps=STEPS, tasks=N)


def test_the_documented_per_task_shape_equals_a_loop_over_tasks_with_gradients():
    """lr of shape (n, 1, ...) is one learning rate per task: weights and d/d lr equal a loop to 1e-12."""
    model = linear()
    xs, ys = data()
    lrs = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64, requires_grad=True)
    w0 = fresh(model)
    opt = ng.optim.SGD(lr={"weight": lrs.view(N, 1, 1), "bias": lrs.view(N, 1)}, momentum=0.9)
    fast = ng.train(loss_of(model), w0, opt, [(xs, ys)], steps=STEPS, tasks=N)
    target = sum((v**2).sum() * (i + 1) for i, v in enumerate(fast.values()))
    got = torch.autograd.grad(target, [lrs, *w0.values()])

    ref_lrs = lrs.detach().clone().requires_grad_()
    ref_w0 = fresh(model)
    runs = [
        ng.train(loss_of(model), ref_w0, ng.optim.SGD(lr=ref_lrs[i], momentum=0.9), [(xs[i], ys[i])], steps=STEPS)
        for i in range(N)
    ]
    for k in fast:
        close(fast[k].detach(), torch.stack([r[k] for r in runs]).detach())
    stacked = {k: torch.stack([r[k] for r in runs]) for k in runs[0]}
    ref_target = sum((v**2).sum() * (i + 1) for i, v in enumerate(stacked.values()))
    want = torch.autograd.grad(ref_target, [ref_lrs, *ref_w0.values()])
    for a, b in zip(got, want, strict=True):
        close(a, b)


def test_the_shared_per_element_form_equals_a_loop_with_the_same_values_in_every_task():
    """(1, 3): the same per-column rates in every task, as the message says; equals a loop to 1e-12."""
    model = linear(bias=False)
    xs, ys = data()
    cols = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    with torch.no_grad():
        opt = ng.optim.SGD(lr=cols.view(1, 3))
        fast = ng.train(loss_of(model), fresh(model), opt, [(xs, ys)], steps=STEPS, tasks=N)
        for i in range(N):
            wi = ng.train(loss_of(model), fresh(model), ng.optim.SGD(lr=cols), [(xs[i], ys[i])], steps=STEPS)
            close(fast["weight"][i], wi["weight"])


def test_unambiguous_shapes_are_untouched():
    """A per-element value whose leading size is not n, a full (n, *shape) value and tasks=1 train as before."""
    model = linear()
    xs, ys = data()
    full = {
        "weight": torch.full((4, 3), 0.1, dtype=torch.float64),  # leading 4, not n: shared per-element
        "bias": torch.full((N, 4), 0.1, dtype=torch.float64),  # (n, 4): tasks first
    }
    with torch.no_grad():
        fast = ng.train(loss_of(model), fresh(model), ng.optim.SGD(lr=full), [(xs, ys)], steps=STEPS, tasks=N)
        ref = ng.train(loss_of(model), fresh(model), ng.optim.SGD(lr=0.1), [(xs, ys)], steps=STEPS, tasks=N)
        for k in fast:
            close(fast[k], ref[k])
        one = ng.train(
            loss_of(model), fresh(model), ng.optim.SGD(lr=torch.full((1,), 0.1, dtype=torch.float64)),
            [(xs[:1], ys[:1])], steps=STEPS, tasks=1,
        )  # fmt: skip
        close(one["weight"][0], ref["weight"][0])


# ------------------------------------------------------------------ 6. what vmap forbids inside loss_fn
def _base(model: nn.Module):
    def base(p, batch):
        x, y = batch
        return F.mse_loss(ng.call(model, p, x), y)

    return base


def test_item_inside_a_vectorised_loss_says_what_vmap_forbids_and_what_to_write():
    model = linear()
    base = _base(model)

    def loss_fn(p, batch, _):
        loss = base(p, batch)
        scale = 2.0 if loss.item() > 1 else 1.0
        return scale * loss

    with pytest.raises(RuntimeError, match=r"nestgrad.train\(tasks=3\): loss_fn calls .item\(\)") as info:
        ng.train(loss_fn, fresh(model), ng.optim.SGD(lr=0.1), [data()], steps=STEPS, tasks=N)
    text = str(info.value)
    for needed in ("once for all 3 tasks", "torch.where", "torch.clamp", "tasks=None and a Python loop"):
        assert needed in text, needed
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "calling .item() on a Tensor" in str(info.value.__cause__)


@pytest.mark.parametrize("kind", ["if", "float", "bool"])
def test_data_dependent_control_flow_says_what_vmap_forbids(kind: str):
    model = linear()
    base = _base(model)

    def loss_fn(p, batch, _):
        loss = base(p, batch)
        if kind == "if":
            if loss > 1:
                return 2 * loss
            return loss
        if kind == "float":
            return loss * float(loss)
        return loss * (2 if bool(loss > 1) else 1)

    said = r"nestgrad.train\(tasks=3\): loss_fn (uses a tensor in Python control|calls .item)"
    with pytest.raises(RuntimeError, match=said) as info:
        ng.train(loss_fn, fresh(model), ng.optim.SGD(lr=0.1), [data()], steps=STEPS, tasks=N)
    assert "torch.where" in str(info.value) and info.value.__cause__ is not None


def test_boolean_mask_indexing_says_to_keep_shapes_fixed():
    model = linear()

    def loss_fn(p, batch, _):
        x, y = batch
        err = (ng.call(model, p, x) - y) ** 2
        return err[err > 0.5].mean()

    with pytest.raises(RuntimeError, match=r"output shape depends on the values.*torch.where\(mask, t, 0\)") as info:
        ng.train(loss_fn, fresh(model), ng.optim.SGD(lr=0.1), [data()], steps=STEPS, tasks=N)
    assert info.value.__cause__ is not None


def test_the_suggested_torch_where_equals_a_loop_with_if():
    """What the message says to write: torch.where instead of if, equal to a per-task loop with if, to 1e-12."""
    model = linear()
    base = _base(model)
    xs, ys = data()

    def with_where(p, batch, _):
        loss = base(p, batch)
        return torch.where(loss > 1, 2 * loss, loss)

    def with_if(p, batch, _):
        loss = base(p, batch)
        return 2 * loss if loss > 1 else loss

    with torch.no_grad():
        fast = ng.train(with_where, fresh(model), ng.optim.SGD(lr=0.1), [(xs, ys)], steps=STEPS, tasks=N)
        for i in range(N):
            wi = ng.train(with_if, fresh(model), ng.optim.SGD(lr=0.1), [(xs[i], ys[i])], steps=STEPS)
            for k in wi:
                close(fast[k][i], wi[k])


# ------------------------------------------------------------------ 6. continuing from stacked weights
def test_stacked_weights_passed_as_shared_say_they_are_stacked_and_how_to_pass_them():
    model = linear()
    xs, ys = data()
    first = ng.train(loss_of(model), fresh(model), ng.optim.SGD(lr=0.1), [(xs, ys)], steps=STEPS, tasks=N)
    with pytest.raises(ValueError, match=r"look like stacked per-task weights") as info:
        ng.train(loss_of(model), first, ng.optim.SGD(lr=0.1), [(xs, ys)], steps=STEPS, tasks=N)
    text = str(info.value)
    assert "tasks=ng.Tasks(3, params=0)" in text and "'weight' has shape (3, 4, 3) in each task" in text
    assert isinstance(info.value.__cause__, ValueError) and "nestgrad.call" in str(info.value.__cause__)

    # what it says to do continues the run: 3 + 3 steps equal 6 steps, to 1e-12
    again = ng.train(loss_of(model), first, ng.optim.SGD(lr=0.1), [(xs, ys)], steps=STEPS, tasks=ng.Tasks(N, params=0))
    whole = ng.train(loss_of(model), fresh(model), ng.optim.SGD(lr=0.1), [(xs, ys)], steps=2 * STEPS, tasks=N)
    for k in whole:
        close(again[k].detach(), whole[k].detach())


def test_stacked_weights_in_a_hand_written_loss_raise_the_same_hint():
    """Without ng.call, torch's own shape error (a RuntimeError) gets the same hint, and stays its cause."""
    g = torch.Generator().manual_seed(0)
    w = {"w": torch.randn(N, 4, 3, dtype=torch.float64, generator=g).requires_grad_()}  # stacked, leading N
    xs, ys = data()

    def loss_fn(p, batch, _):
        x, y = batch
        return ((F.linear(x, p["w"]) - y) ** 2).mean()

    with pytest.raises(RuntimeError, match=r"params \['w'\] look like stacked per-task weights") as info:
        ng.train(loss_fn, w, ng.optim.SGD(lr=0.1), [(xs, ys)], steps=STEPS, tasks=N)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_an_unrelated_error_is_not_blamed_on_stacking():
    """Shared weights of which only some start with n: loss_fn's own error comes through unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, N), nn.Linear(N, 2)).double()  # '0.*' lead with N=3, '1.weight' with 2

    def loss_fn(p, batch, _):
        raise ValueError("my own bug")

    with pytest.raises(ValueError, match=r"^my own bug$"):
        ng.train(loss_fn, fresh(model), ng.optim.SGD(lr=0.1), [data()], steps=STEPS, tasks=N)
