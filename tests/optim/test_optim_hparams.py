"""Per-element hyperparameters (Meta-SGD) and learnable schedules, in float64.

1. Per-element values (a Tensor per parameter, in a group or a dict of name -> value) match a
   hand-written per-element update; values filled with a constant match the float trajectory
   for every optimizer; dict form equals group form; gradcheck of one step w.r.t. a per-element lr.
2. Schedules: entry t-1 is used at step t; hypergradients w.r.t. every entry match central finite
   differences, and Unroll == Reverse == Forward.
3. Errors: shapes that do not broadcast, dicts that miss or add names, schedules that run out.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import nestgrad as ng
from nestgrad.optim import Schedule
from optim_db import OPTIMIZERS

pytestmark = pytest.mark.usefixtures("float64")
optim = ng.optim


def shapes() -> dict[str, tuple[int, ...]]:
    return {"w": (3, 4), "b": (4,)}


def make_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes().items()}


def make_grads(t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return {k: torch.randn(s, generator=g) for k, s in shapes().items()}


def positive(seed: int, lo: float, hi: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: lo + (hi - lo) * torch.rand(s, generator=g) for k, s in shapes().items()}


def run(opt: optim.Optimizer, steps: int, params=None) -> dict[str, torch.Tensor]:
    p = params or make_params()
    state = opt.init(p)
    for t in range(steps):
        p, state = opt.update(make_grads(t), state, p)
    return p


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-13) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=tol, atol=tol) for k in b)


# ------------------------------------------------------- against hand-written rules
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_per_element_sgd_with_momentum_and_weight_decay_matches_a_hand_written_update(foreach):
    lr, mom, wd = positive(1, 0.01, 0.2), positive(2, 0.5, 0.95), positive(3, 0.0, 0.1)
    opt = optim.SGD(lr=lr, momentum=mom, weight_decay=wd, foreach=foreach)
    p, buf = make_params(), {}
    for t in range(6):
        grads = make_grads(t)
        for k in p:
            g = grads[k] + wd[k] * p[k]
            buf[k] = g if t == 0 else mom[k] * buf[k] + g
            p[k] = p[k] - lr[k] * buf[k]
    assert close(run(opt, 6), p)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_per_element_adam_matches_a_hand_written_update(foreach):
    lr, b1, b2 = positive(1, 0.001, 0.05), positive(2, 0.8, 0.95), positive(3, 0.9, 0.999)
    eps = 1e-8
    # The same values given three ways: a dict (lr), groups ("w"'s betas), and the defaults ("b"'s).
    opt = optim.Adam(
        lr=lr, betas=(b1["b"], b2["b"]), eps=eps, groups=[{"params": ["w"], "betas": (b1["w"], b2["w"])}],
        foreach=foreach, eps_root=0.0,
    )  # fmt: skip
    p = make_params()
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v = {k: torch.zeros_like(x) for k, x in p.items()}
    for t in range(1, 7):
        grads = make_grads(t - 1)
        for k in p:
            m[k] = b1[k] * m[k] + (1 - b1[k]) * grads[k]
            v[k] = b2[k] * v[k] + (1 - b2[k]) * grads[k] ** 2
            mhat, vhat = m[k] / (1 - b1[k] ** t), v[k] / (1 - b2[k] ** t)
            p[k] = p[k] - lr[k] * mhat / (vhat.sqrt() + eps)
    assert close(run(opt, 6), p, 1e-12)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_per_element_rmsprop_matches_a_hand_written_update(foreach):
    lr, alpha = positive(1, 0.001, 0.05), positive(2, 0.8, 0.99)
    eps = 1e-8
    opt = optim.RMSprop(lr=lr, alpha=alpha, eps=eps, eps_root=0.0, foreach=foreach)
    p = make_params()
    sq = {k: torch.zeros_like(v) for k, v in p.items()}
    for t in range(6):
        grads = make_grads(t)
        for k in p:
            sq[k] = alpha[k] * sq[k] + (1 - alpha[k]) * grads[k] ** 2
            p[k] = p[k] - lr[k] * grads[k] / (sq[k].sqrt() + eps)
    assert close(run(opt, 6), p, 1e-12)


def _constant_per_element(info, kwargs):
    """kwargs with every meta hyperparameter replaced by a dict of per-element Tensors filled with its value."""
    out = dict(kwargs)
    for key in info.meta:
        k, i = key if isinstance(key, tuple) else (key, None)
        value = out[k] if k in out else inspect.signature(info.ours.__init__).parameters[k].default
        x = value[i] if i is not None else value
        per = {n: torch.full(s, float(x)) for n, s in shapes().items()}
        if i is None:
            out[k] = per
        else:
            pair = list(value)
            pair[i] = per
            out[k] = tuple(pair)
    return out


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_per_element_values_filled_with_a_constant_follow_the_float_trajectory(info, foreach):
    kwargs = {**info.base, **info.meta_base}
    if info.ours is optim.RAdam:
        kwargs["betas"] = (0.9, 0.8)  # rho_t > 5 from step 4 on: both branches, element by element
    ref = run(info.ours(**kwargs, foreach=foreach), 8)
    ours = run(info.ours(**_constant_per_element(info, kwargs), foreach=foreach), 8)
    assert close(ours, ref, 1e-12)


def test_radam_per_element_beta2_takes_each_branch_per_element():
    # Elements with beta2 = 0.8 rectify from step 4 on, those with 0.999 never in 8 steps: each
    # element must follow the scalar run with its own beta2.
    b2 = {"w": torch.full((3, 4), 0.8), "b": torch.full((4,), 0.999)}
    b2["w"][0] = 0.999
    ours = run(optim.RAdam(lr=0.01, betas=(0.9, b2)), 8)
    for value in (0.8, 0.999):
        ref = run(optim.RAdam(lr=0.01, betas=(0.9, value)), 8)
        for k in ref:
            mask = b2[k] == value
            assert torch.allclose(ours[k][mask], ref[k][mask], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_dict_form_and_group_form_give_identical_results(foreach):
    lr, mom = positive(1, 0.01, 0.2), positive(2, 0.5, 0.9)
    a = optim.SGD(lr=lr, momentum=mom, foreach=foreach)
    b = optim.SGD(
        lr=0.5, momentum=0.1, foreach=foreach,
        groups=[{"params": [n], "lr": lr[n], "momentum": mom[n]} for n in shapes()],
    )  # fmt: skip
    assert all(torch.equal(x, y) for x, y in zip(run(a, 5).values(), run(b, 5).values(), strict=True))


def test_a_per_element_value_may_broadcast_and_may_mix_with_floats_in_a_dict():
    row = torch.rand(1, 4) * 0.1
    opt = optim.SGD(lr={"w": row, "b": 0.05})
    p, g = make_params(), make_grads(0)
    new, _ = opt.update(g, opt.init(p), p)
    assert torch.equal(new["w"], p["w"] - row * g["w"]) and torch.equal(new["b"], p["b"] - 0.05 * g["b"])


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("make", [lambda lr: optim.SGD(lr=lr, momentum=0.9, weight_decay=0.1), optim.Adam])
def test_gradcheck_of_one_step_wrt_a_per_element_lr(make, foreach):
    params, grads = make_params(), make_grads(0)
    opt0 = make({n: torch.full(s, 0.1) for n, s in shapes().items()})
    opt0.foreach = foreach
    state = opt0.init(params)
    params, state = opt0.update(grads, state, params)  # step 2 uses the momentum buffer / moments
    lr = [(0.05 + 0.1 * torch.rand(s)).requires_grad_() for s in shapes().values()]

    def step(*lrs):
        new, _ = opt0.with_tensors(list(lrs)).update(make_grads(1), state, params)
        return tuple(new.values())

    assert torch.autograd.gradcheck(step, lr)


def test_the_foreach_back_end_backpropagates_into_per_element_values():
    lr = {n: torch.full(s, 0.1, requires_grad=True) for n, s in shapes().items()}
    outs = []
    for foreach in (True, False):
        out = run(optim.SGD(lr=lr, momentum=0.9, foreach=foreach), 3)
        outs.append(torch.autograd.grad(sum((v**2).sum() for v in out.values()), list(lr.values())))
    assert all(torch.allclose(a, b, rtol=1e-13) and a.abs().max() > 0 for a, b in zip(*outs, strict=True))


def test_tensors_and_with_tensors_include_dict_values_and_schedules():
    lr = {"w": torch.rand(3, 4), "b": torch.tensor(0.1)}
    sched = torch.rand(5) * 0.5
    opt = optim.SGD(lr=lr, momentum=Schedule(sched), groups=[{"params": ["b"], "weight_decay": torch.tensor(0.1)}])
    assert opt.tensor_names() == ["lr['w']", "lr['b']", "momentum (schedule)", "groups[0].weight_decay"]
    assert [id(t) for t in opt.tensors()] == [id(lr["w"]), id(lr["b"]), id(sched), id(opt.groups[0]["weight_decay"])]
    fresh = [t.clone() for t in opt.tensors()]
    assert [id(t) for t in opt.with_tensors(fresh).tensors()] == [id(t) for t in fresh]


# -------------------------------------------------------------- through ng.train
def regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(32, 4, generator=g), torch.randn(32, 4, generator=g)
    w_true = torch.randn(4, 3, generator=g)
    y, yv = X @ w_true + 0.1 * torch.randn(32, 3, generator=g), Xv @ w_true

    def loss_fn(p, batch, hp):
        xb, yb = batch
        return ((torch.tanh(xb @ p["w"]) + p["b"] - yb) ** 2).mean()

    def val(p):
        return ((torch.tanh(Xv @ p["w"]) + p["b"] - yv) ** 2).mean()

    data = [(X[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    params = {"w": (0.3 * torch.randn(4, 3, generator=g)).requires_grad_(), "b": torch.zeros(3, requires_grad=True)}
    return loss_fn, val, data, params


def outer(opt: optim.Optimizer, method, steps: int = 10) -> torch.Tensor:
    loss_fn, val, data, params = regression()
    return val(ng.train(loss_fn, params, opt, data, steps=steps, method=method))


@pytest.mark.parametrize("form", ["group", "dict"])
def test_a_per_element_lr_gives_the_same_hypergradient_through_unroll_and_reverse(form):
    lr_w = (0.05 + 0.1 * torch.rand(4, 3)).requires_grad_()
    lr_b = (0.05 + 0.1 * torch.rand(3)).requires_grad_()

    def make():
        if form == "dict":
            return optim.SGD(lr={"w": lr_w, "b": lr_b}, momentum=0.9)
        return optim.SGD(lr=0.1, momentum=0.9, groups=[{"params": ["w"], "lr": lr_w}, {"params": ["b"], "lr": lr_b}])

    grads = [torch.autograd.grad(outer(make(), m), [lr_w, lr_b]) for m in (ng.Unroll(), ng.Reverse())]
    for a, b in zip(*grads, strict=True):
        assert a.abs().max() > 0
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


# -------------------------------------------------------------------- schedules
def test_a_schedule_uses_entry_t_minus_1_at_step_t():
    lrs = torch.tensor([0.1, 0.2, 0.3])
    p = make_params()
    expected = dict(p)
    for t in range(3):
        expected = {k: v - lrs[t] * make_grads(t)[k] for k, v in expected.items()}
    assert close(run(optim.SGD(lr=Schedule(lrs)), 3), expected)
    assert close(run(optim.SGD(lr=Schedule(lambda t: 0.1 * t)), 3), expected)
    assert close(run(optim.SGD(lr=Schedule([0.1, 0.2, 0.3])), 3), expected)


def test_a_per_element_schedule_has_one_per_element_value_per_step():
    values = torch.rand(3, 4) * 0.1  # 3 steps, broadcast over w's rows and b
    p = make_params()
    expected = dict(p)
    for t in range(3):
        expected = {k: v - values[t] * make_grads(t)[k] for k, v in expected.items()}
    assert close(run(optim.SGD(lr=Schedule(values)), 3), expected)


def test_a_schedule_that_runs_out_raises_at_that_step():
    opt = optim.Adam(lr=Schedule(torch.full((3,), 0.01)))
    p, state = make_params(), None
    state = opt.init(p)
    for t in range(3):
        p, state = opt.update(make_grads(t), state, p)
    with pytest.raises(ValueError, match=r"lr Schedule has 3 values, one per step, but this is step 4"):
        opt.update(make_grads(3), state, p)


def test_a_function_schedule_must_not_return_a_tensor_that_requires_grad():
    base = torch.tensor(0.1, requires_grad=True)
    opt = optim.SGD(lr=Schedule(lambda t: base * 0.9**t))
    p = make_params()
    with pytest.raises(ValueError, match=r"pass its values as a Tensor"):
        opt.update(make_grads(0), opt.init(p), p)


STEPS = 10


def schedule_hypergradient(method) -> torch.Tensor:
    lrs = torch.linspace(0.3, 0.1, STEPS).requires_grad_()
    loss = outer(optim.SGD(lr=Schedule(lrs), momentum=0.5), method, STEPS)
    (g,) = torch.autograd.grad(loss, lrs)
    return g


def test_schedule_hypergradients_match_central_finite_differences_for_every_entry():
    g = schedule_hypergradient(ng.Unroll())
    base, h = torch.linspace(0.3, 0.1, STEPS), 1e-5
    fd = torch.empty(STEPS)
    with torch.no_grad():
        for i in range(STEPS):
            plus, minus = base.clone(), base.clone()
            plus[i] += h
            minus[i] -= h
            lp = outer(optim.SGD(lr=Schedule(plus), momentum=0.5), ng.Unroll(), STEPS)
            lm = outer(optim.SGD(lr=Schedule(minus), momentum=0.5), ng.Unroll(), STEPS)
            fd[i] = (lp - lm) / (2 * h)
    assert (fd.abs() > 1e-6).all(), "every step's lr must matter, or the test proves nothing"
    assert torch.allclose(g, fd, rtol=1e-6, atol=1e-10), (g, fd)


def test_schedule_hypergradients_agree_across_unroll_reverse_and_forward():
    ref = schedule_hypergradient(ng.Unroll())
    for method in (ng.Reverse(), ng.Reverse(checkpoint_every=3), ng.Forward()):
        assert torch.allclose(schedule_hypergradient(method), ref, rtol=1e-10, atol=1e-14), method


# ----------------------------------------------------------------------- errors
def test_a_per_element_value_that_does_not_broadcast_names_the_hparam_the_parameter_and_both_shapes():
    opt = optim.SGD(lr=torch.rand(3, 4))
    with pytest.raises(
        ValueError, match=r"lr has shape \(3, 4\), which does not broadcast to parameter 'b' of shape \(4,\)"
    ):
        opt.init(make_params())
    opt = optim.Adam(betas=(0.9, {"w": torch.full((4, 3), 0.99), "b": 0.999}))
    with pytest.raises(ValueError, match=r"betas\[1\]\['w'\] has shape \(4, 3\).*'w' of shape \(3, 4\)"):
        opt.init(make_params())
    opt = optim.SGD(lr=Schedule(torch.rand(5, 3)))
    with pytest.raises(ValueError, match=r"a Schedule of shape \(5, 3\), whose per-step values have shape \(3,\)"):
        opt.init(make_params())


def test_a_dict_must_name_every_parameter_it_applies_to_and_no_other():
    with pytest.raises(ValueError, match=r"lr is a dict of per-parameter values, but has no entry for parameter 'b'"):
        optim.SGD(lr={"w": 0.1}).init(make_params())
    with pytest.raises(ValueError, match=r"there is no parameter 'bb' \(did you mean 'b'\?\)"):
        optim.SGD(lr={"w": 0.1, "b": 0.1, "bb": 0.1}).init(make_params())
    with pytest.raises(ValueError, match=r"'b' takes lr from another group"):
        optim.SGD(lr={"w": 0.1, "b": 0.1}, groups=[{"params": ["b"], "lr": 0.2}]).init(make_params())
    # A parameter in a group with its own value needs no entry.
    optim.SGD(lr={"w": 0.1}, groups=[{"params": ["b"], "lr": 0.2}]).init(make_params())


def test_per_element_values_are_checked_elementwise_naming_the_first_bad_element():
    lr = torch.full((3, 4), 0.1)
    lr[1, 2] = -0.5
    with pytest.raises(
        ValueError,
        match=r"lr\['w'\] must be >= 0 and finite; got a Tensor of shape \(3, 4\) whose element \[1, 2\] is -0.5",
    ):
        optim.SGD(lr={"w": lr, "b": 0.1})
    good = torch.full((3, 4), 0.1)
    opt = optim.SGD(lr={"w": good, "b": 0.1})
    good[0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"SGD.init: lr\['w'\] is a Tensor of shape \(3, 4\) whose element \[0, 0\] is nan now"
    ):
        opt.init(make_params())
    with pytest.raises(ValueError, match=r"betas\[0\] \(schedule\) must be in \[0, 1\)"):
        optim.Adam(betas=(Schedule(torch.tensor([0.9, 1.0])), 0.999))


def test_hyperparameters_that_cannot_vary_say_so():
    with pytest.raises(ValueError, match=r"t0 must be a float or a 1-element Tensor \(it is a step count"):
        optim.ASGD(t0=torch.ones(3))
    with pytest.raises(TypeError, match=r"Rprop reads lr only once, in init\(\)"):
        optim.Rprop(lr=Schedule(torch.full((3,), 0.01)))
    with pytest.raises(TypeError, match=r"must be a float, a Tensor .* or a nestgrad.optim.Schedule; got str"):
        optim.SGD(lr="0.1")
    with pytest.raises(TypeError, match=r"Schedule takes a floating-point Tensor"):
        Schedule(torch.tensor(0.1))
