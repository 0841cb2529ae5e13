"""One table of optimizers and flag settings drives every optimizer test (like torch's OptimizerInfo)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import nestgrad as ng


@dataclass(frozen=True)
class OptimInfo:
    """An optimizer, the flag settings to test, and the hyperparameters to differentiate."""

    ours: type[ng.optim.Optimizer]
    torch_cls: type[torch.optim.Optimizer]
    base: dict[str, Any]  # arguments used in every setting (a learning rate that trains stably)
    settings: list[dict[str, Any]]  # flag grid on top of `base`
    meta: list[str | tuple[str, int]] = field(default_factory=list)  # hparams to take meta-gradients of
    meta_base: dict[str, Any] = field(default_factory=dict)  # extra arguments for the meta-gradient test

    @property
    def name(self) -> str:
        return self.ours.__name__


OPTIMIZERS = [
    OptimInfo(
        ng.optim.SGD,
        torch.optim.SGD,
        {"lr": 0.05},
        [
            {},
            {"momentum": 0.9},
            {"momentum": 0.9, "dampening": 0.2},
            {"momentum": 0.9, "nesterov": True},
            {"weight_decay": 0.05, "momentum": 0.5},
            {"maximize": True, "lr": 0.005},
        ],
        meta=["lr", "momentum", "weight_decay", "dampening"],
        meta_base={"momentum": 0.8, "weight_decay": 0.01, "dampening": 0.1},
    ),
    OptimInfo(
        ng.optim.Adam,
        torch.optim.Adam,
        {"lr": 0.01},
        [
            {},
            {"amsgrad": True},
            {"weight_decay": 0.1},
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
            {"betas": (0.8, 0.99), "eps": 1e-6},
            {"maximize": True, "lr": 0.001},
        ],
        meta=["lr", ("betas", 0), ("betas", 1), "weight_decay", "eps"],
        meta_base={"weight_decay": 0.05, "eps": 1e-3},
    ),
    OptimInfo(
        ng.optim.AdamW,
        torch.optim.AdamW,
        {"lr": 0.01},
        [{}, {"amsgrad": True}, {"weight_decay": 0.2, "betas": (0.85, 0.95)}],
        meta=["lr", "weight_decay", ("betas", 1)],
    ),
    OptimInfo(
        ng.optim.RMSprop,
        torch.optim.RMSprop,
        {"lr": 0.002},
        [
            {},
            {"centered": True},
            {"momentum": 0.8},
            {"centered": True, "momentum": 0.5, "weight_decay": 0.1},
            {"alpha": 0.9, "maximize": True, "lr": 0.0005},
        ],
        meta=["lr", "alpha", "momentum", "weight_decay"],
        meta_base={"momentum": 0.5, "weight_decay": 0.05, "centered": True},
    ),
    OptimInfo(
        ng.optim.Adagrad,
        torch.optim.Adagrad,
        {"lr": 0.05},
        [
            {},
            {"lr_decay": 0.05},
            {"initial_accumulator_value": 0.1, "weight_decay": 0.1},
            {"maximize": True, "lr": 0.005},
        ],
        meta=["lr", "lr_decay", "weight_decay", "initial_accumulator_value"],
        meta_base={"lr_decay": 0.01, "weight_decay": 0.05, "initial_accumulator_value": 0.1},
    ),
    OptimInfo(
        ng.optim.Adadelta,
        torch.optim.Adadelta,
        {"lr": 1.0},
        [{}, {"rho": 0.8, "weight_decay": 0.1}, {"eps": 1e-4}, {"maximize": True, "lr": 0.1}],
        meta=["lr", "rho", "eps", "weight_decay"],
        meta_base={"weight_decay": 0.05},
    ),
    OptimInfo(
        ng.optim.Adamax,
        torch.optim.Adamax,
        {"lr": 0.01},
        [{}, {"weight_decay": 0.1}, {"betas": (0.8, 0.95)}, {"maximize": True, "lr": 0.001}],
        meta=["lr", ("betas", 0), ("betas", 1), "weight_decay"],
        meta_base={"weight_decay": 0.05},
    ),
    OptimInfo(
        ng.optim.NAdam,
        torch.optim.NAdam,
        {"lr": 0.01},
        [
            {},
            {"weight_decay": 0.1},
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
            {"momentum_decay": 0.01, "betas": (0.8, 0.99)},
            {"maximize": True, "lr": 0.001},
        ],
        meta=["lr", ("betas", 0), ("betas", 1), "momentum_decay", "weight_decay"],
        meta_base={"weight_decay": 0.05},
    ),
    OptimInfo(
        ng.optim.RAdam,
        torch.optim.RAdam,
        {"lr": 0.01},
        [
            {},
            {"weight_decay": 0.1},
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
            {"betas": (0.8, 0.9)},
            {"maximize": True, "lr": 0.001},
        ],
        meta=["lr", ("betas", 0), ("betas", 1), "weight_decay"],
        # beta2 = 0.9 makes rho_t > 5 from step 6 on, so the test crosses the rectified branch.
        meta_base={"betas": (0.9, 0.9), "weight_decay": 0.05},
    ),
    OptimInfo(
        ng.optim.Rprop,
        torch.optim.Rprop,
        {"lr": 0.001},
        [{}, {"etas": (0.3, 1.5)}, {"step_sizes": (1e-4, 0.01)}, {"maximize": True}],
        meta=["lr", ("etas", 1)],
    ),
    OptimInfo(
        ng.optim.ASGD,
        torch.optim.ASGD,
        {"lr": 0.05},
        [{}, {"t0": 10}, {"lambd": 0.01, "alpha": 0.5, "weight_decay": 0.1}, {"maximize": True, "lr": 0.005}],
        meta=["lr", "lambd", "alpha", "weight_decay"],
        meta_base={"lambd": 0.01, "weight_decay": 0.05},
    ),
]


def cases() -> list[tuple[OptimInfo, dict[str, Any]]]:
    """Every (optimizer, setting) pair, for parametrization."""
    return [(info, {**info.base, **s}) for info in OPTIMIZERS for s in info.settings]


def case_id(case: tuple[OptimInfo, dict[str, Any]]) -> str:
    info, kwargs = case
    flags = ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in info.base or v != info.base[k])
    return f"{info.name}({flags})"
