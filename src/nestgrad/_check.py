"""``check``: compare a hypergradient with central finite differences along random directions."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import Tensor

Verdict = Literal["passed", "failed", "no signal"]

_FLOAT32 = (
    "hparams or fn's output are {dtype}: finite differences in {dtype} are unreliable, because rounding "
    "error (about {machine:.0e} * |f| / eps) swamps the difference. Run the check in float64: call "
    "torch.set_default_dtype(torch.float64) before building the model and the data, or .double() the model, "
    "the data and the hparams."
)
_NO_SIGNAL = (
    "the autograd gradient is exactly zero{why} and the finite differences see no change either, so nothing "
    "was compared. If the hypergradient should not be zero, the path from hparams to the output is cut "
    "(argmax, detach, .item(), torch.no_grad(), ...): run nestgrad's explain(fn, hparams) to see where."
)
_CUT = (
    "the autograd gradient is exactly zero{why}, but the output changes when hparams move: the output depends "
    "on hparams through a path autograd does not see (argmax, detach, .item(), torch.no_grad(), ...). Run "
    "nestgrad's explain(fn, hparams) to see where, or use a method that needs no derivative of the path "
    "(nestgrad.ZerothOrder)."
)


@dataclass(frozen=True)
class Direction:
    """One random unit direction :math:`v` of a :func:`check`.

    Attributes:
        autograd: :math:`g \\cdot v`, the directional derivative from autograd.
        finite_diff: :math:`(f(h + \\varepsilon v) - f(h - \\varepsilon v)) / 2\\varepsilon`.
        error: :math:`|g \\cdot v - \\mathrm{fd}| / \\max(\\lVert g\\rVert, |\\mathrm{fd}|)`, the error
            relative to the size of the whole gradient. It stays meaningful along directions
            nearly orthogonal to :math:`g`, where both numbers are close to zero; the verdict
            uses it.
        relative: :math:`|g \\cdot v - \\mathrm{fd}| / |\\mathrm{fd}|`, the plain relative error
            (``inf`` when the finite difference is exactly zero).
    """

    autograd: float
    finite_diff: float
    error: float
    relative: float


@dataclass(frozen=True)
class CheckResult:
    """What :func:`check` found: the verdict, one :class:`Direction` per direction, and notes.

    ``str(result)`` is a readable table. ``verdict`` is ``"passed"`` when every
    ``error <= rtol``, ``"failed"`` otherwise, and ``"no signal"`` when the
    autograd gradient is exactly zero (or missing) and the finite differences
    are zero too: a zero compared with a zero proves nothing, so it never passes.
    """

    verdict: Verdict
    value: float
    grad_norm: float
    eps: float
    rtol: float
    dtype: torch.dtype
    directions: tuple[Direction, ...]
    notes: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True only for the verdict ``"passed"``."""
        return self.verdict == "passed"

    @property
    def max_error(self) -> float:
        """The largest :attr:`Direction.error` (0.0 when there is no direction)."""
        return max((d.error for d in self.directions), default=0.0)

    def __str__(self) -> str:
        head = {
            "passed": f"passed: max error {self.max_error:.1e} <= rtol {self.rtol:.0e}",
            "failed": f"FAILED: max error {self.max_error:.1e} > rtol {self.rtol:.0e}",
            "no signal": "NO SIGNAL: the gradient and the finite differences are both zero",
        }[self.verdict]
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [
            f"nestgrad.check {head}",
            f"  f(hparams) = {self.value:.10g}, |grad| = {self.grad_norm:.3e}, eps = {self.eps:.1e} ({dtype}), "
            f"{len(self.directions)} random unit directions",
            f"  {'dir':>3}  {'autograd g.v':>18}  {'finite diff':>18}  {'error/|g|':>10}  {'error/|fd|':>10}",
        ]
        for i, d in enumerate(self.directions):
            flag = "  <-- " if d.error > self.rtol else ""
            lines.append(
                f"  {i:>3}  {d.autograd:>18.10e}  {d.finite_diff:>18.10e}  {d.error:>10.1e}  {d.relative:>10.1e}{flag}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _leaves(hparams: Any) -> tuple[list[Tensor], Any]:
    leaves, spec = pytree.tree_flatten(hparams)
    if not leaves:
        raise ValueError("nestgrad.check: hparams holds no Tensor. Pass a Tensor or a tuple/list/dict of Tensors.")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            got = type(leaf).__name__ if not isinstance(leaf, Tensor) else f"a {leaf.dtype} Tensor"
            raise TypeError(
                f"nestgrad.check: every leaf of hparams must be a floating-point Tensor; leaf {i} is {got}. "
                f"Wrap numbers as tensors (torch.tensor(0.1, dtype=torch.float64)), and close over integer "
                f"data in fn instead of passing it as hparams."
            )
    return leaves, spec


def _scalar(out: Any, where: str) -> Tensor:
    if not isinstance(out, Tensor) or out.numel() != 1 or not out.is_floating_point():
        got = f"a {out.dtype} Tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"nestgrad.check: fn must return a real floating-point scalar Tensor; {where} it returned {got}. "
            f"Reduce it with .mean() or .sum()."
        )
    return out


