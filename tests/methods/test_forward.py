"""Forward (forward-mode hypergradients): exactness against Unroll, a closed form and finite differences;
mse/huber losses, dropout, optimizer state that depends on hyperparameters, composition across levels,
memory independent of the number of steps, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
import torch.utils._pytree as pytree

import nestgrad as ng
from nestgrad._data import Batches
from nestgrad._problem import Problem
from nestgrad.methods._forward import Forward, ForwardRun, Jacobian
from nestgrad.methods._reverse import Reverse

pytestmark = pytest.mark.usefixtures("float64")


def mlp(seed: int = 0, n: int = 24, dropout: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    layers = [torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)]
    if dropout:
        layers.insert(1, torch.nn.Dropout(dropout))
    model = torch.nn.Sequential(*layers)
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model, X, y


def batches(X, y, size=8):
    return [(X[i : i + size], y[i : i + size], torch.arange(i, i + size)) for i in range(0, len(X), size)]


def weighted_loss(model):
    """Per-example loss weights sigmoid(A), times a constant scale that is an hparam without grad."""

    def loss_fn(params, batch, hp):
        A, scale = hp
        x, y, idx = batch
        losses = F.cross_entropy(ng.call(model, params, x), y, reduction="none")
        return scale * (torch.sigmoid(A[idx]) * losses).mean()

    return loss_fn


def val_loss(model, params, X, y):
    return F.cross_entropy(ng.call(model, params, X), y)


def assert_close(a, b, tol=1e-10):
    assert torch.allclose(a, b, rtol=tol, atol=tol * 1e-3), (a - b).abs().max()


OPTIMIZERS = {
    "adam": lambda lr: ng.optim.Adam(lr=lr, betas=(torch.tensor(0.8, requires_grad=True), 0.99)),
    "sgd_momentum": lambda lr: ng.optim.SGD(lr=lr, momentum=torch.tensor(0.9, requires_grad=True)),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_forward_equals_unroll_for_loss_weights_and_optimizer_hparams(name):
    model, X, y = mlp()
    data = batches(X, y)
    params = dict(model.named_parameters())
    A = torch.randn(len(X), generator=torch.Generator().manual_seed(1)).requires_grad_()
    scale = torch.tensor(1.5)  # an hparam that does not require grad: no rows, no gradient
    lr = torch.tensor(0.05 if name == "adam" else 0.1, requires_grad=True)
    opt = OPTIMIZERS[name](lr)
    results = {}
    methods = {"unroll": ng.Unroll(), "forward": Forward(), "double-backward": Forward(mode="double-backward")}
    for key, method in methods.items():
        trained = ng.train(weighted_loss(model), params, opt, data, steps=12, hparams=(A, scale), method=method)
        grads = torch.autograd.grad(val_loss(model, trained, X, y), [A, lr, *opt.tensors()[1:]])
        results[key] = trained, grads
    assert methods["forward"].last_run == ForwardRun(12, 0)  # forward-mode AD at every step, no fallback
    assert methods["forward"].last_run.path == "forward-mode"
    assert methods["double-backward"].last_run == ForwardRun(0, 12, "mode='double-backward'")
    w_ref, g_ref = results["unroll"]
    assert len(g_ref) == 3
    assert g_ref[0].abs().max() > 1e-4 and g_ref[1].abs() > 1e-4 and g_ref[2].abs() > 1e-4  # all really matter
    for key in ("forward", "double-backward"):
        w, g = results[key]
        for k in w_ref:
            assert_close(w[k], w_ref[k], 1e-12)
        for a, b in zip(g, g_ref, strict=True):
            assert_close(a, b)


def test_forward_matches_the_closed_form_of_gradient_descent_on_a_quadratic():
    """f(w) = a/2 (w - c)^2, plain GD: w_T = c + r^T (w_0 - c) with r = 1 - lr a."""
    a, w0, T = 0.7, 2.0, 50
    c = torch.tensor(-1.0, requires_grad=True)
    lr = torch.tensor(0.3, requires_grad=True)
    trained = ng.train(
        lambda p, _, c_: 0.5 * a * ((p["w"] - c_) ** 2).sum(),
        {"w": torch.tensor([w0], requires_grad=True)},
        ng.optim.SGD(lr=lr),
        [None],
        steps=T,
        hparams=c,
        method=Forward(),
    )
    dc, dlr = torch.autograd.grad(trained["w"].sum(), [c, lr])
    r = 1 - lr.item() * a
    assert abs(trained["w"].item() - (c.item() + r**T * (w0 - c.item()))) < 1e-13
    assert abs(dc.item() - (1 - r**T)) < 1e-13
    assert abs(dlr.item() - (-T * a * r ** (T - 1) * (w0 - c.item()))) < 1e-13


@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    """Chunks of 5 over 24 + 1 directions straddle the boundary between A and lr."""
    model, X, y = mlp(2)
    data = batches(X, y)
    params = dict(model.named_parameters())
    A = torch.zeros(len(X), requires_grad=True)
    lr = torch.tensor(0.05, requires_grad=True)

    def hypergrad(method):
        opt = ng.optim.Adam(lr=lr)
        trained = ng.train(
            weighted_loss(model), params, opt, data, steps=5, hparams=(A, torch.tensor(1.0)), method=method
        )
        return torch.autograd.grad(val_loss(model, trained, X, y), [A, lr])

    for a, b in zip(hypergrad(Forward(chunk_size=chunk_size)), hypergrad(Forward(chunk_size=25))):
        assert_close(a, b, 1e-12)


def regression():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 4, generator=g)
    y = torch.randn(20, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    torch.manual_seed(3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model, X, y


LOSSES = {"mse": F.mse_loss, "huber": lambda out, y: F.huber_loss(out, y, delta=0.5)}


@pytest.mark.parametrize("loss", LOSSES)
def test_forward_works_through_mse_and_huber_losses(loss):
    """The losses where forward-over-reverse fails on torch 2.13 (see the next test)."""
    model, X, y = regression()
    params = dict(model.named_parameters())
    s = torch.ones(4, requires_grad=True)  # per-feature input scaling
    lr = torch.tensor(0.1, requires_grad=True)

    def loss_fn(p, batch, scale):
        x, target = batch
        return LOSSES[loss](ng.call(model, p, x * scale).squeeze(-1), target)

    def train(method):
        return ng.train(
            loss_fn,
            params,
            ng.optim.SGD(lr=lr, momentum=0.5),
            [(X[:10], y[:10]), (X[10:], y[10:])],
            steps=8,
            hparams=s,
            method=method,
        )

    grads = []
    forward = Forward()
    for method in (ng.Unroll(), forward):
        val = F.mse_loss(ng.call(model, train(method), X).squeeze(-1), y)
        grads.append(torch.autograd.grad(val, [s, lr]))
    assert grads[0][0].abs().max() > 1e-4
    for a, b in zip(*grads):
        assert_close(a, b)
    # Forward mode failed (at the first step whose weights had tangents) and the double-backward trick took over.
    run = forward.last_run
    assert run.path in ("double-backward", "mixed") and run.fallback_step in (0, 1)
    assert run.double_backward_steps == 8 - run.fallback_step == 8 - run.forward_steps
    assert ("ZeroTensors are immutable" if loss == "mse" else "huber_loss_backward") in run.reason
    with pytest.raises(
        RuntimeError, match=r"mode='forward'.*failed at step [01].*nestgrad.Forward\(\) \(mode='auto'\)"
    ):
        train(Forward(mode="forward"))


# torch.autograd.forward_ad loads torch's jvp decompositions, which call the deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("loss", LOSSES)
def test_forward_over_reverse_still_fails_through_these_losses_on_this_torch(loss):
    """Why Forward uses the double-backward trick rather than forward-mode AD (pytorch#123996 for mse).

    If this starts failing, torch has fixed forward AD through these backward ops, and
    the reasons given in Forward's docstring need updating.
    """
    g = torch.Generator().manual_seed(4)
    x, target, w, v = torch.randn(5, 3, generator=g), torch.randn(5, generator=g), torch.randn(3), torch.randn(3)
    match = "ZeroTensors are immutable" if loss == "mse" else "huber_loss_backward"

    def f(w):
        return LOSSES[loss](x @ w, target)

    with pytest.raises(RuntimeError, match=match):
        torch.func.jvp(torch.func.grad(f), (w,), (v,))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=match):
        leaf = w.clone().requires_grad_()
        torch.autograd.grad(f(fwAD.make_dual(leaf, v)), leaf, create_graph=True)
    # The double-backward trick gives the exact Hessian-vector product.
    leaf = w.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(leaf), leaf, create_graph=True)
    u = torch.zeros_like(grad, requires_grad=True)
    (vjp,) = torch.autograd.grad(grad, leaf, u, create_graph=True)
    (jvp,) = torch.autograd.grad(vjp, u, v)
    assert_close(jvp, torch.autograd.functional.hvp(f, w, v)[1], 1e-12)


def test_saved_jacobian_has_a_size_independent_of_the_number_of_steps():
    model, X, y = mlp(5)
    data = batches(X, y)
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    A = torch.zeros(len(X), requires_grad=True)
    lr = torch.tensor(0.05, requires_grad=True)
    K = len(X) + 1
    sizes = []
    for steps in (2, 20):
        opt = ng.optim.Adam(lr=lr)
        problem = Problem(weighted_loss(model), opt, Batches(data, steps), steps, (A, torch.tensor(1.0)), {})
        _, _, saved = Forward().forward(problem, params)
        assert isinstance(saved, Jacobian)
        tensors = [t for t in pytree.tree_leaves(saved) if isinstance(t, torch.Tensor)]
        assert [tuple(t.shape) for t in tensors] == [(K, *p.shape) for p in params.values()]
        sizes.append(sum(t.numel() for t in tensors))
        assert saved.slices == [(0, len(X)), None, (len(X), K)]
    assert sizes[0] == sizes[1] == K * sum(p.numel() for p in params.values())


def test_too_many_hparams_is_a_clear_error_not_an_out_of_memory():
    model, X, y = mlp(6)
    params = dict(model.named_parameters())
    A = torch.zeros(len(X), requires_grad=True)
    lr = torch.tensor(0.05, requires_grad=True)
    opt = ng.optim.SGD(lr=lr)
    with pytest.raises(ValueError) as info:
        ng.train(
            weighted_loss(model),
            params,
            opt,
            batches(X, y),
            steps=2,
            hparams=(A, torch.tensor(1.0)),
            method=Forward(max_hparams=24),
        )
    message = str(info.value)
    for part in ("25 elements", "max_hparams=24", "nestgrad.Reverse", "nestgrad.Implicit", "max_hparams=25"):
        assert part in message
    # At the limit it runs; hparams that do not require grad do not count.
    ng.train(
        weighted_loss(model),
        params,
        opt,
        batches(X, y),
        steps=2,
        hparams=(A, torch.tensor(1.0)),
        method=Forward(max_hparams=25),
    )
    ng.train(
        weighted_loss(model),
        params,
        ng.optim.SGD(lr=0.1),
        batches(X, y),
        steps=2,
        hparams=(A, torch.tensor(1.0)),
        method=Forward(max_hparams=24),
    )


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "16", None])
def test_max_hparams_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match=r"max_hparams must be a positive int; got"):
        Forward(max_hparams=value)


@pytest.mark.parametrize("value", [0, 1.0, False])
def test_chunk_size_must_be_a_positive_int_or_none(value):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None"):
        Forward(chunk_size=value)


def test_asking_for_the_gradient_w_r_t_the_initial_params_raises():
    model, X, y = mlp(7)
    params = dict(model.named_parameters())
    A = torch.zeros(len(X), requires_grad=True)
    trained = ng.train(
        weighted_loss(model),
        params,
        ng.optim.SGD(lr=0.1),
        batches(X, y),
        steps=3,
        hparams=(A, torch.tensor(1.0)),
        method=Forward(),
    )
    assert Forward.differentiates_params is False
    val = val_loss(model, trained, X, y)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(val, params["0.weight"], retain_graph=True)
    (dA,) = torch.autograd.grad(val, A)
    assert dA.abs().max() > 1e-5


LEVEL_METHODS = [(ng.Unroll(), Forward()), (Reverse(), Forward()), (Forward(), ng.Unroll()), (Forward(), Forward())]


@pytest.mark.parametrize(("first", "second"), LEVEL_METHODS, ids=lambda m: type(m).__name__)
def test_two_levels_compose_and_match_central_finite_differences(first, second):
    """A weights level 1's examples; level 2 fits level 1's predictions; the outer loss is level 2's fit."""
    g = torch.Generator().manual_seed(8)
    X = torch.randn(12, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(12, generator=g)
    X2 = torch.randn(12, 3, generator=g)
    A = torch.rand(12, generator=g).requires_grad_()

    def loss1(p, batch, a):
        return (a * (X @ p["w"] - y) ** 2).mean()

    def loss2(q, batch, w1):
        return ((torch.tanh(X2 @ q["v"]) - X2 @ w1["w"]) ** 2).mean()

    def outer(a):
        w1 = ng.train(
            loss1,
            {"w": torch.zeros(3, requires_grad=True)},
            ng.optim.SGD(lr=0.1, momentum=0.5),
            [None],
            steps=6,
            hparams=a,
            method=first,
        )
        w2 = ng.train(
            loss2,
            {"v": torch.full((3,), 0.1, requires_grad=True)},
            ng.optim.Adam(lr=0.05),
            [None],
            steps=6,
            hparams=w1,
            method=second,
        )
        return ((torch.tanh(X @ w2["v"]) - y) ** 2).mean()

    (grad,) = torch.autograd.grad(outer(A), A)
    v = torch.randn(12, generator=g)
    h = 1e-5
    with torch.no_grad():
        fd = (outer(A + h * v) - outer(A - h * v)) / (2 * h)
    assert abs(fd) > 1e-6
    assert abs(grad @ v - fd) <= 1e-6 * abs(fd)


def test_dropout_uses_the_randomness_of_training():
    model, X, y = mlp(9, dropout=0.3)
    model.train()
    data = batches(X, y)
    params = dict(model.named_parameters())
    A = torch.zeros(len(X), requires_grad=True)

    def run(method, seed):
        torch.manual_seed(seed)
        trained = ng.train(
            weighted_loss(model),
            params,
            ng.optim.Adam(lr=0.05),
            data,
            steps=6,
            hparams=(A, torch.tensor(1.0)),
            method=method,
        )
        after = torch.get_rng_state()
        model.eval()  # no dropout in the validation loss
        (dA,) = torch.autograd.grad(val_loss(model, trained, X, y), A)
        model.train()
        return dA, after

    g_ref, rng_ref = run(ng.Unroll(), 10)
    forward = Forward()
    g, rng = run(forward, 10)
    g_other, _ = run(Forward(), 11)
    assert_close(g, g_ref)
    assert torch.equal(rng, rng_ref)  # consumed the same random numbers as Unroll
    assert not torch.allclose(g, g_other, rtol=1e-3)  # dropout really changes the result
    # vmap refuses random ops (it would draw other numbers than training): the double-backward trick ran.
    assert forward.last_run.path == "double-backward" and "random operation" in forward.last_run.reason


@pytest.mark.parametrize("which", ["adagrad", "rprop"])
def test_initial_optimizer_state_that_depends_on_hparams(which):
    """Adagrad's initial_accumulator_value and Rprop's lr enter through init(), before any step."""
    g = torch.Generator().manual_seed(12)
    X = torch.randn(16, 3, generator=g)
    y = torch.randn(16, generator=g)
    lr = torch.tensor(0.1, requires_grad=True)
    init = torch.tensor(0.3, requires_grad=True)
    if which == "adagrad":
        opt = ng.optim.Adagrad(lr=lr, initial_accumulator_value=init)
    else:
        opt = ng.optim.Rprop(lr=lr)
    grads = []
    for method in (ng.Unroll(), Forward()):
        trained = ng.train(
            lambda p, b, _: F.mse_loss(X @ p["w"], y),
            {"w": torch.zeros(3, requires_grad=True)},
            opt,
            [None],
            steps=5,
            method=method,
        )
        grads.append(torch.autograd.grad(F.mse_loss(X @ trained["w"], y), opt.tensors()))
    assert all(g.abs() > 1e-3 for g in grads[0])
    for a, b in zip(*grads):
        assert_close(a, b)


def test_params_without_a_gradient_at_some_steps_keep_their_tangents():
    """The second layer is only used at even steps; at odd steps it passes through unchanged."""
    g = torch.Generator().manual_seed(13)
    X = torch.randn(10, 3, generator=g)
    y = torch.randn(10, generator=g)
    A = torch.rand(10, generator=g).requires_grad_()
    params = {"w": torch.randn(3, 4, generator=g).requires_grad_(), "v": torch.randn(4, generator=g).requires_grad_()}

    def loss_fn(p, t, a):
        h = torch.tanh(X @ p["w"])
        out = h @ p["v"] if t % 2 == 0 else h.sum(-1)
        return (a * (out - y) ** 2).mean()

    grads = []
    for method in (ng.Unroll(), Forward()):
        trained = ng.train(
            loss_fn, params, ng.optim.SGD(lr=0.1, momentum=0.9), lambda t: t, steps=7, hparams=A, method=method
        )
        val = ((torch.tanh(X @ trained["w"]) @ trained["v"] - y) ** 2).mean()
        grads.append(torch.autograd.grad(val, A))
    assert_close(grads[1][0], grads[0][0])


def test_iterator_data_and_optimizer_only_hparams():
    g = torch.Generator().manual_seed(14)
    X = torch.randn(30, 3, generator=g)
    y = torch.randn(30, generator=g)
    data = [(X[i : i + 10], y[i : i + 10]) for i in range(0, 30, 10)]
    lr = torch.tensor(0.05, requires_grad=True)
    grads = []
    for method in (ng.Unroll(), Forward()):
        trained = ng.train(
            lambda p, b, _: F.mse_loss(b[0] @ p["w"], b[1]),
            {"w": torch.zeros(3, requires_grad=True)},
            ng.optim.Adam(lr=lr),
            iter(data),
            steps=3,
            method=method,
        )
        grads.append(torch.autograd.grad(F.mse_loss(X @ trained["w"], y), lr))
    assert grads[0][0].abs() > 1e-4
    assert_close(grads[1][0], grads[0][0])


def test_without_hparams_that_require_grad_it_is_plain_training():
    model, X, y = mlp(15)
    params = dict(model.named_parameters())
    A = torch.zeros(len(X))
    outs = []
    for method in (ng.Unroll(), Forward()):
        with pytest.warns(UserWarning, match="none requires grad"):
            outs.append(
                ng.train(
                    weighted_loss(model),
                    params,
                    ng.optim.SGD(lr=0.1),
                    batches(X, y),
                    steps=4,
                    hparams=(A, torch.tensor(1.0)),
                    method=method,
                )
            )
    for k in params:
        assert not outs[1][k].requires_grad
        assert_close(outs[1][k], outs[0][k], 1e-12)


@pytest.mark.slow
def test_many_hparams_and_steps_equal_reverse():
    """300 per-example weights plus lr, 60 steps of Adam, against Reverse (exact, low memory)."""
    model, X, y = mlp(16, n=300)
    data = batches(X, y, size=50)
    params = dict(model.named_parameters())
    A = torch.randn(len(X), generator=torch.Generator().manual_seed(17)).requires_grad_()
    lr = torch.tensor(0.02, requires_grad=True)
    grads = []
    for method in (Reverse(), Forward(chunk_size=64)):
        trained = ng.train(
            weighted_loss(model),
            params,
            ng.optim.Adam(lr=lr),
            data,
            steps=60,
            hparams=(A, torch.tensor(1.0)),
            method=method,
        )
        grads.append(torch.autograd.grad(val_loss(model, trained, X, y), [A, lr]))
    for a, b in zip(*grads):
        assert_close(a, b)


def test_2d_nll_loss_gap_of_the_double_backward_trick_is_explained_and_forward_mode_has_none():
    """torch 2.13 cannot double-backward the 2-D NLL loss with Forward's cotangents: say how to flatten.

    Forward-mode AD has no such gap: the default mode runs it and matches Unroll.
    """
    torch.manual_seed(0)
    w = {"w": torch.randn(4, 3, requires_grad=True)}
    x = torch.randn(2, 5, 4)
    labels = torch.randint(0, 3, (2, 5))
    a = torch.ones(2, requires_grad=True)

    def seq_loss(p, batch, a):
        logits = x @ p["w"]  # (N, d, C)
        return (a[:, None] * F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")).mean()

    def flat_loss(p, batch, a):
        logits = x @ p["w"]
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        return (a[:, None] * per_token).mean()

    opt = ng.optim.SGD(lr=0.1)
    with pytest.raises(RuntimeError, match=r"flatten\(0, 1\)"):
        ng.train(seq_loss, w, opt, [None], steps=2, hparams=a, method=Forward(mode="double-backward"))
    ref = ng.train(flat_loss, w, opt, [None], steps=2, hparams=a)
    (g_ref,) = torch.autograd.grad(ref["w"].pow(2).sum(), a)
    assert g_ref.abs().max() > 1e-4
    for loss_fn, method in [
        (flat_loss, Forward(mode="double-backward")),
        (flat_loss, Forward()),
        (seq_loss, Forward(mode="forward")),
    ]:
        out = ng.train(loss_fn, w, opt, [None], steps=2, hparams=a, method=method)
        (g,) = torch.autograd.grad(out["w"].pow(2).sum(), a)
        assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)


def test_a_loss_that_forward_mode_cannot_take_from_some_step_on_falls_back_there_and_stays_exact():
    """Cross-entropy for two steps, then mean squared error: forward mode, then the double-backward trick."""
    model, X, y = mlp(18)
    params = dict(model.named_parameters())
    A = torch.randn(len(X), generator=torch.Generator().manual_seed(19)).requires_grad_()
    target = F.one_hot(y, 3).double()

    def loss_fn(p, t, a):
        out = ng.call(model, p, X)
        if t < 2:
            return (torch.sigmoid(a) * F.cross_entropy(out, y, reduction="none")).mean()
        return F.mse_loss(torch.sigmoid(a)[:, None] * out, target)

    runs = []
    grads = []
    for method in (ng.Unroll(), Forward(on_run=runs.append)):
        trained = ng.train(loss_fn, params, ng.optim.Adam(lr=0.05), lambda t: t, steps=5, hparams=A, method=method)
        grads.append(torch.autograd.grad(val_loss(model, trained, X, y), A)[0])
    assert grads[0].abs().max() > 1e-4
    assert_close(grads[1], grads[0])
    (run,) = runs
    assert run.path == "mixed"
    assert (run.forward_steps, run.double_backward_steps, run.fallback_step) == (2, 3, 2)
    assert "ZeroTensors are immutable" in run.reason


@pytest.mark.parametrize("mode", ["auto", "double-backward"])
def test_a_given_and_returned_optimizer_state_in_forward_mode(mode):
    """Start from a state (Adam's moments and step counts), return the final one, differentiate through both."""
    model, X, y = mlp(20)
    data = batches(X, y)
    A = torch.randn(len(X), generator=torch.Generator().manual_seed(21)).requires_grad_()
    lr = torch.tensor(0.03, requires_grad=True)
    opt = ng.optim.Adam(lr=lr, betas=(0.8, 0.95))
    with torch.no_grad():
        start, state = ng.train(
            weighted_loss(model), dict(model.named_parameters()), opt, data, steps=3,
            hparams=(A, torch.tensor(1.0)), return_state=True,
        )  # fmt: skip
    start = {k: v.requires_grad_() for k, v in start.items()}
    results = []
    forward = Forward(mode=mode)
    for method in (ng.Unroll(), forward):
        w, s = ng.train(
            weighted_loss(model), start, opt, data, steps=6, hparams=(A, torch.tensor(1.0)),
            state=state, return_state=True, method=method,
        )  # fmt: skip
        assert s.step == {k: 9 for k in start}
        outer = val_loss(model, w, X, y) + sum((x**2).sum() for x in s.tensors())
        results.append(torch.autograd.grad(outer, [A, lr]))
    assert forward.last_run.path == ("forward-mode" if mode == "auto" else "double-backward")
    assert results[0][0].abs().max() > 1e-4 and results[0][1].abs() > 1e-4
    for a, b in zip(*results, strict=True):
        assert_close(a, b)


def test_a_non_finite_training_step_and_an_infinite_tangent_raise_in_forward_mode():
    g = torch.Generator().manual_seed(22)
    X, y = torch.randn(12, 3, generator=g), torch.randn(12, generator=g)
    A = torch.ones(12, requires_grad=True)

    def loss_fn(p, batch, a):  # "unused" gets a gradient of exactly 0 at every step
        return (a * (X @ p["w"] - y) ** 2).mean() + 0 * p["unused"].sum() ** 2

    params = {"w": torch.zeros(3, requires_grad=True), "unused": torch.zeros(2, requires_grad=True)}
    with pytest.raises(ng.NonFiniteError, match="step"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=1e200), [None], steps=5, hparams=A, method=Forward(mode="forward"))
    lr = torch.tensor(0.1, requires_grad=True)
    forward = Forward(mode="forward")
    w = ng.train(loss_fn, params, ng.optim.Adam(lr=lr, eps_root=0.0), [None], steps=4, hparams=A, method=forward)
    assert forward.last_run.path == "forward-mode"
    assert all(torch.isfinite(v).all() for v in w.values())  # training itself is finite; sqrt'(0) is not
    with pytest.raises(ng.NonFiniteError, match=r"hypergradient is not finite.*eps_root"):
        torch.autograd.grad((w["w"] ** 2).sum() + (w["unused"] ** 2).sum(), [A, lr])


def test_a_loss_that_differs_between_two_calls_of_one_step_raises_instead_of_giving_other_tangents():
    """Forward mode evaluates each step twice; Python-side state in loss_fn would put the tangents elsewhere."""
    model, X, y = mlp(23)
    calls = []

    def loss_fn(p, batch, a):
        calls.append(None)
        scale = 1.0 + 0.1 * (len(calls) % 2)  # e.g. a Python random number: not replayed
        return scale * (a * F.cross_entropy(ng.call(model, p, X), y, reduction="none")).mean()

    A = torch.ones(len(X), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"at step 0.*another training loss.*mode='double-backward'"):
        ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.1), [None], steps=3, hparams=A,
                 method=Forward())  # fmt: skip
    w = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.1), [None], steps=3, hparams=A,
                 method=Forward(mode="double-backward"))  # fmt: skip
    assert w["0.weight"].requires_grad


