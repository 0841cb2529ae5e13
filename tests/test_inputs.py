"""What reaches the training loss, and what the backward pass reads again.

* A tensor that requires grad and reaches the loss outside ``hparams`` (a closure, a data
  function, a module's own weight) is found by every method that trains with its own copies
  of the hparams, which raise instead of dropping its gradient; Unroll, which records it, is
  exact.
* hparams used only from some step on are not reported as unused.
* Tensors a method reads again in its backward pass may not change in place before it.
* Bad inputs to ``train`` raise errors that name the real cause.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import nestgrad as ng

pytestmark = pytest.mark.usefixtures("float64")

ADJOINT = {
    "Reverse": lambda: ng.Reverse(),
    "Forward": lambda: ng.Forward(),
    "Implicit": lambda: ng.Implicit(),
    "FiniteDiff": lambda: ng.FiniteDiff(),
    "ZerothOrder": lambda: ng.ZerothOrder(samples=2, sigma=0.01, seed=0),
}


def regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(20, 3, generator=g), torch.randn(20, generator=g)


def weighted(p, batch, A):
    x, y = batch
    return (A * (x @ p["w"] - y) ** 2).mean()


def w0():
    return {"w": torch.zeros(3, requires_grad=True)}


def unroll_grad(loss_fn, A, data, steps=5, hparams=None):
    w = ng.train(loss_fn, w0(), ng.optim.SGD(lr=0.1), data, steps=steps, hparams=hparams)
    (g,) = torch.autograd.grad((w["w"] ** 2).sum(), A)
    return g


# ------------------------------------------------------------------------------ outside hparams
@pytest.mark.parametrize("name", list(ADJOINT))
def test_a_closed_over_hparam_raises_where_unroll_is_exact(name):
    x, y = regression()
    A = torch.ones(20, requires_grad=True)

    def closure(p, batch, _):
        return weighted(p, batch, A)  # reads A from the closure, not from its third argument

    g = unroll_grad(closure, A, [(x, y)], hparams=A)
    assert g.abs().sum() > 1e-3  # Unroll records the closure: a real gradient
    with pytest.raises(RuntimeError, match=rf"\({name}\): at step 0, the training loss depends on a leaf Tensor "
                                           r"of shape \(20,\).*third argument"):  # fmt: skip
        ng.train(closure, w0(), ng.optim.SGD(lr=0.1), [(x, y)], steps=5, hparams=A, method=ADJOINT[name]())


@pytest.mark.parametrize("name", list(ADJOINT))
def test_an_hparam_used_by_the_data_function_raises(name):
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    data = lambda t: (x * A[:, None], y)  # noqa: E731

    def loss_fn(p, batch, _):
        bx, by = batch
        return ((bx @ p["w"] - by) ** 2).mean()

    assert unroll_grad(loss_fn, A, data, hparams=A).abs().sum() > 1e-3
    with pytest.raises(RuntimeError, match=r"the training loss depends on a leaf Tensor.*data function"):
        ng.train(loss_fn, w0(), ng.optim.SGD(lr=0.1), data, steps=5, hparams=A, method=ADJOINT[name]())


def test_a_precomputed_batch_that_requires_grad_raises():
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    scaled = x * A[:, None]  # computed before the run: a non-leaf from outside the step

    def loss_fn(p, batch, _):
        bx, by = batch
        return ((bx @ p["w"] - by) ** 2).mean()

    with pytest.raises(RuntimeError, match=r"a Tensor computed before this step \(by MulBackward0\)"):
        ng.train(loss_fn, w0(), ng.optim.SGD(lr=0.1), [(scaled, y)], steps=3, hparams=A, method=ng.Reverse())


def test_a_module_weight_left_out_of_params_raises_and_names_the_fix():
    x, y = regression()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    params = {k: v for k, v in model.named_parameters() if k.startswith("0.")}  # the last layer is left out

    def loss_fn(p, batch, A):
        bx, by = batch
        return (A * (ng.call(model, p, bx).squeeze(1) - by) ** 2).mean()

    A = torch.ones(20, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"an nn.Parameter of shape .*pass it in params"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [(x, y)], steps=3, hparams=A, method=ng.Reverse())
    frozen = {**params, **{k: v.detach() for k, v in model.named_parameters() if k.startswith("1.")}}
    w = ng.train(loss_fn, frozen, ng.optim.SGD(lr=0.1), [(x, y)], steps=3, hparams=A, method=ng.Reverse())
    assert torch.autograd.grad(w["0.weight"].sum(), A)[0].abs().sum() > 0


def test_a_closure_used_only_from_a_late_step_is_found_by_the_next_power_of_two():
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    hp = torch.ones(20, requires_grad=True)

    def late(p, batch, h):
        return weighted(p, batch, h) + (weighted(p, batch, A) if step[0] >= 5 else 0.0)

    step = [0]

    def data(t):
        step[0] = t
        return (x, y)

    with pytest.raises(RuntimeError, match=r"at step 8, the training loss depends on a leaf Tensor"):
        ng.train(late, w0(), ng.optim.SGD(lr=0.01), data, steps=20, hparams=hp, method=ng.Reverse())


def test_tensors_passed_right_give_no_error_and_unroll_never_checks():
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    for method in [ng.Unroll(), *(m() for m in ADJOINT.values())]:
        ng.train(weighted, w0(), ng.optim.SGD(lr=0.1), [(x, y)], steps=3, hparams=A, method=method)


# ------------------------------------------------------------------------------ warnings must be true
def test_an_hparam_used_only_from_step_3_gives_no_warning_and_the_right_gradient():
    x, y = regression()
    A = torch.ones(20, requires_grad=True)

    def loss_fn(p, batch, h):
        bx, by, t = batch
        weights = h if t >= 3 else torch.ones_like(h)
        return (weights * (bx @ p["w"] - by) ** 2).mean()

    data = lambda t: (x, y, t)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = {}
        for name, method in [("Unroll", ng.Unroll()), ("Reverse", ng.Reverse()), ("Forward", ng.Forward())]:
            w = ng.train(loss_fn, w0(), ng.optim.SGD(lr=0.1), data, steps=6, hparams=A, method=method)
            (got[name],) = torch.autograd.grad((w["w"] ** 2).sum(), A)
    assert got["Unroll"].abs().sum() > 1e-3
    torch.testing.assert_close(got["Reverse"], got["Unroll"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got["Forward"], got["Unroll"], rtol=1e-10, atol=1e-14)


def test_hparams_no_step_uses_still_warn_once_at_the_end():
    x, y = regression()
    A = torch.ones(20, requires_grad=True)

    def ignores(p, batch, h):
        x, y = batch
        return ((x @ p["w"] - y) ** 2).mean()

    with pytest.warns(UserWarning, match="at none of the 4 steps") as record:
        ng.train(ignores, w0(), ng.optim.SGD(lr=0.1), [(x, y)], steps=4, hparams=A)
    assert len([w for w in record if "at none" in str(w.message)]) == 1


# ------------------------------------------------------------------------------ changed before backward
def change(tensor):
    with torch.no_grad():
        tensor.mul_(1.5)


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("Implicit", "hparams"),
        ("Implicit", "trained"),
        ("ZerothOrder", "hparams"),
        ("Reverse", "hparams"),
        ("FiniteDiff", "hparams"),
    ],
)
def test_a_tensor_read_again_in_backward_may_not_change_in_place(name, target):
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    params = w0()
    w = ng.train(weighted, params, ng.optim.SGD(lr=0.1), [(x, y)], steps=30, hparams=A, method=ADJOINT[name]())
    loss = w["w"].sum()  # sum saves nothing, so autograd itself would not notice a change
    change({"hparams": A, "params": params["w"], "trained": w["w"]}[target])
    with pytest.raises(RuntimeError, match=rf"\({name}\): .* was modified in place after nestgrad.train returned"):
        torch.autograd.grad(loss, A)


def test_forward_reads_nothing_again_so_changing_a_after_train_is_fine():
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    w = ng.train(weighted, w0(), ng.optim.SGD(lr=0.1), [(x, y)], steps=5, hparams=A, method=ng.Forward())
    expected = torch.autograd.grad((w["w"] ** 2).sum(), A, retain_graph=True)[0]
    change(A)
    torch.testing.assert_close(torch.autograd.grad((w["w"] ** 2).sum(), A)[0], expected, rtol=0, atol=0)


def test_changing_a_after_backward_is_the_normal_outer_loop():
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    for _ in range(2):
        w = ng.train(weighted, w0(), ng.optim.SGD(lr=0.1), [(x, y)], steps=10, hparams=A, method=ng.Implicit())
        (g,) = torch.autograd.grad((w["w"] ** 2).sum(), A)
        with torch.no_grad():
            A -= 0.1 * g


# ------------------------------------------------------------------------------ bad inputs, true messages
def test_messages_name_the_real_cause():
    x, y = regression()
    opt = ng.optim.SGD(lr=0.1)
    with pytest.raises(ValueError, match="params is empty"):
        ng.train(weighted, {}, opt, [(x, y)], steps=1)
    with pytest.raises(TypeError, match=r"only non-floating-point tensors \(torch.int64\)"):
        ng.train(weighted, {"w": torch.zeros(3, dtype=torch.int64)}, opt, [(x, y)], steps=1)
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        ng.train(weighted, {"w": torch.zeros(3, device="meta", requires_grad=True)}, opt, [(x, y)], steps=1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inside torch.inference_mode\(\).*no_grad"):
        ng.train(weighted, w0(), opt, [(x, y)], steps=1)
    with torch.inference_mode():
        inference = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"created under torch\.inference_mode"):
        ng.train(weighted, {"w": inference.requires_grad_(False)}, opt, [(x, y)], steps=1)


def test_integer_and_complex_losses_are_named():
    x, y = regression()

    def count(p, batch, A):
        return ((batch[0] @ p["w"]) > 0).sum()

    def complex_loss(p, batch, A):
        return (batch[0] @ p["w"]).to(torch.complex128).sum()

    with pytest.raises(TypeError, match=r"torch.int64 Tensor at step 0, which has no gradient.*cross_entropy"):
        ng.train(count, w0(), ng.optim.SGD(lr=0.1), [(x, y)], steps=1)
    with pytest.raises(TypeError, match=r"complex scalar.*loss.abs\(\)"):
        ng.train(complex_loss, w0(), ng.optim.SGD(lr=0.1), [(x, y)], steps=1)


@pytest.mark.parametrize("method", [ng.Unroll(), ng.Reverse()], ids=["Unroll", "Reverse"])
def test_out_of_memory_names_the_method_the_step_and_the_alternatives(method):
    x, y = regression()

    def hungry(p, batch, A):
        if step[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        step[0] += 1
        return F.mse_loss(batch[0] @ p["w"], batch[1])

    step = [0]
    name = type(method).__name__
    with pytest.raises(torch.OutOfMemoryError, match=rf"\({name}\): out of memory at step 3 of 10.*checkpoint_every"):
        ng.train(hungry, w0(), ng.optim.SGD(lr=0.1), [(x, y)], steps=10, method=method)


def test_cpu_out_of_memory_is_recognised_too():
    def cpu_oom(p, batch, A):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    x, y = regression()
    with pytest.raises(torch.OutOfMemoryError, match=r"\(Unroll\): out of memory at step 0 of 2") as info:
        ng.train(cpu_oom, w0(), ng.optim.SGD(lr=0.1), [(x, y)], steps=2)
    assert "can't allocate" in str(info.value.__cause__)