def check(
    fn: Callable[[Any], Tensor],
    hparams: Any,
    *,
    directions: int = 3,
    eps: float | None = None,
    rtol: float = 1e-5,
    seed: int = 0,
    no_grad: bool = True,
) -> CheckResult:
    r"""Check the hypergradient of ``fn`` at ``hparams`` against central finite differences.

    With :math:`g = \nabla f(h)` from autograd and random unit directions
    :math:`v_i` (over all leaves of ``hparams`` together), compare

    .. math::
        g \cdot v_i \quad\text{with}\quad \frac{f(h + \varepsilon v_i) - f(h - \varepsilon v_i)}{2\varepsilon}

    and pass when every error :math:`|g\cdot v_i - \mathrm{fd}_i| / \max(\lVert g\rVert, |\mathrm{fd}_i|)`
    is at most ``rtol``. The error is relative to the whole gradient, so a
    direction nearly orthogonal to :math:`g` does not blow it up; the plain
    ratio :math:`|g\cdot v_i - \mathrm{fd}_i| / |\mathrm{fd}_i|` is reported too.

    A zero is never a pass: when the autograd gradient is exactly zero or
    missing (hparams disconnected from the output), the verdict is
    ``"no signal"`` if the finite differences are zero too, and ``"failed"``
    if they are not (the output depends on hparams through a path autograd
    does not see). Run it in float64: in float32 the finite differences
    themselves are too noisy, and the result says so.

    Args:
        fn: ``fn(hparams) -> scalar Tensor``, any function of the hparams, e.g.
            one that calls :func:`nestgrad.train` and returns a validation
            loss. It is called ``1 + 2 * directions`` times and must be
            deterministic (seed any randomness inside it).
        hparams: a floating-point Tensor or a tuple/list/dict of them. The check
            differentiates with respect to fresh copies, so they need not
            require grad.
        directions: number of random directions, an int >= 1.
        eps: finite-difference step along each unit direction. Default:
            :math:`\epsilon_{\text{dtype}}^{1/3} \max(1, \lVert h\rVert)`, the step that balances
            truncation and rounding error for central differences (about
            ``6e-6 * max(1, ||h||)`` in float64).
        rtol: largest error that passes.
        seed: seed of the check's own ``torch.Generator`` (the global RNG is untouched).
        no_grad: evaluate the finite differences under ``torch.no_grad()`` (then
            :func:`nestgrad.train` does plain training with the same trajectory,
            cheaply). Set False for an ``fn`` that calls ``torch.autograd.grad``
            itself.

    Returns:
        A :class:`CheckResult`; ``print`` it for a table, test ``result.passed``.

    Example:
        >>> torch.set_default_dtype(torch.float64)
        >>> def val_loss(A):
        ...     trained = nestgrad.train(loss_fn, params, nestgrad.optim.SGD(lr=0.1), data, steps=20, hparams=A)
        ...     return F.cross_entropy(nestgrad.call(model, trained, x_val), y_val)
        >>> result = nestgrad.check(val_loss, A)
        >>> print(result)
        >>> result.passed
        True
    """
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"nestgrad.check: directions must be an int >= 1; got {directions!r}.")
    if eps is not None and not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"nestgrad.check: eps must be a positive number or None (choose from the dtype); got {eps!r}.")
    if not rtol > 0:
        raise ValueError(f"nestgrad.check: rtol must be > 0; got {rtol!r}.")
    leaves, spec = _leaves(hparams)
    fresh = [h.detach().clone().requires_grad_() for h in leaves]

    with torch.enable_grad():
        out = _scalar(fn(pytree.tree_unflatten(list(fresh), spec)), "at hparams")
        grads: list[Tensor | None] = [None] * len(fresh)
        if out.requires_grad:
            grads = list(torch.autograd.grad(out.reshape(()), fresh, allow_unused=True))
    value = float(out.detach().reshape(()).double())

    dtypes = [h.dtype for h in leaves] + [out.dtype]
    dtype = max(dtypes, key=lambda d: torch.finfo(d).eps)  # the least precise decides eps and the noise floor
    machine = torch.finfo(dtype).eps
    norm_h = math.sqrt(sum(float(h.detach().double().abs().pow(2).sum()) for h in leaves))
    step = float(eps) if eps is not None else machine ** (1 / 3) * max(1.0, norm_h)

    g64 = [
        torch.zeros(h.shape, dtype=torch.float64) if g is None else g.detach().double().cpu()
        for h, g in zip(leaves, grads)
    ]
    grad_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g64))

    gen = torch.Generator().manual_seed(seed)
    results: list[tuple[float, float]] = []
    for _ in range(directions):
        vs = [torch.randn(h.shape, generator=gen, dtype=torch.float64) for h in leaves]
        norm_v = math.sqrt(sum(float(v.pow(2).sum()) for v in vs)) or 1.0
        vs = [v / norm_v for v in vs]
        along = sum(float((g * v).sum()) for g, v in zip(g64, vs))
        f = []
        for sign in (1.0, -1.0):
            moved = [
                (h.detach() + (sign * step) * v.to(device=h.device, dtype=h.dtype)).requires_grad_(not no_grad)
                for h, v in zip(leaves, vs)
            ]
            with torch.no_grad() if no_grad else torch.enable_grad():
                f_out = _scalar(fn(pytree.tree_unflatten(moved, spec)), f"at hparams {'+-'[sign < 0]} eps * v")
            f.append(float(f_out.detach().reshape(()).double()))
        results.append((along, (f[0] - f[1]) / (2 * step)))

    notes: list[str] = []
    if any(d in (torch.float32, torch.float16, torch.bfloat16) for d in dtypes):
        notes.append(_FLOAT32.format(dtype=str(dtype).removeprefix("torch."), machine=machine))
    missing = [i for i, g in enumerate(grads) if g is None]
    why = ""
    if not out.requires_grad:
        why = " (the output does not require grad: it is not connected to hparams at all)"
    elif len(missing) == len(leaves):
        why = " (no leaf of hparams reaches the output through autograd)"
    elif missing:
        notes.append(
            f"leaves {missing} of hparams do not reach the output through autograd (their gradient is None, "
            f"counted as zero)."
        )

    noise = 100 * machine * max(abs(value), torch.finfo(dtype).tiny) / step
    fd_max = max(abs(fd) for _, fd in results)
    dirs = []
    for along, fd in results:
        diff = abs(along - fd)
        scale = max(grad_norm, abs(fd))
        error = diff / scale if scale > 0 else 0.0
        relative = diff / abs(fd) if fd != 0 else (0.0 if diff == 0 else math.inf)
        dirs.append(Direction(along, fd, error, relative))

    verdict: Verdict
    if grad_norm == 0 and fd_max <= noise:
        verdict = "no signal"
        notes.insert(0, _NO_SIGNAL.format(why=why))
    else:
        verdict = "passed" if all(d.error <= rtol for d in dirs) else "failed"
        if grad_norm == 0:
            notes.insert(0, _CUT.format(why=why))
    return CheckResult(verdict, value, grad_norm, step, rtol, dtype, tuple(dirs), tuple(notes))
