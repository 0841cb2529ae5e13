"""The Adam family: Adam, AdamW, Adamax, NAdam and RAdam."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import Hparam, Optimizer, Slots, _pair
from ._ops import Ops, is_zero

_EPS_ROOT_DOC = r"""eps_root: added to the second moment *inside* the square root,
            ``\sqrt{\hat v + \epsilon_{root}} + \epsilon``. Where a gradient entry has
            been exactly 0 at every step so far (an unused embedding row, a blank pixel),
            ``\hat v = 0`` and the derivative of ``\sqrt{\hat v}`` is infinite, so
            with ``eps_root=0`` meta-gradients through the optimizer are NaN. The default
            1e-30 keeps them finite and exact while leaving every real ``\hat v``, and so
            the trajectory, unchanged to float precision (the tests match ``torch.optim`` to
            1e-10 with it); ``eps_root=0`` is ``torch.optim``'s formula exactly. A large value
            such as 1e-16 visibly biases meta-gradients where ``\hat v`` is small. Same
            meaning as in optax."""


def _decay(ops: Ops, ps: list[Tensor], gs: list[Tensor], hp: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """Maximize and (coupled or decoupled) weight decay, shared by the family."""
    if hp["maximize"]:
        gs = ops.neg(gs)
    wd = hp["weight_decay"]
    if not is_zero(wd):
        if hp.get("decoupled_weight_decay", False):
            ps = ops.mul(ps, 1 - hp["lr"] * wd)
        else:
            gs = ops.add(gs, ps, wd)
    return ps, gs


def _root(ops: Ops, vs: list[Tensor], eps_root: Hparam) -> list[Tensor]:
    return ops.sqrt(vs if is_zero(eps_root) else ops.add_scalar(vs, eps_root))


def _moments(
    ops: Ops, gs: list[Tensor], slots: Slots, beta1: Hparam, beta2: Hparam
) -> tuple[list[Tensor], list[Tensor]]:
    m = ops.lerp(slots["exp_avg"], gs, 1 - beta1)
    v = ops.addcmul(ops.mul(slots["exp_avg_sq"], beta2), gs, gs, 1 - beta2)
    return m, v


class Adam(Optimizer):
    r"""Adam (Kingma and Ba, 2015), with optional AMSGrad and decoupled weight decay.

    ```text
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{(v_t + \epsilon_{root})/(1-\beta_2^t)} + \epsilon}
    ```

    With ``amsgrad=True``, ``v_t`` in the denominator is replaced by its running
    maximum. With ``decoupled_weight_decay=True`` (AdamW), the weights are first
    multiplied by ``1-\gamma\lambda``; otherwise ``\lambda\theta`` is added to
    the gradient.

    Args:
        lr: learning rate ``\gamma``.
        betas: ``(\beta_1, \beta_2)``, each a float or a Tensor.
        eps: term added to the denominator.
        weight_decay: ``\lambda``.
        amsgrad: use the AMSGrad variant.
        decoupled_weight_decay: AdamW-style weight decay.
        {eps_root}
        maximize, groups, foreach: see ``Optimizer``.

    Examples:
        >>> lr = torch.tensor(1e-3, requires_grad=True)  # a meta-learned learning rate
        >>> opt = Adam(lr=lr, betas=(0.9, 0.999))  # the default eps_root=1e-30 keeps meta-gradients finite

    Matches ``torch.optim.Adam`` step for step.
    """

    def __init__(
        self,
        lr: Hparam = 1e-3,
        betas: tuple[Hparam, Hparam] = (0.9, 0.999),
        eps: Hparam = 1e-8,
        weight_decay: Hparam = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        eps_root: Hparam = 1e-30,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        defaults = dict(
            lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, eps_root=eps_root,
        )  # fmt: skip
        super().__init__(defaults, groups, foreach, unknown)

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        slots = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if hp["amsgrad"]:
            slots["max_exp_avg_sq"] = torch.zeros_like(p)
        return slots

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        beta1, beta2 = hp["betas"]
        ps, gs = _decay(ops, ps, gs, hp)
        m, v = _moments(ops, gs, slots, beta1, beta2)
        new = {"exp_avg": m, "exp_avg_sq": v}
        step_size = hp["lr"] / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if hp["amsgrad"]:
            v = new["max_exp_avg_sq"] = ops.maximum(slots["max_exp_avg_sq"], v)
        denom = ops.add_scalar(ops.div(_root(ops, v, hp["eps_root"]), bias_correction2_sqrt), hp["eps"])
        return ops.addcdiv(ps, m, denom, -step_size), new


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov and Hutter, 2019).

    ``AdamW(...)`` is ``Adam(..., decoupled_weight_decay=True)`` with the default
    ``weight_decay=1e-2``, as in ``torch.optim.AdamW``. See ``Adam``.
    """

    def __init__(
        self,
        lr: Hparam = 1e-3,
        betas: tuple[Hparam, Hparam] = (0.9, 0.999),
        eps: Hparam = 1e-8,
        weight_decay: Hparam = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        eps_root: Hparam = 1e-30,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__(
            lr, betas, eps, weight_decay, amsgrad, maximize=maximize, decoupled_weight_decay=True,
            eps_root=eps_root, groups=groups, foreach=foreach, **unknown,
        )  # fmt: skip


class Adamax(Optimizer):
    r"""Adamax, the infinity-norm variant of Adam (Kingma and Ba, 2015).

    ```text
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \\
    \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{u_t}
    ```

    Args:
        lr, betas, eps, weight_decay: as in ``Adam``.
        maximize, groups, foreach: see ``Optimizer``.

    Matches ``torch.optim.Adamax``.
    """

    def __init__(
        self,
        lr: Hparam = 2e-3,
        betas: tuple[Hparam, Hparam] = (0.9, 0.999),
        eps: Hparam = 1e-8,
        weight_decay: Hparam = 0.0,
        *,
        maximize: bool = False,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        defaults = dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(defaults, groups, foreach, unknown)

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        return {"exp_avg": torch.zeros_like(p), "exp_inf": torch.zeros_like(p)}

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        beta1, beta2 = hp["betas"]
        ps, gs = _decay(ops, ps, gs, hp)
        m = ops.lerp(slots["exp_avg"], gs, 1 - beta1)
        u = ops.maximum(ops.mul(slots["exp_inf"], beta2), ops.add_scalar(ops.abs(gs), hp["eps"]))
        clr = hp["lr"] / (1 - beta1**step)
        return ops.addcdiv(ps, m, u, -clr), {"exp_avg": m, "exp_inf": u}


class NAdam(Optimizer):
    r"""Adam with Nesterov momentum (Dozat, 2016), with momentum decay.

    ```text
    \mu_t &= \beta_1\,(1 - \tfrac12\, 0.96^{t\,\psi}), \qquad
    \Pi_t = \textstyle\prod_{i \le t} \mu_i \\
    \theta_t &= \theta_{t-1}
        - \gamma\,\frac{1-\mu_t}{1-\Pi_t}\,\frac{g_t}{d_t}
        - \gamma\,\frac{\mu_{t+1}}{1-\Pi_{t+1}}\,\frac{m_t}{d_t},
        \qquad d_t = \sqrt{\frac{v_t + \epsilon_{root}}{1-\beta_2^t}} + \epsilon
    ```

    Args:
        lr, betas, eps, weight_decay, decoupled_weight_decay: as in ``Adam``.
        momentum_decay: ``\psi``.
        {eps_root}
        maximize, groups, foreach: see ``Optimizer``.

    Matches ``torch.optim.NAdam``. The running product ``\Pi_t`` is the state
    slot ``"mu_product"``.
    """

    def __init__(
        self,
        lr: Hparam = 2e-3,
        betas: tuple[Hparam, Hparam] = (0.9, 0.999),
        eps: Hparam = 1e-8,
        weight_decay: Hparam = 0.0,
        momentum_decay: Hparam = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        eps_root: Hparam = 1e-30,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        defaults = dict(
            lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, eps_root=eps_root,
        )  # fmt: skip
        super().__init__(defaults, groups, foreach, unknown)

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        # One running product per parameter, or per element where beta1 or momentum_decay is.
        sources = (hp["betas"][0], hp["momentum_decay"])
        shape = torch.broadcast_shapes(*(x.shape for x in sources if isinstance(x, Tensor)))
        return {
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
            "mu_product": torch.ones(shape, dtype=p.dtype, device=p.device),
        }

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        beta1, beta2 = hp["betas"]
        lr, psi = hp["lr"], hp["momentum_decay"]
        ps, gs = _decay(ops, ps, gs, hp)
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
        mu_product = slots["mu_product"][0] * mu
        m, v = _moments(ops, gs, slots, beta1, beta2)
        denom = ops.add_scalar(_root(ops, ops.div(v, 1 - beta2**step), hp["eps_root"]), hp["eps"])
        ps = ops.addcdiv(ps, gs, denom, -lr * (1.0 - mu) / (1.0 - mu_product))
        ps = ops.addcdiv(ps, m, denom, (-lr * mu_next) / (1.0 - mu_product * mu_next))
        return ps, {"exp_avg": m, "exp_avg_sq": v, "mu_product": [mu_product] * len(ps)}


class RAdam(Optimizer):
    r"""Rectified Adam (Liu et al., 2020).

    ```text
    \rho_\infty &= \frac{2}{1-\beta_2} - 1, \qquad
    \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1-\beta_2^t} \\
    \theta_t &= \theta_{t-1} - \gamma\,\frac{m_t}{1-\beta_1^t}\cdot
    \begin{cases}
        r_t \sqrt{1-\beta_2^t} / (\sqrt{v_t + \epsilon_{root}} + \epsilon) & \rho_t > 5 \\
        1 & \text{otherwise}
    \end{cases}
    ```

    where ``r_t = \sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}``.

    Args:
        lr, betas, eps, weight_decay, decoupled_weight_decay: as in ``Adam``.
        {eps_root}
        maximize, groups, foreach: see ``Optimizer``.

    Matches ``torch.optim.RAdam``. The branch on ``\rho_t`` reads its value,
    which carries no gradient, so a Tensor ``beta2`` still receives one.
    """

    def __init__(
        self,
        lr: Hparam = 1e-3,
        betas: tuple[Hparam, Hparam] = (0.9, 0.999),
        eps: Hparam = 1e-8,
        weight_decay: Hparam = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        eps_root: Hparam = 1e-30,
        groups: Sequence[Mapping[str, Any]] | None = None,
        foreach: bool | None = None,
        **unknown: Any,
    ) -> None:
        defaults = dict(
            lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, eps_root=eps_root,
        )  # fmt: skip
        super().__init__(defaults, groups, foreach, unknown)

    def _init(self, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def _step(
        self, ops: Ops, step: int, ps: list[Tensor], gs: list[Tensor], slots: Slots, hp: dict[str, Any]
    ) -> tuple[list[Tensor], Slots]:
        beta1, beta2 = hp["betas"]
        ps, gs = _decay(ops, ps, gs, hp)
        m, v = _moments(ops, gs, slots, beta1, beta2)
        bias_correction2 = 1 - beta2**step
        update = ops.mul(ops.div(m, 1 - beta1**step), hp["lr"])
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        if isinstance(rho_t, Tensor) and rho_t.numel() > 1:  # per-element beta2: the branch per element
            return ops.sub(ps, _rectify_per_element(ops, update, v, rho_t, rho_inf, bias_correction2, hp)), {
                "exp_avg": m,
                "exp_avg_sq": v,
            }
        if bool(rho_t > 5.0):  # a branch on a value; no gradient flows through the test
            adaptive = ops.add_scalar(_root(ops, v, hp["eps_root"]), hp["eps"])
            update = ops.div(ops.mul(update, bias_correction2**0.5), adaptive)
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            update = ops.mul(update, rect)
        return ops.sub(ps, update), {"exp_avg": m, "exp_avg_sq": v}


def _rectify_per_element(
    ops: Ops, update: list[Tensor], v: list[Tensor], rho_t: Tensor, rho_inf: Tensor, bc2: Tensor, hp: dict[str, Any]
) -> list[Tensor]:
    """RAdam's rectification where rho_t > 5, element by element. The branch not taken is computed
    at rho = 6 so that neither it nor its (discarded) gradient is NaN."""
    on = rho_t > 5.0
    rho_t, rho_inf = torch.where(on, rho_t, 6.0), torch.where(on, rho_inf, 6.0)
    adaptive = ops.add_scalar(_root(ops, v, hp["eps_root"]), hp["eps"])
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    rectified = ops.mul(ops.div(ops.mul(update, bc2**0.5), adaptive), rect)
    return [torch.where(on, r, u) for r, u in zip(rectified, update, strict=True)]


for _cls in (Adam, NAdam, RAdam):
    _cls.__doc__ = (_cls.__doc__ or "").replace("{eps_root}", _EPS_ROOT_DOC)
