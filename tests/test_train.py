"""nestgrad.train with Unroll: exactness against hand-written unrolls and finite differences,
truncation, frozen weights, nesting, data handling, progress and errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import nestgrad as ng

pytestmark = pytest.mark.usefixtures("float64")


def problem(seed: int = 0, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model, X, y


def weighted_loss(model):
    def loss_fn(params, batch, A):
        x, y, idx = batch
        losses = F.cross_entropy(ng.call(model, params, x), y, reduction="none")
        return (torch.sigmoid(A[idx]) * losses).mean()

    return loss_fn


def batches(X, y, size=8):
    return [(X[i : i + size], y[i : i + size], torch.arange(i, i + size)) for i in range(0, len(X), size)]


def hand_unroll(model, params, A, data, steps, lr, momentum, first=0):
    """An independent reference: functional_call + autograd.grad(create_graph=True), SGD by hand."""
    p = dict(params)
    buf = None
    for t in range(steps):
        x, y, idx = data[t % len(data)]
        differentiable = t >= first
        if t == first and first > 0:
            p = {k: v.detach().requires_grad_() for k, v in p.items()}
            buf = [b.detach() for b in buf] if buf is not None else None
        loss = (
            torch.sigmoid(A[idx]) * F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")
        ).mean()
        gs = torch.autograd.grad(loss, list(p.values()), create_graph=differentiable)
        if not differentiable:
            p = {k: v.detach().requires_grad_() for k, v in p.items()}
        buf = list(gs) if buf is None else [momentum * b + g for b, g in zip(buf, gs)]
        p = {k: v - lr * b for (k, v), b in zip(p.items(), buf)}
    return p


def val_loss(model, params, X, y):
    return F.cross_entropy(ng.call(model, params, X), y)


def test_unroll_equals_hand_written_unroll_w_r_t_hparams_and_initial_params():
    model, X, y = problem()
    data = batches(X, y)
    A = torch.zeros(len(X), requires_grad=True)
    params = dict(model.named_parameters())
    opt = ng.optim.SGD(lr=0.3, momentum=0.9)
    ours = ng.train(weighted_loss(model), params, opt, data, steps=9, hparams=A)
    ref = hand_unroll(model, params, A, data, 9, 0.3, 0.9)
    inputs = [A, *params.values()]
    g_ours = torch.autograd.grad(val_loss(model, ours, X, y), inputs)
    g_ref = torch.autograd.grad(val_loss(model, ref, X, y), inputs)
    assert g_ours[0].abs().max() > 1e-4  # A really matters
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_unroll_hypergradient_matches_central_finite_differences():
    model, X, y = problem(1)
    data = batches(X, y)
    A = torch.randn(len(X), generator=torch.Generator().manual_seed(3), requires_grad=True)
    params = dict(model.named_parameters())
    opt = ng.optim.Adam(lr=0.05)

    def outer(a):
        return val_loss(model, ng.train(weighted_loss(model), params, opt, data, steps=10, hparams=a), X, y)

    (g,) = torch.autograd.grad(outer(A), A)
    v = torch.randn(len(X), generator=torch.Generator().manual_seed(4))
    h = 1e-5
    with torch.no_grad():
        fd = (outer(A + h * v) - outer(A - h * v)) / (2 * h)
    assert abs(g @ v - fd) <= 1e-7 * abs(fd)


def test_truncate_differentiates_only_the_last_steps():
    model, X, y = problem(2)
    data = batches(X, y)
    A = torch.zeros(len(X), requires_grad=True)
    params = dict(model.named_parameters())
    opt = ng.optim.SGD(lr=0.3, momentum=0.5)
    ours = ng.train(weighted_loss(model), params, opt, data, steps=9, hparams=A, method=ng.Unroll(truncate=3))
    ref = hand_unroll(model, params, A, data, 9, 0.3, 0.5, first=6)
    full = ng.train(weighted_loss(model), params, opt, data, steps=9, hparams=A)
    (g,) = torch.autograd.grad(val_loss(model, ours, X, y), A)
    (g_ref,) = torch.autograd.grad(val_loss(model, ref, X, y), A)
    (g_full,) = torch.autograd.grad(val_loss(model, full, X, y), A)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(g, g_full, rtol=1e-3)  # truncation really changed something
    for k in ours:  # same forward trajectory
        assert torch.allclose(ours[k], full[k], rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError):  # the initial params are cut off by truncation
        torch.autograd.grad(val_loss(model, ours, X, y), params["0.weight"])
    long = ng.train(weighted_loss(model), params, opt, data, steps=9, hparams=A, method=ng.Unroll(truncate=50))
    (g_long,) = torch.autograd.grad(val_loss(model, long, X, y), A)
    assert torch.allclose(g_long, g_full, rtol=1e-12)


def test_frozen_params_stay_fixed_and_still_feed_the_loss():
    model, X, y = problem(3)
    params = dict(model.named_parameters())
    frozen = params["0.weight"].detach().clone()
    params["0.weight"] = frozen
    A = torch.zeros(len(X), requires_grad=True)
    out = ng.train(weighted_loss(model), params, ng.optim.SGD(lr=0.5), batches(X, y), steps=5, hparams=A)
    assert out["0.weight"] is frozen
    assert not torch.allclose(out["2.weight"], params["2.weight"])
    # The frozen weight was used: changing it changes the result.
    params["0.weight"] = frozen * 2
    out2 = ng.train(weighted_loss(model), params, ng.optim.SGD(lr=0.5), batches(X, y), steps=5, hparams=A)
    assert not torch.allclose(out2["2.weight"], out["2.weight"])


def test_optimizer_tensor_hparams_receive_gradients():
    model, X, y = problem(4)
    lr = torch.tensor(0.2, requires_grad=True)
    params = dict(model.named_parameters())

    def outer(lr_value):
        opt = ng.optim.SGD(lr=lr_value, momentum=0.5)
        out = ng.train(lambda p, b, _: F.cross_entropy(ng.call(model, p, b[0]), b[1]), params, opt, [(X, y)], steps=6)
        return val_loss(model, out, X, y)

    (g,) = torch.autograd.grad(outer(lr), lr)
    h = 1e-6
    with torch.no_grad():
        fd = (outer(lr + h) - outer(lr - h)) / (2 * h)
    assert abs(g - fd) <= 1e-7 * abs(fd)


def test_nested_train_gives_the_finite_difference_gradient_through_two_levels():
    """A trilevel chain: A weights level 1; level 2 trains on level 1's predictions."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(16, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(16, generator=g)
    X2 = torch.randn(16, 3, generator=g)
    A = torch.rand(16, generator=g).requires_grad_()

    def loss1(p, batch, a):
        return (a * (X @ p["w"] - y) ** 2).mean()

    def loss2(q, batch, w1):  # level 2 fits level 1's predictions on X2, with a tanh feature
        return ((torch.tanh(X2 @ q["v"]) - X2 @ w1["w"]) ** 2).mean()

    def outer(a):
        w1 = ng.train(
            loss1, {"w": torch.zeros(3, requires_grad=True)}, ng.optim.SGD(lr=0.1), [None], steps=6, hparams=a
        )
        w2 = ng.train(
            loss2, {"v": torch.full((3,), 0.1, requires_grad=True)}, ng.optim.Adam(lr=0.05), [None], steps=6, hparams=w1
        )
        return ((torch.tanh(X @ w2["v"]) - y) ** 2).mean()

    (grad,) = torch.autograd.grad(outer(A), A)
    v = torch.randn(16, generator=g)
    h = 1e-5
    with torch.no_grad():
        fd = (outer(A + h * v) - outer(A - h * v)) / (2 * h)
    assert abs(fd) > 1e-6
    assert abs(grad @ v - fd) <= 1e-7 * abs(fd)


