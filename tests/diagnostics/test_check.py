"""check: passes on an exact hypergradient through nestgrad.train, fails on a gradient that is 10% off,
never passes a zero gradient (no signal / cut) or a NaN/inf anywhere, steps relative to each hparam (so it
works in float32 at lr=0.01), names round-off vs truncation vs a wrong gradient, and validates its arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nestgrad as ng
from nestgrad.diagnostics._check import CheckResult, Direction, check

pytestmark = pytest.mark.usefixtures("float64")

C64 = torch.finfo(torch.float64).eps ** (1 / 3)  # 6.1e-6: the default relative step in float64
C32 = torch.finfo(torch.float32).eps ** (1 / 3)  # 4.9e-3: in float32


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
    assert "autograd gradient itself is off" in result.notes[0]  # the error does not depend on the step


def test_float32_says_finite_differences_are_unreliable_and_advises_float64():
    A = torch.randn(5, dtype=torch.float32)
    result = check(lambda A: torch.sin(A).sum() * torch.cos(A).sum(), A)
    assert result.dtype == torch.float32 and result.rtol == 3e-3
    assert any("float32 are unreliable" in n and "torch.set_default_dtype(torch.float64)" in n for n in result.notes)
    assert "float32 are unreliable" in str(result) and "float64 is the reliable setting" in str(result)
    assert result.passed, str(result)
    # Each element moves by at most cbrt(float32 eps) = 4.9e-3 of itself (f changes a lot relative to |f|).
    assert result.relative_step == pytest.approx(C32, rel=1e-3)
    # The same check in float64 passes at rtol 1e-5, with a far smaller step.
    result64 = check(lambda A: torch.sin(A).sum() * torch.cos(A).sum(), A.double())
    assert result64.passed and result64.notes == () and result64.eps < 1e-4 and result64.rtol == 1e-5


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


def test_default_eps_is_relative_to_each_element_and_a_given_eps_is_absolute():
    fn = lambda A: (A**3).sum()  # noqa: E731
    small = check(fn, torch.full((4,), 0.1))
    large = check(fn, torch.full((4,), 100.0))
    assert small.relative_step == pytest.approx(C64) and large.relative_step == pytest.approx(C64)
    assert large.eps / small.eps == pytest.approx(1000.0)
    assert small.eps < 0.1 * 2 * C64  # a unit direction over 4 elements: |move| <= sqrt(4) * c * 0.1
    given = check(fn, torch.ones(4), eps=1e-4)
    assert given.eps == 1e-4 and all(d.step == pytest.approx(1e-4) for d in given.directions)
    assert small.passed and large.passed and given.passed


def test_default_step_never_flips_a_sign_or_moves_a_small_element_far():
    """One leaf mixing 1e-4, -3, 0 and 50: every nonzero element moves by the same small fraction of itself."""
    h = torch.tensor([1e-4, -3.0, 0.0, 50.0])
    seen = []

    def fn(A):
        seen.append(A.detach().clone())
        return (torch.exp(A / 50) * torch.tensor([1e3, 1.0, 1.0, 1.0])).sum()

    result = check(fn, h, directions=4)
    assert result.passed, str(result)
    for A in seen[1:]:
        change = (A - h).abs()
        assert torch.equal(torch.sign(A[[0, 1, 3]]), torch.sign(h[[0, 1, 3]]))
        assert (change[[0, 1, 3]] <= result.relative_step * h[[0, 1, 3]].abs() * (1 + 1e-9)).all()
        assert 0 < change[2] <= result.relative_step * h[h != 0].pow(2).mean().sqrt() * 1.001  # its leaf's RMS
    assert C64 <= result.relative_step <= 10 * C64


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
    with pytest.raises(ValueError, match="rtol must be > 0"):
        check(f, torch.ones(2), rtol=math.nan)
    with pytest.raises(TypeError, match="floating-point Tensor; leaf 0 is float"):
        check(f, [0.1])
    with pytest.raises(TypeError, match=r"leaf 0 is a torch\.int64 Tensor"):
        check(f, torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="holds no Tensor"):
        check(f, [])
    with pytest.raises(ValueError, match="leaf 1 of hparams holds 1 NaN and 1 inf elements"):
        check(f, [torch.ones(2), torch.tensor([math.nan, math.inf, 0.0])])
    with pytest.raises(
        ValueError, match=r"scalar Tensor; at hparams it returned a torch.float64 Tensor of shape \(2,\)"
    ):
        check(lambda A: A * 2, torch.ones(2))
    assert math.isfinite(check(f, torch.ones(2)).value)


# --- never a silent NaN ---------------------------------------------------------------------------------


def test_nan_autograd_gradient_with_a_finite_function_fails():
    """sqrt at 0 has an infinite derivative: f is finite (sqrt(0) = 0), autograd gives inf - inf = NaN."""
    result = check(lambda A: (A**2).sum() + torch.sqrt(A - A).sum(), torch.tensor([1.0, 2.0]))
    assert result.verdict == "failed" and not result.passed
    assert math.isnan(result.grad_norm) and math.isnan(result.max_error)
    assert all(math.isfinite(d.finite_diff) for d in result.directions)
    note = result.notes[0]
    assert "autograd gradient is not finite (leaf 0: 2 NaN" in note and "every finite difference is finite" in note
    assert "sqrt at 0" in note and "eps_root" in note
    text = str(result)
    assert text.startswith("nestgrad.check FAILED: max error nan") and text.count("<--") == 3


def adam_problem(eps_root: float, check_finite: bool = True):
    """Linear regression where feature 2 is always 0: its weight's gradient is exactly 0 at every step."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 3, generator=g), torch.randn(12, generator=g)
    X[:, 2] = 0.0
    Xv, yv = torch.randn(12, 3, generator=g), torch.randn(12, generator=g)
    w0 = {"w": torch.zeros(3, requires_grad=True)}

    def fn(lr):
        opt = ng.optim.Adam(lr=lr, eps_root=eps_root)
        loss_fn = lambda p, batch, h: ((X @ p["w"] - y) ** 2).mean()  # noqa: E731
        w = ng.train(loss_fn, w0, opt, [None], steps=5, check_finite=check_finite)
        return ((Xv @ w["w"] - yv) ** 2).mean()

    return fn


