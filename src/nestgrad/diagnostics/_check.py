"""``check``: compare a hypergradient with central finite differences along random directions."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._explain import INFERENCE_MODE

Verdict = Literal["passed", "failed", "no signal"]

_FLOAT32 = (
    "hparams or fn's output are {dtype}: finite differences in {dtype} are unreliable at tight tolerances, "
    "because rounding error (about {machine:.0e} * |f| / step) and truncation error (about curvature * step^2) "
    "cannot both be small; this check used {steps} and rtol {rtol:.0e}, so it "
    "catches gross errors, not subtle ones. float64 is the reliable setting: call "
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
_NONFINITE_VALUE = (
    "f(hparams) = {value}: fn itself is not finite at hparams, so there is nothing to differentiate or compare. "
    "Typical causes: log(0) or 0/0 in the loss, an inf or NaN in the data, a training run that diverges (lower "
    "lr, clip gradients). Check torch.isfinite on the trained weights and the loss step by step to find where "
    "it starts."
)
_NONFINITE_GRAD = (
    "the autograd gradient is not finite ({where}) while f(hparams) = {value:.6g}{fd_too}: a derivative on the "
    "path is infinite at this point although the function is not, e.g. sqrt at 0 (Adam/RMSprop/Adagrad with "
    "eps_root=0 and a gradient entry that is exactly 0 at every step, such as an unused weight: keep the default "
    "eps_root=1e-30), x ** p with 0 < p < 1 at 0, .norm() of a zero vector, or log(0) and 1/0 multiplied by 0 "
    "(torch.where over an inf branch: mask the input, not the output). torch.autograd.set_detect_anomaly(True) "
    "names the backward op that first returns NaN."
)
_NONFINITE_FD = (
    "f is not finite at hparams +- step along direction(s) {dirs} (f(h + step v) = {plus:.6g}, f(h - step v) = "
    "{minus:.6g}), though f(hparams) = {value:.6g} is: fn is undefined or diverges within {step:.1e} of hparams. "
    "The step may cross a boundary (a hyperparameter that must stay positive, log of a negative number) or "
    "training may blow up there. Pass a smaller eps, and check fn near hparams."
)
_ZERO_STEP = (
    "the step along direction(s) {dirs} is below the resolution of {dtype} at hparams (hparams +- step == "
    "hparams), so there is no finite difference to compare. Pass a larger eps, or leave eps=None."
)
_TRUNCATION = (
    "the error grows with the step ({errors}): truncation error. f curves too strongly over a step of {step:.1e} "
    "for a central difference, so the finite difference is off, not necessarily the gradient. Pass a smaller "
    "eps (about {smaller:.1e})."
)
_ROUNDOFF = (
    "the error shrinks as the step grows ({errors}): round-off error. The rounding noise of f in {dtype} (about "
    "{machine:.0e} * |f| = {noise:.1e}) divided by the step swamps the difference. Pass a larger eps (about "
    "{larger:.1e}), or better run the check in float64, the reliable setting."
)
_GRADIENT = (
    "the error stays the same when the step changes 10x either way ({errors}): the finite differences are "
    "consistent, so the autograd gradient itself is off. Look for a custom backward, a detach or no_grad on "
    "part of the path, or an approximate method (Implicit short of convergence, FiniteDiff, Unroll(truncate=k))."
)
_UNCLEAR = (
    "the error changes with the step in no clean pattern ({errors}): fn may be noisy (seed any randomness "
    "inside it) or non-smooth near hparams (relu, max, clamp, abs at a kink)."
)
_AGREES = " At step {step:.1e} the error is {error:.1e} <= rtol: the autograd gradient agrees there."

# rtol used when none is given: what central differences can resolve in the least precise dtype.
_RTOL = {torch.float64: 1e-5, torch.float32: 3e-3}
_RTOL_HALF = 5e-2


@dataclass(frozen=True)
class Direction:
    """One random unit direction ``v`` of a ``check()``.

    Attributes:
        autograd: ``g \\cdot v``, the directional derivative from autograd.
        finite_diff: ``(f(h + t v) - f(h - t v)) / 2t``, with ``t`` = ``step``.
        error: ``|g \\cdot v - \\mathrm{fd}| / \\max(\\lVert g\\rVert, |\\mathrm{fd}|)``, the error
            relative to the size of the whole gradient. It stays meaningful along directions
            nearly orthogonal to ``g``, where both numbers are close to zero; the verdict
            uses it. ``nan`` when anything compared is not finite (never 0).
        relative: ``|g \\cdot v - \\mathrm{fd}| / |\\mathrm{fd}|``, the plain relative error
            (``inf`` when the finite difference is exactly zero, ``nan`` when not finite).
        step: ``t``, the length of the step along ``v``, measured on the hparams as
            they were actually rounded to their dtype.
    """

    autograd: float
    finite_diff: float
    error: float
    relative: float
    step: float = math.nan


def _nanmax(xs: Any) -> float:
    """``max`` that returns nan when any value is nan (Python's ``max`` keeps or drops a nan by position)."""
    values = [float(x) for x in xs]
    return math.nan if any(math.isnan(x) for x in values) else max(values, default=0.0)


@dataclass(frozen=True)
class CheckResult:
    """What ``check()`` found: the verdict, one ``Direction`` per direction, and notes.

    ``str(result)`` is a readable table. ``verdict`` is ``"passed"`` when every
    value is finite and every ``error <= rtol``; ``"failed"`` otherwise (any
    NaN or inf in the gradient, in ``f`` or in a finite difference fails,
    with a note naming it); and ``"no signal"`` when the autograd gradient is
    exactly zero (or missing) and the finite differences are zero too: a zero
    compared with a zero proves nothing, so it never passes.

    Attributes:
        eps: the step length along each unit direction: the ``eps`` given, or
            the largest step chosen (see ``check()``).
        relative_step: the largest change of any nonzero hparam element,
            relative to its value (``nan`` when every element is zero). The
            default step keeps it at ``\\epsilon_{\\text{dtype}}^{1/3}``.
    """

    verdict: Verdict
    value: float
    grad_norm: float
    eps: float
    rtol: float
    dtype: torch.dtype
    directions: tuple[Direction, ...]
    notes: tuple[str, ...]
    relative_step: float = math.nan

    @property
    def passed(self) -> bool:
        """True only for the verdict ``"passed"``."""
        return self.verdict == "passed"

    @property
    def max_error(self) -> float:
        """The largest ``Direction.error``; ``nan`` if any is (0.0 when there is no direction)."""
        return _nanmax(d.error for d in self.directions)

    def __str__(self) -> str:
        worst = self.max_error
        failed = (
            f"FAILED: max error {worst:.1e} > rtol {self.rtol:.0e}"
            if math.isfinite(worst)
            else f"FAILED: max error {worst} (a value is not finite, see the notes)"
        )
        head = {
            "passed": f"passed: max error {worst:.1e} <= rtol {self.rtol:.0e}",
            "failed": failed,
            "no signal": "NO SIGNAL: the gradient and the finite differences are both zero",
        }[self.verdict]
        dtype = str(self.dtype).removeprefix("torch.")
        relative = f", <= {self.relative_step:.1e} * |h|" if math.isfinite(self.relative_step) else ""
        lines = [
            f"nestgrad.check {head}",
            f"  f(hparams) = {self.value:.10g}, |grad| = {self.grad_norm:.3e}, eps = {self.eps:.1e}{relative} "
            f"({dtype}), {len(self.directions)} random unit directions",
            f"  {'dir':>3}  {'autograd g.v':>18}  {'finite diff':>18}  {'error/|g|':>10}  {'error/|fd|':>10}",
        ]
        for i, d in enumerate(self.directions):
            flag = "" if d.error <= self.rtol else "  <-- "  # a nan error is flagged too
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
        if not bool(torch.isfinite(leaf).all()):
            raise ValueError(
                f"nestgrad.check: leaf {i} of hparams holds {int(torch.isnan(leaf).sum())} NaN and "
                f"{int(torch.isinf(leaf).sum())} inf elements; a derivative there means nothing. Check at finite "
                f"hparams (if they came from an outer optimizer, its last step diverged: lower its lr)."
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


def _scales(leaves: list[Tensor]) -> list[Tensor]:
    """Per element, the size of the default step: ``|h_i|``; for an element that is 0 (or not finite), the RMS
    of its leaf's finite nonzero elements (1 when there are none). So a step never flips a sign."""
    scales = []
    for h in leaves:
        a = h.detach().double().cpu().abs()
        usable = torch.isfinite(a) & (a > 0)
        top = float(a[usable].max()) if bool(usable.any()) else 1.0
        floor = top * float((a[usable] / top).pow(2).mean().sqrt()) if bool(usable.any()) else 1.0
        scales.append(torch.where(usable, a, torch.full_like(a, floor)))
    return scales


@dataclass(frozen=True)
class _Central:
    """One central difference along a move ``p``: ``fd = (f(h + p) - f(h - p)) / |2p|`` and ``g`` along ``p``."""

    along: float
    fd: float
    step: float  # |p| as the hparams' dtype rounded it; 0 when the move vanished in rounding
    relative: float  # the largest |change| / |h| over nonzero elements (nan when there are none)
    plus: float
    minus: float


_BOOST_MAX = 10.0


def _boost(value: float, g64: list[Tensor], scales: list[Tensor]) -> float:
    """How much longer than ``c * |h|`` the default step should be: ``(|f| / |g * h|) ** (1/3)`` in [1, 10].

    Rounding noise is relative to ``|f|``, the signal is ``|g * h|`` per unit relative step: when f hardly
    changes with the hparams (a small lr, a few steps), a longer step keeps the noise below the signal.
    Truncation stays small as long as the derivative varies on the scale of ``h``. 1 when g is 0 or not finite.
    """
    sensitivity = math.sqrt(sum(float((g * s).pow(2).sum()) for g, s in zip(g64, scales)))
    if not (math.isfinite(value) and math.isfinite(sensitivity) and sensitivity > 0):
        return 1.0
    return min(max(abs(value) / sensitivity, 1.0), _BOOST_MAX**3) ** (1 / 3)


def _central(
    fn: Callable[[Any], Tensor], spec: Any, leaves: list[Tensor], g64: list[Tensor], moves: list[Tensor], no_grad: bool
) -> _Central:
    plus = [h.detach() + p.to(device=h.device, dtype=h.dtype) for h, p in zip(leaves, moves)]
    minus = [h.detach() - p.to(device=h.device, dtype=h.dtype) for h, p in zip(leaves, moves)]
    # The move as the hparams' dtype actually rounded it: compare g along that, not along the intended move.
    width = [(hp.double() - hm.double()).cpu() for hp, hm in zip(plus, minus)]
    length = math.sqrt(sum(float(w.pow(2).sum()) for w in width))
    ratios = []
    for h, hp, hm in zip(leaves, plus, minus):
        h64, nonzero = h.detach().double(), h.detach() != 0
        change = torch.maximum((hp.double() - h64).abs(), (h64 - hm.double()).abs())
        ratios += [float((change[nonzero] / h64[nonzero].abs()).max())] if bool(nonzero.any()) else []
    relative = _nanmax(ratios) if ratios else math.nan
    if length == 0:
        return _Central(math.nan, math.nan, 0.0, relative, math.nan, math.nan)
    f = []
    for at, sign in ((plus, "+"), (minus, "-")):
        at = [m.requires_grad_(not no_grad) for m in at]
        with torch.no_grad() if no_grad else torch.enable_grad():
            out = _scalar(fn(pytree.tree_unflatten(at, spec)), f"at hparams {sign} eps * v")
        f.append(float(out.detach().reshape(()).double()))
    along = sum(float((g * w).sum()) for g, w in zip(g64, width)) / length
    return _Central(along, (f[0] - f[1]) / length, length / 2, relative, f[0], f[1])


def _compare(along: float, fd: float, grad_norm: float) -> tuple[float, float]:
    """``(error, relative)`` of one direction; nan, never 0, when a value is not finite."""
    if not (math.isfinite(along) and math.isfinite(fd) and math.isfinite(grad_norm)):
        return math.nan, math.nan
    diff = abs(along - fd)
    scale = max(grad_norm, abs(fd))
    error = diff / scale if scale > 0 else 0.0
    relative = diff / abs(fd) if fd != 0 else (0.0 if diff == 0 else math.inf)
    return error, relative


def _nonfinite_where(g64: list[Tensor]) -> str:
    parts = []
    for i, g in enumerate(g64):
        nan, inf = int(torch.isnan(g).sum()), int(torch.isinf(g).sum())
        if nan or inf:
            parts.append(f"leaf {i}: {nan} NaN and {inf} inf of {g.numel()} elements")
    return "; ".join(parts[:3] + ["..."] * (len(parts) > 3))


def _diagnose(
    evaluate: Callable[[float], _Central], at: _Central, grad_norm: float, rtol: float, noise: float, dtype: torch.dtype
) -> str:
    """Re-run the worst direction with a 10x smaller and a 10x larger step and name the error's kind:
    round-off shrinks as the step grows, truncation grows with it, a wrong gradient does neither."""
    error = _compare(at.along, at.fd, grad_norm)[0]
    probes: list[tuple[float, float, str]] = []
    for factor in (0.1, 10.0):
        try:
            point = evaluate(factor)
        except Exception as exc:  # a diagnostic only: fn may refuse a 10x step; say so rather than fail
            probes.append((factor * at.step, math.nan, f"fn raised {type(exc).__name__} at {factor * at.step:.1e}"))
            continue
        e = _compare(point.along, point.fd, grad_norm)[0]
        probes.append((point.step, e, f"{e:.1e} at {point.step:.1e}"))
    (small_step, small, small_text), (large_step, large, large_text) = probes
    errors = f"error {small_text}, {error:.1e} at {at.step:.1e}, {large_text}"
    truncation = small < error / 2 or large > 2 * error  # a comparison with nan is False: no evidence
    roundoff = small > 2 * error or large < error / 2
    if truncation and not roundoff:
        text = _TRUNCATION.format(errors=errors, step=at.step, smaller=small_step)
    elif roundoff and not truncation:
        text = _ROUNDOFF.format(
            errors=errors,
            dtype=str(dtype).removeprefix("torch."),
            machine=torch.finfo(dtype).eps,
            noise=noise,
            larger=large_step,
        )
    elif not truncation and not roundoff and math.isfinite(small) and math.isfinite(large):
        text = _GRADIENT.format(errors=errors)
    else:
        text = _UNCLEAR.format(errors=errors)
    agree = [(step, e) for step, e, _ in probes if e <= rtol]
    return text + (_AGREES.format(step=agree[0][0], error=agree[0][1]) if agree else "")


def check(
    fn: Callable[[Any], Tensor],
    hparams: Any,
    *,
    directions: int = 3,
    eps: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    no_grad: bool = True,
) -> CheckResult:
    r"""Check the hypergradient of ``fn`` at ``hparams`` against central finite differences.

    With ``g = \nabla f(h)`` from autograd and random unit directions
    ``v_i`` (over all leaves of ``hparams`` together), compare

    ```text
    g \cdot v_i \quad\text{with}\quad \frac{f(h + t_i v_i) - f(h - t_i v_i)}{2 t_i}
    ```

    and pass when every value is finite and every error
    ``|g\cdot v_i - \mathrm{fd}_i| / \max(\lVert g\rVert, |\mathrm{fd}_i|)``
    is at most ``rtol``. The error is relative to the whole gradient, so a
    direction nearly orthogonal to ``g`` does not blow it up; the plain
    ratio ``|g\cdot v_i - \mathrm{fd}_i| / |\mathrm{fd}_i|`` is reported too.

    It never passes silently:

    - NaN or inf in the autograd gradient, in ``f(h)`` or in any finite
      difference fails, with a note naming which one and the likely cause
      (a NaN gradient next to finite differences that are finite: a
      derivative that is infinite at ``h``, such as ``\sqrt{x}`` at
      0 in Adam with ``eps_root=0``).
    - When the autograd gradient is exactly zero or missing (hparams
      disconnected from the output), the verdict is ``"no signal"`` if the
      finite differences are zero too, and ``"failed"`` if they are not (the
      output depends on hparams through a path autograd does not see).
    - On a failure, the worst direction is re-run with a 10x smaller and a 10x
      larger step, and a note says whether the error is round-off (it shrinks
      as the step grows), truncation (it grows with the step) or the gradient
      itself (it does not change).

    float64 is the reliable setting. In float32 a central difference resolves
    a gradient only to about 1e-5 to 1e-3 (rounding error
    ``\sim \epsilon_{\text{dtype}} |f| / t`` against truncation error
    ``\sim |f'''|\, t^2``), so the default ``rtol`` is looser there, the
    check catches gross errors only, and the result says so.

    Args:
        fn: ``fn(hparams) -> scalar Tensor``, any function of the hparams, e.g.
            one that calls ``nestgrad.train()`` and returns a validation
            loss. It is called ``1 + 2 * directions`` times (4 more on a
            failure) and must be deterministic (seed any randomness inside it).
        hparams: a floating-point Tensor or a tuple/list/dict of them. The check
            differentiates with respect to fresh copies, so they need not
            require grad.
        directions: number of random directions, an int >= 1.
        eps: ``None`` (default) for a relative step per element: element
            ``h_j`` moves by at most ``r\,|h_j|``, with
            ``r = c \cdot \mathrm{clip}(|f| / \lVert g \odot h\rVert, 1, 1000)^{1/3}`` and
            ``c = \epsilon_{\text{dtype}}^{1/3}`` (about ``6e-6`` in float64,
            ``5e-3`` in float32), which balances truncation against rounding
            error; the factor (1 to 10) lengthens the step when ``f`` hardly
            changes relative to its size, where rounding would dominate. An
            element that is 0 moves by at most ``r`` times the RMS of its
            leaf's nonzero elements (``r`` if the whole leaf is 0). So the
            step never flips the sign of a hyperparameter, and moves
            ``lr=0.01`` by at most ``r * 0.01`` (at most 5e-4 in float32).
            ``result.relative_step`` is the largest fraction used. A number is an absolute
            step: the length ``t`` of the move along each unit direction,
            the same for every element (so no element moves by more than
            ``eps``).
        rtol: largest error that passes. ``None`` (default): ``1e-5`` when the
            hparams and the output are float64, ``1e-3`` when the least precise
            of them is float32, ``3e-2`` for 16-bit dtypes.
        seed: seed of the check's own ``torch.Generator`` (the global RNG is untouched).
        no_grad: evaluate the finite differences under ``torch.no_grad()`` (then
            ``nestgrad.train()`` does plain training with the same trajectory,
            cheaply). Set False for an ``fn`` that calls ``torch.autograd.grad``
            itself.

    Returns:
        A ``CheckResult``; ``print`` it for a table, test ``result.passed``.

    Examples:
        >>> torch.set_default_dtype(torch.float64)
        >>> def val_loss(A):
        ...     trained = nestgrad.train(loss_fn, params, nestgrad.optim.SGD(lr=0.1), data, steps=20, hparams=A)
        ...     return F.cross_entropy(nestgrad.call(model, trained, x_val), y_val)
        >>> result = nestgrad.check(val_loss, A)
        >>> print(result)
        >>> result.passed
        True
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(INFERENCE_MODE.format(where="nestgrad.check"))
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"nestgrad.check: directions must be an int >= 1; got {directions!r}.")
    if eps is not None and not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(
            f"nestgrad.check: eps must be a positive number (an absolute step) or None (a relative step chosen "
            f"from each hparam's size and dtype); got {eps!r}."
        )
    if rtol is not None and not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"nestgrad.check: rtol must be > 0, or None to choose it from the dtype; got {rtol!r}.")
    leaves, spec = _leaves(hparams)
    fresh = [h.detach().clone().requires_grad_() for h in leaves]

    with torch.enable_grad():
        out = _scalar(fn(pytree.tree_unflatten(list(fresh), spec)), "at hparams")
        grads: list[Tensor | None] = [None] * len(fresh)
        if out.requires_grad:
            grads = list(torch.autograd.grad(out.reshape(()), fresh, allow_unused=True))
    value = float(out.detach().reshape(()).double())

    dtypes = [h.dtype for h in leaves] + [out.dtype]
    dtype = max(dtypes, key=lambda d: torch.finfo(d).eps)  # the least precise decides the step and the noise floor
    machine = torch.finfo(dtype).eps
    c = machine ** (1 / 3)
    tol = float(rtol) if rtol is not None else _RTOL.get(dtype, _RTOL_HALF)

    g64 = [
        torch.zeros(h.shape, dtype=torch.float64) if g is None else g.detach().double().cpu()
        for h, g in zip(leaves, grads)
    ]
    finite_grad = all(bool(torch.isfinite(g).all()) for g in g64)
    grad_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g64))  # nan or inf when an element is

    scales = _scales(leaves)
    relative = c * _boost(value, g64, scales) if eps is None else math.nan
    gen = torch.Generator().manual_seed(seed)
    all_moves: list[list[Tensor]] = []
    for _ in range(directions):
        vs = [torch.randn(h.shape, generator=gen, dtype=torch.float64) for h in leaves]
        norm_v = math.sqrt(sum(float(v.pow(2).sum()) for v in vs)) or 1.0
        vs = [v / norm_v for v in vs]
        if eps is None:  # the element with the largest |v_j| moves by exactly c * its scale
            top = max((float(v.abs().max()) for v in vs if v.numel()), default=0.0) or 1.0
            all_moves.append([(relative / top) * s * v for s, v in zip(scales, vs)])
        else:
            all_moves.append([float(eps) * v for v in vs])
    points = [_central(fn, spec, leaves, g64, moves, no_grad) for moves in all_moves]
    dirs = [Direction(p.along, p.fd, *_compare(p.along, p.fd, grad_norm), p.step) for p in points]
    step = float(eps) if eps is not None else _nanmax(p.step for p in points)
    relatives = [p.relative for p in points if not math.isnan(p.relative)]
    relative_step = max(relatives) if relatives else math.nan

    notes: list[str] = []
    if any(d in (torch.float32, torch.float16, torch.bfloat16) for d in dtypes):
        steps = (
            f"relative steps of {relative:.1e} * |h| per element" if eps is None else f"an absolute step of {eps:.1e}"
        )
        notes.append(_FLOAT32.format(dtype=str(dtype).removeprefix("torch."), machine=machine, steps=steps, rtol=tol))
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

    zero = [i for i, p in enumerate(points) if p.step == 0]
    bad_fd = [i for i, p in enumerate(points) if p.step != 0 and not math.isfinite(p.fd)]
    problems: list[str] = []
    if not math.isfinite(value):
        problems.append(_NONFINITE_VALUE.format(value=value))
    else:
        if not finite_grad:
            fd_too = "" if bad_fd else " and every finite difference is finite"
            problems.append(_NONFINITE_GRAD.format(where=_nonfinite_where(g64), value=value, fd_too=fd_too))
        if bad_fd:
            first = points[bad_fd[0]]
            problems.append(
                _NONFINITE_FD.format(dirs=bad_fd, plus=first.plus, minus=first.minus, value=value, step=first.step)
            )
        if zero:
            problems.append(_ZERO_STEP.format(dirs=zero, dtype=str(dtype).removeprefix("torch.")))

    verdict: Verdict
    smallest = min((p.step for p in points if p.step > 0), default=math.inf)
    noise = 100 * machine * max(abs(value), torch.finfo(dtype).tiny) / smallest
    if problems:
        verdict = "failed"
        notes[:0] = problems
    elif grad_norm == 0 and _nanmax(abs(d.finite_diff) for d in dirs) <= noise:
        verdict = "no signal"
        notes.insert(0, _NO_SIGNAL.format(why=why))
    else:
        verdict = "passed" if all(d.error <= tol for d in dirs) else "failed"  # a nan error fails
        if grad_norm == 0:
            notes.insert(0, _CUT.format(why=why))
        elif verdict == "failed":
            worst = max(range(len(dirs)), key=lambda i: dirs[i].error)

            def evaluate(factor: float) -> _Central:
                return _central(fn, spec, leaves, g64, [factor * m for m in all_moves[worst]], no_grad)

            notes.insert(0, _diagnose(evaluate, points[worst], grad_norm, tol, machine * abs(value), dtype))
    return CheckResult(verdict, value, grad_norm, step, tol, dtype, tuple(dirs), tuple(notes), relative_step)