def test_no_grad_is_plain_first_order_training_equal_to_torch_optim():
    model, X, y = problem(6)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    data = [(X[:12], y[:12]), (X[12:], y[12:])]
    with torch.no_grad():
        out = ng.train(
            lambda p, b, _: F.cross_entropy(ng.call(model, p, b[0]), b[1]),
            params,
            ng.optim.Adam(lr=0.01),
            data,
            steps=7,
        )
    ref_params = [v.detach().clone().requires_grad_() for v in params.values()]
    opt = torch.optim.Adam(ref_params, lr=0.01)
    for t in range(7):
        opt.zero_grad()
        x, yy = data[t % 2]
        F.cross_entropy(torch.func.functional_call(model, dict(zip(params, ref_params)), (x,)), yy).backward()
        opt.step()
    for (k, v), r in zip(out.items(), ref_params):
        assert not v.requires_grad
        assert torch.allclose(v, r, rtol=1e-12, atol=1e-15), k


def test_default_optimizer_path_saves_nothing_extra_for_backward():
    """A recorded SGD update is p - lr * g: it needs no saved tensors (foreach ops would save p and g)."""
    params = {"a": torch.randn(3, requires_grad=True), "b": torch.randn(2, requires_grad=True)}
    grads = {k: torch.randn_like(v, requires_grad=True) for k, v in params.items()}
    opt = ng.optim.SGD(lr=0.1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        opt.update(grads, opt.init(params), params)
    assert saved == []


# --------------------------------------------------------------------- data
def test_data_forms_give_the_same_batches_in_order():
    seen = []

    def loss_fn(p, batch, _):
        seen.append(int(batch))
        return (p["w"] * batch).sum() ** 2

    def run(data, steps=5):
        seen.clear()
        ng.train(loss_fn, {"w": torch.ones(1, requires_grad=True)}, ng.optim.SGD(lr=0.01), data, steps=steps)
        return list(seen)

    assert run([1, 2, 3]) == [1, 2, 3, 1, 2]  # sequences are cycled
    assert run(iter([1, 2, 3, 4, 5, 6])) == [1, 2, 3, 4, 5]  # iterators are read once
    assert run(lambda t: t + 10) == [10, 11, 12, 13, 14]  # callables get the step

    class Loader:  # an iterable that is not an iterator, like a DataLoader: re-iterated per epoch
        def __iter__(self):
            return iter([7, 8])

    assert run(Loader()) == [7, 8, 7, 8, 7]


# ------------------------------------------------------------------- errors
def simple():
    return {"w": torch.ones(2, requires_grad=True)}, (lambda p, b, h: (p["w"] ** 2).sum())


def test_non_scalar_loss_is_rejected():
    params, _ = simple()
    with pytest.raises(ValueError, match=r"scalar.*\(2,\).*\.mean\(\)"):
        ng.train(lambda p, b, h: p["w"] ** 2, params, ng.optim.SGD(lr=0.1), [None], steps=1)


@pytest.mark.parametrize(
    "bad, hint",
    [
        (torch.nn.Linear(2, 2), "named_parameters"),
        ([torch.ones(2)], "named_parameters"),
        ({"w": 1.0}, "entry 'w'"),
    ],
)
def test_params_must_be_a_dict_of_tensors(bad, hint):
    _, loss_fn = simple()
    with pytest.raises(TypeError, match=hint):
        ng.train(loss_fn, bad, ng.optim.SGD(lr=0.1), [None], steps=1)


def test_empty_and_exhausted_data_are_rejected():
    params, loss_fn = simple()
    with pytest.raises(ValueError, match="empty list"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [], steps=1)
    with pytest.raises(ValueError, match=r"ran out after 2 batches, but steps=5.*itertools.cycle"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), iter([None, None]), steps=5)
    with pytest.raises(TypeError, match=r"single Tensor.*data=\[batch\]"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), torch.ones(3), steps=1)
    with pytest.raises(TypeError, match=r"tuple of Tensors \(\(4, 2\), \(4,\)\).*data=\[\(x, y\)\]"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), (torch.ones(4, 2), torch.ones(4)), steps=1)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_steps_must_be_a_positive_int(steps):
    params, loss_fn = simple()
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [None], steps=steps)


