"""Optimizer state in and out of ``ng.train``: a run continues exactly, and hypergradients cross segments.

References: the 20-step run in one call, in float64.
"""

from __future__ import annotations

import pytest
import torch

import nestgrad as ng
from optim_db import OPTIMIZERS, case_id, cases

pytestmark = pytest.mark.usefixtures("float64")


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(20, 3, generator=g), torch.randn(20, generator=g)
    data = [(x[i : i + 5], y[i : i + 5], torch.arange(i, i + 5)) for i in range(0, 20, 5)]
    return data


def loss_fn(p, batch, A):
    x, y, idx = batch
    r = torch.tanh(x @ p["w"] + p["b"]) - y
    return (r**2 if A is None else torch.sigmoid(A[idx]) * r**2).mean()


def init():
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(3, generator=g).requires_grad_(), "b": torch.zeros((), requires_grad=True)}


def outer(w):
    return ((w["w"] - 1) ** 2).sum() + w["b"] ** 2


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_ten_steps_then_ten_more_equal_twenty_bit_for_bit(case):
    info, setting = case
    opt = info.ours(**{**info.base, **setting})
    data, A = problem(), torch.zeros(20)
    with torch.no_grad():
        whole = ng.train(loss_fn, init(), opt, data, steps=20, hparams=A)
        first, state = ng.train(loss_fn, init(), opt, data, steps=10, hparams=A, return_state=True)
        assert set(state.step.values()) == {10}
        second = ng.train(loss_fn, first, opt, data[2:] + data[:2], steps=10, hparams=A, state=state)
    for k in whole:
        assert torch.equal(second[k], whole[k]), (info.name, setting, k)


SEGMENTS = {
    "Unroll": ng.Unroll,
    "Reverse": ng.Reverse,
    "Reverse(checkpoint_every=3)": lambda: ng.Reverse(checkpoint_every=3),
}


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "Adagrad"])
@pytest.mark.parametrize(
    ("first", "second"), [(a, b) for a in SEGMENTS for b in SEGMENTS] + [("Forward", "Unroll"), ("Forward", "Reverse")]
)
def test_hypergradients_through_two_segments_equal_the_whole_run(opt_name, first, second):
    kwargs = {"SGD": {"lr": 0.1, "momentum": 0.9}, "Adam": {"lr": 0.05}, "Adagrad": {"lr": 0.1}}[opt_name]
    lr = torch.tensor(kwargs.pop("lr"), requires_grad=True)
    opt = getattr(ng.optim, opt_name)(lr=lr, **kwargs)
    data, A = problem(), torch.linspace(-1, 1, 20).requires_grad_()

    whole = ng.train(loss_fn, init(), opt, data, steps=20, hparams=A)
    expected = torch.autograd.grad(outer(whole), [A, lr])

    method1 = ng.Forward() if first == "Forward" else SEGMENTS[first]()
    w1, s1 = ng.train(loss_fn, init(), opt, data, steps=10, hparams=A, method=method1, return_state=True)
    w2 = ng.train(loss_fn, w1, opt, data[2:] + data[:2], steps=10, hparams=A, state=s1, method=SEGMENTS[second]())
    got = torch.autograd.grad(outer(w2), [A, lr])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)


def test_gradient_w_r_t_the_initial_weights_crosses_segments_too():
    opt, data, A = ng.optim.Adam(lr=0.05), problem(), None
    w0 = init()
    (expected,) = torch.autograd.grad(outer(ng.train(loss_fn, w0, opt, data, steps=20, hparams=A)), w0["w"])
    w1, s1 = ng.train(loss_fn, w0, opt, data, steps=10, hparams=A, return_state=True, method=ng.Reverse())
    w2 = ng.train(loss_fn, w1, opt, data[2:] + data[:2], steps=10, hparams=A, state=s1, method=ng.Reverse())
    (got,) = torch.autograd.grad(outer(w2), w0["w"])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["Forward", "Implicit", "FiniteDiff", "ZerothOrder"])
def test_methods_that_do_not_differentiate_the_start_raise_instead_of_dropping_the_path(name):
    method = {
        "Forward": ng.Forward(),
        "Implicit": ng.Implicit(),
        "FiniteDiff": ng.FiniteDiff(),
        "ZerothOrder": ng.ZerothOrder(samples=2, sigma=0.1, seed=0),
    }[name]
    opt, data, A = ng.optim.SGD(lr=0.1), problem(), torch.zeros(20, requires_grad=True)
    w1, s1 = ng.train(loss_fn, init(), opt, data, steps=5, hparams=A, return_state=True)
    with pytest.raises(RuntimeError, match=rf"\({name}\): params\['w'\] carries a graph.*\.detach\(\)"):
        ng.train(loss_fn, w1, opt, data, steps=5, hparams=A, state=s1, method=method)
    # Warm-starting from detached weights and state is fine: the path is dropped on purpose.
    warm = {k: v.detach().requires_grad_() for k, v in w1.items()}
    w = ng.train(loss_fn, warm, opt, data, steps=5, hparams=A, state=s1, method=method)
    reference = ng.train(loss_fn, warm, opt, data, steps=5, hparams=A, state=s1)  # Unroll from the same start
    assert torch.equal(w["w"], reference["w"])
    if name != "Implicit":  # Implicit's solve needs an optimum, which 5 steps do not reach (it warns)
        assert torch.autograd.grad(outer(w), A)[0].abs().sum() > 0


