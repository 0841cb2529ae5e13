"""nestgrad.optim rejects what it cannot answer exactly, and says how to fix it.

1. Hyperparameter values: NaN, inf and out-of-range floats and Tensors, at construction,
   and Tensors again at ``init()`` (a meta-learned value may have left its range).
2. ``update`` checks each gradient's shape and dtype and the state's slot names; a
   1-element or float64 Tensor hyperparameter never broadcasts or promotes a weight.
3. Parameter groups whose patterns overlap.
"""

from __future__ import annotations

import re

import pytest
import torch

import nestgrad as ng

optim = ng.optim
NAN, INF = float("nan"), float("inf")

# (optimizer, arguments, the words the message must contain)
BAD_VALUES = [
    (optim.SGD, {"lr": NAN}, "lr must be >= 0 and finite; got nan"),
    (optim.SGD, {"lr": INF}, "lr must be >= 0 and finite; got inf"),
    (optim.SGD, {"lr": -0.1}, "lr must be >= 0 and finite; got -0.1"),
    (optim.SGD, {"momentum": -0.5}, "momentum must be >= 0 and finite; got -0.5"),
    (optim.SGD, {"weight_decay": NAN}, "weight_decay must be >= 0 and finite; got nan"),
    (optim.Adam, {"eps": NAN}, "eps must be >= 0 and finite; got nan"),
    (optim.Adam, {"betas": (1.0, 0.999)}, "betas[0] must be in [0, 1); got 1.0"),
    (optim.Adam, {"betas": (0.9, 1.5)}, "betas[1] must be in [0, 1); got 1.5"),
    (optim.Adam, {"betas": (NAN, 0.999)}, "betas[0] must be in [0, 1); got nan"),
    (optim.AdamW, {"weight_decay": -1e-2}, "weight_decay must be >= 0 and finite; got -0.01"),
    (optim.Adadelta, {"rho": 1.0}, "rho must be in [0, 1); got 1.0"),
    (optim.Adadelta, {"rho": -0.1}, "rho must be in [0, 1); got -0.1"),
    (optim.RMSprop, {"alpha": 1.5}, "alpha must be in [0, 1]; got 1.5"),
    (optim.RMSprop, {"momentum": INF}, "momentum must be >= 0 and finite; got inf"),
    (optim.Rprop, {"etas": (0.5, 0.9)}, "etas[1] must be > 1 and finite; got 0.9"),
    (optim.Rprop, {"etas": (1.5, 1.2)}, "etas[0] must be in (0, 1); got 1.5"),
    (optim.Adagrad, {"lr_decay": NAN}, "lr_decay must be >= 0 and finite; got nan"),
    (optim.NAdam, {"momentum_decay": -1.0}, "momentum_decay must be >= 0 and finite; got -1.0"),
    (optim.ASGD, {"t0": NAN}, "t0 must be >= 0 and finite; got nan"),
    (optim.SGD, {"groups": [{"params": ["w"], "lr": NAN}]}, "groups[0].lr must be >= 0 and finite; got nan"),
]


def _id(case) -> str:
    cls, kwargs, _ = case
    return f"{cls.__name__}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


@pytest.mark.parametrize("case", BAD_VALUES, ids=_id)
def test_out_of_range_float_hyperparameters_are_rejected_with_the_range_and_a_fix(case):
    cls, kwargs, words = case
    with pytest.raises(ValueError, match=re.escape(words) + r"\. Pass a value .*\(the default is "):
        cls(**kwargs)


