"""NaN and inf are named where they appear, for every method, in training and in the backward pass.

The reference for "where" is a hand-written loop in plain torch that finds the first step whose
loss, weights or optimizer state is not finite.
"""

from __future__ import annotations

import pytest
import torch

import nestgrad as ng
from nestgrad._nonfinite import all_finite

pytestmark = pytest.mark.usefixtures("float64")

METHODS = {
    "Unroll": lambda: ng.Unroll(),
    "Reverse": lambda: ng.Reverse(),
    "Reverse(checkpoint_every=3)": lambda: ng.Reverse(checkpoint_every=3),
    "Reverse(checkpoints=2)": lambda: ng.Reverse(checkpoints=2),
    "Forward": lambda: ng.Forward(),
    "Implicit": lambda: ng.Implicit(),
    "Implicit(FixedPoint)": lambda: ng.Implicit(ng.FixedPoint()),
    "FiniteDiff": lambda: ng.FiniteDiff(),
    "ZerothOrder": lambda: ng.ZerothOrder(samples=2, sigma=0.01, seed=0),
}
ADJOINT = [k for k in METHODS if k != "Unroll"]


def regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(20, 3, generator=g), torch.randn(20, generator=g)
    return x, y


def weighted(p, batch, A=None):
    x, y = batch
    r2 = (x @ p["w"] - y) ** 2
    return (r2 if A is None else A * r2).mean()


def first_bad_step(lr: float, steps: int) -> int:
    """Plain torch SGD on the same problem: the first step whose loss or update is not finite."""
    x, y = regression()
    w = torch.zeros(3, requires_grad=True)
    A = torch.ones(20)
    for t in range(steps):
        loss = (A * (x @ w - y) ** 2).mean()
        (g,) = torch.autograd.grad(loss, w)
        w = (w - lr * g).detach().requires_grad_()
        if not (torch.isfinite(loss) and torch.isfinite(w).all()):
            return t
    raise AssertionError("the reference run stayed finite")


@pytest.mark.parametrize("name", list(METHODS))
def test_divergence_raises_at_the_first_non_finite_step(name):
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    expected = first_bad_step(1000.0, 80)
    with pytest.raises(ng.NonFiniteError, match=rf"\({name.split('(')[0]}\): at step {expected} of 80") as info:
        ng.train(weighted, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=1000.0), [(x, y)],
                 steps=80, hparams=A, method=METHODS[name]())  # fmt: skip
    assert "learning rate" in str(info.value) and "check_finite=False" in str(info.value)


def test_check_finite_false_lets_the_values_through_like_plain_torch():
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    steps = 200  # the loss overflows first; the weights follow a few steps later
    w = ng.train(weighted, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=1000.0), [(x, y)],
                 steps=steps, hparams=A, check_finite=False)["w"]  # fmt: skip
    assert not torch.isfinite(w).all()


def test_a_nan_gradient_is_named_with_its_parameter():
    x, y = regression()

    def loss_fn(p, batch, A):  # sqrt has an infinite derivative at the initial b = 0
        return weighted(p, batch, A) + torch.sqrt((p["b"] ** 2).sum())

    params = {"w": torch.zeros(3, requires_grad=True), "b": torch.zeros(2, requires_grad=True)}
    with pytest.raises(ng.NonFiniteError, match=r"step 0 of 5.*gradient of 'b' \(2 NaN of 2 elements\)") as info:
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [(x, y)], steps=5, hparams=torch.ones(20, requires_grad=True))
    assert "sqrt" in str(info.value) and "'w'" not in str(info.value)


def test_a_non_finite_state_slot_is_named_even_when_the_weights_stay_finite():
    x, y = regression()
    x = x * 1e200  # squared gradients overflow into exp_avg_sq while m / sqrt(v) stays finite

    with pytest.raises(ng.NonFiniteError, match=r"optimizer state 'exp_avg_sq' of 'w'"):
        ng.train(weighted, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.Adam(lr=0.1), [(x, y)], steps=5,
                 hparams=torch.ones(20, requires_grad=True))  # fmt: skip


def test_a_nan_loss_from_log_zero_names_the_loss():
    x, y = regression()

    def loss_fn(p, batch, A):
        return weighted(p, batch, A) + torch.log(torch.zeros(())) * 0  # log(0) * 0 = nan

    with pytest.raises(ng.NonFiniteError, match=r"step 0 of 3, the training loss is nan.*log\(0\)"):
        ng.train(loss_fn, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=0.1), [(x, y)], steps=3,
                 hparams=torch.ones(20, requires_grad=True))  # fmt: skip


def test_nan_initial_params_and_nan_hparams_are_named():
    x, y = regression()
    w = torch.tensor([0.0, float("nan"), 0.0], requires_grad=True)
    with pytest.raises(ng.NonFiniteError, match=r"the initial params are not finite: 'w'"):
        ng.train(weighted, {"w": w}, ng.optim.SGD(lr=0.1), [(x, y)], steps=3)
    A = torch.ones(20)
    A[4] = float("inf")
    with pytest.raises(ng.NonFiniteError, match=r"a hyperparameter is not finite: 'hparams' \(1 inf of 20"):
        ng.train(weighted, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=0.1), [(x, y)], steps=3,
                 hparams=A.requires_grad_())  # fmt: skip


