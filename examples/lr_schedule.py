"""Learn a per-step learning-rate schedule for a digits MLP by hypergradient descent (Maclaurin et al. 2015).

The inner run trains a 64-64-10 MLP for ``--steps`` full-batch SGD steps (momentum 0.9) on
scikit-learn's digits (the clean labels of the demo's 1000 training images). Its learning rate at
step ``t`` is ``exp(log_lrs[t - 1])``: one learnable value per step, given to the optimizer as an
``ng.optim.Schedule`` (on a log scale, so every rate stays positive). The outer loop moves
``log_lrs`` with Adam on the hypergradient of the validation loss after training, through the
whole run (``ng.Reverse()``: memory of one copy of the weights per step, not one graph per step).

    python examples/lr_schedule.py                       # 40 steps, 30 outer steps, a plot
    python examples/lr_schedule.py --steps 100 --outer-steps 50 --out schedule.png

It prints the validation loss before and after, and plots the learned schedule against the
constant one it started from, with the validation loss over the outer steps.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad as ng
from nestgrad.demos._demo import load_data


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def learn_schedule(steps: int, outer_steps: int, init_lr: float, outer_lr: float, seed: int) -> dict[str, Any]:
    """Return the initial and learned schedules and the validation loss at every outer step."""
    data = load_data(seed)
    x, y = data.x_train, data.y_train_clean
    model = make_model(seed)
    params = {k: v.detach() for k, v in model.named_parameters()}
    log_lrs = torch.full((steps,), float(torch.tensor(init_lr).log()), requires_grad=True)
    outer = torch.optim.Adam([log_lrs], lr=outer_lr)

    def loss_fn(p: dict[str, Tensor], batch: Any, _: Any) -> Tensor:
        return F.cross_entropy(ng.call(model, p, x), y)

    def val_loss(log_lrs: Tensor) -> Tensor:
        opt = ng.optim.SGD(lr=ng.optim.Schedule(log_lrs.exp()), momentum=0.9)
        w0 = {k: v.clone().requires_grad_() for k, v in params.items()}
        trained = ng.train(loss_fn, w0, opt, [None], steps=steps, method=ng.Reverse())
        return F.cross_entropy(ng.call(model, trained, data.x_val), data.y_val)

    initial = log_lrs.detach().exp().clone()
    history = []
    for _ in range(outer_steps):
        loss = val_loss(log_lrs)
        outer.zero_grad()
        (log_lrs.grad,) = torch.autograd.grad(loss, log_lrs)
        outer.step()
        history.append(loss.item())
    with torch.no_grad():
        final = val_loss(log_lrs).item()
    return {"initial": initial, "learned": log_lrs.detach().exp(), "history": [*history, final]}


def plot(result: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = range(1, len(result["learned"]) + 1)
    left.plot(steps, result["initial"], "--", color="grey", label="initial (constant)")
    left.plot(steps, result["learned"], color="C0", label="learned")
    left.set(xlabel="training step t", ylabel="learning rate at step t", title="Learning-rate schedule")
    left.legend(frameon=False)
    right.plot(result["history"], color="C1")
    right.set(xlabel="outer step", ylabel="validation loss after training", title="Outer loop")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="inner SGD steps (the schedule's length)")
    parser.add_argument("--outer-steps", type=int, default=30)
    parser.add_argument("--init-lr", type=float, default=0.05)
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam's rate on the log learning rates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lr_schedule.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = learn_schedule(args.steps, args.outer_steps, args.init_lr, args.outer_lr, args.seed)
    plot(result, args.out)
    first, last = result["history"][0], result["history"][-1]
    learned = result["learned"]
    print(f"validation loss {first:.4f} -> {last:.4f} in {args.outer_steps} outer steps "
          f"({time.perf_counter() - start:.1f} s); learned rates from {learned.min():.3g} to {learned.max():.3g} "
          f"(first step {learned[0]:.3g}, last {learned[-1]:.3g}); figure: {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
