"""Behaviour shared by every method that supplies its own backward pass: freeing, retain_graph."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import nestgrad as ng
from test_train import batches, problem, val_loss, weighted_loss

ADJOINT = {
    "reverse": ng.Reverse(),
    "reverse-checkpointed": ng.Reverse(checkpoint_every=2),
    "forward": ng.Forward(),
    "implicit-cg": ng.Implicit(ng.CG(max_steps=5, tol=0.0)),
    "finite-diff": ng.FiniteDiff(),
    "zeroth-order": ng.ZerothOrder(samples=2, sigma=0.1, seed=0),
}


pytestmark = [
    pytest.mark.usefixtures("float64"),
    pytest.mark.filterwarnings("ignore::nestgrad.ConvergenceWarning"),  # CG stops at 5 steps on purpose
]


def trained(method: ng.Method):
    model, X, y = problem()
    A = torch.zeros(len(X), requires_grad=True)
    params = dict(model.named_parameters())
    out = ng.train(weighted_loss(model), params, ng.optim.SGD(lr=0.3), batches(X, y), steps=5, hparams=A, method=method)
    return out, val_loss(model, out, X, y), A


def saved_by(out: dict[str, torch.Tensor]):
    """The object the method saved for its backward (None once freed), through the autograd node."""
    run = next(iter(out.values())).grad_fn.run
    return None if run is None else run[3]


class Probe:
    """A weak reference to what a method saved, to see when it is freed."""

    def __init__(self, saved) -> None:
        holder = saved if _weakrefable(saved) else next(x for x in _parts(saved) if _weakrefable(x))
        self.ref = weakref.ref(holder)

    def alive(self) -> bool:
        gc.collect()
        return self.ref() is not None


def _weakrefable(x) -> bool:
    try:
        weakref.ref(x)
    except TypeError:
        return False
    return True


def _parts(x):
    if isinstance(x, dict):
        yield from x.values()
    elif isinstance(x, (tuple, list)):
        for item in x:
            yield item
            yield from _parts(item)


@pytest.mark.parametrize("name", list(ADJOINT))
def test_what_a_method_saved_is_freed_by_the_backward_pass(name):
    out, loss, A = trained(ADJOINT[name])
    probe = Probe(saved_by(out))
    assert probe.alive()
    torch.autograd.grad(loss, A)
    assert not probe.alive(), "the trajectory / Jacobian should be freed with the graph, not kept with the weights"
    assert all(v.requires_grad for v in out.values())  # the weights themselves are untouched


@pytest.mark.parametrize("name", list(ADJOINT))
def test_retain_graph_keeps_it_for_a_second_identical_backward(name):
    out, loss, A = trained(ADJOINT[name])
    probe = Probe(saved_by(out))
    (first,) = torch.autograd.grad(loss, A, retain_graph=True)
    assert probe.alive()
    (second,) = torch.autograd.grad(loss, A)
    assert first.abs().max() > 0 and second.abs().max() > 0
    if name != "zeroth-order":  # it draws fresh directions at every backward pass, by design
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not probe.alive()


def test_a_second_backward_without_retain_graph_names_the_fix():
    out, _, A = trained(ng.Reverse())
    loss = sum(v.sum() for v in out.values())  # saves nothing itself, so the run's node is reached again
    torch.autograd.grad(loss, A)
    with pytest.raises(RuntimeError, match=r"second time.*Reverse.*retain_graph=True"):
        torch.autograd.grad(loss, A)


@pytest.mark.parametrize(
    "method",
    [ng.Reverse(), ng.Reverse(checkpoint_every=2), ng.Forward(), ng.Forward(mode="forward"),
     ng.Forward(mode="double-backward")],
    ids=["reverse", "reverse-checkpointed", "forward", "forward-mode", "double-backward"],
)  # fmt: skip
@pytest.mark.parametrize("return_state", [False, True], ids=["weights", "weights-and-state"])
def test_an_optimizer_returning_one_tensor_as_weight_and_state_keeps_both_gradients(method, return_state):
    """ASGD returns its weight itself as the average until averaging starts: one tensor in two outputs. The
    weight's gradient must not be routed to the state slot (Forward gave an exact 0; found by the fuzzer)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.rand(6, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(p, b, a):
        return (a * (b[0] @ p["w"] - b[1]) ** 2).mean()

    def hypergradient(m):
        w = {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
        out = ng.train(loss, w, ng.optim.ASGD(lr=0.05), [(x, y)], steps=3, hparams=a, method=m,
                       return_state=return_state)  # fmt: skip
        trained = out[0] if return_state else out
        return torch.autograd.grad(trained["w"].sum(), a)[0]

    ref = hypergradient(ng.Unroll())
    got = hypergradient(method)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
