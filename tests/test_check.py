"""check: passes on an exact hypergradient through nestgrad.train, fails on a gradient that is 10% off,
advises float64 in float32, never passes a zero gradient (no signal / cut), and validates its arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nestgrad as ng
from nestgrad._check import CheckResult, check

pytestmark = pytest.mark.usefixtures("float64")


def weighted_problem(seed: int = 0, n: int = 16):
    """Per-example weights A; fn(A) trains a small MLP with nestgrad.train and returns the validation loss."""
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    Xv, yv = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    params = dict(model.named_parameters())

    def loss_fn(p, batch, A):
        return (torch.sigmoid(A) * F.cross_entropy(ng.call(model, p, X), y, reduction="none")).mean()

    def fn(A):
        trained = ng.train(loss_fn, params, ng.optim.SGD(lr=0.5, momentum=0.9), [None], steps=5, hparams=A)
        return F.cross_entropy(ng.call(model, trained, Xv), yv)

    return fn, torch.zeros(n)


def test_passes_on_an_exact_hypergradient_through_train():
    fn, A = weighted_problem()
    result = check(fn, A)
    assert isinstance(result, CheckResult)
    assert result.verdict == "passed" and result.passed, str(result)
    assert result.max_error < 1e-7 and result.grad_norm > 0
    assert len(result.directions) == 3 and result.notes == ()
    text = str(result)
    assert text.startswith("nestgrad.check passed") and "float64" in text
    assert len(text.splitlines()) == 3 + 3  # header, summary, column names, one row per direction


class OffByTenPercent(torch.autograd.Function):
    """y = x ** 2 with a backward that is 10% too large."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 1.1 * 2 * x * g


def test_fails_on_a_gradient_that_is_ten_percent_off():
    fn, A = weighted_problem()

    def wrong(A):
        return fn(OffByTenPercent.apply(A + 0.5))

    result = check(wrong, A)
    assert result.verdict == "failed" and not result.passed
    assert 0.01 < result.max_error < 0.2
    text = str(result)
    assert text.startswith("nestgrad.check FAILED") and "<--" in text


def test_float32_says_finite_differences_are_unreliable_and_advises_float64():
    A = torch.randn(5, dtype=torch.float32)
    result = check(lambda A: torch.sin(A).sum() * torch.cos(A).sum(), A)
    assert result.dtype == torch.float32
    assert any("float32 are unreliable" in n and "torch.set_default_dtype(torch.float64)" in n for n in result.notes)
    assert "float32 are unreliable" in str(result)
    assert result.eps == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3) * A.norm().item())
    # The same check in float64 passes, with a far smaller step.
    result64 = check(lambda A: torch.sin(A).sum() * torch.cos(A).sum(), A.double())
    assert result64.passed and result64.notes == () and result64.eps < 1e-4


def test_a_float32_output_triggers_the_advice_too():
    result = check(lambda A: (A.float() ** 2).sum(), torch.randn(3))
    assert any("float32" in n for n in result.notes)


def test_disconnected_through_argmax_is_no_signal_not_passed():
    X = torch.randn(10, 3)
    W = torch.randn(3, 3)

    def fn(A):
        labels = (X @ A).argmax(1)  # piecewise constant: the finite differences are zero too
        return F.cross_entropy(X @ W, labels)

    result = check(fn, torch.randn(3, 3))
    assert result.verdict == "no signal" and not result.passed
    assert result.grad_norm == 0
    assert "NO SIGNAL" in str(result) and "explain(fn, hparams)" in result.notes[0]
    assert "does not require grad" in result.notes[0]


def test_disconnected_but_changing_output_fails():
    def fn(A):
        return (A.detach() ** 2).sum() + 0.0 * A.sum()  # the gradient says 0, the value moves

    result = check(fn, torch.tensor([1.0, 2.0]))
    assert result.verdict == "failed"
    assert "path autograd does not see" in result.notes[0] and "ZerothOrder" in result.notes[0]
    assert result.max_error == pytest.approx(1.0)


def test_a_gradient_that_is_truly_zero_is_no_signal():
    result = check(lambda A: (A - A).sum() + 1.0, torch.randn(4))
    assert result.verdict == "no signal"


def test_trees_of_hparams_unused_leaves_and_directions():
    fn, A = weighted_problem()
    B = torch.tensor(0.3)
    unused = torch.tensor([1.0, 2.0])

    def tree_fn(h):
        return fn(h["A"] * h["scale"][0])

    result = check(tree_fn, {"A": A + 0.1, "scale": (B + 1.0, unused)}, directions=2, seed=3)
    assert result.passed, str(result)
    assert len(result.directions) == 2
    assert any("do not reach the output" in n and "[2]" in n for n in result.notes)


def test_own_generator_and_deterministic():
    fn = lambda A: (torch.exp(A) * torch.arange(4.0)).sum()  # noqa: E731
    A = torch.randn(4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = check(fn, A, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert check(fn, A, seed=7).directions == first.directions
    assert check(fn, A, seed=8).directions != first.directions


def test_default_eps_scales_with_the_hparams_and_can_be_given():
    fn = lambda A: (A**3).sum()  # noqa: E731
    small = check(fn, torch.full((4,), 0.1))
    large = check(fn, torch.full((4,), 100.0))
    eps64 = torch.finfo(torch.float64).eps ** (1 / 3)
    assert small.eps == pytest.approx(eps64) and large.eps == pytest.approx(eps64 * 200.0)
    assert check(fn, torch.ones(4), eps=1e-4).eps == 1e-4
    assert small.passed and large.passed


def test_no_grad_false_for_functions_that_differentiate_inside():
    def fn(lam):
        w = torch.zeros(3, requires_grad=True)
        for _ in range(3):
            loss = ((w - 1.0) ** 2).sum() + (torch.exp(lam) * w**2).sum()
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            w = w - 0.1 * g
        return (w**2).sum()

    lam = torch.tensor([0.1, -0.2, 0.3])
    with pytest.raises(RuntimeError):
        check(fn, lam)  # autograd.grad inside fn cannot run under torch.no_grad()
    assert check(fn, lam, no_grad=False).passed


def test_relative_error_along_near_orthogonal_directions_stays_small():
    """With one coordinate dominating, g.v is tiny along some directions; the error is relative to |g|."""
    A = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    result = check(lambda A: 1e3 * A[0] ** 2 + 1e-6 * A[1:].sum(), A, directions=8)
    assert result.passed
    assert all(d.error <= d.relative or d.relative == 0 for d in result.directions)


def test_argument_errors():
    f = lambda A: A.sum()  # noqa: E731
    with pytest.raises(ValueError, match="directions must be an int >= 1"):
        check(f, torch.ones(2), directions=0)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        check(f, torch.ones(2), eps=-1.0)
    with pytest.raises(ValueError, match="rtol must be > 0"):
        check(f, torch.ones(2), rtol=0.0)
    with pytest.raises(TypeError, match="floating-point Tensor; leaf 0 is float"):
        check(f, [0.1])
    with pytest.raises(TypeError, match=r"leaf 0 is a torch\.int64 Tensor"):
        check(f, torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="holds no Tensor"):
        check(f, [])
    with pytest.raises(
        ValueError, match=r"scalar Tensor; at hparams it returned a torch.float64 Tensor of shape \(2,\)"
    ):
        check(lambda A: A * 2, torch.ones(2))
    assert math.isfinite(check(f, torch.ones(2)).value)
