"""What each feature accepts, in one place, and the generator that combines them.

A ``Config`` is plain data (strings, numbers, tuples), drawn by ``draw(seed)`` from
``random.Random(seed)``, so a seed alone reproduces a case and its ``repr`` says what it is.
``refusals(cfg)`` lists the documented limitations the configuration hits: the only
circumstances in which a nestgrad error is an accepted outcome (each with the sentence of the
docs that promises it). Everything else must equal the oracle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import optim_db

# ----------------------------------------------------------------------------------------- the table
#: model name -> (input shape of one example, whether it has BatchNorm running statistics)
MODELS: dict[str, tuple[tuple[int, ...], bool]] = {
    "mlp": ((3,), False),
    "conv": ((1, 4, 4), False),
    "batchnorm": ((3,), True),
    "tied": ((3,), False),
    "ridge": ((3,), False),  # Linear(3, 1) + an L2 penalty: strongly convex, for Implicit
}

#: the leading sizes of each model's parameters (a per-element lr of that shape is refused with tasks=n)
PARAM_LEADING_SIZES = {"mlp": {4, 1}, "conv": {2, 1}, "batchnorm": {4, 1}, "tied": {4, 1}, "ridge": {1}}

#: optimizer name -> its optim_db entry (flags, stable base hyperparameters, what to differentiate)
OPTIMIZERS = {info.name: info for info in optim_db.OPTIMIZERS}

#: how the learning rate is given. "groups": a second group with its own lr for the first parameter.
LR_FORMS = ("float", "tensor", "per_element", "schedule", "schedule_fn", "groups", "groups_tensor")

#: method name -> what it is exact to (see docs/methods.md, the method docstrings, docs/tasks.md)
#:   exact: equals Unroll (and the hand-written loop) to float precision
#:   truncated: Unroll(truncate=k), exactly the loop with the steps before the last k detached
#:   onestep: FiniteDiff, the loop with only the last step differentiated, to O(eps^2)
#:   implicit: the hypergradient of the exact optimum, on a converged strongly convex problem
#:   estimate: ZerothOrder, noisy: the trained weights are exact, the estimate only finite
METHODS: dict[str, str] = {
    "Unroll": "exact",
    "Unroll(truncate)": "truncated",
    "Reverse": "exact",
    "Reverse(checkpoint_every)": "exact",
    "Reverse(checkpoints)": "exact",
    "Forward": "exact",
    "Implicit(CG)": "implicit",
    "Implicit(FixedPoint)": "implicit",
    "FiniteDiff": "onestep",
    "ZerothOrder": "estimate",
    "SAMA": "estimate",  # approximate: the trained weights are exact, the estimate only finite
}
#: methods that differentiate through the initial weights and a given state (train's docs)
DIFFERENTIATES_PARAMS = ("Unroll", "Unroll(truncate)", "Reverse", "Reverse(checkpoint_every)", "Reverse(checkpoints)")

N, NV = 6, 6  # training examples per batch, validation examples (divisible by 1, 2 and 3 ranks)
IMPLICIT_STEPS = 150  # enough SGD steps for the ridge problem to converge to float precision
RIDGE_MU = 0.5


@dataclass(frozen=True)
class Config:
    seed: int
    model: str
    opt: str
    kwargs: tuple[tuple[str, Any], ...]  # the optimizer's float and flag arguments (optim_db setting)
    lr_form: str
    meta: tuple[str, int | None] | None  # another hyperparameter given as a Tensor requiring grad
    method: str
    method_arg: Any  # truncate, checkpoint_every, FiniteDiff's eps, ...
    steps: int
    segments: tuple[int, ...]  # steps of each train() call; state= carries the optimizer state across
    tasks: int | None
    task_params: str  # "shared" (MAML) or "stacked" (Tasks(params=0))
    world: int  # data-parallel ranks (1: no parallel=)
    init_grad: bool  # also differentiate with respect to the initial weights
    buffers: bool  # BatchNorm: pass the buffers in params (trained and returned)
    compiled: bool = False  # train(compile=...): set by test_fuzz_compiled, never drawn (seeds keep their cases)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def short(self) -> str:
        kw = ",".join(f"{k}={v}" for k, v in self.kwargs)
        return (
            f"seed={self.seed} {self.model} {self.opt}({kw}) lr={self.lr_form} meta={self.meta} "
            f"{self.method}[{self.method_arg}] steps={self.segments} tasks={self.tasks}/{self.task_params} "
            f"world={self.world} init_grad={self.init_grad} buffers={self.buffers} compiled={self.compiled}"
        )


def draw(seed: int, world: int = 1) -> Config:
    """One configuration from ``random.Random(seed)``; ``world`` > 1 draws a data-parallel one."""
    r = random.Random(seed)
    method = r.choice(list(METHODS))
    implicit = METHODS[method] == "implicit"
    model = "ridge" if implicit else r.choice([m for m in MODELS if world == 1 or not MODELS[m][1]])
    if implicit:  # converging SGD on the ridge problem; the optimizer's lr is not meta-learned
        opt, kwargs = "SGD", {"lr": 0.2, **r.choice([{}, {"momentum": 0.5}, {"weight_decay": 0.1}])}
        lr_form, meta = "float", None
    else:
        opt = r.choice(list(OPTIMIZERS))
        info = OPTIMIZERS[opt]
        kwargs = {**info.base, **r.choice(info.settings)}
        lr_form = r.choice(LR_FORMS)
        meta = None
        others = [m for m in info.meta if m != "lr" and not (m == "dampening" and kwargs.get("nesterov"))]
        if others and r.random() < 0.3:
            m = r.choice(others)
            meta = (m, None) if isinstance(m, str) else m
            if meta[0] in info.meta_base and meta[0] not in kwargs:  # a value where its derivative is not degenerate
                kwargs = {**kwargs, meta[0]: info.meta_base[meta[0]]}
    arg: Any = None
    if method == "Unroll(truncate)":
        arg = r.randint(1, 3)
    elif method == "Reverse(checkpoint_every)":
        arg = r.randint(1, 3)
    elif method == "Reverse(checkpoints)":
        arg = r.randint(1, 3)  # binomial checkpointing: with up to 4 steps, c < T - 1 recomputes steps
    elif method == "FiniteDiff":
        arg = r.choice([1e-3, 1e-4])
    elif method == "ZerothOrder":
        arg = r.randint(1, 3)  # samples
    steps = IMPLICIT_STEPS if implicit else r.randint(1, 4)
    segments: tuple[int, ...] = (steps,)
    if steps >= 2 and r.random() < (0.4 if method in DIFFERENTIATES_PARAMS else 0.1):
        cut = r.randint(1, steps - 1)
        segments = (cut, steps - cut)
    tasks = r.choice([2, 3]) if world == 1 and r.random() < 0.3 else None
    return Config(
        seed=seed,
        model=model,
        opt=opt,
        kwargs=tuple(sorted(kwargs.items())),
        lr_form=lr_form,
        meta=meta,
        method=method,
        method_arg=arg,
        steps=steps,
        segments=segments,
        tasks=tasks,
        task_params=r.choice(["shared", "stacked"]) if tasks else "shared",
        world=world,
        init_grad=r.random() < 0.5,
        buffers=MODELS[model][1] and r.random() < 0.7,
    )


# ----------------------------------------------------------------------------------------- refusals
def refusals(cfg: Config) -> list[str]:
    """The documented limitations ``cfg`` runs into: any one of them may raise a nestgrad error."""
    out = []
    if len(cfg.segments) > 1 and cfg.method not in DIFFERENTIATES_PARAMS:
        out.append(
            "train(state=): 'A state that carries a graph (from an earlier segment) is differentiated "
            "through by Unroll and Reverse; the other methods raise instead of dropping that path.'"
        )
    if cfg.tasks and cfg.lr_form == "per_element" and cfg.tasks in PARAM_LEADING_SIZES[cfg.model]:
        out.append(
            "Tasks: 'A value with fewer dimensions than the stacked weight whose leading size is n ... is "
            "ambiguous and raises with the shape to use'"
        )
    if cfg.lr_form.startswith("schedule") and cfg.opt == "Rprop":
        out.append("Rprop reads lr only in init(): a Schedule would have no effect after step 1 (raises)")
    if cfg.tasks and MODELS[cfg.model][1]:
        out.append(
            "docs/buffers.md: 'Many tasks need batch statistics ... a module that writes a shared buffer raises'"
        )
    if cfg.method == "ZerothOrder" and cfg.meta is not None and cfg.meta[0] == "eps":
        out.append(
            "ZerothOrder: 'a re-run at hparams - sigma * direction that leaves the hparams' range raises: lower "
            "sigma' (an eps of 1e-6 is within the fuzzer's sigma=1e-6 of 0)"
        )
    if cfg.method == "SAMA":
        if cfg.opt not in ("Adam", "AdamW"):
            out.append("SAMA: 'Adam and AdamW only; another optimizer raises with the reason'")
        if cfg.lr_form in ("tensor", "per_element", "schedule", "groups_tensor") or cfg.meta is not None:
            out.append("SAMA: 'optimizer hyperparameters that require grad raise: it has no estimate for them'")
        if cfg.world > 1:
            out.append("SAMA: 'parallel= raises'")
    if cfg.method.startswith("Implicit") and dict(cfg.kwargs).get("weight_decay") and cfg.method.endswith("(CG)"):
        out.append("Implicit(CG) with weight_decay in the optimizer: not a zero of the gradient (raises)")
    return out


def init_grad_refused(cfg: Config) -> bool:
    """The methods that do not differentiate the initial weights: asking autograd for it raises (its
    'not used in the graph' error), per docs/methods.md ('asking raises')."""
    return cfg.method not in DIFFERENTIATES_PARAMS