def test_unknown_optimizer_arguments_name_the_fix():
    with pytest.raises(TypeError, match=r"unknown argument 'learning_rate'.*Did you mean 'lr'"):
        ng.optim.Adam(learning_rate=0.1)
    with pytest.raises(TypeError, match=r"unknown argument 'betass' in groups\[0\]"):
        ng.optim.Adam(groups=[{"params": ["w"], "betass": (0.9, 0.99)}])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        ng.optim.SGD(lr=-1.0)
    with pytest.raises(ValueError, match="does not broadcast"):  # per-element values must fit each parameter
        ng.optim.SGD(lr=torch.ones(3)).init({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="matches no parameter"):
        ng.optim.SGD(groups=[{"params": ["nope.*"], "lr": 0.1}]).init({"w": torch.ones(1)})


def test_torch_optimizer_instead_of_nestgrad_is_explained():
    params, loss_fn = simple()
    with pytest.raises(TypeError, match=r"nestgrad.optim.SGD\(lr=0.1, \.\.\.\)"):
        ng.train(loss_fn, params, torch.optim.SGD(list(params.values()), lr=0.1), [None], steps=1)


def test_hparams_that_do_not_require_grad_warn_and_never_give_a_silent_zero():
    params, _ = simple()
    A = torch.ones(2)  # forgot requires_grad_()
    with pytest.warns(UserWarning, match=r"none requires grad.*requires_grad_\(\)"):
        out = ng.train(
            lambda p, b, a: (a * p["w"] ** 2).sum(), params, ng.optim.SGD(lr=0.1), [None], steps=2, hparams=A
        )
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(out["w"].sum(), A)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():  # asking only for the trained weights is fine
            ng.train(lambda p, b, a: (a * p["w"] ** 2).sum(), params, ng.optim.SGD(lr=0.1), [None], steps=2, hparams=A)


def test_hparams_must_be_tensors():
    params, loss_fn = simple()
    with pytest.raises(TypeError, match=r"hparams\['lr'\].*float.*torch.tensor"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [None], steps=1, hparams={"lr": 0.1})


def test_loss_that_ignores_params_is_caught_instead_of_silently_not_training():
    model = torch.nn.Linear(2, 1)
    x = torch.ones(4, 2)
    params = dict(model.named_parameters())
    # At step 0 already: loss_fn never receives the module's own Parameters, not even at the start.
    with pytest.raises(RuntimeError, match=r"at step 0.*nestgrad.call\(model, params, x\), not model\(x\)"):
        ng.train(lambda p, b, h: model(x).pow(2).mean(), params, ng.optim.SGD(lr=0.1), [None], steps=3)


def test_no_trainable_params_is_an_error():
    with pytest.raises(ValueError, match="nothing to train"):
        ng.train(lambda p, b, h: p["w"].sum(), {"w": torch.ones(2)}, ng.optim.SGD(lr=0.1), [None], steps=1)


def test_method_must_be_a_method_object():
    params, loss_fn = simple()
    with pytest.raises(TypeError, match=r"nestgrad.Unroll\(\)"):
        ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [None], steps=1, method="unroll")
    with pytest.raises(ValueError, match="truncate"):
        ng.Unroll(truncate=0)