def _as_tensors(kwargs):
    def t(v):
        return torch.tensor(v, requires_grad=True) if isinstance(v, float) else v

    return {k: tuple(map(t, v)) if isinstance(v, tuple) else t(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("case", [c for c in BAD_VALUES if "groups" not in c[1]], ids=_id)
def test_out_of_range_tensor_hyperparameters_are_rejected_at_construction(case):
    cls, kwargs, words = case
    name, got = words.split("; got ")
    with pytest.raises(ValueError, match=re.escape(f"{name}; got a Tensor holding {got}") + r"\. Pass a value"):
        cls(**_as_tensors(kwargs))


def test_tensor_hyperparameters_of_shape_1_and_float64_are_checked_too():
    with pytest.raises(ValueError, match=r"lr must be >= 0 and finite; got a Tensor holding -1\.0"):
        optim.SGD(lr=torch.tensor([-1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\); got a Tensor holding 1\.5"):
        optim.Adam(betas=(torch.tensor(1.5), 0.9))


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (optim.SGD, {"lr": 0.0, "momentum": 0.0}),
        (optim.Adam, {"betas": (0.0, 0.0), "eps": 0.0, "eps_root": 0.0}),
        (optim.Adadelta, {"rho": 0.0}),
        (optim.RMSprop, {"alpha": 1.0}),
        (optim.Rprop, {"etas": (0.1, 3.0), "step_sizes": (0.0, 1e6)}),
        (optim.ASGD, {"t0": 0.0}),
    ],
)
def test_values_at_the_edge_of_their_range_are_accepted(cls, kwargs):
    opt = cls(**kwargs)
    opt.init({"w": torch.ones(2)})
    cls(**_as_tensors(kwargs)).init({"w": torch.ones(2)})


@pytest.mark.parametrize(
    "cls, arg, bad, words",
    [
        (optim.SGD, "lr", -0.1, r"lr is a Tensor holding -0\.1\d* now, but it must be >= 0 and finite"),
        (optim.SGD, "lr", NAN, r"lr is a Tensor holding nan now"),
        (optim.Adam, "betas", 1.0, r"betas\[1\] is a Tensor holding 1\.0 now, but it must be in \[0, 1\)"),
        (optim.RMSprop, "eps", INF, r"eps is a Tensor holding inf now"),
    ],
)
def test_a_tensor_hyperparameter_made_invalid_after_construction_is_caught_at_init(cls, arg, bad, words):
    value = torch.tensor(0.5, requires_grad=True)
    opt = cls(**{arg: (0.9, value) if arg == "betas" else value})
    params = {"w": torch.ones(3)}
    opt.init(params)  # valid so far
    with torch.no_grad():  # what an outer optimizer step can do to a meta-learned value
        value.fill_(bad)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.init: {words}.*log_lr\.exp\(\).*clamp"):
        opt.init(params)
    # A hypergradient method swaps its own leaves in: they are checked at init too.
    with pytest.raises(ValueError, match=words):
        opt.with_tensors([t.detach().clone() for t in opt.tensors()]).init(params)


def test_a_tensor_in_a_group_is_named_with_its_group():
    lr = torch.tensor(0.1)
    opt = optim.SGD(lr=0.1, groups=[{"params": ["w"], "lr": lr}])
    lr.fill_(-1.0)
    with pytest.raises(ValueError, match=r"SGD\.init: groups\[0\]\.lr is a Tensor holding -1\.0 now"):
        opt.init({"w": torch.ones(1)})


def test_a_pair_hyperparameter_must_be_a_pair():
    with pytest.raises(
        ValueError, match=r"betas must be a pair of values; got float 0\.9\. For example betas=\(0\.9, 0\.999\)"
    ):
        optim.Adam(betas=0.9)
    with pytest.raises(ValueError, match=r"groups\[0\]\.etas must be a pair"):
        optim.Rprop(groups=[{"params": ["w"], "etas": (0.5, 1.2, 2.0)}])


# ------------------------------------------------------------------ update
FOREACH = pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])


@FOREACH
@pytest.mark.parametrize("grad_shape", [(3, 4), (1,), ()])
def test_a_gradient_of_another_shape_raises_instead_of_broadcasting(grad_shape, foreach):
    params = {"b": torch.ones(2), "w": torch.ones(4)}
    opt = optim.SGD(lr=0.1, foreach=foreach)
    grads = {"b": torch.ones(2), "w": torch.ones(grad_shape)}
    shape = re.escape(str(tuple(grad_shape)))
    with pytest.raises(
        ValueError, match=rf"SGD\.update: grads\['w'\] has shape {shape}, but params\['w'\] has shape \(4,\)"
    ):
        opt.update(grads, opt.init(params), params)


def test_a_gradient_of_another_dtype_raises():
    params = {"w": torch.ones(4)}
    opt = optim.Adam()
    grads = {"w": torch.ones(4, dtype=torch.float64)}
    with pytest.raises(
        TypeError, match=r"grads\['w'\] has dtype torch\.float64, but params\['w'\] has dtype torch\.float32.*\.to\("
    ):
        opt.update(grads, opt.init(params), params)


