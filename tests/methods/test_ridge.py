"""Every method against closed forms on ridge regression, and every pair of exact methods across levels.

Ridge: w*(λ) = (XᵀX/n + e^λ I)⁻¹ Xᵀy/n, reached by gradient descent; the outer loss is
the validation MSE, whose exact hypergradient follows from the implicit function theorem
in closed form (torch.linalg.solve on the explicit Hessian: an independent reference).
"""

from __future__ import annotations

import math

import pytest
import torch

import nestgrad as ng

pytestmark = pytest.mark.usefixtures("float64")


class Ridge:
    """A ridge problem whose data Hessian has condition number about ``kappa``."""

    def __init__(self, kappa: float, n: int = 60, d: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
        r, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        spectrum = torch.linspace(1.0, kappa, d)  # eigenvalues of X^T X / n
        self.X = q * (spectrum * n).sqrt() @ r
        self.y = self.X @ torch.randn(d, generator=g) + 0.5 * torch.randn(n, generator=g)
        self.Xv = torch.randn(n, d, generator=g) * 2
        self.yv = self.Xv @ torch.randn(d, generator=g) * 0.3 + torch.randn(n, generator=g)
        self.n, self.d = n, d
        self.lam = torch.tensor(math.log(0.05), requires_grad=True)

    def hessian(self) -> torch.Tensor:
        return self.X.T @ self.X / self.n + torch.exp(self.lam.detach()) * torch.eye(self.d)

    def condition(self) -> float:
        e = torch.linalg.eigvalsh(self.hessian())
        return (e[-1] / e[0]).item()

    def lr(self) -> float:
        return 1.0 / torch.linalg.eigvalsh(self.hessian())[-1].item()

    def loss(self, p, batch, lam):
        r = self.X @ p["w"] - self.y
        return (r @ r) / (2 * self.n) + torch.exp(lam) * (p["w"] @ p["w"]) / 2

    def val(self, w):
        r = self.Xv @ w - self.yv
        return (r @ r) / (2 * self.n)

    def solution(self, lam: float) -> torch.Tensor:
        H = self.X.T @ self.X / self.n + math.exp(lam) * torch.eye(self.d)
        return torch.linalg.solve(H, self.X.T @ self.y / self.n)

    def exact(self) -> tuple[float, torch.Tensor]:
        H = self.hessian()
        w = torch.linalg.solve(H, self.X.T @ self.y / self.n)
        dw = -torch.linalg.solve(H, torch.exp(self.lam.detach()) * w)
        grad_val = self.Xv.T @ (self.Xv @ w - self.yv) / self.n
        return (grad_val @ dw).item(), w

    def hypergradient(self, method, steps: int, optimizer=None) -> float:
        opt = optimizer or ng.optim.SGD(lr=self.lr())
        out = ng.train(self.loss, {"w": torch.zeros(self.d, requires_grad=True)}, opt, [None], steps=steps,
                       hparams=self.lam, method=method)  # fmt: skip
        return torch.autograd.grad(self.val(out["w"]), self.lam)[0].item()


def gd_steps(kappa: float, accuracy: float = 1e-13) -> int:
    """GD with lr = 1/L contracts by (1 - 1/κ) per step; its derivative converges at about the same rate."""
    return math.ceil(kappa * math.log(1 / accuracy) * 1.5)


@pytest.fixture(scope="module", params=[6.0, 60.0], ids=["kappa6", "kappa60"])
def ridge(request) -> Ridge:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    r = Ridge(request.param)
    torch.set_default_dtype(old)
    return r


def test_the_reference_is_right(ridge):
    exact, _ = ridge.exact()
    h = 1e-6
    lam = ridge.lam.item()
    with torch.no_grad():
        fd = (ridge.val(ridge.solution(lam + h)) - ridge.val(ridge.solution(lam - h))) / (2 * h)
    assert abs(fd.item() - exact) <= 1e-7 * abs(exact)


@pytest.mark.parametrize(
    "method",
    [ng.Unroll(), ng.Reverse(), ng.Reverse(checkpoint_every=17), ng.Forward()],
    ids=["unroll", "reverse", "reverse-checkpointed", "forward"],
)
def test_exact_methods_match_the_closed_form(ridge, method):
    exact, _ = ridge.exact()
    got = ridge.hypergradient(method, gd_steps(ridge.condition()))
    assert abs(got - exact) <= 1e-8 * abs(exact)


def test_cg_matches_the_closed_form_within_the_textbook_iteration_bound(ridge):
    exact, _ = ridge.exact()
    tol = 1e-11
    kappa = ridge.condition()
    bound = math.ceil(0.5 * math.sqrt(kappa) * math.log(2 / tol))
    solutions = []
    method = ng.Implicit(solver=ng.CG(max_steps=bound, tol=tol), on_solve=solutions.append)
    got = ridge.hypergradient(method, gd_steps(kappa))
    assert abs(got - exact) <= 1e-8 * abs(exact)
    assert solutions[-1].converged and solutions[-1].steps <= bound


def test_neumann_is_close_with_enough_steps(ridge):
    exact, _ = ridge.exact()
    kappa = ridge.condition()
    method = ng.Implicit(solver=ng.Neumann(steps=int(kappa * 12), alpha=ridge.lr()))
    got = ridge.hypergradient(method, gd_steps(kappa))
    assert abs(got - exact) <= 1e-3 * abs(exact)


def test_fixed_point_matches_the_closed_form(ridge):
    exact, _ = ridge.exact()
    kappa = ridge.condition()
    got = ridge.hypergradient(ng.Implicit(solver=ng.FixedPoint(max_steps=gd_steps(kappa), tol=1e-13)), gd_steps(kappa))
    assert abs(got - exact) <= 1e-8 * abs(exact)


def test_finite_diff_equals_the_one_step_truncation(ridge):
    steps = gd_steps(ridge.condition())
    one_step = ridge.hypergradient(ng.Unroll(truncate=1), steps)
    errors = [abs(ridge.hypergradient(ng.FiniteDiff(eps=eps), steps) - one_step) for eps in (1e-2, 5e-3)]
    assert errors[0] <= 1e-6 * abs(one_step)
    # Central differences: halving eps divides the error by about 4 (unless it is at rounding level).
    assert errors[1] <= errors[0] / 3 or errors[0] <= 1e-12 * abs(one_step)


# ------------------------------------------------------------ three levels
EXACT = {
    "unroll": lambda: ng.Unroll(),
    "reverse": lambda: ng.Reverse(checkpoint_every=10),
    "forward": lambda: ng.Forward(),
    "implicit": lambda: ng.Implicit(solver=ng.CG(max_steps=100, tol=1e-12)),
}


class Chain:
    """A weights level 1 (weighted ridge); level 2 fits level 1's predictions; L is level 2's validation loss."""

    def __init__(self, seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(20, 4, generator=g)
        self.y = self.X @ torch.tensor([1.0, -1.0, 0.5, 2.0]) + torch.randn(20, generator=g)
        self.X2 = torch.randn(20, 4, generator=g)
        self.Xv = torch.randn(10, 4, generator=g)
        self.yv = self.Xv @ torch.tensor([0.8, -1.2, 0.4, 1.5])
        self.A = (0.3 * torch.randn(20, generator=g)).requires_grad_()

    def loss1(self, p, batch, a):
        return (torch.sigmoid(a) * (self.X @ p["w"] - self.y) ** 2).mean() / 2 + 0.1 * (p["w"] @ p["w"]) / 2

    def loss2(self, q, batch, w1):
        return ((self.X2 @ q["v"] - self.X2 @ w1["w"]) ** 2).mean() / 2 + 0.05 * (q["v"] @ q["v"]) / 2

    def outer(self, a, m1, m2, steps=150):
        w1 = ng.train(self.loss1, {"w": torch.zeros(4, requires_grad=True)}, ng.optim.SGD(lr=0.5), [None],
                      steps=steps, hparams=a, method=m1)  # fmt: skip
        w2 = ng.train(self.loss2, {"v": torch.zeros(4, requires_grad=True)}, ng.optim.SGD(lr=0.4, momentum=0.3),
                      [None], steps=steps, hparams=w1, method=m2)  # fmt: skip
        return ((self.Xv @ w2["v"] - self.yv) ** 2).mean()


@pytest.fixture(scope="module")
def chain_reference():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    chain = Chain()
    v = torch.randn(20, generator=torch.Generator().manual_seed(9))
    h = 1e-5
    with torch.no_grad():
        fd = (chain.outer(chain.A + h * v, None, None) - chain.outer(chain.A - h * v, None, None)) / (2 * h)
    torch.set_default_dtype(old)
    return chain, v, fd.item()


@pytest.mark.parametrize("m2", list(EXACT))
@pytest.mark.parametrize("m1", list(EXACT))
def test_every_pair_of_exact_methods_gives_the_finite_difference_gradient(chain_reference, m1, m2):
    chain, v, fd = chain_reference
    (grad,) = torch.autograd.grad(chain.outer(chain.A, EXACT[m1](), EXACT[m2]()), chain.A)
    assert abs(fd) > 1e-4
    assert abs((grad @ v).item() - fd) <= 1e-6 * abs(fd)


# ------------------------------------------------------------ against a hand-written implicit hypergradient
def hand_written_implicit(loss, val, w_trained, lam, iterations):
    """Plain torch: CG on Hessian-vector products of the training loss at the trained weights, then one VJP."""
    w = w_trained.detach().requires_grad_()
    lam = lam.detach().requires_grad_()
    (v,) = torch.autograd.grad(val(w), w)
    (g,) = torch.autograd.grad(loss({"w": w}, None, lam), w, create_graph=True)
    x, r = torch.zeros_like(v), v.clone()
    p, rr = r.clone(), r @ r
    for _ in range(iterations):
        (Ap,) = torch.autograd.grad(g, w, p, retain_graph=True)
        a = rr / (p @ Ap)
        x, r = x + a * p, r - a * Ap
        rr_next = r @ r
        p, rr = r + (rr_next / rr) * p, rr_next
    (dlam,) = torch.autograd.grad(g, lam, x)
    return -dlam


@pytest.mark.parametrize(("tol", "agree"), [(1e-12, 1e-10), (1e-6, 1e-8)])
def test_implicit_cg_equals_the_hand_written_implicit_hypergradient_per_feature(tol, agree):
    """100 hparams (one log ridge penalty per feature), float64: the same iterations give the same answer.

    To 1e-10 when both solves converge; a solve stopped at 1e-6 is a truncated CG iterate, which
    carries the rounding of its dot products (summed in another order) amplified by the iteration.
    """
    g = torch.Generator().manual_seed(5)
    n, d = 200, 100
    X = torch.randn(n, d, generator=g) * torch.linspace(0.3, 1.5, d)
    y = X @ torch.randn(d, generator=g) + 0.5 * torch.randn(n, generator=g)
    Xv, yv = torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    lam = torch.full((d,), math.log(0.1), requires_grad=True)

    def loss(p, batch, lam):
        r = X @ p["w"] - y
        return (r @ r) / (2 * n) + (lam.exp() * p["w"].square()).sum() / 2

    def val(w):
        return ((Xv @ w - yv) ** 2).mean() / 2

    H = X.T @ X / n + torch.diag(lam.detach().exp())
    w_star = torch.linalg.solve(H, X.T @ y / n)
    log = []
    method = ng.Implicit(ng.CG(max_steps=200, tol=tol), on_solve=log.append)
    out = ng.train(loss, {"w": w_star.clone().requires_grad_()}, ng.optim.SGD(lr=0.1), [None], steps=1,
                   hparams=lam, method=method)  # fmt: skip
    (got,) = torch.autograd.grad(val(out["w"]), lam)
    assert log[-1].converged and log[-1].steps > 10
    want = hand_written_implicit(loss, val, out["w"], lam, log[-1].steps)
    assert float((got - want).abs().max() / want.abs().max()) <= agree