def test_progress_shows_a_bar(capsys):
    params, loss_fn = simple()
    ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [None], steps=7, progress=True)
    err = capsys.readouterr().err
    assert "nestgrad.train" in err and "/7 [" in err


def test_update_skips_params_without_gradients_like_torch():
    params = {"used": torch.tensor([1.0, 2.0]), "unused": torch.tensor([3.0])}
    opt = ng.optim.Adam(lr=0.1, weight_decay=0.1)
    state = opt.init(params)
    new, state = opt.update({"used": torch.tensor([0.5, -0.5]), "unused": None}, state, params)
    assert new["unused"] is params["unused"] and state.step == {"used": 1, "unused": 0}
    ref = [p.clone().requires_grad_() for p in params.values()]
    topt = torch.optim.Adam(ref, lr=0.1, weight_decay=0.1)
    ref[0].grad = torch.tensor([0.5, -0.5])
    topt.step()
    assert torch.allclose(new["used"], ref[0].detach(), rtol=1e-14)


def test_param_groups_match_torch_param_groups():
    model, X, y = problem(7)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    opt = ng.optim.SGD(lr=0.1, momentum=0.9, groups=[{"params": ["0.*"], "lr": 0.01, "momentum": 0.5}])
    with torch.no_grad():
        out = ng.train(lambda p, b, _: F.cross_entropy(ng.call(model, p, X), y), params, opt, [None], steps=5)
    ref = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    topt = torch.optim.SGD(
        [
            {"params": [ref["0.weight"], ref["0.bias"]], "lr": 0.01, "momentum": 0.5},
            {"params": [ref["2.weight"], ref["2.bias"]]},
        ],
        lr=0.1,
        momentum=0.9,
    )
    for _ in range(5):
        topt.zero_grad()
        F.cross_entropy(torch.func.functional_call(model, ref, (X,)), y).backward()
        topt.step()
    for k in out:
        assert torch.allclose(out[k], ref[k], rtol=1e-12), k


