"""Everything a method reads again in its backward pass is version-checked or copied.

Each case trains, changes one of the caller's tensors in place between ``ng.train`` and
``backward()``, and then asks for the hypergradient. The outcome must be either a nestgrad error
that names the tensor and says it was changed in place after ``ng.train``, or the hypergradient of
the unmodified run (the method copied the tensor, or kept what it needs of it). Never another
answer, and never a raw torch error.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import nestgrad as ng

pytestmark = [
    pytest.mark.usefixtures("float64"),
    pytest.mark.filterwarnings("ignore::nestgrad.ConvergenceWarning"),  # CG stops at 5 steps on purpose
]

METHODS: dict[str, Callable[[], ng.Method]] = {
    "unroll": ng.Unroll,
    "reverse": ng.Reverse,
    "reverse-checkpointed": lambda: ng.Reverse(checkpoint_every=2),
    "reverse-binomial": lambda: ng.Reverse(checkpoints=2),
    "forward": ng.Forward,
    "implicit": lambda: ng.Implicit(ng.CG(max_steps=5, tol=0.0)),
    "finite-diff": ng.FiniteDiff,
    "zeroth-order": lambda: ng.ZerothOrder(samples=2, sigma=1e-3, seed=0),
}

#: What is changed in place: the caller's initial params, a weight frozen in params
#: (requires_grad=False), a module weight left out of params (reached through ng.call), a tensor of
#: the given state=, the hparams, and the optimizer's Tensor lr.
KINDS = ("params", "frozen", "module", "state", "hparams", "lr")

#: Where the method keeps its own copy of (or all it needs from) the tensor: the answer must equal
#: the unmodified run's. Everywhere else the change must raise a nestgrad error.
COPIED = {
    # Unroll's graph keeps what it needs of every tensor (and autograd checks the versions of what it saved).
    **{("unroll", k): True for k in KINDS},
    # train passes clones of the trainable params to every method.
    **{(m, "params"): True for m in METHODS},
    # Forward keeps the Jacobian of the trained weights, nothing else.
    **{("forward", k): True for k in KINDS},
    # Reverse copies a given state into its trajectory.
    ("reverse", "state"): True,
    ("reverse-checkpointed", "state"): True,
    ("reverse-binomial", "state"): True,
    # Implicit differentiates at the trained weights and the final state: the initial state is never read again.
    ("implicit", "state"): True,
    # FiniteDiff keeps the state before the last step: with steps=1 a copy of the given state.
    ("finite-diff", "state"): True,
}

STEPS = 4


def _setup(kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)  # left out of params: ng.call uses the module's own
    X, y = torch.randn(8, 3), torch.randn(8, 1)
    params = {
        "0.bias": model[0].bias.detach().clone(),  # frozen in params: requires_grad=False
        "2.weight": model[2].weight.detach().clone().requires_grad_(),
        "2.bias": model[2].bias.detach().clone().requires_grad_(),
    }
    A = torch.full((8,), 1.0).requires_grad_()
    lr = torch.tensor(0.2, requires_grad=True)
    optimizer = ng.optim.SGD(lr=lr, momentum=0.9)

    def loss_fn(p, batch, A):
        x, y = batch
        return (A * (ng.call(model, p, x) - y).square().squeeze(1)).mean()

    state = None
    if kind == "state":
        with torch.no_grad():  # a warm start: momentum buffers that are not zero
            _, state = ng.train(loss_fn, params, optimizer, [(X, y)], steps=2, hparams=A, return_state=True)
    target = {
        "params": params["2.weight"],
        "frozen": params["0.bias"],
        "module": model[0].weight,
        "state": None if state is None else state.tensors()[0],
        "hparams": A,
        "lr": lr,
    }[kind]
    return loss_fn, params, optimizer, [(X, y)], A, lr, state, target


def _hypergradient(method_name: str, kind: str, change: bool, steps: int = STEPS):
    loss_fn, params, optimizer, data, A, lr, state, target = _setup(kind)
    trained = ng.train(
        loss_fn, params, optimizer, data, steps=steps, hparams=A, method=METHODS[method_name](), state=state
    )
    if change:
        with torch.no_grad():
            target.mul_(1.5).add_(0.25)
    outer = trained["2.weight"].sin().sum() + trained["2.bias"].square().sum()
    return torch.autograd.grad(outer, [A, lr], allow_unused=True, materialize_grads=True)


def _check(method_name: str, kind: str, steps: int = STEPS) -> None:
    reference = _hypergradient(method_name, kind, change=False, steps=steps)
    if COPIED.get((method_name, kind), False):
        got = _hypergradient(method_name, kind, change=True, steps=steps)
        for g, r in zip(got, reference, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
        return
    with pytest.raises(RuntimeError, match=r"^nestgrad\.train \(\w+\): .* was modified in place after") as info:
        _hypergradient(method_name, kind, change=True, steps=steps)
    message = str(info.value)
    assert NAMES[kind] in message and "Call backward() / torch.autograd.grad() before changing it" in message


#: How the error names each kind of tensor.
NAMES = {
    "frozen": "params['0.bias'] (frozen)",
    "module": "the module weight '0.weight'",
    "state": "the given state's 'momentum_buffer' of",
    "hparams": "hparams was modified",
    "lr": "optimizer lr was modified",
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method_name", list(METHODS))
def test_changed_in_place_before_backward(method_name: str, kind: str) -> None:
    _check(method_name, kind)


@pytest.mark.parametrize("method_name", list(METHODS))
def test_given_state_changed_after_one_step(method_name: str) -> None:
    """With steps=1 the state before the last step is the given one (FiniteDiff's backward reads it)."""
    _check(method_name, "state", steps=1)