def test_a_returned_state_that_a_method_cannot_differentiate_raises_when_it_is_used():
    opt, data, A = ng.optim.SGD(lr=0.1, momentum=0.9), problem(), torch.zeros(20, requires_grad=True)
    w1, s1 = ng.train(loss_fn, init(), opt, data, steps=5, hparams=A, return_state=True, method=ng.Implicit())
    loss = outer(w1) + sum(x.sum() for x in s1.tensors())
    with pytest.raises(RuntimeError, match=r"\(Implicit\): the final optimizer state.*Unroll\(\) or nestgrad.Reverse"):
        torch.autograd.grad(loss, A)
    # Not using the state is fine (5 steps reach no optimum: the solve warns, as it should).
    w1, s1 = ng.train(loss_fn, init(), opt, data, steps=5, hparams=A, return_state=True, method=ng.Implicit())
    with pytest.warns(ng.ConvergenceWarning):
        torch.autograd.grad(outer(w1), A)


def test_bad_states_are_named():
    opt, data = ng.optim.Adam(lr=0.1), problem()
    A = torch.zeros(20, requires_grad=True)
    with pytest.raises(TypeError, match="state must be the OptState"):
        ng.train(loss_fn, init(), opt, data, steps=1, hparams=A, state={"step": 3})
    other = ng.optim.Adam().init({"w": torch.zeros(3)})
    other = ng.optim.Adam().init({"v": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"state holds step counts for \['v'\].*\['b', 'w'\]"):
        ng.train(loss_fn, init(), opt, data, steps=1, hparams=A, state=other)
    partial = ng.optim.Adam().init({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"params \['b'\] require grad, but the given state has no entry"):
        ng.train(loss_fn, init(), opt, data, steps=2, hparams=A, state=partial)
    frozen_b = {**init(), "b": init()["b"].detach()}  # b without requires_grad: the state trains w only
    assert torch.equal(ng.train(loss_fn, frozen_b, opt, data, steps=2, hparams=A, state=partial)["b"], frozen_b["b"])
    sgd_state = ng.optim.SGD(momentum=0.9).init(init())
    with pytest.raises(ValueError, match="exp_avg"):  # the optimizer's own check: another optimizer's slots
        ng.train(loss_fn, init(), opt, data, steps=1, hparams=A, state=sgd_state)
    with pytest.raises(TypeError, match="return_state must be True or False"):
        ng.train(loss_fn, init(), opt, data, steps=1, hparams=A, return_state="yes")


def test_default_call_is_unchanged():
    opt, data, A = ng.optim.SGD(lr=0.1), problem(), torch.zeros(20, requires_grad=True)
    out = ng.train(loss_fn, init(), opt, data, steps=3, hparams=A)
    assert isinstance(out, dict) and set(out) == {"w", "b"}


def test_optimizers_in_the_table_are_all_covered():
    assert {info.name for info in OPTIMIZERS} >= {"SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Rprop", "ASGD"}


def test_a_given_state_with_nan_is_named_at_the_first_step():
    opt, data, A = ng.optim.SGD(lr=0.1, momentum=0.9), problem(), torch.zeros(20, requires_grad=True)
    _, state = ng.train(loss_fn, init(), opt, data, steps=2, hparams=A, return_state=True)
    bad = state.with_tensors([torch.full_like(x, float("nan")) for x in state.tensors()])
    with pytest.raises(ng.NonFiniteError, match=r"at step 0 of 3.*optimizer state 'momentum_buffer'"):
        ng.train(loss_fn, init(), opt, data, steps=3, hparams=A, state=bad)


# ------------------------------------------------ a given state is checked before the first step
def matrix_problem(dtype=torch.float64):
    calls = []

    def loss(p, batch, h):
        calls.append(1)
        return ((p["W"] - 1) ** 2).sum() + (p["b"] ** 2).sum()

    params = {
        "W": torch.zeros(4, 3, dtype=dtype, requires_grad=True),
        "b": torch.zeros(3, dtype=dtype, requires_grad=True),
    }
    return loss, params, calls


def replaced(state, slot, name, value):
    return state._replace(slots={**state.slots, slot: {**state.slots[slot], name: value}})


OPT = ng.optim.SGD(lr=0.1, momentum=0.9)
GOOD = OPT.init(matrix_problem()[1])
BAD_STATES = {
    "broadcasting shape": (
        replaced(GOOD, "momentum_buffer", "W", torch.zeros(3, dtype=torch.float64)),
        r"slot 'momentum_buffer' of parameter 'W' is a Tensor of shape \(3,\) .* but a Tensor of shape \(4, 3\)",
    ),
    "non-broadcasting shape": (
        replaced(GOOD, "momentum_buffer", "W", torch.zeros(2, 5, dtype=torch.float64)),
        r"shape \(2, 5\)",
    ),
    "float32 for float64": (
        OPT.init(matrix_problem(torch.float32)[1]),
        r"dtype torch.float32 in the given state, but .* dtype torch.float64 for these params.*Cast the state",
    ),
    "step 2.5": (GOOD._replace(step={"W": 2.5, "b": 0}), r"step counts must be ints >= 0.*float 2.5 for 'W'"),
    "step -1": (GOOD._replace(step={"W": -1, "b": 0}), r"step counts must be ints >= 0.*int -1 for 'W'"),
    "step True": (GOOD._replace(step={"W": 0, "b": True}), r"step counts must be ints >= 0.*bool True for 'b'"),
    "another device": (
        replaced(GOOD, "momentum_buffer", "b", torch.zeros(3, dtype=torch.float64, device="meta")),
        r"slot 'momentum_buffer' of parameter 'b' is on meta in the given state, but parameter 'b' is on cpu",
    ),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_a_given_state_is_checked_for_shapes_dtypes_devices_and_step_counts_before_the_first_step(name):
    state, words = BAD_STATES[name]
    loss, params, calls = matrix_problem()
    with pytest.raises(ValueError, match=words):
        ng.train(loss, params, OPT, [None], steps=2, state=state)
    assert not calls, "the run started before the state was checked"


def test_load_state_dict_applies_the_same_rules():
    for name in ("broadcasting shape", "step 2.5", "step -1", "step True"):
        state, words = BAD_STATES[name]
        with pytest.raises(ValueError, match=words.replace("given state", "saved state")):
            GOOD.load_state_dict({"step": state.step, "slots": state.slots})


def test_a_float32_state_for_float32_params_keeps_float32_weights_and_a_checked_state_trains_exactly():
    loss, params, _ = matrix_problem(torch.float32)
    with pytest.raises(ValueError, match=r"torch\.float64 in the given state"):
        ng.train(loss, params, OPT, [None], steps=2, state=GOOD)
    with torch.no_grad():
        whole = ng.train(loss, params, OPT, [None], steps=4)
        half, state = ng.train(loss, params, OPT, [None], steps=2, return_state=True)
        rest = ng.train(loss, half, OPT, [None], steps=2, state=state)
    assert all(rest[k].dtype is torch.float32 and torch.equal(rest[k], whole[k]) for k in whole)


def test_a_single_task_state_given_to_tasks_says_the_params_have_a_task_dimension():
    loss, params, calls = matrix_problem()
    with pytest.raises(
        ValueError,
        match=r"shape \(3, 4, 3\) and dtype torch.float64 for these params: the params have a leading task dimension",
    ):
        ng.train(loss, params, OPT, [None], steps=2, state=GOOD, tasks=3)
    assert not calls
    with torch.no_grad():  # the state a tasks run returned fits
        w, state = ng.train(loss, params, OPT, [None], steps=2, tasks=3, return_state=True)
        ng.train(loss, w, OPT, [None], steps=2, tasks=ng.Tasks(3, params=0), state=state)


@pytest.mark.parametrize(
    "lr, label",
    [
        (torch.tensor(0.1, device="meta"), "lr"),
        (torch.full((3,), 0.1, device="meta"), "lr"),
        ({"W": torch.tensor(0.1, device="meta"), "b": 0.1}, r"lr\['W'\]"),
        (ng.optim.Schedule(torch.full((5,), 0.1, device="meta")), r"lr \(schedule\)"),
    ],
    ids=["0-dim", "per-element", "dict", "schedule"],
)
@pytest.mark.parametrize("given_state", [False, True], ids=["fresh", "state="])
def test_a_tensor_hyperparameter_on_another_device_is_named_before_the_first_step(lr, label, given_state):
    loss, params, calls = matrix_problem()
    opt = ng.optim.SGD(lr=lr, momentum=0.9)
    state = GOOD if given_state else None
    with pytest.raises(ValueError, match=rf"SGD.init: {label} is a Tensor on meta, but parameter 'W' is on cpu"):
        ng.train(loss, params, opt, [None], steps=2, state=state)
    assert not calls