def test_iterator_batches_are_consumed_exactly_steps_times():
    it = itertools.count()
    params, _ = simple()
    ng.train(lambda p, b, h: (p["w"] * b).sum() ** 2, params, ng.optim.SGD(lr=0.01), it, steps=4)
    assert next(it) == 4


@pytest.mark.parametrize(
    "method",
    [ng.Unroll(), ng.Reverse(), ng.Implicit(solver=ng.CG(max_steps=5))],
    ids=["unroll", "reverse", "implicit"],
)
def test_a_cut_path_raises_disconnected_error_naming_the_op_and_line(method):
    A = torch.randn(8, 3, requires_grad=True)
    x = torch.randn(8, 2)

    def loss_fn(p, batch, a):
        labels = a.argmax(dim=1)  # the only path from A: cut
        return F.cross_entropy(x @ p["w"], labels)

    params = {"w": torch.zeros(2, 3, requires_grad=True)}
    with pytest.raises(ng.DisconnectedError, match=r"(?s)argmax at .*test_train.py:\d+.*ZerothOrder") as err:
        out = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1), [None], steps=3, hparams=A, method=method)
        torch.autograd.grad(out["w"].sum(), A)  # adjoint methods find out in their backward pass
    assert isinstance(err.value, RuntimeError)


def test_no_path_check_for_zeroth_order_no_grad_or_detached_hparams():
    A = torch.randn(8, 3, requires_grad=True)
    x = torch.randn(8, 2)

    def loss_fn(p, batch, a):
        return F.cross_entropy(x @ p["w"], a.argmax(dim=1))

    params = {"w": torch.zeros(2, 3, requires_grad=True)}
    opt = ng.optim.SGD(lr=0.1)
    ng.train(loss_fn, params, opt, [None], steps=2, hparams=A, method=ng.ZerothOrder(samples=2, sigma=0.1))
    with torch.no_grad():
        ng.train(loss_fn, params, opt, [None], steps=2, hparams=A)
    with pytest.warns(UserWarning, match="none requires grad"):
        ng.train(loss_fn, params, opt, [None], steps=2, hparams=A.detach())


# ------------------------------------------------- a loss_fn with the wrong number of parameters
_THREE = (
    r"^nestgrad\.train: loss_fn is called as loss_fn\(params, batch, hparams\) .*def loss_fn\(p, batch, hparams=None\)"
)


def test_two_argument_loss_fn_says_how_it_is_called():
    w = torch.randn(3, requires_grad=True)

    def loss_fn(p, batch):
        return (p["w"] * batch).sum()

    with pytest.raises(TypeError, match=_THREE) as info:
        ng.train(loss_fn, {"w": w}, ng.optim.SGD(lr=0.1), [torch.randn(3)], steps=1)
    assert "loss_fn(p, batch) cannot" in str(info.value)
    with pytest.raises(TypeError, match=_THREE):  # before any step: tasks= would hide it under vmap
        ng.train(loss_fn, {"w": w}, ng.optim.SGD(lr=0.1), [torch.randn(2, 3)], steps=1, tasks=2)


