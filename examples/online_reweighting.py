"""Online (warm-start) bilevel data reweighting on scikit-learn's digits, with checkpoint and resume.

As in learning-to-reweight (Ren et al. 2018), but with persistent weights: half of the 1000
training labels are flipped to a wrong class, and every training example ``i`` has a loss
weight ``sigmoid(A[i])``. A small MLP trains on minibatches for many steps, never restarting.
Every ``k`` inner steps, ``A`` takes one outer step (``torch.optim.Adam``) on the hypergradient of
the validation loss, taken with ``ng.train`` back through the last ``k`` steps only: each segment
starts from the warm (detached) weights and optimizer state of the previous one,

    w, state = ng.train(loss_fn, w, opt, batches, steps=k, hparams=A, state=state, return_state=True)
    val_loss = F.cross_entropy(ng.call(model, w, x_val), y_val)
    A.grad = torch.autograd.grad(val_loss, A)[0]; outer.step()
    w, state = detach(w), detach(state)           # the inner model continues from here

and the inner model continues from the weights and state that the segment produced.

Checkpoint and resume: with ``--checkpoint DIR``, every ``--save-every`` outer steps the script
saves all the outer loop needs (inner weights, inner optimizer state and state_dict, ``A``, the
outer Adam's state_dict, the outer step counter, the torch RNG state, the minibatch generator's
state and the data position) atomically (``torch.save`` to a temporary file in ``DIR``, then
``os.replace``). ``--resume`` loads it with ``torch.load(path, weights_only=True)`` and continues;
the result is bit for bit that of an uninterrupted run.

    python examples/online_reweighting.py                                  # ~200 outer steps
    python examples/online_reweighting.py --checkpoint ckpt --save-every 10
    python examples/online_reweighting.py --checkpoint ckpt --resume       # after a crash / kill
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import nestgrad as ng
from nestgrad.demos._demo import load_data

CHECKPOINT_NAME = "checkpoint.pt"
THRESHOLD = 0.5  # an example is predicted clean when its learned weight is above this

Params = dict[str, Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outer-steps", type=int, default=200, help="outer (A) steps; each follows k inner steps")
    p.add_argument("--k", type=int, default=5, help="inner steps per outer step (hypergradient horizon)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="online_reweighting.png", help="figure path ('' for none)")
    p.add_argument("--checkpoint", default=None, help="folder for checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint")
    p.add_argument("--save-every", type=int, default=10, help="save a checkpoint every N outer steps")
    p.add_argument("--final", default=None, help="torch.save the final inner weights and A here")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--hidden", type=int, default=64, help="MLP hidden width")
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--outer-lr", type=float, default=0.1)
    p.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow the loop down
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.outer_steps < 1 or args.k < 1 or args.save_every < 1 or args.batch_size < 1:
        p.error("--outer-steps, --k, --save-every and --batch-size must be >= 1")
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint DIR")
    return args


def make_model(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def detach_state(state: ng.optim.OptState) -> ng.optim.OptState:
    return state.with_tensors([t.detach() for t in state.tensors()])


class Minibatches:
    """Shuffled epochs of training indices, drawn from a ``torch.Generator``.

    Its position (the current permutation and the index into it) and the generator's state
    are what a checkpoint needs to continue with the same minibatches.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def next(self) -> Tensor:
        if self.pos + self.batch_size > self.n:  # drop the last partial batch, start a new epoch
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.gen.set_state(sd["gen"])
        self.perm = sd["perm"].clone()
        self.pos = int(sd["pos"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def f1_clean(weights: Tensor, flipped: Tensor, threshold: float = THRESHOLD) -> float:
    """F1 of "weight > threshold" as a detector of clean labels."""
    pred, clean = weights > threshold, ~flipped
    tp = (pred & clean).sum().item()
    if tp == 0:
        return 0.0
    precision, recall = tp / pred.sum().item(), tp / clean.sum().item()
    return 2 * precision * recall / (precision + recall)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_data(args.seed)
    model = make_model(args.hidden, args.seed)
    n = len(data.y_train)
    opt = ng.optim.SGD(lr=args.inner_lr, momentum=0.9)
    A = torch.zeros(n, requires_grad=True)  # weight sigmoid(0) = 0.5 for every example
    outer = torch.optim.Adam([A], lr=args.outer_lr)
    batches = Minibatches(n, args.batch_size, args.seed)
    w: Params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = opt.init({k: v.requires_grad_() for k, v in w.items()})
    w = {k: v.detach() for k, v in w.items()}
    step0, history = 0, {"val_loss": [], "test_acc": []}
    ckpt_path = Path(args.checkpoint) / CHECKPOINT_NAME if args.checkpoint else None

    if args.resume:
        if ckpt_path is None or not ckpt_path.exists():
            print(f"no checkpoint at {ckpt_path}; starting from scratch", flush=True)
        else:
            ck = torch.load(ckpt_path, weights_only=True)
            w = {k: v.clone() for k, v in ck["weights"].items()}
            state = opt.init({k: v.detach().requires_grad_() for k, v in w.items()}).load_state_dict(ck["state"])
            opt.load_state_dict(ck["inner_opt"])
            with torch.no_grad():
                A.copy_(ck["A"])
            outer.load_state_dict(ck["outer_opt"])
            torch.set_rng_state(ck["torch_rng"])
            batches.load_state_dict(ck["data"])
            step0 = int(ck["outer_step"])
            history = {k: list(v) for k, v in ck["history"].items()}
            print(f"resumed from checkpoint at outer step {step0}", flush=True)

    def loss_fn(params: Params, batch: tuple[Tensor, Tensor, Tensor], A: Tensor) -> Tensor:
        x, y, idx = batch
        losses = F.cross_entropy(ng.call(model, params, x), y, reduction="none")
        return (torch.sigmoid(A[idx]) * losses).sum() / len(idx)

    def checkpoint(step: int) -> None:
        assert ckpt_path is not None
        save_checkpoint(
            ckpt_path,
            {
                "outer_step": step,
                "weights": {k: v.detach().clone() for k, v in w.items()},
                "state": state.state_dict(),
                "inner_opt": opt.state_dict(),
                "A": A.detach().clone(),
                "outer_opt": outer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "data": batches.state_dict(),
                "history": history,
            },
        )

    bar = tqdm(
        range(step0, args.outer_steps),
        initial=step0,
        total=args.outer_steps,
        desc="outer steps",
        disable=args.no_progress,
        dynamic_ncols=True,
    )
    for step in bar:
        idx = [batches.next() for _ in range(args.k)]
        segment = [(data.x_train[i], data.y_train[i], i) for i in idx]
        w_new, state_new = ng.train(loss_fn, w, opt, segment, steps=args.k, hparams=A, state=state, return_state=True)
        val_loss = F.cross_entropy(ng.call(model, w_new, data.x_val), data.y_val)
        (grad,) = torch.autograd.grad(val_loss, A)
        outer.zero_grad()
        A.grad = grad
        outer.step()
        w = {k: v.detach() for k, v in w_new.items()}  # warm start: the inner model continues from here
        state = detach_state(state_new)
        with torch.no_grad():
            acc = (ng.call(model, w, data.x_test).argmax(1) == data.y_test).float().mean().item()
        history["val_loss"].append(val_loss.item())
        history["test_acc"].append(acc)
        bar.set_postfix(val_loss=f"{val_loss.item():.3f}", test_acc=f"{acc:.3f}")
        if ckpt_path is not None and ((step + 1) % args.save_every == 0 or step + 1 == args.outer_steps):
            checkpoint(step + 1)
        if args.delay:
            time.sleep(args.delay)
    bar.close()

    weights = torch.sigmoid(A.detach())
    result = {
        "weights": weights,
        "flipped": data.flipped,
        "A": A.detach().clone(),
        "params": w,
        "test_acc": history["test_acc"][-1] if history["test_acc"] else math.nan,
        "f1": f1_clean(weights, data.flipped),
        "clean_mean": weights[~data.flipped].mean().item(),
        "flipped_mean": weights[data.flipped].mean().item(),
        "history": history,
    }
    if args.final:
        torch.save({"weights": w, "A": result["A"]}, args.final)
    if args.out:
        plot(result, Path(args.out))
    result["wall_time"] = time.perf_counter() - start
    print(
        f"test accuracy {result['test_acc']:.3f}; F1 of 'weight > {THRESHOLD}' vs clean label {result['f1']:.3f}; "
        f"mean weight clean {result['clean_mean']:.3f}, flipped {result['flipped_mean']:.3f}; "
        f"wall time {result['wall_time']:.1f} s",
        flush=True,
    )
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = result["history"]
    steps = range(1, len(hist["val_loss"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    left.plot(steps, hist["val_loss"], color="tab:blue")
    left.set(xlabel="outer step", ylabel="validation loss", title="Validation loss and test accuracy")
    twin = left.twinx()
    twin.plot(steps, [100 * a for a in hist["test_acc"]], color="tab:green")
    twin.set_ylabel("test accuracy (%)", color="tab:green")
    w, flipped = result["weights"].numpy(), result["flipped"].numpy()
    bins = [i / 40 for i in range(41)]
    right.hist(w[~flipped], bins=bins, alpha=0.7, color="tab:blue", label=f"clean label ({(~flipped).sum()})")
    right.hist(w[flipped], bins=bins, alpha=0.7, color="tab:red", label=f"flipped label ({flipped.sum()})")
    right.axvline(THRESHOLD, color="black", linestyle=":", linewidth=1)
    right.set(xlabel="learned weight sigmoid(A)", ylabel="training examples", title=f"F1 {result['f1']:.3f}")
    right.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
