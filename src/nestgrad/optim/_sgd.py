"""SGD with momentum, and averaged SGD."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._base import Hparam, Optimizer, Slots
from ._ops import Ops, Unfused, is_zero


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum and Nesterov momentum.

    ```text
    g_t &= \nabla f(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
    b_t &= g_1 \text{ if } t = 1 \text{ else } \mu\, b_{t-1} + (1-\tau)\, g_t \\
    \theta_t &= \theta_{t-1} - \gamma\,(g_t + \mu\, b_t \text{ if nesterov else } b_t)
    ```

    Args:
        lr: learning rate ``\gamma``.
        momentum: momentum factor ``\mu`` (0 disables momentum and its buffer).
        dampening: dampening ``\tau`` for momentum.
        weight_decay: L2 penalty ``\lambda``.
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: ascend instead of descend.
        unfused_add: compute each scaled sum ``x + a\,y`` as a product then a sum (two
            roundings), as hand-written updates such as ``p - lr * g`` and the ``higher``
            library do, instead of ``torch.add(x, y, alpha=a)``, which ``torch.optim.SGD``
            uses and which CPUs with FMA round once. The math is the same; the results differ
            in the last bit, which only matters for bit-for-bit comparisons with such code.
        groups, foreach: see ``Optimizer``.

    Examples:
        >>> opt = SGD(lr=torch.tensor(0.1, requires_grad=True), momentum=0.9)
        >>> state = opt.init(params)
        >>> params, state = opt.update(grads, state, params)

    Matches ``torch.optim.SGD`` with the same arguments, step for step. Unlike
    ``torch.optim``, the first momentum buffer is not detached from the graph.
    """

    def __init__(
        self,
        lr: Hparam = 1e-3,
        momentum: Hparam = 0.0,
        dampening: Hparam = 0.0,
        weight_decay: Hparam = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        unfused_add: bool = False,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        if not isinstance(unfused_add, bool):
            raise TypeError(
                f"SGD: unfused_add must be True or False; got {type(unfused_add).__name__} {unfused_add!r}."
            )
        self.unfused_add = unfused_add
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize,
        )  # fmt: skip
        super().__init__(defaults, groups, foreach, unknown)
        self._check_after_load(self.defaults, self.groups, "SGD")

    def _check_after_load(self, defaults: Mapping[str, Any], groups: Sequence[Mapping[str, Any]], where: str) -> None:
        for hp in [defaults, *groups]:
            hp = {**defaults, **hp}
            if hp["nesterov"] and (is_zero(hp["momentum"]) or not is_zero(hp["dampening"])):
                loaded = " in the state_dict; nothing was loaded" if where != "SGD" else ""
                raise ValueError(f"{where}: nesterov=True needs momentum > 0 and dampening == 0{loaded}.")

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        return {} if is_zero(hp["momentum"]) else {"momentum_buffer": torch.zeros_like(p)}

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        momentum = hp["momentum"]
        if self.unfused_add:
            ops = Unfused(ops)  # type: ignore[assignment]
        if hp["maximize"]:
            gs = ops.neg(gs)
        if not is_zero(hp["weight_decay"]):
            gs = ops.add(gs, ps, hp["weight_decay"])
        if not is_zero(momentum):
            if step == 1:
                buf = gs
            else:
                buf = ops.add(ops.mul(slots["momentum_buffer"], momentum), gs, 1 - hp["dampening"])
            slots = {"momentum_buffer": buf}
            gs = ops.add(gs, buf, momentum) if hp["nesterov"] else buf
        return ops.add(ps, gs, -hp["lr"]), slots


class ASGD(Optimizer):
    r"""Averaged stochastic gradient descent (Polyak and Juditsky, 1992).

    ```text
    \eta_t &= \gamma / (1 + \lambda_d\,\gamma\,(t-1))^{\alpha} \\
    \theta_t &= \theta_{t-1}\,(1 - \lambda_d\,\eta_t) - \eta_t\, g_t \\
    \bar\theta_t &= \bar\theta_{t-1} + \mu_t\,(\theta_t - \bar\theta_{t-1}),
        \quad \mu_t = 1/\max(1, t - 1 - t_0)
    ```

    The average ``\bar\theta`` is kept in the state slot ``"ax"``.

    Args:
        lr: learning rate ``\gamma``.
        lambd: decay term ``\lambda_d``.
        alpha: power ``\alpha`` for the step-size schedule.
        t0: step at which averaging starts.
        weight_decay: L2 penalty.
        maximize, groups, foreach: see ``Optimizer``.

    Matches ``torch.optim.ASGD``, whose ``eta`` and ``mu`` state are recomputed here
    from the step count rather than stored. ``t0`` is a step count: one value, never
    per element.
    """

    _scalar_only: ClassVar[tuple[str, ...]] = ("t0",)

    def __init__(
        self,
        lr: Hparam = 1e-2,
        lambd: Hparam = 1e-4,
        alpha: Hparam = 0.75,
        t0: float = 1e6,
        weight_decay: Hparam = 0.0,
        *,
        maximize: bool = False,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        defaults = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, maximize=maximize)
        super().__init__(defaults, groups, foreach, unknown)

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        return {"ax": torch.zeros_like(p)}

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        lr, lambd = hp["lr"], hp["lambd"]
        if hp["maximize"]:
            gs = ops.neg(gs)
        if not is_zero(hp["weight_decay"]):
            gs = ops.add(gs, ps, hp["weight_decay"])
        eta = lr / ((1 + lambd * lr * (step - 1)) ** hp["alpha"])
        mu = 1 / max(1, step - 1 - hp["t0"])
        ps = ops.add(ops.mul(ps, 1 - lambd * eta), gs, -eta)
        ax = slots["ax"]
        ax = ps if mu == 1 else ops.add(ax, ops.mul(ops.sub(ps, ax), mu))
        return ps, {"ax": ax}
