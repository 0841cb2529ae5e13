r"""Plot: relative error of the hypergradient against its cost in Hessian-vector products, on ridge regression.

The problem (float64): ridge regression with ``n = 200`` examples and ``d = 40`` features,
built so that the data Hessian ``XᵀX/n`` has the eigenvalues ``linspace(1, κ, d)``,
trained by gradient descent (lr ``1/λ_max(H)``) long enough to reach the optimum to
1e-13; the outer loss is a validation MSE and the hyperparameter is ``λ`` in the
penalty ``e^λ |w|²/2``. The exact hypergradient comes from the closed form

.. math::
    w^*(\lambda) = (X^\top X/n + e^\lambda I)^{-1} X^\top y/n, \qquad
    \frac{d\mathcal L}{d\lambda} = -\nabla\mathcal L(w^*)^\top H^{-1} e^\lambda w^*

with ``torch.linalg.solve`` on the explicit Hessian ``H`` (independent of nestgrad).
Two panels: condition numbers κ ≈ 6 and κ ≈ 60 of ``H``.

How the cost is counted (the x axis):

* ``Implicit(CG(max_steps=k))`` and ``Implicit(Neumann(steps=k, alpha=lr))``: the
  Hessian-vector products of the solve, counted as the ``torch.autograd.grad`` calls of
  the backward pass minus 2 (the gradient recorded with its graph, and the final mixed
  product w.r.t. λ: 2 gradient evaluations on top, the same for every k, not on the axis).
  CG uses ``tol=0`` so that it runs k iterations until it breaks down at round-off.
* ``Unroll(truncate=k)``: backpropagating through k gradient steps takes k
  Hessian-vector products (plus k mixed products with λ): plotted at k.
* ``FiniteDiff(eps)``: 2 gradient evaluations, plotted at 2 (it approximates
  ``Unroll(truncate=1)``).

Usage::

    python benchmarks/plot_convergence.py                   # writes docs/convergence.png, about a minute
    python benchmarks/plot_convergence.py --out /tmp/c.png
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import nestgrad as ng
from bench_methods import counting_grad_calls

KAPPAS = (6.0, 60.0)
TRAIN_ACCURACY = 1e-13  # the training reaches w* to about this relative accuracy
FD_EPS = (0.1, 0.01, 0.001)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Ridge:
    """Ridge regression whose data Hessian ``XᵀX/n`` has the eigenvalues ``linspace(1, kappa, d)``."""

    kappa: float
    n: int = 200
    d: int = 40
    seed: int = 0
    X: Tensor = field(init=False)
    y: Tensor = field(init=False)
    Xv: Tensor = field(init=False)
    yv: Tensor = field(init=False)
    lam: Tensor = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        n, d = self.n, self.d
        left, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
        right, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        spectrum = torch.linspace(1.0, self.kappa, d, dtype=torch.float64)
        self.X = left * (spectrum * n).sqrt() @ right  # XᵀX/n = rightᵀ diag(spectrum) right
        w_true = torch.randn(d, generator=g, dtype=torch.float64)
        self.y = self.X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        self.Xv = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
        w_val = w_true + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)  # a shifted validation task
        self.yv = self.Xv @ w_val + torch.randn(n, generator=g, dtype=torch.float64)
        self.lam = torch.tensor(math.log(0.05), dtype=torch.float64, requires_grad=True)

    def hessian(self) -> Tensor:
        """``H = XᵀX/n + e^λ I``, the Hessian of the training loss (constant in w)."""
        return self.X.T @ self.X / self.n + math.exp(self.lam.item()) * torch.eye(self.d, dtype=torch.float64)

    def condition(self) -> float:
        """The condition number of ``H``."""
        e = torch.linalg.eigvalsh(self.hessian())
        return (e[-1] / e[0]).item()

    def lr(self) -> float:
        """``1/λ_max(H)``: the gradient-descent step size (and Neumann's alpha)."""
        return 1.0 / torch.linalg.eigvalsh(self.hessian())[-1].item()

    def steps(self) -> int:
        """Gradient-descent steps to reach ``w*`` to about ``TRAIN_ACCURACY`` (it contracts by 1 - 1/κ per step)."""
        return math.ceil(1.5 * self.condition() * math.log(1 / TRAIN_ACCURACY))

    def loss(self, params: dict[str, Tensor], batch: Any, lam: Tensor) -> Tensor:
        """The training loss ``|Xw - y|²/(2n) + e^λ |w|²/2``."""
        r = self.X @ params["w"] - self.y
        return (r @ r) / (2 * self.n) + torch.exp(lam) * (params["w"] @ params["w"]) / 2

    def val(self, w: Tensor) -> Tensor:
        """The outer loss: the validation MSE / 2."""
        r = self.Xv @ w - self.yv
        return (r @ r) / (2 * self.n)

    def exact(self) -> float:
        """The closed-form hypergradient ``-∇L(w*)ᵀ H⁻¹ e^λ w*`` at the exact optimum."""
        H = self.hessian()
        w = torch.linalg.solve(H, self.X.T @ self.y / self.n)
        dw = -torch.linalg.solve(H, math.exp(self.lam.item()) * w)
        return (self.Xv.T @ (self.Xv @ w - self.yv) / self.n @ dw).item()

    def hypergradient(self, method: ng.Method) -> tuple[float, int]:
        """Train with ``method`` and return the hypergradient and the backward's ``autograd.grad`` calls."""
        params = {"w": torch.zeros(self.d, dtype=torch.float64, requires_grad=True)}
        out = ng.train(self.loss, params, ng.optim.SGD(lr=self.lr()), [None], steps=self.steps(), hparams=self.lam,
                       method=method)  # fmt: skip
        val = self.val(out["w"])
        with counting_grad_calls() as calls:
            (grad,) = torch.autograd.grad(val, self.lam)
        return grad.item(), calls[0] - 1  # minus the outer call itself


@dataclass
class Curve:
    """The relative errors of one method at several costs."""

    label: str
    costs: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def rel_error(got: float, exact: float) -> float:
    """``|got - exact| / |exact|``."""
    return abs(got - exact) / abs(exact)


def log_grid(top: int, points: int) -> list[int]:
    """About ``points`` integers from 1 to ``top``, evenly spaced in log scale."""
    return sorted({max(1, round(top ** (i / (points - 1)))) for i in range(points)})


def curves_for(problem: Ridge, points: int) -> tuple[list[Curve], list[tuple[float, float, float]]]:
    """Relative-error curves of CG, Neumann and truncated Unroll, and the FiniteDiff points ``(eps, value, error)``."""
    exact = problem.exact()
    lr = problem.lr()
    # Neumann and truncated Unroll contract the error by 1 - lr·λ_min per HVP; go until it is at round-off.
    top = min(problem.steps(), math.ceil(1.2 * problem.condition() * math.log(1 / TRAIN_ACCURACY)))
    cg = Curve("Implicit(CG(k))")
    for k in range(1, problem.d + 3):
        solutions: list[ng.Solution] = []
        got, calls = problem.hypergradient(ng.Implicit(ng.CG(max_steps=k, tol=0.0), on_solve=solutions.append))
        hvps = calls - 2
        if cg.costs and hvps <= cg.costs[-1]:  # the solve stopped before k (round-off): no new point
            break
        cg.costs.append(hvps)
        cg.errors.append(rel_error(got, exact))
        cg.notes.append(f"{solutions[-1].steps} steps, {solutions[-1].result}")
    neumann = Curve("Implicit(Neumann(k, alpha=lr))")
    unroll = Curve("Unroll(truncate=k)")
    for k in log_grid(top, points):
        got, calls = problem.hypergradient(ng.Implicit(ng.Neumann(steps=k, alpha=lr)))
        neumann.costs.append(calls - 2)
        neumann.errors.append(rel_error(got, exact))
        got, _ = problem.hypergradient(ng.Unroll(truncate=k))
        unroll.costs.append(k)
        unroll.errors.append(rel_error(got, exact))
    fd = []
    for eps in FD_EPS:
        got, _ = problem.hypergradient(ng.FiniteDiff(eps=eps))
        fd.append((eps, got, rel_error(got, exact)))
    return [cg, neumann, unroll], fd


def first_below(curve: Curve, level: float) -> int | None:
    """The smallest cost at which the error is at most ``level``."""
    return next((c for c, e in zip(curve.costs, curve.errors) if e <= level), None)


STYLES = {
    "Implicit(CG(k))": dict(color="tab:blue", marker="o", markersize=4),
    "Implicit(Neumann(k, alpha=lr))": dict(color="tab:orange", marker="s", markersize=5, linewidth=2.5),
    "Unroll(truncate=k)": dict(color="tab:green", marker="x", markersize=6, linestyle="--"),
}
FLOOR = 1e-16  # errors of exactly 0 are drawn here, so that the log scale can show them


def plot(panels: list[tuple[Ridge, list[Curve], list[tuple[float, float, float]]]], out: str) -> None:
    """Two panels, one per κ: relative error (log) against HVPs (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.6), sharey=True)
    for ax, (problem, curves, fd) in zip(axes, panels):
        for curve in curves:
            ax.plot(curve.costs, [max(e, FLOOR) for e in curve.errors], label=curve.label, **STYLES[curve.label])
        eps, _, err = next(p for p in fd if p[0] == 0.01)
        ax.plot([2], [max(err, FLOOR)], marker="*", markersize=14, color="tab:red", linestyle="none",
                label=f"FiniteDiff(eps={eps:g}): 2 grad. evals (≈ truncate=1)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(FLOOR / 3, 10)
        ax.set_title(f"κ(H) = {problem.condition():.1f} (data spectrum 1..{problem.kappa:g}), "
                     f"GD for {problem.steps()} steps", fontsize=11)  # fmt: skip
        ax.set_xlabel("Hessian-vector products in the backward pass")
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.12)
    axes[0].set_ylabel("relative error of dL/dλ vs closed form")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, bbox_to_anchor=(0.5, 0.045))
    fig.suptitle(f"Hypergradient error vs cost: ridge regression, n={panels[0][0].n}, d={panels[0][0].d}, float64")
    fig.text(0.5, 0.01, "CG/Neumann: solver matvecs (+2 gradient evaluations, same for all k).  "
             "Unroll(truncate=k): k steps backpropagated.  FiniteDiff: 2 gradient evaluations, drawn at 2.  "
             f"Errors of 0 drawn at {FLOOR:g}.", ha="center", fontsize=8, color="0.3")  # fmt: skip
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def print_tables(panels: list[tuple[Ridge, list[Curve], list[tuple[float, float, float]]]]) -> None:
    """The numbers behind the plot, as markdown: relative errors by HVP count, one column per method."""
    for problem, curves, fd in panels:
        exact = problem.exact()
        print(f"## κ(H) = {problem.condition():.2f} (data spectrum 1..{problem.kappa:g}); GD lr = {problem.lr():.4g}, "
              f"{problem.steps()} steps; exact dL/dλ = {exact:.12g}\n")  # fmt: skip
        print("| HVPs | " + " | ".join(c.label for c in curves) + " |")
        print("|--:|" + "--:|" * len(curves))
        by_cost = [dict(zip(c.costs, c.errors)) for c in curves]
        for cost in sorted({k for c in curves for k in c.costs}):
            cells = [f"{errors[cost]:.3e}" if cost in errors else "" for errors in by_cost]
            print(f"| {cost} | " + " | ".join(cells) + " |")
        print()
        for curve in curves:
            unusual = sorted({n for n in curve.notes if not n.endswith("max_steps_reached")})
            if unusual:
                print(f"- {curve.label}: solves that stopped early: {', '.join(unusual)}")
        for eps, value, err in fd:
            print(f"- FiniteDiff(eps={eps:g}), 2 gradient evaluations: dL/dλ = {value:.10g}, relative error {err:.3e}")
        print()
        print("HVPs to reach a relative error:\n")
        levels = (1e-2, 1e-6, 1e-10)
        print("| Method | " + " | ".join(f"<= {lv:g}" for lv in levels) + " |")
        print("|---|" + "--:|" * len(levels))
        for curve in curves:
            cells = [first_below(curve, lv) for lv in levels]
            print(f"| {curve.label} | " + " | ".join("not reached" if c is None else str(c) for c in cells) + " |")
        print()


def main() -> None:
    """Compute the curves for both κ, print the tables and save the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "convergence.png"), help="the PNG to write")
    parser.add_argument("--points", type=int, default=18, help="k values per Neumann/Unroll curve (log grid)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ng.ConvergenceWarning)  # short solves are the point here
    print(f"# Hypergradient convergence on ridge regression ({datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z})")
    print(f"\n- torch {torch.__version__}, nestgrad {ng.__version__}, Python {platform.python_version()}, float64\n")
    panels: list[tuple[Ridge, list[Curve], list[tuple[float, float, float]]]] = []
    for kappa in KAPPAS:
        problem = Ridge(kappa)
        curves, fd = curves_for(problem, args.points)
        panels.append((problem, curves, fd))
    print_tables(panels)
    plot(panels, args.out)
    print(f"Saved {args.out}")


if __name__ == "__main__":
    main()