def test_mode_and_on_run_are_checked_and_last_run_starts_empty():
    with pytest.raises(ValueError, match=r"mode must be one of 'auto', 'forward', 'double-backward'; got 'jvp'"):
        Forward(mode="jvp")
    with pytest.raises(TypeError, match="on_run must be a callable"):
        Forward(on_run=[])
    assert Forward().last_run is None
    assert Forward(on_run=print) == Forward()  # the callback is not part of the method's identity


def test_batchnorm_buffers_advance_once_per_step_and_forward_mode_matches_unroll():
    """The forward-mode evaluation runs on throwaway buffers; the training step advances the run's own."""
    torch.manual_seed(24)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    def loss_fn(p, batch, h):
        return h * ((ng.call(model, p, x) - y) ** 2).mean()  # not F.mse_loss, which forward mode cannot take

    results = []
    forward = Forward(mode="forward")
    for method in (ng.Unroll(), forward):
        h = torch.tensor(0.7, requires_grad=True)
        out = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1, momentum=0.5), [None], steps=5, hparams=h, method=method)
        model.eval()
        val = ((ng.call(model, {k: out[k] for k in out}, x) - y) ** 2).mean()
        model.train()
        results.append((out, torch.autograd.grad(val, h)[0]))
    assert forward.last_run.path == "forward-mode"
    (ref, g_ref), (got, g) = results
    assert got["1.num_batches_tracked"].item() == 5
    for k in ("1.running_mean", "1.running_var"):
        assert_close(got[k], ref[k], 1e-12)
    assert abs(g_ref) > 1e-3
    assert_close(g, g_ref)


