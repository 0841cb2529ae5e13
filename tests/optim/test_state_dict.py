"""state_dict round trips: optimizers, OptState and ZerothOrder, through torch.save and
torch.load(weights_only=True), continue exactly (bit for bit in float64) and reject what does not fit."""

from __future__ import annotations

import pytest
import torch

import nestgrad as ng
from nestgrad.optim import Schedule
from optim_db import case_id, cases

pytestmark = pytest.mark.usefixtures("float64")
optim = ng.optim


def make_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def grads_at(t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def steps(opt, state, p, ts):
    for t in ts:
        p, state = opt.update(grads_at(t), state, p)
    return p, state


def save_and_load(obj, path):
    torch.save(obj, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_continuing_from_a_loaded_state_equals_continuing_from_the_original(case, tmp_path):
    info, kwargs = case
    opt = info.ours(**kwargs)
    p, state = steps(opt, opt.init(make_params()), make_params(), range(4))
    saved = save_and_load({"opt": opt.state_dict(), "state": state.state_dict(), "p": p}, tmp_path / "ckpt.pt")
    opt2 = info.ours(**kwargs)
    opt2.load_state_dict(saved["opt"])
    state2 = opt2.init(saved["p"]).load_state_dict(saved["state"])
    a, sa = steps(opt, state, p, range(4, 8))
    b, sb = steps(opt2, state2, saved["p"], range(4, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sa.step == sb.step and all(torch.equal(x, y) for x, y in zip(sa.tensors(), sb.tensors(), strict=True))


def tensor_opt(seed: int) -> optim.Optimizer:
    g = torch.Generator().manual_seed(seed)
    lr = Schedule((0.05 + 0.1 * torch.rand(8, generator=g)).requires_grad_())
    momentum = {"w": 0.5 + 0.4 * torch.rand(3, 4, generator=g), "b": 0.9}
    wd = torch.rand((), generator=g).requires_grad_()
    return optim.SGD(lr=lr, momentum=momentum, groups=[{"params": ["b"], "weight_decay": wd}])


def test_tensor_per_element_and_schedule_hyperparameters_round_trip_into_the_optimizers_own_tensors(tmp_path):
    opt = tensor_opt(0)
    p, state = steps(opt, opt.init(make_params()), make_params(), range(3))
    saved = save_and_load({"opt": opt.state_dict(), "state": state.state_dict()}, tmp_path / "ckpt.pt")
    opt2 = tensor_opt(1)  # other values, same structure: loading overwrites them
    own = [id(t) for t in opt2.tensors()]
    opt2.load_state_dict(saved["opt"])
    assert [id(t) for t in opt2.tensors()] == own, "values are copied into the optimizer's own tensors"
    assert all(torch.equal(x, y) for x, y in zip(opt.tensors(), opt2.tensors(), strict=True))
    assert opt2.tensors()[0].requires_grad  # still the user's leaf
    a, _ = steps(opt, state, p, range(3, 8))
    b, _ = steps(opt2, opt2.init(p).load_state_dict(saved["state"]), p, range(3, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_state_dicts_hold_only_what_weights_only_loading_accepts(tmp_path):
    opt = tensor_opt(0)
    state = opt.init(make_params())
    loaded = save_and_load(opt.state_dict(), tmp_path / "o.pt")
    assert loaded["optimizer"] == "SGD" and loaded["defaults"]["momentum"]["per_parameter"]["b"] == 0.9
    assert save_and_load(state.state_dict(), tmp_path / "s.pt")["step"] == {"w": 0, "b": 0}


def test_a_function_schedule_cannot_be_saved():
    with pytest.raises(TypeError, match=r"lr is a Schedule of a function, which cannot be saved"):
        optim.SGD(lr=Schedule(lambda t: 0.1 / t)).state_dict()


def test_loading_another_optimizers_state_dict_raises():
    with pytest.raises(ValueError, match=r"saved from nestgrad.optim.Adam, not SGD"):
        optim.SGD().load_state_dict(optim.Adam().state_dict())
    with pytest.raises(TypeError, match=r"expected the dict that an optimizer's state_dict\(\) returns"):
        optim.SGD().load_state_dict(optim.SGD().init(make_params()).state_dict())


def test_loading_hyperparameters_of_another_kind_or_groups_raises():
    with pytest.raises(ValueError, match=r"lr is float 0.1 here but a Tensor of shape \(\) in the state_dict"):
        optim.SGD(lr=0.1).load_state_dict(optim.SGD(lr=torch.tensor(0.1)).state_dict())
    with pytest.raises(ValueError, match=r"lr is a Tensor of shape \(3,\) here but a Tensor of shape \(4,\)"):
        optim.SGD(lr=torch.ones(3)).load_state_dict(optim.SGD(lr=torch.ones(4)).state_dict())
    with pytest.raises(ValueError, match=r"the saved optimizer has groups for \[\['w'\]\], but this one for \[\]"):
        optim.SGD().load_state_dict(optim.SGD(groups=[{"params": ["w"], "lr": 0.1}]).state_dict())
    with pytest.raises(ValueError, match=r"lr\['w'\]"):
        optim.SGD(lr={"w": torch.ones(3, 4), "b": 0.1}).load_state_dict(
            optim.SGD(lr={"w": torch.ones(4), "b": 0.1}).state_dict()
        )


def test_loading_a_state_with_other_names_slots_or_shapes_raises():
    params = make_params()
    state = optim.Adam().init(params)
    with pytest.raises(ValueError, match=r"saved state is for parameters \['b'\], but this state is for \['b', 'w'\]"):
        state.load_state_dict(optim.Adam().init({"b": params["b"]}).state_dict())
    with pytest.raises(ValueError, match=r"saved state has slots \['momentum_buffer'\], but this optimizer keeps"):
        state.load_state_dict(optim.SGD(momentum=0.9).init(params).state_dict())
    other = optim.Adam().init({"w": torch.zeros(4, 3), "b": params["b"]})
    with pytest.raises(ValueError, match=r"slot 'exp_avg' of parameter 'w' is a Tensor of shape \(4, 3\)"):
        state.load_state_dict(other.state_dict())


def loaded_optimizer():
    """An Adam with a Tensor, a per-element, a per-parameter dict, a schedule and a group."""
    return optim.Adam(
        lr=torch.tensor(0.1),
        betas=(torch.tensor(0.9), 0.999),
        eps={"w": torch.full((3, 4), 1e-8), "b": 1e-8},
        weight_decay=Schedule(torch.tensor([0.0, 0.01, 0.02])),
        groups=[{"params": ["b"], "lr": torch.tensor(0.05), "betas": (0.8, 0.99)}],
    )


def snapshot(opt):
    def leaf(v):
        if isinstance(v, tuple):
            return tuple(leaf(x) for x in v)
        if isinstance(v, dict):
            return {k: leaf(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor):
            return ("tensor", id(v), v.clone())
        if isinstance(v, Schedule):
            return ("schedule", id(v), id(v.values), v.values.clone())
        return v

    return leaf(opt.defaults), [leaf(g) for g in opt.groups]


def same(a, b):
    if isinstance(a, tuple) and a and a[0] in ("tensor", "schedule"):
        return a[:-1] == b[:-1] and torch.equal(a[-1], b[-1])
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b or (a != a and b != b)


def corrupt(sd, where, value):
    """The state_dict with a new lr in every place it is saved, and ``value`` at ``where``."""
    sd["defaults"]["lr"] = torch.tensor(0.5)
    sd["groups"][0]["lr"] = torch.tensor(0.5)
    sd["defaults"]["weight_decay"] = {"schedule": torch.tensor([0.3, 0.3, 0.3])}
    sd["defaults"]["eps"]["per_parameter"]["w"] = torch.full((3, 4), 1e-3)
    if where == "betas[0]":
        sd["defaults"]["betas"] = (value, 0.999)
    elif where == "groups[0].betas[1]":
        sd["groups"][0]["betas"] = (0.8, value)
    elif where == "eps['w']":
        sd["defaults"]["eps"]["per_parameter"]["w"] = value
    elif where == "weight_decay (schedule)":
        sd["defaults"]["weight_decay"] = {"schedule": value}
    return sd


BAD = [
    ("betas[0]", torch.tensor(float("nan")), "betas[0] is a Tensor holding nan, but it must be in [0, 1)"),
    ("groups[0].betas[1]", float("nan"), "groups[0].betas[1] must be in [0, 1); got nan"),
    ("eps['w']", torch.full((3, 4), -1.0), "eps['w'] is a Tensor of shape (3, 4) whose element [0, 0] is -1.0"),
    ("weight_decay (schedule)", torch.tensor([0.1, float("inf"), 0.0]), "weight_decay (schedule) is a Tensor of"),
]


@pytest.mark.parametrize("where, value, words", BAD, ids=[b[0] for b in BAD])
def test_loading_an_invalid_value_raises_naming_it_and_changes_nothing(where, value, words):
    opt = loaded_optimizer()
    before = snapshot(opt)
    sd = corrupt(loaded_optimizer().state_dict(), where, value)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    text = str(info.value)
    assert text.startswith("Adam.load_state_dict: ") and words in text, text
    assert "Nothing was loaded" in text and "meta-learned" not in text, text
    assert same(snapshot(opt), before), "the optimizer was changed by a load that raised"
    # A valid state_dict with the same new values still loads, into the same Tensors.
    opt.load_state_dict(corrupt(loaded_optimizer().state_dict(), "", None))
    assert id(opt.defaults["lr"]) == before[0]["lr"][1] and float(opt.defaults["lr"]) == 0.5


def test_loading_sgd_settings_that_break_a_rule_across_hyperparameters_raises_before_loading():
    opt = optim.SGD(lr=torch.tensor(0.1), momentum=0.9, nesterov=True)
    sd = opt.state_dict()
    sd["defaults"]["lr"], sd["defaults"]["momentum"] = torch.tensor(0.5), 0.0
    with pytest.raises(ValueError, match=r"SGD.load_state_dict: nesterov=True needs momentum > 0.*nothing was loaded"):
        opt.load_state_dict(sd)
    assert float(opt.defaults["lr"]) == 0.1 and opt.defaults["momentum"] == 0.9


# ------------------------------------------------------------------ ZerothOrder
def zo_estimate(method) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=g)
    y = X @ torch.randn(3, generator=g)
    lam = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)

    def loss_fn(p, batch, lam):
        return ((X @ p["w"] - y) ** 2).mean() + (lam * p["w"] ** 2).sum()

    w = ng.train(loss_fn, {"w": torch.zeros(3, requires_grad=True)}, optim.SGD(lr=0.1), [None], steps=5, hparams=lam,
                 method=method)  # fmt: skip
    (d,) = torch.autograd.grad((w["w"] ** 2).sum(), lam)
    return d


def test_zeroth_order_continues_with_the_same_directions_after_a_save_and_load(tmp_path):
    method = ng.ZerothOrder(samples=2, sigma=1e-3, seed=0)
    zo_estimate(method)  # move the generator away from its seed
    saved = save_and_load(method.state_dict(), tmp_path / "zo.pt")
    expected = [zo_estimate(method), zo_estimate(method)]
    resumed = ng.ZerothOrder(samples=2, sigma=1e-3, seed=0)
    resumed.load_state_dict(saved)
    assert all(torch.equal(a, zo_estimate(resumed)) for a in expected)
    fresh = ng.ZerothOrder(samples=2, sigma=1e-3, seed=0)
    assert not torch.equal(zo_estimate(fresh), expected[0]), "without the load, the directions differ"


def test_zeroth_order_rejects_a_state_of_other_settings():
    with pytest.raises(ValueError, match=r"saved with samples=4, but this method has samples=2"):
        ng.ZerothOrder(samples=2, sigma=0.1).load_state_dict(ng.ZerothOrder(samples=4, sigma=0.1).state_dict())
    with pytest.raises(ValueError, match=r"expected the dict that ZerothOrder.state_dict\(\) returns"):
        ng.ZerothOrder(samples=2, sigma=0.1).load_state_dict(optim.SGD().state_dict())