def test_a_gradient_that_is_not_a_tensor_raises():
    params = {"w": torch.ones(4)}
    opt = optim.SGD()
    with pytest.raises(TypeError, match=r"grads\['w'\] must be a Tensor or None; got float 1\.0"):
        opt.update({"w": 1.0}, opt.init(params), params)  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "opt, other, found, expected",
    [
        (optim.Adam(), optim.SGD(momentum=0.9), "['momentum_buffer']", "['exp_avg', 'exp_avg_sq']"),
        (
            optim.Adam(amsgrad=True),
            optim.Adam(),
            "['exp_avg', 'exp_avg_sq']",
            "['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq']",
        ),
        (optim.SGD(momentum=0.9), optim.SGD(), "[]", "['momentum_buffer']"),
        (optim.RMSprop(centered=True), optim.Adagrad(), "['sum']", "['square_avg', 'grad_avg']"),
    ],
    ids=["Adam-given-SGD", "amsgrad-given-Adam", "momentum-given-plain-SGD", "RMSprop-given-Adagrad"],
)
def test_a_state_from_another_optimizer_names_the_slots_expected_and_found(opt, other, found, expected):
    params = {"w": torch.ones(3)}
    state = other.init(params)
    name = type(opt).__name__
    with pytest.raises(
        ValueError,
        match=rf"{name}\.update: the state of parameter 'w' has slots {re.escape(found)}, "
        rf"but {name} with these hyperparameters keeps {re.escape(expected)}.*opt\.init\(params\)",
    ):
        opt.update({"w": torch.ones(3)}, state, params)


def test_groups_with_different_state_slots_update_like_separate_optimizers():
    # Momentum in one group only: the other group's parameters have no momentum buffer.
    params = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5, 3.0])}
    grads = {"a": torch.tensor([0.3, 0.1]), "b": torch.tensor([-0.2, 0.4])}
    opt = optim.SGD(lr=0.1, groups=[{"params": ["a"], "momentum": 0.9}])
    state = opt.init(params)
    p = params
    ref_a, ref_b = optim.SGD(lr=0.1, momentum=0.9), optim.SGD(lr=0.1)
    pa, sa = {"a": params["a"]}, ref_a.init({"a": params["a"]})
    pb, sb = {"b": params["b"]}, ref_b.init({"b": params["b"]})
    for _ in range(3):
        p, state = opt.update(grads, state, p)
        pa, sa = ref_a.update({"a": grads["a"]}, sa, pa)
        pb, sb = ref_b.update({"b": grads["b"]}, sb, pb)
    torch.testing.assert_close(p["a"], pa["a"], rtol=0, atol=0)
    torch.testing.assert_close(p["b"], pb["b"], rtol=0, atol=0)


@FOREACH
@pytest.mark.parametrize("shape", [(), (3,)], ids=["0-dim", "1-dim"])
def test_a_1_element_float64_lr_keeps_the_weight_shape_and_dtype_and_its_exact_gradient(shape, foreach):
    # f(w) = a/2 w^2 per entry, so SGD gives w_T = w_0 (1 - lr a)^T and
    # d sum(w_T) / d lr = sum(-T a w_0 (1 - lr a)^(T-1)), computed here in float64.
    T, lr0 = 5, 0.1
    a = torch.tensor([1.5, 0.5, 2.0][: (shape[0] if shape else 1)]).reshape(shape)
    w0 = torch.tensor([1.0, -2.0, 0.5][: (shape[0] if shape else 1)]).reshape(shape)
    lr = torch.tensor([lr0], dtype=torch.float64, requires_grad=True)
    opt = optim.SGD(lr=lr, foreach=foreach)
    p = {"w": w0.clone()}
    state = opt.init(p)
    for _ in range(T):
        p, state = opt.update({"w": a * p["w"]}, state, p)
        assert p["w"].shape == shape and p["w"].dtype == torch.float32
    (g,) = torch.autograd.grad(p["w"].sum(), lr)
    assert g.shape == (1,) and g.dtype == torch.float64
    a64, w64 = a.double(), w0.double()
    exact = (-T * a64 * w64 * (1 - lr0 * a64) ** (T - 1)).sum()
    torch.testing.assert_close(g[0], exact, rtol=1e-6, atol=1e-7)