def test_adam_with_eps_root_zero_and_a_weight_whose_gradient_is_always_zero_fails():
    lr = torch.tensor(0.05)
    with pytest.raises(ng.NonFiniteError, match=r"\(Unroll\): in the backward pass.*eps_root"):
        check(adam_problem(eps_root=0.0), lr)  # nestgrad.train itself raises first
    result = check(adam_problem(eps_root=0.0, check_finite=False), lr)  # ng.check must fail without that help
    assert result.verdict == "failed", str(result)  # before: "passed", max error 0.0, with |grad| = nan
    assert math.isnan(result.max_error) and math.isfinite(result.value)
    assert "eps_root=1e-30" in result.notes[0]
    fixed = check(adam_problem(eps_root=1e-30), lr)  # the default keeps the meta-gradient finite and exact
    assert fixed.passed and fixed.max_error < 1e-8, str(fixed)


class InfiniteBackward(torch.autograd.Function):
    """y = x with a backward that returns inf."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


def test_inf_gradient_fails():
    result = check(lambda A: InfiniteBackward.apply(A).sum() ** 2, torch.tensor([0.5, 1.0, 2.0]))
    assert result.verdict == "failed"
    assert math.isinf(result.grad_norm) and math.isnan(result.max_error)
    assert "0 NaN and 3 inf of 3 elements" in result.notes[0]


def test_nan_function_value_fails():
    result = check(lambda A: (A**2).sum() * torch.tensor(math.nan), torch.tensor([0.5, 1.0]))
    assert result.verdict == "failed" and math.isnan(result.value) and math.isnan(result.max_error)
    assert result.notes[0].startswith("f(hparams) = nan: fn itself is not finite at hparams")


def test_nan_in_the_finite_differences_fails():
    """log(A) at A = 0.001 with a step of 0.01: f(h - step v) takes the log of a negative number."""
    result = check(lambda A: torch.log(A).sum(), torch.tensor([0.5, 0.001]), eps=0.01)
    assert result.verdict == "failed" and math.isfinite(result.value) and math.isfinite(result.grad_norm)
    assert any(math.isnan(d.finite_diff) for d in result.directions) and math.isnan(result.max_error)
    assert "f is not finite at hparams +- step" in result.notes[0] and "Pass a smaller eps" in result.notes[0]
    # The default step is relative, so it stays inside log's domain and passes.
    assert check(lambda A: torch.log(A).sum(), torch.tensor([0.5, 0.001])).passed


def test_a_step_lost_in_rounding_fails():
    result = check(lambda A: (A**2).sum(), torch.ones(3, dtype=torch.float32), eps=1e-12)
    assert result.verdict == "failed" and all(d.step == 0 for d in result.directions)
    assert "below the resolution of float32" in result.notes[0]


def test_max_error_and_the_table_do_not_drop_a_nan_in_any_position():
    def result(*errors: float) -> CheckResult:
        dirs = tuple(Direction(1.0, 1.0, e, e) for e in errors)
        return CheckResult("failed", 1.0, 1.0, 1e-6, 1e-5, torch.float64, dirs, ())

    for errors in [(math.nan, 0.1), (0.1, math.nan), (math.nan,)]:
        assert math.isnan(result(*errors).max_error)
        assert str(result(*errors)).count("<--") == 1 + (0.1 in errors)
    assert result(1e-7, 1e-3).max_error == 1e-3


# --- float32, and what the note blames -------------------------------------------------------------------


def lr_problem(dtype: torch.dtype, wrong: bool = False):
    """fn(lr): an MLP trained for 10 SGD steps, all in dtype; its validation loss."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 5, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)
    Xv, yv = torch.randn(32, 5, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    params = dict(model.named_parameters())

    def fn(lr):
        lr = TenPercentTooLarge.apply(lr) if wrong else lr
        opt = ng.optim.SGD(lr=lr, momentum=0.9)
        w = ng.train(lambda p, batch, h: F.cross_entropy(ng.call(model, p, X), y), params, opt, [None], steps=10)
        return F.cross_entropy(ng.call(model, w, Xv), yv)

    return fn


class TenPercentTooLarge(torch.autograd.Function):
    """y = x with a backward that is 10% too large."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 1.1 * g


def test_float32_small_lr_passes_with_a_step_small_relative_to_it():
    """Before, the step was cbrt(eps) * max(1, |h|) = 4.9e-3, half of lr = 0.01. Now it is relative to lr:
    cbrt(eps) * (|f| / |g * lr|) ** (1/3) * lr, about 5 * 4.9e-3 * 0.01 here, since f is 1.1 and changes
    by only 0.009 per unit relative change of lr."""
    lr = torch.tensor(0.01, dtype=torch.float32)
    fn = lr_problem(torch.float32)
    result = check(fn, lr)
    assert result.dtype == torch.float32 and result.passed, str(result)
    boost = (abs(result.value) / (result.grad_norm * 0.01)) ** (1 / 3)
    assert 1 < boost < 10 and result.relative_step == pytest.approx(C32 * boost, rel=1e-3)
    assert result.eps == pytest.approx(result.relative_step * 0.01, rel=1e-3) and result.eps < 0.05 * 0.01
    assert result.max_error <= result.rtol == 3e-3


def test_float32_wrong_gradient_still_fails_and_the_note_blames_the_gradient():
    result = check(lr_problem(torch.float32, wrong=True), torch.tensor(0.01, dtype=torch.float32))
    assert result.verdict == "failed" and 0.05 < result.max_error < 0.15, str(result)
    assert "autograd gradient itself is off" in result.notes[0]
    assert "round-off" not in result.notes[0] and "truncation" not in result.notes[0]


def test_roundoff_diagnosis_with_a_tiny_eps_in_float32():
    A = torch.tensor([0.7, -1.2, 0.4, 1.5, -0.3], dtype=torch.float32)
    result = check(lambda A: (10 * torch.sin(A)).sum() + (A**2).sum(), A, eps=1e-5)
    assert result.verdict == "failed", str(result)
    note = result.notes[0]
    assert "error shrinks as the step grows" in note and "round-off" in note and "truncation" not in note
    assert "Pass a larger eps (about 1.0e-04)" in note and "float64, the reliable setting" in note
    assert "the autograd gradient agrees there" in note  # at 10x the step it passes


def test_truncation_diagnosis_with_a_huge_eps_on_a_curved_function():
    result = check(lambda A: torch.exp(3 * A).sum(), torch.tensor([0.1, -0.2, 0.3]), eps=0.5)
    assert result.verdict == "failed" and result.max_error > 0.1, str(result)
    note = result.notes[0]
    assert "error grows with the step" in note and "truncation" in note and "round-off" not in note
    assert "Pass a smaller eps (about 5.0e-02)" in note
    assert check(lambda A: torch.exp(3 * A).sum(), torch.tensor([0.1, -0.2, 0.3])).passed
