"""Implicit and the linear solvers: closed-form ridge hypergradients, finite differences through
two levels, solver unit tests on explicit matrices, no NaN, and warnings that teach."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import nestgrad as ng
from nestgrad.methods._implicit import Implicit
from nestgrad.methods._reverse import Reverse
from nestgrad.methods._solvers import CG, ConvergenceWarning, FixedPoint, Neumann, Solution

pytestmark = pytest.mark.usefixtures("float64")


def rel(a, b):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- ridge regression
class Ridge:
    r"""Ridge regression with a closed-form hypergradient.

    L_train(w, λ) = |Xw - y|²/(2n) + e^λ |w|²/2,  w*(λ) = (XᵀX/n + e^λ I)⁻¹ Xᵀy/n,
    outer = validation MSE,  d outer/dλ = -e^λ ∇outer(w*)ᵀ H⁻¹ w*  (IFT, solved with torch.linalg.solve).
    """

    def __init__(self, seed: int = 0, n: int = 200, d: int = 50, log_l2: float = math.log(0.1)):
        g = torch.Generator().manual_seed(seed)
        self.n, self.d = n, d
        self.X = torch.randn(n, d, generator=g)
        w_true = torch.randn(d, generator=g)
        self.y = self.X @ w_true + 0.5 * torch.randn(n, generator=g)
        self.Xv = torch.randn(n // 2, d, generator=g)
        self.yv = self.Xv @ w_true + 0.5 * torch.randn(n // 2, generator=g)
        self.lam = torch.tensor(log_l2, requires_grad=True)
        self.eigs = torch.linalg.eigvalsh(self.hessian(self.X, extra=0.0))
        self.lr = 1 / float(self.eigs[-1])

    @staticmethod
    def loss_fn(p, batch, lam):
        X, y = batch
        w = p["w"]
        return ((X @ w - y) ** 2).sum() / (2 * len(y)) + lam.exp() * (w**2).sum() / 2

    def hessian(self, X, extra):
        return X.T @ X / len(X) + (self.lam.detach().exp() + extra) * torch.eye(self.d)

    def outer(self, w):
        return ((self.Xv @ w - self.yv) ** 2).mean()

    def exact(self, extra: float = 0.0, X=None):
        """w* with a total L2 weight e^λ + extra, and d outer/d(L2 weight) at w* for the condition on X."""
        H = self.hessian(self.X, extra)
        w = torch.linalg.solve(H, self.X.T @ self.y / self.n)
        grad_outer = 2 * self.Xv.T @ (self.Xv @ w - self.yv) / len(self.yv)
        H_condition = H if X is None else self.hessian(X, extra)
        return w, -grad_outer @ torch.linalg.solve(H_condition, w)

    def train(self, method, optimizer=None, steps=400, data=None, hparams=None):
        w0 = {"w": torch.zeros(self.d, requires_grad=True)}
        data = [(self.X, self.y)] if data is None else data
        optimizer = ng.optim.SGD(lr=self.lr) if optimizer is None else optimizer
        hparams = self.lam if hparams is None else hparams
        return ng.train(self.loss_fn, w0, optimizer, data, steps=steps, hparams=hparams, method=method)["w"]

    def hypergrad(self, method, inputs=None, **kw):
        w = self.train(method, **kw)
        return torch.autograd.grad(self.outer(w), inputs or [self.lam])


@pytest.fixture(scope="module")
def ridge():
    old = torch.get_default_dtype()  # module fixtures start before the float64 one
    torch.set_default_dtype(torch.float64)
    try:
        yield Ridge()
    finally:
        torch.set_default_dtype(old)


def test_cg_matches_closed_form_ridge_within_the_cg_iteration_bound(ridge):
    eps = 1e-10
    log = []
    (g,) = ridge.hypergrad(Implicit(CG(max_steps=100, tol=eps), on_solve=log.append))
    w_star, dl2 = ridge.exact()
    ref = ridge.lam.exp() * dl2
    assert rel(ridge.train(Implicit()), w_star) <= 1e-13  # trained to convergence
    assert rel(g, ref) <= 1e-8
    (solution,) = log
    H = ridge.hessian(ridge.X, 0.0)
    kappa = float(torch.linalg.cond(H))
    bound = 0.5 * math.sqrt(kappa) * math.log(2 / eps)
    assert bound < ridge.d  # the bound, not CG's finite termination, is what is tested
    assert solution.converged and solution.residual <= eps
    assert solution.steps <= bound


def test_neumann_approaches_closed_form_ridge_as_terms_are_added(ridge):
    ref = ridge.lam.exp() * ridge.exact()[1]
    errors = [rel(ridge.hypergrad(Implicit(Neumann(steps=k, alpha=ridge.lr)))[0], ref) for k in (10, 20, 40)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] <= 1e-3


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_fixed_point_matches_closed_form_ridge_with_and_without_optimizer_state(ridge, momentum):
    log = []
    opt = ng.optim.SGD(lr=ridge.lr, momentum=momentum)
    (g,) = ridge.hypergrad(Implicit(FixedPoint(max_steps=2000, tol=1e-10), on_solve=log.append), optimizer=opt)
    assert rel(g, ridge.lam.exp() * ridge.exact()[1]) <= 1e-8
    (solution,) = log
    assert solution.converged
    assert len(solution.value) == (2 if momentum else 1)  # the momentum buffer is part of the fixed point


def test_fixed_point_differentiates_an_optimizer_weight_decay_that_moves_the_optimum(ridge):
    wd = torch.tensor(0.05, requires_grad=True)
    opt = ng.optim.SGD(lr=1 / (float(ridge.eigs[-1]) + 0.05), weight_decay=wd)
    g_lam, g_wd = ridge.hypergrad(Implicit(FixedPoint(tol=1e-11)), optimizer=opt, inputs=[ridge.lam, wd])
    w_star, dl2 = ridge.exact(extra=0.05)
    assert rel(ridge.train(Implicit(FixedPoint()), optimizer=opt), w_star) <= 1e-12
    assert rel(g_wd, dl2) <= 1e-8
    assert rel(g_lam, ridge.lam.exp() * dl2) <= 1e-8
    with pytest.raises(ValueError, match=r"weight_decay=.*FixedPoint"):
        ridge.train(Implicit(CG()), optimizer=opt)


def test_gradient_condition_gives_zero_for_optimizer_hparams_and_fixed_point_about_zero(ridge):
    lr = torch.tensor(ridge.lr, requires_grad=True)
    momentum = torch.tensor(0.5, requires_grad=True)
    opt = ng.optim.SGD(lr=lr, momentum=momentum)
    ref = ridge.lam.exp() * ridge.exact()[1]
    g_lam, g_lr, g_mom = ridge.hypergrad(Implicit(CG(tol=1e-10)), optimizer=opt, inputs=[ridge.lam, lr, momentum])
    assert rel(g_lam, ref) <= 1e-8
    assert g_lr.item() == 0.0 and g_mom.item() == 0.0  # W* does not depend on the path to it
    inputs = [ridge.lam, lr, momentum]
    g_lam, g_lr, g_mom = ridge.hypergrad(Implicit(FixedPoint(tol=1e-10)), optimizer=opt, inputs=inputs)
    assert rel(g_lam, ref) <= 1e-8
    assert abs(g_lr) <= 1e-10 * abs(ref) and abs(g_mom) <= 1e-10 * abs(ref)


def test_batch_argument_defines_the_optimality_condition(ridge):
    half = (ridge.X[:100], ridge.y[:100])
    (g_default,) = ridge.hypergrad(Implicit(CG(tol=1e-10)))
    (g_full,) = ridge.hypergrad(Implicit(CG(tol=1e-10), batch=(ridge.X, ridge.y)))
    (g_half,) = ridge.hypergrad(Implicit(CG(tol=1e-10), batch=half))
    assert rel(g_full, g_default) <= 1e-12
    # Hessian and mixed derivative of the half-batch loss at the full-batch optimum:
    ref_half = ridge.lam.exp() * ridge.exact(X=half[0])[1]
    assert rel(g_half, ref_half) <= 1e-8
    assert rel(g_half, g_default) > 1e-2


def test_iterator_data_keeps_the_last_batch_for_the_condition(ridge):
    (g_list,) = ridge.hypergrad(Implicit(CG(tol=1e-10)), steps=300)
    (g_iter,) = ridge.hypergrad(Implicit(CG(tol=1e-10)), steps=300, data=iter([(ridge.X, ridge.y)] * 300))
    assert torch.equal(g_list, g_iter)


def test_backward_costs_k_plus_2_gradient_evaluations_whatever_the_number_of_steps(ridge, monkeypatch):
    calls = {"grad": 0, "loss": 0}
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return grad(*args, **kwargs)

    def counting_loss(p, batch, lam):
        calls["loss"] += 1
        return Ridge.loss_fn(p, batch, lam)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    # Implicit's products call the engine as torch.autograd.grad does: count those calls too.
    import nestgrad.methods._implicit as implicit_module

    engine = implicit_module._ENGINE
    assert engine is not None

    def counting_engine(*args, **kwargs):
        calls["grad"] += 1
        return engine(*args, **kwargs)

    monkeypatch.setattr(implicit_module, "_ENGINE", counting_engine)
    for steps in (100, 400):
        for solver in (CG(tol=1e-10), FixedPoint(tol=1e-10)):
            log = []
            w0 = {"w": torch.zeros(ridge.d, requires_grad=True)}
            w = ng.train(counting_loss, w0, ng.optim.SGD(lr=ridge.lr), [(ridge.X, ridge.y)], steps=steps,
                         hparams=ridge.lam, method=Implicit(solver, on_solve=log.append))  # fmt: skip
            outer = ridge.outer(w["w"])
            calls.update(grad=0, loss=0)
            outer.backward()
            ridge.lam.grad = None
            (solution,) = log
            assert calls == {"grad": solution.matvecs + 2, "loss": 1}
            assert solution.matvecs == solution.steps  # no init, no breakdown


# ------------------------------------------------------------------------- composition
def test_two_levels_unroll_or_reverse_then_implicit_match_central_finite_differences():
    g = torch.Generator().manual_seed(7)
    X, Xv = torch.randn(40, 4, generator=g), torch.randn(40, 4, generator=g)
    w_true = torch.tensor([1.0, -2.0, 0.5, 0.0])
    y, yv = torch.sign(X @ w_true + 0.3), torch.sign(Xv @ w_true + 0.3)
    theta = torch.tensor([0.2, -0.3, 0.1, 0.4], requires_grad=True)
    M = torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)

    def level1(p, _, th):  # u(θ): a few momentum steps on a non-quadratic loss
        u = p["u"]
        return 0.5 * ((M @ u - th) ** 2).sum() + 0.1 * (u**4).sum()

    def level2(q, batch, hp):  # logistic regression, per-feature L2 weights e^u from level 1
        Xb, yb = batch
        w = q["w"]
        return F.softplus(-yb * (Xb @ w)).mean() + 0.5 * (hp["level1"]["u"].exp() * w**2).sum()

    def outer(th, method1=None, method2=None, opt2=None):
        u = ng.train(level1, {"u": torch.zeros(4, requires_grad=True)}, ng.optim.SGD(lr=0.3, momentum=0.5), [None],
                     steps=6, hparams=th, method=method1)  # fmt: skip
        w = ng.train(level2, {"w": torch.zeros(4, requires_grad=True)}, opt2 or ng.optim.SGD(lr=0.5), [(X, y)],
                     steps=300, hparams={"level1": u}, method=method2)  # fmt: skip
        return F.softplus(-yv * (Xv @ w["w"])).mean()

    direction = torch.randn(4, generator=g)
    h = 1e-5
    with torch.no_grad():
        fd = (outer(theta + h * direction) - outer(theta - h * direction)) / (2 * h)
    levels2 = [(Implicit(CG(tol=1e-12)), None), (Implicit(FixedPoint(tol=1e-12)), ng.optim.SGD(lr=0.5, momentum=0.5))]
    for method1 in (ng.Unroll(), Reverse()):
        for method2, opt2 in levels2:
            (grad,) = torch.autograd.grad(outer(theta, method1, method2, opt2), theta)
            assert abs(grad @ direction - fd) <= 1e-6 * abs(fd)


# ----------------------------------------------------------------- Implicit edge cases
def test_indefinite_hessian_warns_instead_of_returning_nan():
    def saddle(p, _, lam):  # H = diag(1, -1): training walks away from the saddle
        w = p["w"]
        return 0.5 * (w[0] ** 2 - w[1] ** 2) + lam * w.sum()

    lam = torch.tensor(0.3, requires_grad=True)
    w = ng.train(saddle, {"w": torch.tensor([1.0, 0.1], requires_grad=True)}, ng.optim.SGD(lr=0.1), [None],
                 steps=5, hparams=lam, method=Implicit())  # fmt: skip
    with pytest.warns(ConvergenceWarning, match=r"not positive definite.*train longer"):
        (g,) = torch.autograd.grad((w["w"] ** 2).sum(), lam)
    assert torch.isfinite(g)


def test_condition_replays_the_randomness_of_the_last_training_step(ridge):
    noises = []

    def noisy(p, batch, lam):  # random example weights, like dropout
        noise = torch.rand(len(batch[1]))
        noises.append(noise)
        X, y = batch
        return (noise * (X @ p["w"] - y) ** 2).sum() / (2 * len(y)) + lam.exp() * (p["w"] ** 2).sum() / 2

    w = ng.train(noisy, {"w": torch.zeros(ridge.d, requires_grad=True)}, ng.optim.SGD(lr=0.1), [(ridge.X, ridge.y)],
                 steps=5, hparams=ridge.lam, method=Implicit())  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 5 steps: far from an optimum
        torch.autograd.grad(ridge.outer(w["w"]), ridge.lam)
    assert len(noises) == 6 and torch.equal(noises[5], noises[4])


@pytest.mark.parametrize("solver", [CG(tol=1e-10), FixedPoint(tol=1e-10)], ids=["CG", "FixedPoint"])
def test_weights_the_training_loss_ignores_are_constants(ridge, solver):
    w0 = {"w": torch.zeros(ridge.d, requires_grad=True), "unused": torch.ones(3, requires_grad=True)}
    w = ng.train(Ridge.loss_fn, w0, ng.optim.SGD(lr=ridge.lr), [(ridge.X, ridge.y)], steps=400, hparams=ridge.lam,
                 method=Implicit(solver))  # fmt: skip
    (g,) = torch.autograd.grad(ridge.outer(w["w"]) + w["unused"].sum(), ridge.lam)
    assert rel(g, ridge.lam.exp() * ridge.exact()[1]) <= 1e-8


def test_non_convergence_warning_names_the_residual_the_iterations_and_the_fix(ridge):
    log = []
    with pytest.warns(ConvergenceWarning) as record:
        ridge.hypergrad(Implicit(CG(max_steps=3, tol=1e-10), on_solve=log.append))
    (solution,) = log
    message = str(record[0].message)
    assert not solution.converged and solution.steps == 3
    assert f"relative residual {solution.residual:.3g} after 3 iterations" in message
    assert "Raise max_steps (now 3)" in message and "train longer" in message


def test_initial_weights_get_no_gradient_and_no_grad_is_plain_training(ridge):
    w0 = {"w": torch.zeros(ridge.d, requires_grad=True)}
    data = [(ridge.X, ridge.y)]
    w = ng.train(Ridge.loss_fn, w0, ng.optim.SGD(lr=ridge.lr), data, steps=20, hparams=ridge.lam, method=Implicit())
    with pytest.raises(RuntimeError):
        torch.autograd.grad(ridge.outer(w["w"]), w0["w"])
    with torch.no_grad():
        a = ng.train(Ridge.loss_fn, w0, ng.optim.SGD(lr=ridge.lr), data, steps=20, hparams=ridge.lam,
                     method=Implicit())  # fmt: skip
    assert torch.equal(a["w"], w["w"].detach()) and not a["w"].requires_grad


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (ng.optim.AdamW(lr=0.01), r"weight_decay=0\.01.*FixedPoint"),
        (ng.optim.ASGD(lr=0.01), r"lambd=.*FixedPoint"),
        (ng.optim.SGD(lr=0.01, maximize=True), r"maximize=True.*negative definite.*FixedPoint"),
    ],
)
def test_gradient_condition_rejects_optimizers_whose_fixed_point_is_not_a_gradient_zero(ridge, optimizer, match):
    with pytest.raises(ValueError, match=match):
        ridge.train(Implicit(CG()), optimizer=optimizer, steps=2)


@pytest.mark.parametrize(
    ("solver", "match"),
    [("cg", r"nestgrad\.CG\(\.\.\.\), not a string"), (CG, r"Call the class: nestgrad\.CG"), (3, r"got int 3")],
)
def test_implicit_checks_its_solver(solver, match):
    with pytest.raises(TypeError, match=match):
        Implicit(solver)


# ------------------------------------------------------------------- solver unit tests
def spd(n: int = 8, low: float = 0.2, high: float = 1.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    A = Q @ torch.diag(torch.linspace(low, high, n)) @ Q.T
    return A, torch.randn(n, generator=g)


def structured(A, b, kind):
    """matvec and b in the structure ``kind``, and a function flattening that structure back."""
    if kind == "tensor":
        return (lambda x: A @ x), b, (lambda x: x)
    if kind == "list":
        split = lambda v: [v[:3], v[3:]]  # noqa: E731
        return (lambda x: split(A @ torch.cat(x))), split(b), torch.cat
    to_dict = lambda v: {"a": v[:4].reshape(2, 2), "b": v[4:]}  # noqa: E731
    flat = lambda x: torch.cat([x["a"].flatten(), x["b"]])  # noqa: E731
    return (lambda x: to_dict(A @ flat(x))), to_dict(b), flat


SOLVERS = [CG(max_steps=50, tol=1e-12), Neumann(steps=400, alpha=1.0, tol=1e-12), FixedPoint(tol=1e-12)]


@pytest.mark.parametrize("kind", ["tensor", "list", "dict"])
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_solvers_share_one_signature_and_solve_an_spd_system(solver, kind):
    A, b = spd()
    matvec, rhs, flat = structured(A, b, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solution = solver(matvec, rhs, init=None)
    assert isinstance(solution, Solution)
    assert type(solution.value) is type(rhs)
    x = flat(solution.value)
    assert solution.converged and solution.result == "successful"
    assert 0 < solution.steps <= (8 if isinstance(solver, CG) else 400)
    assert solution.residual <= 1e-12
    assert float((A @ x - b).norm() / b.norm()) <= 1e-11
    assert rel(x, torch.linalg.solve(A, b)) <= 1e-10
    warm = solver(matvec, rhs, init=solution.value)  # a warm start at the solution takes no step
    assert warm.steps == 0 and warm.converged


def counted(A):
    calls = [0]

    def matvec(x):
        calls[0] += 1
        return A @ x

    return matvec, calls


@pytest.mark.parametrize(
    ("solver", "matrix", "result", "extra"),
    [
        (CG(max_steps=50, tol=1e-12), "spd", "successful", 0),
        (CG(max_steps=3, tol=1e-12), "spd", "max_steps_reached", 0),
        (CG(max_steps=50, tol=1e-12), "indefinite", "not_positive_definite", 1),
        (Neumann(steps=30, alpha=1.0), "spd", "successful", 0),
        (Neumann(steps=30, alpha=10.0), "spd", "diverged", 1),
        (FixedPoint(tol=1e-12), "spd", "successful", 0),
    ],
    ids=["cg", "cg-short", "cg-breakdown", "neumann", "neumann-diverged", "fixed-point"],
)
@pytest.mark.parametrize("warm", [False, True])
def test_matvecs_counts_every_call_including_init_and_breakdown(solver, matrix, result, extra, warm):
    A, b = spd()
    if matrix == "indefinite":
        A = A - 0.8 * torch.eye(len(b))
    matvec, calls = counted(A)
    init = 0.1 * torch.ones_like(b) if warm else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        solution = solver(matvec, b, init=init)
    assert solution.result == result
    assert solution.matvecs == calls[0] == solution.steps + extra + warm


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_zero_right_hand_side_returns_zero_without_iterating(solver):
    A, _ = spd()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solution = solver(lambda x: A @ x, torch.zeros(8))
    assert torch.equal(solution.value, torch.zeros(8))
    assert (solution.steps, solution.residual, solution.converged, solution.matvecs) == (0, 0.0, True, 0)


def test_cg_stops_when_the_residual_is_exactly_zero():
    """The case where CG without a guard divides 0 by 0 on the next iteration."""
    d = torch.tensor([2.0, 4.0, 8.0])
    solution = CG(max_steps=50, tol=0.0)(lambda x: d * x, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(solution.value, torch.tensor([0.5, 0.0, 0.0]))
    assert (solution.steps, solution.residual, solution.converged) == (1, 0.0, True)


@pytest.mark.parametrize("tol", [0.0, 1e-30])
def test_cg_far_beyond_convergence_never_returns_nan(tol):
    A, b = spd(6, 0.01, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solution = CG(max_steps=10_000, tol=tol)(lambda x: A @ x, b)
    assert torch.isfinite(solution.value).all() and math.isfinite(solution.residual)
    assert solution.converged and solution.steps < 10_000
    assert rel(solution.value, torch.linalg.solve(A, b)) <= 1e-12


@pytest.mark.parametrize("diagonal", [[1.0, -1.0, 2.0], [-1.0, -2.0, -3.0], [1.0, 0.0, 2.0]])
def test_cg_warns_on_a_matrix_that_is_not_positive_definite_instead_of_nan(diagonal):
    d = torch.tensor(diagonal)
    with pytest.warns(ConvergenceWarning, match=r"pᵀAp <= 0.*needs a symmetric positive definite"):
        solution = CG(max_steps=50)(lambda x: d * x, torch.ones(3))
    assert torch.isfinite(solution.value).all()
    assert solution.result == "not_positive_definite" and not solution.converged


@pytest.mark.parametrize(
    ("solver", "A", "fix"),
    [
        (CG(max_steps=2, tol=1e-10), torch.logspace(0, 3, 20), "Raise max_steps (now 2) or tol"),
        (Neumann(steps=5, alpha=1e-3, tol=1e-6), torch.logspace(0, 3, 20), "Raise steps (now 5) or alpha"),
        (Neumann(steps=50, alpha=1.0), torch.linspace(0.5, 3.0, 20), "Lower alpha (now 1)"),
        (FixedPoint(max_steps=4), torch.linspace(0.01, 1.0, 20), "Raise max_steps (now 4)"),
        (FixedPoint(), torch.linspace(0.5, 3.0, 20), "not a contraction"),
    ],
)
def test_a_solve_that_stops_short_warns_with_the_residual_and_the_fix(solver, A, fix):
    with pytest.warns(ConvergenceWarning) as record:
        solution = solver(lambda x: A * x, torch.ones(20))
    message = str(record[0].message)
    assert not solution.converged and torch.isfinite(solution.value).all()
    assert f"relative residual {solution.residual:.3g} after {solution.steps} iterations" in message
    assert fix in message


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CG(max_steps=0), r"max_steps must be an int >= 1"),
        (lambda: CG(tol=-1.0), r"tol must be a float >= 0"),
        (lambda: FixedPoint(max_steps=2.5), r"max_steps must be an int >= 1"),
        (lambda: Neumann(steps=10, alpha=0.0), r"alpha must be a positive float"),
        (lambda: Neumann(steps=True, alpha=0.1), r"steps must be an int >= 1"),
    ],
)
def test_solver_arguments_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_solvers_reject_bad_right_hand_sides_and_matvecs():
    with pytest.raises(TypeError, match=r"b must be a Tensor or a list, tuple or dict of Tensors"):
        CG()(lambda x: x, [torch.ones(2), 3.0])
    with pytest.raises(ValueError, match=r"matvec\(x\) must return Tensors of the same structure and shapes"):
        CG()(lambda x: x[:1], torch.ones(2))
    with pytest.raises(ValueError, match=r"contains NaN or inf"):
        FixedPoint()(lambda x: x, torch.tensor([1.0, math.nan]))


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_solvers_handle_mixed_dtypes_and_a_matvec_in_another_dtype(solver):
    """Mixed dtypes iterate on lists; a matvec result in another dtype is cast to b's: both still solve."""
    A, b = spd()
    split = lambda v: [v[:3].float(), v[3:]]  # noqa: E731  (float32 and float64)
    matvec = lambda x: split(A @ torch.cat([t.double() for t in x]))  # noqa: E731
    solution = solver(matvec, split(b))
    assert [t.dtype for t in solution.value] == [torch.float32, torch.float64]
    x = torch.cat([t.double() for t in solution.value])
    assert rel(x, torch.linalg.solve(A, b)) <= 1e-6  # the float32 part limits it
    # One float64 vector whose matvec answers in float32: the iteration stays in float64.
    solution = solver(lambda x: (A @ x).float(), b)
    assert solution.value.dtype == torch.float64
    assert rel(solution.value, torch.linalg.solve(A, b)) <= 1e-6


def test_vjp_fast_path_equals_torch_autograd_grad_and_falls_back_for_anything_else():
    from nestgrad.methods._implicit import _vjp

    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=g, requires_grad=True)
    u = torch.randn(3, generator=g, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    (gw,) = torch.autograd.grad((w**3).sum() + (w[:3] * u).sum(), w, create_graph=True)
    v = torch.randn(5, generator=g)
    got = _vjp([gw], [w, u, unused], [v])
    want = torch.autograd.grad(gw, [w, u, unused], v, retain_graph=True, allow_unused=True, materialize_grads=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(got[2], torch.zeros(2))  # unconnected: zeros
    # A cotangent of another shape takes torch.autograd.grad, and its error.
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        _vjp([gw], [w], [torch.ones(4)])
    # An output that does not require grad contributes nothing.
    assert torch.equal(_vjp([gw, torch.ones(2)], [u], [v, torch.ones(2)])[0], want[1])