@FOREACH
@pytest.mark.parametrize("shape", [(), (3,)], ids=["0-dim", "1-dim"])
@pytest.mark.parametrize(
    "make",
    [
        lambda x: optim.SGD(lr=x(0.1), momentum=x(0.9)),
        lambda x: optim.Adam(lr=x(0.1), betas=(x(0.9), x(0.99)), eps=x(1e-8)),
        lambda x: optim.NAdam(lr=x(0.1), betas=(x(0.9), 0.99)),
        lambda x: optim.RAdam(lr=x(0.1), betas=(0.9, x(0.5))),
        lambda x: optim.Adagrad(lr=x(0.1), initial_accumulator_value=x(0.1)),
        lambda x: optim.RMSprop(lr=x(0.01), alpha=x(0.9), momentum=x(0.5), centered=True),
        lambda x: optim.Rprop(lr=x(0.1), etas=(x(0.5), x(1.2))),
        lambda x: optim.ASGD(lr=x(0.1), lambd=x(1e-2)),
    ],
    ids=["SGD", "Adam", "NAdam", "RAdam", "Adagrad", "RMSprop", "Rprop", "ASGD"],
)
def test_1_element_float64_tensor_hyperparameters_neither_broadcast_nor_promote(make, shape, foreach):
    def x(v):
        return torch.tensor([v], dtype=torch.float64, requires_grad=True)

    opt = make(x)
    make(float)  # the same optimizer with float hyperparameters
    p = {"w": torch.linspace(-1.0, 1.0, 3).reshape(shape) if shape else torch.tensor(0.7)}
    state = opt.init(p)
    for t in range(4):
        g = {"w": torch.full(shape, 0.3 * (-1) ** t)}
        p, state = opt.update(g, state, p)
        assert p["w"].shape == shape and p["w"].dtype == torch.float32
        for slot, values in state.slots.items():
            assert values["w"].dtype == torch.float32, slot
            assert values["w"].shape in (shape, ()), slot
    grads = torch.autograd.grad(p["w"].sum(), opt.tensors(), allow_unused=True)
    assert any(g is not None and g.shape == (1,) and torch.isfinite(g).all() for g in grads)


def test_float64_tensor_hyperparameters_give_the_float_trajectory_in_float32():
    p0 = {"w": torch.tensor(0.7), "v": torch.tensor([0.5, -0.3])}
    runs = []
    for lr in (0.1, torch.tensor([0.1], dtype=torch.float64)):
        opt = optim.Adam(lr=lr, betas=(0.9, 0.99))
        p, state = dict(p0), opt.init(p0)
        for _ in range(5):
            p, state = opt.update({k: 2 * v for k, v in p.items()}, state, p)
        runs.append(p)
    for k in p0:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ groups
def test_overlapping_groups_raise_at_init_naming_the_parameter_both_groups_and_patterns():
    opt = optim.SGD(lr=0.1, groups=[{"params": ["enc.*"], "lr": 0.01}, {"params": ["*.weight"], "lr": 0.5}])
    params = {"enc.weight": torch.ones(2), "enc.bias": torch.ones(2), "dec.weight": torch.ones(2)}
    with pytest.raises(
        ValueError,
        match=r"parameter 'enc\.weight' matches two groups: groups\[0\] \(params \['enc\.\*'\], matched by 'enc\.\*'\) "
        r"and groups\[1\] \(params \['\*\.weight'\], matched by '\*\.weight'\).*disjoint",
    ):
        opt.init(params)


def test_disjoint_groups_are_accepted():
    opt = optim.SGD(lr=0.1, groups=[{"params": ["enc.*"], "lr": 0.01}, {"params": ["dec.weight"], "lr": 0.5}])
    params = {"enc.weight": torch.ones(2), "dec.weight": torch.ones(2), "dec.bias": torch.ones(2)}
    new, _ = opt.update({k: torch.ones(2) for k in params}, opt.init(params), params)
    assert [new[k][0].item() for k in params] == pytest.approx([0.99, 0.5, 0.9])