def test_finite_diff_no_longer_turns_a_nan_run_into_a_zero_hypergradient():
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    with pytest.raises(ng.NonFiniteError, match="FiniteDiff"):
        ng.train(weighted, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=1e3), [(x, y)], steps=60,
                 hparams=A, method=ng.FiniteDiff())  # fmt: skip


def test_the_flags_are_read_in_batches_off_the_cpu(monkeypatch):
    """The accelerator path (flags kept on the device, read every CHECK_EVERY steps), run on the CPU."""
    import nestgrad._problem as train_module

    class OnDevice:  # a flag that claims to live on an accelerator, so that nothing is read per step
        def __init__(self, flag):
            self.flag, self.device = flag, torch.device("meta")

    reads = []
    # An accelerator's flag is exact (the infinity norm): no false alarm from an overflowing L2 norm.
    monkeypatch.setattr(train_module, "finite", lambda ts: OnDevice(torch.tensor(all_finite(ts))))
    monkeypatch.setattr(train_module, "CHECK_EVERY", 8)
    stack = torch.stack

    def read(xs, *args):
        if isinstance(xs[0], OnDevice):
            reads.append(len(xs))
            xs = [x.flag for x in xs]
        return stack(xs, *args)

    monkeypatch.setattr(train_module.torch, "stack", read)
    x, y = regression()
    expected = first_bad_step(1000.0, 80)
    with pytest.raises(ng.NonFiniteError, match=rf"at step {expected} of 80 \(details from step 47"):
        ng.train(weighted, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=1000.0), [(x, y)],
                 steps=80, hparams=torch.ones(20, requires_grad=True))  # fmt: skip
    assert reads == [8] * (expected // 8 + 1)  # one read per 8 steps, none per step


# ----------------------------------------------------------------------------------------- backward pass
def outer_nan(w):
    return (w["w"] ** 2).sum() * torch.tensor(float("nan"))


@pytest.mark.parametrize("name", ADJOINT)
def test_a_nan_outer_loss_is_blamed_on_the_outer_loss(name):
    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    w = ng.train(weighted, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=0.1), [(x, y)], steps=20,
                 hparams=A, method=METHODS[name]())  # fmt: skip
    with pytest.raises(ng.NonFiniteError, match=r"gradient arriving at the trained weights .*not finite.*outer loss"):
        torch.autograd.grad(outer_nan(w), A)


def zero_gradient_problem():
    """Adam with eps_root=0 and a weight whose gradient is always exactly 0: sqrt'(0) makes meta-gradients NaN."""
    x, y = regression()

    def loss_fn(p, batch, A):
        return weighted(p, batch, A) + 0 * p["unused"].sum() ** 2

    params = {"w": torch.zeros(3, requires_grad=True), "unused": torch.zeros(2, requires_grad=True)}
    lr = torch.tensor(0.1, requires_grad=True)
    return loss_fn, params, ng.optim.Adam(lr=lr, eps_root=0.0), [(x, y)], lr


@pytest.mark.parametrize("name", ["Reverse", "Reverse(checkpoint_every=3)", "Forward"])
def test_an_infinite_derivative_in_the_adjoint_raises_with_the_eps_root_fix(name):
    loss_fn, params, opt, data, lr = zero_gradient_problem()
    w = ng.train(loss_fn, params, opt, data, steps=6, method=METHODS[name]())
    # The training run itself is finite:
    assert all(torch.isfinite(v).all() for v in w.values())
    with pytest.raises(ng.NonFiniteError, match=r"hypergradient is not finite.*optimizer lr.*eps_root"):
        torch.autograd.grad((w["w"] ** 2).sum() + (w["unused"] ** 2).sum(), lr)


def test_the_same_run_with_the_default_eps_root_is_finite_and_matches_unroll():
    loss_fn, params, _, data, lr = zero_gradient_problem()
    got = {}
    for name in ["Unroll", "Reverse", "Forward"]:
        w = ng.train(loss_fn, params, ng.optim.Adam(lr=lr), data, steps=6, method=METHODS[name]())
        (got[name],) = torch.autograd.grad((w["w"] ** 2).sum() + (w["unused"] ** 2).sum(), lr)
    assert torch.isfinite(got["Unroll"])
    torch.testing.assert_close(got["Reverse"], got["Unroll"], rtol=1e-10, atol=0)
    torch.testing.assert_close(got["Forward"], got["Unroll"], rtol=1e-10, atol=0)


def test_check_finite_false_also_turns_off_the_backward_checks():
    loss_fn, params, opt, data, lr = zero_gradient_problem()
    w = ng.train(loss_fn, params, opt, data, steps=6, method=ng.Reverse(), check_finite=False)
    (g,) = torch.autograd.grad((w["w"] ** 2).sum() + (w["unused"] ** 2).sum(), lr)
    assert torch.isnan(g)


