r"""Matrix-free linear solvers that share one signature and report how well they converged.

Every solver is a small frozen object called as:

    solution = solver(matvec, b, *, init=None)

where ``matvec(x)`` returns ``A x`` for ``x`` of the same structure as ``b``: a
Tensor, or a list, tuple or dict (any nesting) of Tensors. The matrix ``A`` is
never formed. The result is a ``Solution`` holding the solution in the structure
of ``b``, the number of iterations, the relative residual and whether the tolerance was
met. A solve that stops short emits a ``ConvergenceWarning`` that says why and what
to change.

``CG`` is for symmetric positive definite ``A`` (a Hessian at a minimum);
``Neumann`` sums a fixed number of terms of a Neumann series (cheap, biased);
``FixedPoint`` iterates ``x \leftarrow x + (b - A x)`` until the residual meets the
tolerance; ``nestgrad.Implicit`` uses it on the optimizer's own update map.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

Tensors = list[Tensor]
MatVec = Callable[[Tensors], Tensors]

SUCCESSFUL = "successful"
MAX_STEPS_REACHED = "max_steps_reached"
NOT_POSITIVE_DEFINITE = "not_positive_definite"
DIVERGED = "diverged"

# A Richardson / Neumann iteration whose residual grows past this many times |b| is given up.
_DIVERGENCE = 1e8

_STOPPED = {
    MAX_STEPS_REACHED: "the iteration limit was reached before the tolerance",
    NOT_POSITIVE_DEFINITE: "it met a direction p with pᵀAp <= 0 (or numerically 0), so A is not positive definite",
    DIVERGED: "the residual grew instead of shrinking",
}


class ConvergenceWarning(UserWarning):
    """A linear solve stopped before meeting its tolerance, so its solution (and any
    hypergradient computed from it) is approximate."""


@dataclass(frozen=True)
class Solution:
    """The result of a linear solve.

    Attributes:
        value: the approximate solution ``x``, in the structure of ``b``.
        steps: iterations completed, each one ``matvec``.
        residual: relative residual ``\\|b - A x\\| / \\|b\\|`` as tracked by the
            iteration (0 when ``b`` is 0).
        converged: whether the stopping criterion was met (see each solver).
        result: ``"successful"``, ``"max_steps_reached"``, ``"not_positive_definite"``
            (CG only) or ``"diverged"``.
        matvecs: every call of ``matvec`` the solve made: ``steps``, plus one for an
            ``init``, plus the one that revealed a breakdown (``"not_positive_definite"``,
            ``"diverged"``) without completing an iteration. This is the solve's cost.
    """

    value: Any
    steps: int
    residual: float
    converged: bool
    result: str
    matvecs: int = 0


class LinearSolver(abc.ABC):
    """Base class of the matrix-free solvers ``CG``, ``Neumann`` and ``FixedPoint``.

    Call a solver as ``solver(matvec, b, *, init=None) -> Solution``. Subclasses
    implement ``_solve`` on flat lists of tensors and ``_fix``, the advice printed
    when a solve stops short.
    """

    def __call__(self, matvec: Callable[[Any], Any], b: Any, *, init: Any = None) -> Solution:
        """Solve ``A x = b`` where ``matvec(x)`` computes ``A x``.

        Args:
            matvec: the linear map, taking and returning the structure of ``b``.
            b: a Tensor, or a (nested) list, tuple or dict of Tensors.
            init: a starting guess in the structure of ``b``; ``None`` starts at 0.

        Returns:
            A ``Solution`` whose ``value`` has the structure of ``b``.
        """
        leaves, spec = pytree.tree_flatten(b)
        name = type(self).__name__
        for leaf in leaves:
            if not isinstance(leaf, Tensor):
                raise TypeError(
                    f"nestgrad.{name}: b must be a Tensor or a list, tuple or dict of Tensors; it holds "
                    f"{type(leaf).__name__} {leaf!r}."
                )

        def flat_matvec(xs: Tensors) -> Tensors:
            out = pytree.tree_leaves(matvec(pytree.tree_unflatten(list(xs), spec)))
            if len(out) != len(xs) or any(not isinstance(o, Tensor) or o.shape != x.shape for o, x in zip(out, xs)):
                raise ValueError(
                    f"nestgrad.{name}: matvec(x) must return Tensors of the same structure and shapes as x "
                    f"(shapes {[tuple(x.shape) for x in xs]}); it returned "
                    f"{[tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in out]}."
                )
            return out

        start = None if init is None else pytree.tree_leaves(init)
        solution = self._run(flat_matvec, leaves, start)
        if not solution.converged:
            warnings.warn(f"nestgrad.{name}: {explain(self, solution)}", ConvergenceWarning, stacklevel=2)
        return dataclasses.replace(solution, value=pytree.tree_unflatten(solution.value, spec))

    def _run(self, matvec: MatVec, b: Tensors, init: Tensors | None) -> Solution:
        """``_solve()``, with its ``matvec`` calls counted into ``Solution.matvecs``. Never warns."""
        calls = 0

        def counted(xs: Tensors) -> Tensors:
            nonlocal calls
            calls += 1
            return matvec(xs)

        return dataclasses.replace(self._solve(counted, b, init), matvecs=calls)

    @abc.abstractmethod
    def _solve(self, matvec: MatVec, b: Tensors, init: Tensors | None) -> Solution:
        """Solve on flat lists of Tensors; ``Solution.value`` is a list. Never warns."""

    @abc.abstractmethod
    def _fix(self, solution: Solution) -> str:
        """What to change when ``solution`` did not converge."""


def explain(solver: LinearSolver, solution: Solution) -> str:
    """One sentence on why ``solution`` stopped short, and the fix."""
    why = _STOPPED.get(solution.result, solution.result)
    return (
        f"did not converge: relative residual {solution.residual:.3g} after {solution.steps} iterations "
        f"({why}; {solver!r}). {solver._fix(solution)}"
    )


@dataclass(frozen=True)
class CG(LinearSolver):
    r"""Conjugate gradients for a symmetric positive definite ``A``.

    ```text
    \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k},\quad
    x_{k+1} = x_k + \alpha_k p_k,\quad r_{k+1} = r_k - \alpha_k A p_k,\quad
    p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k}\, p_k
    ```

    Stops when ``\|r_k\| \le \mathrm{tol}\,\|b\|``, which takes at most about
    ``\tfrac12\sqrt{\kappa}\,\ln(2/\mathrm{tol})`` iterations for condition number
    ``\kappa`` (and at most ``n`` in exact arithmetic). Every division is guarded:
    ``b = 0`` returns 0 at once, a residual that reaches exactly 0 stops the iteration, and
    a direction with ``p^\top A p \le 0``, or numerically 0 relative to the largest
    curvature met (``A`` indefinite or singular, e.g. a Hessian away from a minimum),
    stops it with ``result="not_positive_definite"`` and a warning, keeping the last iterate.
    CG never returns NaN or inf for finite inputs.

    Args:
        max_steps: iteration limit (each iteration is one ``matvec``).
        tol: relative residual to reach, ``\|b - Ax\| \le \mathrm{tol}\,\|b\|``.

    Examples:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> sol = nestgrad.CG(max_steps=10, tol=1e-10)(lambda x: A @ x, torch.tensor([1.0, 2.0]))
        >>> sol.value, sol.steps, sol.converged
        (tensor([0.0909, 0.6364]), 2, True)

    When to use: a symmetric positive definite system, e.g. the Hessian at a minimum
    (``nestgrad.Implicit``'s default). Fastest of the three by far when
    ``\kappa`` is large.
    """

    max_steps: int = 100
    tol: float = 1e-6

    def __post_init__(self) -> None:
        _check_steps("CG", "max_steps", self.max_steps)
        _check_tol("CG", self.tol)

    def _solve(self, matvec: MatVec, b: Tensors, init: Tensors | None) -> Solution:
        V = _space(b)
        bv = V.pack(b)
        b_norm = _norm(V, bv, "CG")
        if b_norm == 0:
            return Solution([torch.zeros_like(t) for t in b], 0, 0.0, True, SUCCESSFUL)
        A = V.operator(matvec)
        if init is None:
            x, r = V.zeros(bv), bv
        else:
            x = V.pack(list(init))
            r = V.add(bv, A(x), -1.0)
        rr = V.dot(r, r)
        threshold = self.tol * b_norm
        result, steps = MAX_STEPS_REACHED, 0
        if math.sqrt(rr) <= threshold:
            return Solution(V.unpack(x), 0, math.sqrt(rr) / b_norm, True, SUCCESSFUL)
        eps = torch.finfo(b[0].dtype).eps
        p, largest = r, 0.0  # largest: the largest curvature pᵀAp/pᵀp met so far, a scale for |A|
        while steps < self.max_steps:
            Ap = A(p)
            pAp, pp = V.dot(p, Ap), V.dot(p, p)
            if not pAp > eps * largest * pp:  # <= 0, numerically 0 (A singular) or NaN: never divide by it
                # pAp underflows to 0 only once the residual is far below what floating point resolves.
                done = pAp == 0 and math.sqrt(rr) <= eps * b_norm
                result = SUCCESSFUL if done else NOT_POSITIVE_DEFINITE
                break
            largest = max(largest, pAp / pp)
            a = rr / pAp
            r_next = V.add(r, Ap, -a)
            rr_next = V.dot(r_next, r_next)
            if not math.sqrt(rr_next) <= _DIVERGENCE * b_norm:  # also NaN: keep the last finite iterate
                result = DIVERGED
                break
            x = V.add(x, p, a)
            r = r_next
            steps += 1
            if math.sqrt(rr_next) <= threshold:  # includes a residual of exactly 0
                rr, result = rr_next, SUCCESSFUL
                break
            p = V.add(r, p, rr_next / rr)  # rr > threshold**2 >= 0 here
            rr = rr_next
        return Solution(V.unpack(x), steps, math.sqrt(rr) / b_norm, result == SUCCESSFUL, result)

    def _fix(self, solution: Solution) -> str:
        if solution.result in (NOT_POSITIVE_DEFINITE, DIVERGED):
            return (
                "CG needs a symmetric positive definite A (not singular, not indefinite). For a Hessian this "
                "means the point is not a (strict) minimum: train longer or with a smaller learning rate so the "
                "weights reach one, add an L2 penalty to the loss, or use nestgrad.Neumann with a small alpha."
            )
        return f"Raise max_steps (now {self.max_steps}) or tol (now {self.tol:g})."


@dataclass(frozen=True)
class Neumann(LinearSolver):
    r"""A truncated Neumann series: ``steps`` terms of ``A^{-1} = \alpha\sum_k (I - \alpha A)^k``.

    ```text
    x = \alpha \sum_{k=0}^{\mathrm{steps}-1} (I - \alpha A)^k\, b
    ```

    computed as the Richardson iteration ``x_{k+1} = x_k + \alpha r_k``,
    ``r_{k+1} = r_k - \alpha A r_k`` (one ``matvec`` per term), whose residual
    ``r_K = (I-\alpha A)^K b`` comes for free. The series converges when the
    eigenvalues of ``A`` lie in ``(0, 2/\alpha)``, at the rate
    ``1 - \alpha\lambda_{\min}``: slowly when ``A`` is ill-conditioned, so a few
    terms give a cheap, biased (shrunk) solution.

    Args:
        steps: number of terms (``matvec`` calls).
        alpha: step size; keep ``\alpha < 2/\lambda_{\max}(A)``, e.g. the learning rate
            that trained the weights when ``A`` is the Hessian.
        tol: stop early once the relative residual is at most ``tol``, and count the solve as
            converged only then. ``None`` always sums ``steps`` terms and counts the solve as
            converged unless the series diverged (residual above ``\|b\|``).

    Examples:
        >>> sol = nestgrad.Neumann(steps=50, alpha=0.2)(lambda x: A @ x, b)

    When to use: a fixed, small budget of Hessian-vector products, or when CG reports that
    the Hessian is not positive definite (a small ``alpha`` damps the negative directions'
    growth for a few terms). Otherwise prefer ``CG``.
    """

    steps: int
    alpha: float
    tol: float | None = None

    def __post_init__(self) -> None:
        _check_steps("Neumann", "steps", self.steps)
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < math.inf:
            raise ValueError(
                f"nestgrad.Neumann: alpha must be a positive float below 2/λ_max(A), e.g. the learning "
                f"rate that trained the weights; got {a!r}."
            )
        if self.tol is not None:
            _check_tol("Neumann", self.tol)

    def _solve(self, matvec: MatVec, b: Tensors, init: Tensors | None) -> Solution:
        return _richardson(matvec, b, init, float(self.alpha), self.steps, self.tol, "Neumann")

    def _fix(self, solution: Solution) -> str:
        if solution.result == DIVERGED:
            return (
                f"Lower alpha (now {self.alpha:g}) below 2/λ_max(A). If A is a Hessian and that does not help, "
                f"it is not positive definite at these weights: train longer so they reach a minimum."
            )
        return f"Raise steps (now {self.steps}) or alpha (now {self.alpha:g}, keeping it below 2/λ_max(A))."


@dataclass(frozen=True)
class FixedPoint(LinearSolver):
    r"""Fixed-point (Richardson) iteration, stopped on tolerance.

    ```text
    x_{k+1} = x_k + (b - A x_k)
    ```

    For ``A = I - M`` this is ``x_{k+1} = b + M x_k``, the fixed-point iteration
    of ``x = b + M x``, which converges when the spectral radius of ``M`` is below 1,
    at that rate. Its residual is updated as ``r_{k+1} = r_k - A r_k``, so each
    iteration costs one ``matvec``.

    Passed to ``nestgrad.Implicit``, it selects the optimizer's own update map
    ``\Phi`` as the optimality condition and solves
    ``x = v + (\partial\Phi/\partial(W, S))^\top x``: the solution is right for any
    optimizer whose iterates converge, gradient fixed point or not.

    Args:
        max_steps: iteration limit (each iteration is one ``matvec``).
        tol: relative residual to reach, ``\|b - Ax\| \le \mathrm{tol}\,\|b\|``.

    Examples:
        >>> sol = nestgrad.FixedPoint(max_steps=500, tol=1e-8)(lambda x: A @ x, b)

    When to use: with ``nestgrad.Implicit`` when the optimizer's fixed point is not a
    zero of the training loss's gradient (weight decay inside the optimizer, AdamW), or to get
    gradients w.r.t. the optimizer's own hyperparameters where they move the fixed point.
    """

    max_steps: int = 1000
    tol: float = 1e-6

    def __post_init__(self) -> None:
        _check_steps("FixedPoint", "max_steps", self.max_steps)
        _check_tol("FixedPoint", self.tol)

    def _solve(self, matvec: MatVec, b: Tensors, init: Tensors | None) -> Solution:
        return _richardson(matvec, b, init, 1.0, self.max_steps, self.tol, "FixedPoint")

    def _fix(self, solution: Solution) -> str:
        if solution.result == DIVERGED:
            return (
                "The iteration map is not a contraction here. With nestgrad.Implicit this means the optimizer's "
                "update does not converge at the trained weights: train longer, or with a smaller learning rate, "
                "until it does."
            )
        return (
            f"Raise max_steps (now {self.max_steps}) or tol (now {self.tol:g}); the iteration converges at the "
            f"rate the training itself converged near its end."
        )


def _richardson(
    matvec: MatVec, b: Tensors, init: Tensors | None, alpha: float, steps: int, tol: float | None, name: str
) -> Solution:
    """``x <- x + alpha (b - A x)`` with the residual updated as ``r <- r - alpha A r``."""
    V = _space(b)
    bv = V.pack(b)
    b_norm = _norm(V, bv, name)
    if b_norm == 0:
        return Solution([torch.zeros_like(t) for t in b], 0, 0.0, True, SUCCESSFUL)
    A = V.operator(matvec)
    if init is None:
        x, r = V.zeros(bv), bv
    else:
        x = V.pack(list(init))
        r = V.add(bv, A(x), -1.0)
    residual = math.sqrt(V.dot(r, r)) / b_norm
    taken = 0
    while taken < steps and not (tol is not None and residual <= tol):
        Ar = A(r)
        r_next = V.add(r, Ar, -alpha)
        res_next = math.sqrt(V.dot(r_next, r_next)) / b_norm
        if not res_next <= _DIVERGENCE:  # also NaN: keep the last finite iterate
            return Solution(V.unpack(x), taken, residual, False, DIVERGED)
        x = V.add(x, r, alpha)
        r, residual = r_next, res_next
        taken += 1
    value = V.unpack(x)
    if tol is not None and residual <= tol:
        return Solution(value, taken, residual, True, SUCCESSFUL)
    if residual > 1:
        return Solution(value, taken, residual, False, DIVERGED)
    return Solution(value, taken, residual, tol is None, SUCCESSFUL if tol is None else MAX_STEPS_REACHED)


class _Flat:
    """The vectors of a solve as one flat Tensor: every update and dot product is one kernel.

    For ``b`` whose tensors share a floating dtype and a device. A solver iteration then costs
    a handful of kernels whatever the number of tensors; ``matvec`` still receives and returns
    the list of tensors (views of the flat vector in, concatenated out: one copy per call).
    """

    def __init__(self, b: Tensors) -> None:
        self.shapes = [t.shape for t in b]
        self.sizes = [t.numel() for t in b]
        # One 1-D tensor (a weight vector) is its own flat vector: no view per matvec.
        self.vector = len(b) == 1 and b[0].dim() == 1
        self.dtype = b[0].dtype
        self.float64 = self.dtype is torch.float64

    def pack(self, xs: Tensors) -> Tensor:
        if self.vector:
            return xs[0]
        if len(xs) == 1:
            return xs[0].reshape(-1)
        return torch.cat([x.reshape(-1) for x in xs])

    def unpack(self, v: Tensor) -> Tensors:
        if self.vector:
            return [v]
        if len(self.shapes) == 1:
            return [v.reshape(self.shapes[0])]
        return [c.reshape(shape) for c, shape in zip(v.split(self.sizes), self.shapes)]

    def operator(self, matvec: MatVec) -> Callable[[Tensor], Tensor]:
        """``matvec`` on flat vectors; a result in another dtype is cast to ``b``'s (as the list updates promote)."""

        def apply(v: Tensor) -> Tensor:
            out = matvec([v])[0] if self.vector else self.pack(matvec(self.unpack(v)))
            return out if out.dtype is self.dtype else out.to(self.dtype)

        return apply

    def zeros(self, v: Tensor) -> Tensor:
        return torch.zeros_like(v)

    def add(self, y: Tensor, x: Tensor, alpha: float) -> Tensor:
        """``y + alpha x``."""
        return torch.add(y, x, alpha=alpha)

    def dot(self, x: Tensor, y: Tensor) -> float:
        """``<x, y>`` accumulated in float64 (float32 and lower products are summed in float64)."""
        if self.float64:
            return float(torch.dot(x, y))
        return float(torch.sum(x * y, dtype=torch.float64))


class _Lists:
    """The vectors of a solve as lists of Tensors (mixed dtypes or devices): ``torch._foreach`` updates."""

    def pack(self, xs: Tensors) -> Tensors:
        return list(xs)

    def unpack(self, v: Tensors) -> Tensors:
        return v

    def operator(self, matvec: MatVec) -> MatVec:
        return matvec

    def zeros(self, v: Tensors) -> Tensors:
        return [torch.zeros_like(t) for t in v]

    def add(self, y: Tensors, x: Tensors, alpha: float) -> Tensors:
        return list(torch._foreach_add(y, x, alpha=alpha))

    def dot(self, x: Tensors, y: Tensors) -> float:
        return _dot(x, y)


def _space(b: Tensors) -> Any:
    """``_Flat`` when ``b``'s tensors share one floating dtype and one device, else ``_Lists``."""
    first = b[0] if b else None
    if (
        first is not None
        and first.is_floating_point()
        and all(t.dtype is first.dtype and t.device == first.device for t in b)
    ):
        return _Flat(b)
    return _Lists()


def _dot(xs: Tensors, ys: Tensors) -> float:
    """``\\sum_i \\langle x_i, y_i\\rangle``, accumulated in float64, as a Python float (one host read).

    Called a few times per solver iteration, so it costs one kernel per tensor pair (a float64
    ``dot``; float32 and lower products summed in float64) and, for several tensors, one stack
    and sum on the first tensor's device: no Python ``sum`` of tensors, no read per tensor.
    """
    if not xs:
        return 0.0
    if len(xs) == 1:
        return float(_dot1(xs[0], ys[0]))
    device = xs[0].device
    return float(torch.stack([_dot1(x, y).to(device) for x, y in zip(xs, ys)]).sum())


def _dot1(x: Tensor, y: Tensor) -> Tensor:
    """``<x, y>`` as a 0-dim float64 Tensor on ``x``'s device."""
    if x.dtype is torch.float64 and y.dtype is torch.float64:
        return torch.dot(x.reshape(-1), y.reshape(-1))
    return torch.sum(x * y, dtype=torch.float64)


def _norm(space: Any, b: Any, name: str) -> float:
    norm = math.sqrt(space.dot(b, b))
    if not math.isfinite(norm):
        raise ValueError(
            f"nestgrad.{name}: the right-hand side b contains NaN or inf. With nestgrad.Implicit, b is the "
            f"gradient of your outer loss w.r.t. the trained weights: check that loss for NaN."
        )
    return norm


def _check_steps(name: str, arg: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"nestgrad.{name}: {arg} must be an int >= 1 (iterations, one matvec each); got {value!r}.")


def _check_tol(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(
            f"nestgrad.{name}: tol must be a float >= 0, the relative residual |b - Ax|/|b| to reach "
            f"(e.g. 1e-6); got {value!r}."
        )
