"""Data hyper-cleaning on digits, data-parallel: the training set is split across the ranks.

Run with::

    torchrun --nproc_per_node 2 examples/distributed_hyper_cleaning.py            # gloo, CPU
    torchrun --nproc_per_node 2 examples/distributed_hyper_cleaning.py --outer-steps 40

The demo's problem (``nestgrad.demos._demo``, ``--mode full``): 1000 training images, half of them with a
wrong label, one weight per training image, learned by hypergradient descent on the validation loss.
Each outer step trains an MLP from the same initial weights for 100 full-batch steps on the weighted
training images plus the validation images, and moves the weights' logits along
d(validation loss)/d(logits).

Here every rank holds 1/R of the training images, their logits (a sharded hyperparameter) and 1/R of
the validation images. ``ng.train(..., parallel=ng.DataParallel(reduce="sum"))`` all-reduces every
training step's gradient (each rank's loss is its weighted examples' sum over the global count, so the
ranks' gradients add up to the whole set's); ``ng.distributed.mean`` of the ranks' validation losses
is the global validation loss, and each rank's logits receive their part of its hypergradient: the
same numbers one process computes on the whole data. Rank 0 gathers the weights, prints the table and
saves a histogram of the learned weights.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import nestgrad as ng
from nestgrad.demos._demo import DEFAULT_RECIPE, INIT_WEIGHT, OUTER_LR, accuracy, detection_scores, load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outer-steps", type=int, default=30)
    parser.add_argument("--out", default="nestgrad-demo", help="folder for the plot (rank 0)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one thread per rank: the ranks share the machine's cores
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("NESTGRAD_NCCL") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    data = load_data(0)
    recipe = DEFAULT_RECIPE
    n_total = len(data.y_train) + len(data.y_val)  # the inner problem trains on both (see _demo.inner_data)
    x_tr, y_tr = data.x_train.tensor_split(world)[rank], data.y_train.tensor_split(world)[rank]
    x_va, y_va = data.x_val.tensor_split(world)[rank], data.y_val.tensor_split(world)[rank]
    x_in, y_in = torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va])

    model = recipe.model(0)  # the same initial weights on every rank (seeded)
    init = dict(model.named_parameters())
    logits = torch.full((len(y_tr),), math.log(INIT_WEIGHT / (1 - INIT_WEIGHT)), requires_grad=True)
    outer = torch.optim.Adam([logits], lr=OUTER_LR)  # elementwise: sharded logits step as one process's would

    def loss_fn(p: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        x, y = batch
        losses = F.cross_entropy(ng.call(model, p, x), y, reduction="none")
        return (w * losses).sum() / n_total  # normalized by the global count: reduce="sum"

    parallel = ng.DataParallel(reduce="sum", shard_hparams=True)
    start = time.perf_counter()
    for step in range(args.outer_steps):
        weights = torch.cat([torch.sigmoid(logits), torch.ones(len(y_va))])
        params = {k: v.detach().clone().requires_grad_() for k, v in init.items()}
        trained = ng.train(
            loss_fn, params, recipe.optimizer(), [(x_in, y_in)], steps=recipe.steps, hparams=weights, parallel=parallel
        )
        val = ng.distributed.mean(F.cross_entropy(ng.call(model, trained, x_va), y_va))
        (grad,) = torch.autograd.grad(val, logits)
        outer.zero_grad()
        logits.grad = grad
        outer.step()
        if rank == 0 and (step % 10 == 0 or step == args.outer_steps - 1):
            acc = accuracy(model, trained, data.x_test, data.y_test)
            print(f"outer step {step:3d}: validation loss {val.item():.4f}, test accuracy {acc:.3f}", flush=True)
    elapsed = time.perf_counter() - start

    # Gather the learned weights (shards of different sizes: pad to the largest) and score them on rank 0.
    sizes = [len(t) for t in data.y_train.tensor_split(world)]
    mine = torch.zeros(max(sizes))
    mine[: len(y_tr)] = torch.sigmoid(logits.detach())
    everyone = [torch.zeros(max(sizes)) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if rank == 0:
        learned = torch.cat([w[:n] for w, n in zip(everyone, sizes)])
        scores = detection_scores(learned, data.flipped)
        print()
        print(
            f"data-parallel hyper-cleaning on {world} ranks ({backend}), {args.outer_steps} outer steps, "
            f"{recipe.describe()}: {elapsed:.1f} s"
        )
        print(f"{'':34s}{'value':>10s}")
        print(f"{'test accuracy (last inner model)':34s}{acc:>10.3f}")
        for key, value in scores.items():
            print(f"{key:34s}{value:>10.3f}")
        print(f"{'mean weight, clean examples':34s}{learned[~data.flipped].mean().item():>10.3f}")
        print(f"{'mean weight, flipped examples':34s}{learned[data.flipped].mean().item():>10.3f}")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            os.makedirs(args.out, exist_ok=True)
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.hist(learned[~data.flipped].numpy(), bins=40, range=(0, 1), alpha=0.6, label="clean labels")
            ax.hist(learned[data.flipped].numpy(), bins=40, range=(0, 1), alpha=0.6, label="flipped labels")
            ax.set_xlabel("learned example weight")
            ax.set_title(f"hyper-cleaning, data-parallel over {world} ranks")
            ax.legend()
            path = os.path.join(args.out, "distributed_hyper_cleaning.png")
            fig.savefig(path, dpi=120, bbox_inches="tight")
            print(f"plot: {path}")
        except ImportError:
            print("(matplotlib is not installed: no plot)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