def test_check_finite_must_be_a_bool():
    x, y = regression()
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        ng.train(weighted, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=0.1), [(x, y)], steps=1,
                 check_finite="yes")  # fmt: skip


def test_huge_but_finite_float32_values_are_not_an_error():
    """The fast check's norm overflows on entries near float32's limit; the exact check clears them."""
    x = torch.ones(4, 3, dtype=torch.float32)
    w = torch.full((3,), 1e37, dtype=torch.float32, requires_grad=True)  # w**2 overflows, w does not

    def loss_fn(p, batch, A):
        return (x @ p["w"]).mean() * 1e-30  # finite loss, gradients and update

    trained = ng.train(loss_fn, {"w": w}, ng.optim.SGD(lr=0.1), [None], steps=3)
    assert torch.isfinite(trained["w"]).all() and not torch.isfinite(trained["w"].norm())
    torch.autograd.grad(trained["w"].sum() * 1e-30, w)  # the backward checks clear it as well


def test_a_zeroth_order_rerun_that_diverges_blames_sigma():
    x, y = regression()
    critical = float(2 / torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())  # SGD diverges above this lr
    lr = torch.tensor(0.9 * critical, requires_grad=True)  # stable; lr + sigma * 1.54 (the first direction) is not
    w = ng.train(weighted, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=lr), [(x, y)], steps=800,
                 method=ng.ZerothOrder(samples=2, sigma=0.5 * critical, seed=0))  # fmt: skip
    assert torch.isfinite(w["w"]).all()
    with pytest.raises(ng.NonFiniteError, match=r"re-run of training at hparams \+ sigma \* direction.*lower sigma"):
        torch.autograd.grad((w["w"] ** 2).sum(), lr)


@pytest.mark.parametrize("check_finite", [True, False])
def test_unroll_runs_are_freed_after_backward(check_finite):
    """The backward checks must not keep a run alive (a hook holding its tensors made a cycle: a leak per call)."""
    import gc
    import weakref

    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    w0 = {"w": torch.zeros(3, requires_grad=True)}
    w = ng.train(weighted, w0, ng.optim.SGD(lr=0.1), [(x, y)], steps=3, hparams=A, check_finite=check_finite)
    torch.autograd.grad((w["w"] ** 2).sum(), A)
    trained = weakref.ref(w["w"])
    del w
    gc.collect()
    assert trained() is None


@pytest.mark.parametrize("backward", [True, False], ids=["after-backward", "never-differentiated"])
def test_unroll_runs_are_freed_without_the_cycle_collector(backward):
    """No reference cycle through the run's graph: it dies with its last reference, gc off.

    torch's register_multi_grad_hook makes one (its hooks hold the nodes that hold them), so every
    Unroll call waited for the cycle collector: ~1 ms per call on small problems, and the graph's
    memory held until then.
    """
    import gc
    import weakref

    x, y = regression()
    A = torch.ones(20, requires_grad=True)
    w0 = {"w": torch.zeros(3, requires_grad=True)}
    saved = []  # weak references to an object that each step's graph node holds (in its ctx)

    class Token:
        pass

    class Mark(torch.autograd.Function):  # an identity whose node holds a token: alive exactly as long as the graph
        @staticmethod
        def forward(ctx, r, token):
            ctx.token = token
            return r.clone()

        @staticmethod
        def backward(ctx, g):
            return g, None

    def loss_fn(p, batch, A):
        token = Token()
        saved.append(weakref.ref(token))
        r = Mark.apply(x @ p["w"] - y, token)
        return (A * r**2).mean()

    gc.collect()
    gc.disable()
    try:
        w = ng.train(loss_fn, w0, ng.optim.SGD(lr=0.1), [(x, y)], steps=3, hparams=A)
        if backward:
            torch.autograd.grad((w["w"] ** 2).sum(), A, retain_graph=True)
        assert len(saved) == 3 and all(r() is not None for r in saved)  # held by the graph
        del w
        assert all(r() is None for r in saved)
    finally:
        gc.enable()


def test_watch_gradients_passes_every_gradient_of_a_pass_once_and_none_for_the_others():
    from nestgrad._nonfinite import watch_gradients

    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    va, vb, unused = a.view_as(a), b.view_as(b), a.view_as(a)
    calls = []
    watch_gradients([va, vb, unused], calls.append)
    loss = (va * 2).sum() + (vb**2).sum()
    torch.autograd.grad(loss, [a, b], retain_graph=True)
    assert len(calls) == 1
    torch.testing.assert_close(calls[0][0], torch.full((3,), 2.0))
    torch.testing.assert_close(calls[0][1], 2 * b.detach())
    assert calls[0][2] is None
    torch.autograd.grad(loss, [a])  # a second pass that needs va only: a second call, vb's entry None
    assert len(calls) == 2 and calls[1][1] is None and calls[1][2] is None

    def refuse(grads):
        raise ng.NonFiniteError("named")

    c = torch.randn(2, requires_grad=True)
    vc = c.view_as(c)
    watch_gradients([vc], refuse)
    with pytest.raises(ng.NonFiniteError, match="named"):
        torch.autograd.grad(vc.sum(), c)
