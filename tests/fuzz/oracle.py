"""The fuzzer's oracle: float64 references written without nestgrad.

* ``update``: each optimizer's step, hand-written out of place from ``torch.optim``'s formulas
  (one parameter at a time), so that autograd differentiates it with respect to the weights,
  the state and every Tensor hyperparameter. ``test_fuzz.py::test_oracle_matches_torch_optim``
  checks it against ``torch.optim`` itself on every setting of ``tests/optim_db.py``.
* ``reference``: the training run as a plain Python loop of ``torch.func.functional_call`` +
  ``torch.autograd.grad(create_graph=True)`` + ``update``, detaching where a method documents
  that it stops differentiating (``Unroll(truncate=k)``, ``FiniteDiff``'s last step).
* ``ridge_optimum``: the closed-form minimiser of the ridge problem, for ``Implicit``.

``eps_root`` (nestgrad's term inside the square roots, default 1e-30) is left out: in float64 it
changes no value or derivative by more than 1e-30 relative unless a second moment is exactly 0,
which the drawn problems (tanh units, dense data) never produce.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call


# ---------------------------------------------------------------------------------------- optimizers
def init(opt: str, p: Tensor, hp: dict[str, Any]) -> dict[str, Tensor]:
    """The state slots of one parameter, as ``torch.optim`` creates them on the first step."""
    z = torch.zeros_like(p)
    if opt == "SGD":
        return {} if _zero(hp.get("momentum", 0.0)) else {"momentum_buffer": z}
    if opt in ("Adam", "AdamW"):
        slots = {"exp_avg": z, "exp_avg_sq": z}
        if hp.get("amsgrad", False):
            slots["max_exp_avg_sq"] = z
        return slots
    if opt == "Adamax":
        return {"exp_avg": z, "exp_inf": z}
    if opt == "NAdam":
        return {"exp_avg": z, "exp_avg_sq": z, "mu_product": torch.ones((), dtype=p.dtype)}
    if opt == "RAdam":
        return {"exp_avg": z, "exp_avg_sq": z}
    if opt == "RMSprop":
        slots = {"square_avg": z}
        if not _zero(hp.get("momentum", 0.0)):
            slots["momentum_buffer"] = z
        if hp.get("centered", False):
            slots["grad_avg"] = z
        return slots
    if opt == "Adagrad":
        return {"sum": z + hp.get("initial_accumulator_value", 0.0)}
    if opt == "Adadelta":
        return {"square_avg": z, "acc_delta": z}
    if opt == "Rprop":
        return {"prev": z, "step_size": z + hp["lr"]}
    if opt == "ASGD":
        return {"ax": z}
    raise KeyError(opt)


def _zero(x: Any) -> bool:
    return not isinstance(x, Tensor) and x == 0


def update(opt: str, t: int, p: Tensor, g: Tensor, s: dict[str, Tensor], hp: dict[str, Any]) -> tuple[Tensor, dict]:
    """Step ``t`` (counting from 1) of optimizer ``opt`` on one parameter, out of place."""
    lr, wd = hp["lr"], hp.get("weight_decay", 0.0)
    if hp.get("maximize", False):
        g = -g
    if opt == "SGD":
        g = g + wd * p
        mom, damp = hp.get("momentum", 0.0), hp.get("dampening", 0.0)
        if "momentum_buffer" in s:
            buf = g if t == 1 else mom * s["momentum_buffer"] + (1 - damp) * g
            g = g + mom * buf if hp.get("nesterov", False) else buf
            s = {"momentum_buffer": buf}
        return p - lr * g, s
    if opt in ("Adam", "AdamW", "NAdam", "RAdam"):
        b1, b2 = hp["betas"]
        eps = hp.get("eps", 1e-8)
        if hp.get("decoupled_weight_decay", opt == "AdamW"):
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = s["exp_avg"] + (g - s["exp_avg"]) * (1 - b1)
        v = b2 * s["exp_avg_sq"] + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if opt in ("Adam", "AdamW"):
            new = {"exp_avg": m, "exp_avg_sq": v}
            if "max_exp_avg_sq" in s:
                v = torch.maximum(s["max_exp_avg_sq"], v)
                new["max_exp_avg_sq"] = v
            denom = v.sqrt() / _sqrt(bc2) + eps
            return p - lr / bc1 * m / denom, new
        if opt == "NAdam":
            psi = hp.get("momentum_decay", 4e-3)
            mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
            mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
            prod = s["mu_product"] * mu
            denom = (v / bc2).sqrt() + eps
            p = p - lr * (1 - mu) / (1 - prod) * g / denom
            p = p - lr * mu_next / (1 - prod * mu_next) * m / denom
            return p, {"exp_avg": m, "exp_avg_sq": v, "mu_product": prod}
        # RAdam: rho_t depends on the step and beta2 only; its branch is taken on its value
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / bc2
        new = {"exp_avg": m, "exp_avg_sq": v}
        if float(torch.as_tensor(rho_t).detach()) > 5:
            rect = _sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            return p - m / bc1 * lr * rect * _sqrt(bc2) / (v.sqrt() + eps), new
        return p - m / bc1 * lr, new
    if opt == "Adamax":
        b1, b2 = hp["betas"]
        g = g + wd * p
        m = s["exp_avg"] + (g - s["exp_avg"]) * (1 - b1)
        u = torch.maximum(b2 * s["exp_inf"], g.abs() + hp.get("eps", 1e-8))
        return p - lr / (1 - b1**t) * m / u, {"exp_avg": m, "exp_inf": u}
    if opt == "RMSprop":
        alpha, eps, mom = hp.get("alpha", 0.99), hp.get("eps", 1e-8), hp.get("momentum", 0.0)
        g = g + wd * p
        v = alpha * s["square_avg"] + (1 - alpha) * g * g
        new = {"square_avg": v}
        if "grad_avg" in s:
            ga = s["grad_avg"] + (g - s["grad_avg"]) * (1 - alpha)
            new["grad_avg"] = ga
            avg = (v - ga * ga).sqrt() + eps
        else:
            avg = v.sqrt() + eps
        if "momentum_buffer" in s:
            buf = mom * s["momentum_buffer"] + g / avg
            new["momentum_buffer"] = buf
            return p - lr * buf, new
        return p - lr * g / avg, new
    if opt == "Adagrad":
        g = g + wd * p
        clr = lr / (1 + (t - 1) * hp.get("lr_decay", 0.0))
        acc = s["sum"] + g * g
        return p - clr * g / (acc.sqrt() + hp.get("eps", 1e-10)), {"sum": acc}
    if opt == "Adadelta":
        rho, eps = hp.get("rho", 0.9), hp.get("eps", 1e-6)
        g = g + wd * p
        v = rho * s["square_avg"] + (1 - rho) * g * g
        delta = (s["acc_delta"] + eps).sqrt() / (v + eps).sqrt() * g
        acc = rho * s["acc_delta"] + (1 - rho) * delta * delta
        return p - lr * delta, {"square_avg": v, "acc_delta": acc}
    if opt == "Rprop":
        eta_minus, eta_plus = hp.get("etas", (0.5, 1.2))
        lo, hi = hp.get("step_sizes", (1e-6, 50.0))
        prod = g * s["prev"]
        one = torch.ones_like(p)
        factor = torch.where(prod > 0, eta_plus * one, torch.where(prod < 0, eta_minus * one, one))
        size = torch.clamp(s["step_size"] * factor, lo, hi)
        g = torch.where(prod < 0, torch.zeros_like(g), g)
        return p - g.sign() * size, {"prev": g, "step_size": size}
    if opt == "ASGD":
        # torch.optim keeps eta and mu as state; nestgrad computes them from lr and the step (so a
        # method that holds the state fixed still differentiates the last step's eta w.r.t. lr). The
        # values are torch's: eta_{t-1} = lr / (1 + lambd lr (t-1))^alpha, mu_{t-1} = 1 / max(1, t-1-t0).
        lambd, alpha, t0 = hp.get("lambd", 1e-4), hp.get("alpha", 0.75), hp.get("t0", 1e6)
        g = g + wd * p
        eta = lr / (1 + lambd * lr * (t - 1)) ** alpha
        mu = 1 / max(1, t - 1 - t0)
        p = p * (1 - lambd * eta) - eta * g
        return p, {"ax": s["ax"] + (p - s["ax"]) * mu}
    raise KeyError(opt)


def _sqrt(x: Any) -> Any:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


# ----------------------------------------------------------------------------------------- the run
HparamsAt = Callable[[str, int], dict[str, Any]]  # (param name, step from 1) -> that step's hyperparameters


def reference(
    module: torch.nn.Module,
    loss: Callable[[Tensor, Tensor, Any, Tensor, dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    opt: str,
    hparams_at: HparamsAt,
    batches: list[Any],
    a: Tensor,
    cut: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Train ``params`` for ``len(batches)`` steps; return the trained weights and buffers.

    ``loss(out, y, a, x, p)`` is the training loss of the module's output. Before each step in
    ``cut``, the weights and state are detached (and made leaves that require grad again): the
    steps before it are constants, as ``Unroll(truncate=...)`` documents. Buffers are cloned and
    advance in place, as ``module`` does in train mode.
    """
    names = list(params)
    state = {k: init(opt, params[k], hparams_at(k, 1)) for k in names}
    buffers = {k: v.clone() for k, v in buffers.items()}
    p = dict(params)
    for t, (x, y) in enumerate(batches):
        if t in cut:
            p = {k: v.detach().requires_grad_() for k, v in p.items()}
            state = {k: {n: z.detach() for n, z in s.items()} for k, s in state.items()}
        out = functional_call(module, {**p, **buffers}, (x,))
        value = loss(out, y, a, x, p)
        grads = torch.autograd.grad(value, [p[k] for k in names], create_graph=True)
        for k, g in zip(names, grads, strict=True):
            p[k], state[k] = update(opt, t + 1, p[k], g, state[k], hparams_at(k, t + 1))
    return p, buffers


def ridge_optimum(x: Tensor, y: Tensor, a: Tensor, mu: float) -> dict[str, Tensor]:
    """argmin of mean_i a_i (x_i w + b - y_i)^2 + mu (|w|^2 + b^2), for a ``Linear(D, 1)``: differentiable in a."""
    n, d = x.shape
    z = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    lhs = z.T @ (a[:, None] * z) / n + mu * torch.eye(d + 1, dtype=x.dtype)
    theta = torch.linalg.solve(lhs, z.T @ (a * y.squeeze(-1)) / n)
    return {"weight": theta[:d].unsqueeze(0), "bias": theta[d:]}
