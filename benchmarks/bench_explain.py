"""Benchmark: what the gradient-path diagnostics cost, measured side by side.

``ng.train`` checks once per run that the hyperparameters reach the training loss:
one walk over the first loss's graph (``reaches``). ``ng.explain`` / ``ng.tracking``
go further and follow every torch call while they are active. For two models, this
times the same hypergradient (``ng.train`` with ``Unroll`` for T steps, a validation
loss, ``torch.autograd.grad``) three ways:

* **no check**: ``ng.train`` with its path check replaced by a no-op (the baseline);
* **default**: ``ng.train`` as shipped, with the one-walk check;
* **tracking**: the default inside ``with ng.tracking(hparams):``, as ``ng.explain`` runs it.

Models: a small MLP (16-32-4, batch 64), where per-call overheads weigh most, and the
64-256-256-10 MLP of ``bench_unroll.py`` (1000 digits). CPU seconds, one thread, medians
of rounds that run the three variants in a rotated order. Reported, not asserted.

Usage::

    python benchmarks/bench_explain.py            # about 15 seconds
    python benchmarks/bench_explain.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad as ng
import nestgrad._problem as ng_train
from bench_unroll import _load, machine


def small_mlp() -> tuple[nn.Module, Tensor, Tensor, int]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)), x, y, 30


def digits_mlp() -> tuple[nn.Module, Tensor, Tensor, int]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:1000], dtype=torch.float32) / 16
    y = torch.tensor(data.target[:1000])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    return model, x, y, 20


@contextlib.contextmanager
def no_path_check() -> Iterator[None]:
    original = ng_train.require_path
    ng_train.require_path = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ng_train.require_path = original


def hypergradient(model: nn.Module, x: Tensor, y: Tensor, steps: int, A: Tensor) -> Tensor:
    def loss_fn(params: dict[str, Tensor], batch: None, A: Tensor) -> Tensor:
        return (torch.sigmoid(A) * F.cross_entropy(ng.call(model, params, x), y, reduction="none")).mean()

    params = dict(model.named_parameters())
    trained = ng.train(loss_fn, params, ng.optim.SGD(lr=0.1, momentum=0.9), [None], steps=steps, hparams=A)
    (grad,) = torch.autograd.grad(F.cross_entropy(ng.call(model, trained, x), y), A)
    return grad


VARIANTS: dict[str, Callable[[Tensor], contextlib.AbstractContextManager[object]]] = {
    "no check": lambda A: no_path_check(),
    "default (one graph walk)": lambda A: contextlib.nullcontext(),
    "ng.tracking active": lambda A: ng.tracking(A),
}


def measure(name: str, case: Callable[[], tuple[nn.Module, Tensor, Tensor, int]], rounds: int) -> None:
    model, x, y, steps = case()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    grads: dict[str, Tensor] = {}
    order = list(VARIANTS)
    for r in range(rounds + 1):  # round 0 warms up
        shift = r % len(order)
        for v in order[shift:] + order[:shift]:
            A = torch.zeros(len(x), requires_grad=True)
            start = time.process_time()
            with VARIANTS[v](A):
                grads[v] = hypergradient(model, x, y, steps, A)
            elapsed = time.process_time() - start
            if r:
                times[v].append(elapsed)
    base = statistics.median(times["no check"])
    print(f"### {name}: T={steps} SGD(momentum) steps, {len(x)} examples\n")
    print("| variant | CPU s (median) | ratio to no check | same hypergradient |")
    print("|---|--:|--:|:-:|")
    for v in VARIANTS:
        same = torch.equal(grads[v], grads["no check"])
        med = statistics.median(times[v])
        print(f"| {v} | {med:.4f} | {med / base:.3f}x | {'yes' if same else 'NO'} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("# nestgrad diagnostics overhead\n")
    print(f"- torch {torch.__version__}, nestgrad {ng.__version__}; {machine()}; load average {_load()}\n")
    measure("small MLP 16-32-4", small_mlp, args.rounds)
    measure("digits MLP 64-256-256-10", digits_mlp, args.rounds)
    print("Under `ng.tracking` every torch call made from Python in the block is followed: the training, the")
    print("validation loss, and the hypergradient's `torch.autograd.grad`, which it sees as one call.")


if __name__ == "__main__":
    main()