# ------------------------------------------------- tasks= with dropout
def _tasks_with_dropout(method: ng.Method):
    """Two tasks of an MLP with dropout, drawn independently per task (Tasks(randomness="different"))."""
    model, X, y = mlp(dropout=0.3)
    params = dict(model.named_parameters())
    Xs, ys = X[:16].reshape(2, 8, 5), y[:16].reshape(2, 8)
    A = torch.tensor(0.1, requires_grad=True)
    lr = torch.tensor(0.2, requires_grad=True)

    def loss_fn(p, batch, A):
        x, y = batch
        return F.cross_entropy(ng.call(model, p, x), y) + A * sum(v.square().sum() for v in p.values())

    torch.manual_seed(3)
    tasks = ng.Tasks(2, randomness="different")
    trained = ng.train(loss_fn, params, ng.optim.SGD(lr=lr), [(Xs, ys)], steps=3, hparams=A, method=method, tasks=tasks)
    outer = sum((v * torch.linspace(-1, 1, v.numel()).reshape(v.shape)).sum() for v in trained.values())
    return torch.autograd.grad(outer, [A, lr])


def test_forward_with_tasks_and_dropout_takes_its_fallback_and_equals_unroll():
    """The vmap over the hparam directions refuses dropout; Tasks(randomness=...) governs the tasks' vmap only."""
    method = Forward()
    got = _tasks_with_dropout(method)
    want = _tasks_with_dropout(ng.Unroll())
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, tol=1e-12)
    run = method.last_run
    assert run.path == "double-backward" and run.fallback_step == 0
    assert "randomness" in run.reason and not run.reason.startswith("RuntimeError: nestgrad")


def test_forward_mode_only_with_tasks_and_dropout_names_forward_mode():
    with pytest.raises(RuntimeError, match=r"^nestgrad\.Forward\(mode='forward'\): forward-mode AD .* random ops") as e:
        _tasks_with_dropout(Forward(mode="forward"))
    assert "Pass ng.Tasks(2, randomness='different')" not in str(e.value)