class _Unreadable:
    """A callable whose signature inspect cannot read: the call itself is checked instead."""

    __signature__ = "unknown"

    def __call__(self, p, batch):
        return (p["w"] * batch).sum()


def test_two_argument_loss_fn_without_a_readable_signature_is_explained_at_the_call():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match=_THREE):
        ng.train(_Unreadable(), {"w": w}, ng.optim.SGD(lr=0.1), [torch.randn(3)], steps=1)


def test_a_type_error_inside_loss_fn_is_not_blamed_on_its_signature():
    w = torch.randn(3, requires_grad=True)

    def inner(a, b):
        return a * b

    def loss_fn(p, batch, hparams):
        return inner(p["w"], batch, 1).sum()

    with pytest.raises(TypeError, match=r"inner\(\) takes 2 positional arguments but 3 were given"):
        ng.train(loss_fn, {"w": w}, ng.optim.SGD(lr=0.1), [torch.randn(3)], steps=1)


# ------------------------------------------------- Unroll's graph growing
def _elementwise_run(method: ng.Unroll, steps: int = 16, n: int = 2**20):
    """1M float32 weights, elementwise ops only: about 16 MiB of graph a step, computed in milliseconds
    (Unroll measures runs that record 16 steps or more)."""
    w = torch.zeros(n, dtype=torch.float32, requires_grad=True)
    A = torch.tensor(1.0, dtype=torch.float32, requires_grad=True)
    x = torch.linspace(-1, 1, n, dtype=torch.float32)
    loss_fn = lambda p, batch, A: (A * (p["w"] * batch).tanh()).sum()  # noqa: E731
    return ng.train(loss_fn, {"w": w}, ng.optim.SGD(lr=0.1), [x], steps=steps, hparams=A, method=method)


def test_unroll_warns_once_when_its_graph_passes_a_share_of_the_memory_with_the_alternatives():
    with pytest.warns(ResourceWarning) as record:
        _elementwise_run(ng.Unroll(warn_memory=1e-12))
    messages = [str(w.message) for w in record if issubclass(w.category, ResourceWarning)]
    assert len(messages) == 1  # once, not at every step
    message = messages[0]
    assert message.startswith("nestgrad.train (Unroll): the recorded graph of the run now holds about ")
    for alternative in ("Reverse()", "Reverse(checkpoint_every=4)", "Reverse(checkpoints=c)", "Unroll(truncate=k)",
                        "Forward()"):  # fmt: skip
        assert alternative in message
    # 4 MiB of new weights a step plus what autograd saves: the estimate is at least the weights
    per_step = float(message.split(" MiB a step")[0].split("(")[-1])
    assert per_step >= 4


def test_unroll_does_not_measure_runs_of_few_recorded_steps():
    """A run recording fewer than 16 steps is not measured (the measurement cost a seventh of a 5-step
    MAML inner run); it never warns, however large its steps."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        _elementwise_run(ng.Unroll(warn_memory=1e-12), steps=15)


def test_unroll_warn_memory_none_never_warns_and_bad_values_raise():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        _elementwise_run(ng.Unroll(warn_memory=None), steps=2)
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ValueError, match=r"^nestgrad\.Unroll: warn_memory must be None .* in \(0, 1\]"):
            ng.Unroll(warn_memory=bad)


@pytest.mark.parametrize("grad", [True, False], ids=["hypergradient", "no_grad"])
def test_hparams_on_another_device_are_named_with_the_fix(grad: bool) -> None:
    """An hparam on another device than the params: a nestgrad error naming where each input lives (the meta
    device stands in for an accelerator here), not torch's bare device error."""
    p = {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
    A = torch.zeros(3, dtype=torch.float64, device="meta", requires_grad=True)

    def loss_fn(p, batch, A):
        return ((p["w"] * A - batch) ** 2).sum()

    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="on different devices") as info:
        ng.train(loss_fn, p, ng.optim.SGD(lr=0.1), [torch.ones(3, dtype=torch.float64)], steps=2, hparams=A)
    assert "params on cpu, hparams on meta, the batch on cpu" in str(info.value)
    assert "A.to(device)" in str(info.value)
