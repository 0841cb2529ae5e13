"""Per-coordinate adaptive rules: RMSprop, Adagrad, Adadelta and Rprop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._adam import _EPS_ROOT_DOC, _root
from ._base import Hparam, Optimizer, Slots, _pair, _Range
from ._ops import Ops, is_zero


def _prepare(ops: Ops, ps: list[Tensor], gs: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
    if hp["maximize"]:
        gs = ops.neg(gs)
    if not is_zero(hp.get("weight_decay", 0)):
        gs = ops.add(gs, ps, hp["weight_decay"])
    return gs


class RMSprop(Optimizer):
    r"""RMSprop (Hinton, 2012), optionally centered and with momentum.

    ```text
    v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2, \qquad
    \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \ \text{(centered)} \\
    d_t &= \sqrt{v_t - \bar g_t^2 + \epsilon_{root}} + \epsilon \\
    \theta_t &= \theta_{t-1} - \gamma\, b_t, \qquad
    b_t = \mu b_{t-1} + g_t / d_t \ \ (b_t = g_t/d_t \text{ when } \mu = 0)
    ```

    Args:
        lr: learning rate ``\gamma``.
        alpha: smoothing constant ``\alpha``.
        eps: term added to the denominator.
        weight_decay: L2 penalty.
        momentum: momentum factor ``\mu``.
        centered: normalise by the estimated variance instead of the second moment.
        {eps_root}
        maximize, groups, foreach: see ``Optimizer``.

    Matches ``torch.optim.RMSprop`` step for step. Unlike ``torch.optim``, ``alpha`` must
    be at most 1: above 1, ``1-\alpha < 0`` can make ``v_t`` negative and the
    update NaN.
    """

    _ranges: ClassVar[Mapping[str, _Range | tuple[_Range, _Range]]] = {"alpha": _Range(0.0, 1.0, hi_open=False)}

    def __init__(
        self,
        lr: Hparam = 1e-2,
        alpha: Hparam = 0.99,
        eps: Hparam = 1e-8,
        weight_decay: Hparam = 0.0,
        momentum: Hparam = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
        eps_root: Hparam = 1e-30,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        defaults = dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, maximize=maximize, eps_root=eps_root,
        )  # fmt: skip
        super().__init__(defaults, groups, foreach, unknown)

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        slots = {"square_avg": torch.zeros_like(p)}
        if not is_zero(hp["momentum"]):
            slots["momentum_buffer"] = torch.zeros_like(p)
        if hp["centered"]:
            slots["grad_avg"] = torch.zeros_like(p)
        return slots

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        alpha, lr = hp["alpha"], hp["lr"]
        gs = _prepare(ops, ps, gs, hp)
        v = ops.addcmul(ops.mul(slots["square_avg"], alpha), gs, gs, 1 - alpha)
        new = {"square_avg": v}
        if hp["centered"]:
            new["grad_avg"] = ops.lerp(slots["grad_avg"], gs, 1 - alpha)
            v = ops.addcmul(v, new["grad_avg"], new["grad_avg"], -1)
        avg = ops.add_scalar(_root(ops, v, hp["eps_root"]), hp["eps"])
        if is_zero(hp["momentum"]):
            return ops.addcdiv(ps, gs, avg, -lr), new
        new["momentum_buffer"] = ops.addcdiv(ops.mul(slots["momentum_buffer"], hp["momentum"]), gs, avg)
        return ops.add(ps, new["momentum_buffer"], -lr), new


class Adagrad(Optimizer):
    r"""Adagrad (Duchi et al., 2011).

    ```text
    s_t &= s_{t-1} + g_t^2, \qquad
    \theta_t = \theta_{t-1} - \frac{\gamma}{1 + (t-1)\,\delta}\,
        \frac{g_t}{\sqrt{s_t + \epsilon_{root}} + \epsilon}
    ```

    Args:
        lr: learning rate ``\gamma``.
        lr_decay: learning-rate decay ``\delta``.
        weight_decay: L2 penalty.
        initial_accumulator_value: starting value of ``s_0``.
        eps: term added to the denominator.
        {eps_root}
        maximize, groups, foreach: see ``Optimizer``.

    Matches ``torch.optim.Adagrad`` step for step (dense gradients).
    """

    _init_only: ClassVar[tuple[str, ...]] = ("initial_accumulator_value",)

    def __init__(
        self,
        lr: Hparam = 1e-2,
        lr_decay: Hparam = 0.0,
        weight_decay: Hparam = 0.0,
        initial_accumulator_value: Hparam = 0.0,
        eps: Hparam = 1e-10,
        *,
        maximize: bool = False,
        eps_root: Hparam = 1e-30,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        defaults = dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
            eps_root=eps_root,
        )  # fmt: skip
        super().__init__(defaults, groups, foreach, unknown)

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        return {"sum": torch.zeros_like(p) + hp["initial_accumulator_value"]}

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        gs = _prepare(ops, ps, gs, hp)
        clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
        s = ops.addcmul(slots["sum"], gs, gs, 1)
        std = ops.add_scalar(_root(ops, s, hp["eps_root"]), hp["eps"])
        return ops.addcdiv(ps, gs, std, -clr), {"sum": s}


class Adadelta(Optimizer):
    r"""Adadelta (Zeiler, 2012).

    ```text
    v_t &= \rho v_{t-1} + (1-\rho) g_t^2, \qquad
    \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
    u_t &= \rho u_{t-1} + (1-\rho) \Delta_t^2, \qquad
    \theta_t = \theta_{t-1} - \gamma \Delta_t
    ```

    Args:
        lr: coefficient ``\gamma`` that scales ``\Delta_t``.
        rho: decay ``\rho`` of the running averages.
        eps: term added inside both square roots (so meta-gradients stay finite).
        weight_decay: L2 penalty.
        maximize, groups, foreach: see ``Optimizer``.

    Matches ``torch.optim.Adadelta``.
    """

    def __init__(
        self,
        lr: Hparam = 1.0,
        rho: Hparam = 0.9,
        eps: Hparam = 1e-6,
        weight_decay: Hparam = 0.0,
        *,
        maximize: bool = False,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(defaults, groups, foreach, unknown)

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        return {"square_avg": torch.zeros_like(p), "acc_delta": torch.zeros_like(p)}

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        rho, eps = hp["rho"], hp["eps"]
        gs = _prepare(ops, ps, gs, hp)
        v = ops.addcmul(ops.mul(slots["square_avg"], rho), gs, gs, 1 - rho)
        std = ops.sqrt(ops.add_scalar(v, eps))
        delta = ops.mul(ops.div(ops.sqrt(ops.add_scalar(slots["acc_delta"], eps)), std), gs)
        u = ops.addcmul(ops.mul(slots["acc_delta"], rho), delta, delta, 1 - rho)
        return ops.add(ps, delta, -hp["lr"]), {"square_avg": v, "acc_delta": u}


class Rprop(Optimizer):
    r"""Resilient backpropagation (Riedmiller and Braun, 1993).

    Each coordinate keeps its own step size ``s``, which grows by
    ``\eta_+`` while the gradient keeps its sign and shrinks by
    ``\eta_-`` when it flips (and that coordinate then skips one update):

    ```text
    s_t &= \operatorname{clip}(s_{t-1} \cdot
        \eta(\operatorname{sign}(g_t\, g_{t-1})), s_{\min}, s_{\max}) \\
    \theta_t &= \theta_{t-1} - \operatorname{sign}(g_t)\, s_t
    ```

    Args:
        lr: initial step size ``s_0``.
        etas: ``(\eta_-, \eta_+)``.
        step_sizes: ``(s_{\min}, s_{\max})``.
        maximize, groups, foreach: see ``Optimizer``.

    Matches ``torch.optim.Rprop``. Gradients reach ``lr``, ``etas`` and
    ``step_sizes`` through the step sizes; the sign of the gradient has none.
    ``lr`` only sets the initial step sizes (in ``init``), so it cannot be a Schedule.
    """

    _init_only: ClassVar[tuple[str, ...]] = ("lr",)

    def __init__(
        self,
        lr: Hparam = 1e-2,
        etas: tuple[Hparam, Hparam] = (0.5, 1.2),
        step_sizes: tuple[Hparam, Hparam] = (1e-6, 50.0),
        *,
        maximize: bool = False,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        defaults = dict(lr=lr, etas=_pair(etas), step_sizes=_pair(step_sizes), maximize=maximize)
        super().__init__(defaults, groups, foreach, unknown)

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        return {"prev": torch.zeros_like(p), "step_size": torch.zeros_like(p) + hp["lr"]}

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        eta_minus, eta_plus = hp["etas"]
        lo, hi = hp["step_sizes"]
        gs = _prepare(ops, ps, gs, hp)
        signs = ops.sign(ops.mul(gs, slots["prev"]))
        # In the weights' dtype: torch.where of two Python numbers would give the default dtype (float32).
        factors = [torch.where(s > 0, eta_plus, torch.where(s < 0, eta_minus, torch.ones_like(s))) for s in signs]
        sizes = [torch.clamp(s * f, lo, hi) for s, f in zip(slots["step_size"], factors, strict=True)]
        gs = [torch.where(f == eta_minus, 0.0, g) for g, f in zip(gs, factors, strict=True)]
        ps = ops.addcmul(ps, ops.sign(gs), sizes, -1)
        return ps, {"prev": gs, "step_size": sizes}


for _cls in (RMSprop, Adagrad):
    _cls.__doc__ = (_cls.__doc__ or "").replace("{eps_root}", _EPS_ROOT_DOC)
