"""``nestgrad demo``: data hyper-cleaning on scikit-learn's digits.

Half of 1000 training labels are flipped to a wrong class. Every training
example gets a learnable weight ``sigmoid(a_i)``; a classifier is trained on the
weighted data with ``nestgrad.train()``, and the logits ``a`` follow the
hypergradient of the loss on 300 clean validation images. Weights of flipped
examples fall towards 0, weights of clean ones rise towards 1.

Two ways to run the outer loop (``mode``):

* ``"online"`` (the default, ``learn_weights_online()``): one classifier keeps
  training on minibatches and is never restarted (warm start); every ``k``
  inner steps the logits take one step along the hypergradient through those
  last ``k`` steps only. About 5 s.
* ``"full"`` (``learn_weights()``): every outer step trains a classifier from
  scratch for 100 full-batch steps and differentiates through all of them.
  About 40 s.

The pieces are plain functions (``load_data()``, ``fit()``,
``learn_weights()``, ``run()``, ...) so that other front ends and tests can
reuse them; ``nestgrad.demos._cli`` is only an argparse wrapper around ``run()``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad as ng

from .._problem import LossFn
from ._defaults import DEFAULT_MODE, DEFAULT_OUT, DEFAULT_STEPS, FULL_STEPS, MODES

N_TRAIN = 1000
N_VAL = 300
NOISE = 0.5
N_CLASSES = 10
FIGURE_NAME = "hyper_cleaning.png"
OUTER_LR = 0.2
INIT_WEIGHT = 0.3
ONLINE_LR = 0.3
"""Initial learning rate of the online mode's outer Adam (cosine-annealed to 0)."""
ONLINE_K = 5
"""Inner steps per outer step in the online mode: the hypergradient's horizon."""
BATCH_SIZE = 100
THRESHOLD = 0.5
"""An example is predicted to have a flipped label when its learned weight is below this."""


# --------------------------------------------------------------------------- data
@dataclass
class Digits:
    """The demo's data: a noisy training set, clean validation and test sets.

    Features are standardized with training-set statistics. ``y_train`` holds
    the noisy labels the learner sees; ``y_train_clean`` and ``flipped`` are the
    ground truth, used only for the oracle baseline and for scoring.
    """

    x_train: Tensor
    y_train: Tensor
    y_train_clean: Tensor
    flipped: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(seed: int = 0) -> Digits:
    """Split ``load_digits`` into 1000 noisy training, 300 validation and 497 test images.

    The three splits are stratified by class. Exactly half of the training
    labels, chosen at random, are replaced by a different class drawn uniformly
    from the other nine. Each pixel is standardized with the training mean and
    standard deviation; the deviation is floored at one grey level (pixels run
    from 0 to 16) so that border pixels that are (almost) always blank in the
    training images do not blow up on the few test images where they are not.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    index = np.arange(len(y))
    train, rest = train_test_split(index, train_size=N_TRAIN, stratify=y, random_state=seed)
    val, test = train_test_split(rest, train_size=N_VAL, stratify=y[rest], random_state=seed)

    rng = np.random.default_rng(seed)
    flipped = np.zeros(N_TRAIN, dtype=bool)
    flipped[rng.permutation(N_TRAIN)[: round(NOISE * N_TRAIN)]] = True
    noisy = y[train].copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, N_CLASSES, size=int(flipped.sum()))) % N_CLASSES

    mean = x[train].mean(axis=0)
    scale = np.maximum(x[train].std(axis=0), 1.0)

    def features(rows: np.ndarray) -> Tensor:
        return torch.as_tensor((x[rows] - mean) / scale, dtype=torch.float32)

    def labels(values: np.ndarray) -> Tensor:
        return torch.as_tensor(values, dtype=torch.long)

    return Digits(
        x_train=features(train),
        y_train=labels(noisy),
        y_train_clean=labels(y[train]),
        flipped=torch.as_tensor(flipped),
        x_val=features(val),
        y_val=labels(y[val]),
        x_test=features(test),
        y_test=labels(y[test]),
    )


class OuterAdam:
    """The outer loop's Adam on one leaf tensor, with ``nestgrad.optim.Adam``'s pure update, in place.

    ``torch.optim.Adam`` gives the same steps, but constructing any ``torch.optim`` optimizer imports
    ``torch._dynamo`` (about 1.3 s of the demo's start-up on the 2-core machine). ``cosine_steps``
    anneals the learning rate to 0 over that many steps, as ``CosineAnnealingLR`` does.
    """

    def __init__(self, leaf: Tensor, lr: float, cosine_steps: int | None = None) -> None:
        if cosine_steps is not None:
            t = torch.arange(cosine_steps, dtype=torch.float64)
            lr = ng.optim.Schedule(lr * (1 + torch.cos(math.pi * t / cosine_steps)) / 2)  # type: ignore[assignment]
        self.leaf = leaf
        self.opt = ng.optim.Adam(lr=lr, eps_root=0.0)  # eps_root=0: torch.optim.Adam's formula exactly
        self.state = self.opt.init({"a": leaf.detach()})

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        new, self.state = self.opt.update({"a": grad}, self.state, {"a": self.leaf.detach()})
        self.leaf.copy_(new["a"])


# ------------------------------------------------------------------ classifier
@dataclass(frozen=True)
class Recipe:
    """How every classifier in the demo is trained: baselines, inner problem and final model.

    ``hidden=0`` is a linear softmax classifier; otherwise a one-hidden-layer
    ReLU network. Training is full batch, from the same initial weights each
    time, with ``nestgrad.optim.SGD``.
    """

    hidden: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.01
    steps: int = 100

    def model(self, seed: int) -> nn.Module:
        """A freshly initialized classifier; the global torch RNG is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.hidden == 0:
                return nn.Linear(64, N_CLASSES)
            return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, N_CLASSES))

    def optimizer(self) -> ng.optim.SGD:
        """The inner optimizer."""
        return ng.optim.SGD(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def describe(self) -> str:
        """A short human-readable summary, for the printed table."""
        model = "linear softmax" if self.hidden == 0 else f"MLP 64-{self.hidden}-10 (ReLU)"
        return (
            f"{model}, {self.steps} full-batch steps of SGD(lr={self.lr}, momentum={self.momentum}, "
            f"weight_decay={self.weight_decay})"
        )


DEFAULT_RECIPE = Recipe()


def weighted_loss(model: nn.Module, normalize: bool) -> LossFn:
    """``loss_fn(params, (x, y), weights)`` for ``nestgrad.train()``: a weighted cross-entropy.

    With ``normalize``, the weighted average ``sum(w * loss) / sum(w)``: how the
    final model and the baselines are trained (all weights 1 is the plain mean).
    Without it, ``sum(w * loss) / n``: the inner problem of hyper-cleaning. There,
    lowering one weight removes that example's pull without scaling up the
    others, and raising the weights of helpful examples is worth something, so
    clean weights rise towards 1 instead of drifting.
    """

    def loss_fn(params: dict[str, Tensor], batch: tuple[Tensor, Tensor], weights: Tensor) -> Tensor:
        x, y = batch
        losses = F.cross_entropy(ng.call(model, params, x), y, reduction="none")
        total = (weights * losses).sum()
        return total / weights.sum() if normalize else total / len(weights)

    return loss_fn


def fit(
    model: nn.Module,
    init: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    weights: Tensor,
    recipe: Recipe,
    normalize: bool = True,
) -> dict[str, Tensor]:
    """Train ``model`` from ``init`` on ``(x, y)`` with per-example ``weights``; see ``weighted_loss()``.

    The trained weights are a differentiable function of ``weights`` (through
    the unrolled run); under ``torch.no_grad()`` this is plain training.
    """
    params = {name: value.detach().clone().requires_grad_() for name, value in init.items()}
    loss_fn = weighted_loss(model, normalize)
    return ng.train(loss_fn, params, recipe.optimizer(), [(x, y)], steps=recipe.steps, hparams=weights)


@torch.no_grad()
def accuracy(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` that ``model`` with ``params`` classifies as ``y``."""
    return (ng.call(model, params, x).argmax(dim=1) == y).float().mean().item()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (or decorated function), then restore the previous setting.

    The demo's tensors are tiny, so thread start-up and synchronization cost
    more than they save: one thread is several times faster than two on a
    2-core machine, and far faster when other processes compete for the cores.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------- hyper-cleaning
@dataclass
class Cleaning:
    """What ``learn_weights()`` returns: the weights and a per-outer-step history."""

    weights: Tensor
    val_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)


def inner_data(data: Digits, train_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The inner problem's training set: the noisy training images, weighted, plus the validation images at weight 1.

    Training on the validation images too anchors the inner model to clean
    labels, so a flipped example visibly fights the validation images and its
    hypergradient says so.
    """
    x = torch.cat([data.x_train, data.x_val])
    y = torch.cat([data.y_train, data.y_val])
    weights = torch.cat([train_weights, torch.ones(len(data.y_val))])
    return x, y, weights


@torch_threads(1)
def learn_weights(
    data: Digits,
    steps: int,
    *,
    recipe: Recipe = DEFAULT_RECIPE,
    seed: int = 0,
    lr: float = OUTER_LR,
    init_weight: float = INIT_WEIGHT,
    progress: bool = True,
) -> Cleaning:
    """Learn one weight per training example by hypergradient descent on the validation loss.

    Each outer step trains a classifier from scratch with ``nestgrad.train()``
    on the weighted data (see ``inner_data()``, unnormalized loss), computes
    the validation cross-entropy of the result, and moves the logits ``a``
    (weights ``sigmoid(a)``) with Adam (``OuterAdam``) along ``d val_loss / d a``,
    which autograd takes back through every step of the training run.

    All weights start equal, at ``init_weight``: below the 0.5 threshold, so an
    example is counted as clean only once the hypergradient has lifted it.
    The history records, per outer step, the validation loss and the test
    accuracy (reporting only) of the model trained in that step.
    """
    from tqdm.auto import tqdm

    model = recipe.model(seed)
    init = dict(model.named_parameters())
    logits = torch.full((len(data.y_train),), math.log(init_weight / (1 - init_weight)), requires_grad=True)
    outer = OuterAdam(logits, lr)
    history = Cleaning(weights=torch.sigmoid(logits.detach()))
    bar = tqdm(range(steps), desc="hyper-cleaning", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        x, y, weights = inner_data(data, torch.sigmoid(logits))
        trained = fit(model, init, x, y, weights, recipe, normalize=False)
        val_loss = F.cross_entropy(ng.call(model, trained, data.x_val), data.y_val)
        (grad,) = torch.autograd.grad(val_loss, logits)
        outer.step(grad)
        history.val_loss.append(val_loss.item())
        history.test_accuracy.append(accuracy(model, trained, data.x_test, data.y_test))
        bar.set_postfix(val_loss=f"{history.val_loss[-1]:.3f}", test_acc=f"{history.test_accuracy[-1]:.3f}")
    history.weights = torch.sigmoid(logits.detach())
    return history


@torch_threads(1)
def learn_weights_online(
    data: Digits,
    steps: int,
    *,
    recipe: Recipe = DEFAULT_RECIPE,
    seed: int = 0,
    lr: float = ONLINE_LR,
    k: int = ONLINE_K,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> Cleaning:
    """Learn one weight per training example online: one warm-started classifier, a hypergradient every ``k`` steps.

    The classifier trains on minibatches of ``inner_data()`` (noisy images
    weighted by ``sigmoid(a)``, validation images at weight 1, unnormalized loss)
    with ``SGD(recipe.lr, recipe.momentum)`` and is never restarted. Each outer
    step runs ``k`` inner steps with ``nestgrad.train()``, starting from the
    weights *and* optimizer state that the previous segment ended with
    (``state=``, ``return_state=True``), and moves the logits ``a`` with
    Adam (``OuterAdam``: learning rate ``lr``, cosine-annealed to 0 over
    ``steps``) along the gradient of the validation loss through those ``k``
    steps only (learning-to-reweight with persistent weights). The segment's
    results are then detached, and training continues from them.

    All weights start at 0.5. No weight decay in the inner run: a model that
    never restarts needs none here, and it cost accuracy in the measurements.
    The history records, per outer step, the validation loss after the segment
    and the test accuracy (reporting only) of the running classifier.
    """
    from tqdm.auto import tqdm

    model = recipe.model(seed)
    n = len(data.y_train)
    x, y, _ = inner_data(data, torch.ones(n))
    ones = torch.ones(len(y) - n)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(y), generator=gen), 0

    def minibatch() -> Tensor:
        nonlocal order, pos
        if pos + batch_size > len(y):  # a new epoch; the last partial batch is dropped
            order, pos = torch.randperm(len(y), generator=gen), 0
        pos += batch_size
        return order[pos - batch_size : pos]

    def loss_fn(params: dict[str, Tensor], batch: tuple[Tensor, Tensor, Tensor], weights: Tensor) -> Tensor:
        x_b, y_b, idx = batch
        losses = F.cross_entropy(ng.call(model, params, x_b), y_b, reduction="none")
        return (weights[idx] * losses).sum() / len(idx)

    logits = torch.zeros(n, requires_grad=True)
    outer = OuterAdam(logits, lr, cosine_steps=steps)
    inner = ng.optim.SGD(lr=recipe.lr, momentum=recipe.momentum)
    params = {name: p.detach() for name, p in model.named_parameters()}
    state = inner.init(params)
    history = Cleaning(weights=torch.sigmoid(logits.detach()))
    bar = tqdm(range(steps), desc="hyper-cleaning (online)", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        segment = [(x[i], y[i], i) for i in (minibatch() for _ in range(k))]
        weights = torch.cat([torch.sigmoid(logits), ones])
        trained, end = ng.train(
            loss_fn, params, inner, segment, steps=k, hparams=weights, state=state, return_state=True
        )
        val_loss = F.cross_entropy(ng.call(model, trained, data.x_val), data.y_val)
        (grad,) = torch.autograd.grad(val_loss, logits)
        outer.step(grad)
        # Warm start: the classifier continues from the segment's end, cut from the graph.
        params = {name: p.detach() for name, p in trained.items()}
        state = end.with_tensors([t.detach() for t in end.tensors()])
        history.val_loss.append(val_loss.item())
        history.test_accuracy.append(accuracy(model, params, data.x_test, data.y_test))
        bar.set_postfix(val_loss=f"{history.val_loss[-1]:.3f}", test_acc=f"{history.test_accuracy[-1]:.3f}")
    history.weights = torch.sigmoid(logits.detach())
    return history


def detection_scores(weights: Tensor, flipped: Tensor, threshold: float = THRESHOLD) -> dict[str, float]:
    """Precision, recall and F1 of "weight < threshold" as a detector of flipped labels."""
    flagged = weights < threshold
    hits = (flagged & flipped).sum().item()
    precision = hits / max(flagged.sum().item(), 1)
    recall = hits / max(flipped.sum().item(), 1)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flagged.sum().item())}


@torch_threads(1)
@torch.no_grad()
def baselines(data: Digits, recipe: Recipe = DEFAULT_RECIPE, seed: int = 0) -> dict[str, float]:
    """Test accuracy of the same recipe trained on the noisy set, on the validation set only, and on clean labels."""
    model = recipe.model(seed)
    init = dict(model.named_parameters())

    def score(x: Tensor, y: Tensor) -> float:
        return accuracy(model, fit(model, init, x, y, torch.ones(len(y)), recipe), data.x_test, data.y_test)

    return {
        "noisy": score(data.x_train, data.y_train),
        "val_only": score(data.x_val, data.y_val),
        "oracle": score(data.x_train, data.y_train_clean),
    }


@torch_threads(1)
@torch.no_grad()
def retrain(data: Digits, weights: Tensor, recipe: Recipe = DEFAULT_RECIPE, seed: int = 0) -> float:
    """Test accuracy of a model retrained from scratch on the inner problem's data with the learned ``weights``.

    It uses the same recipe and initial weights as the baselines, with the
    weighted-average loss, so that the four rows differ only in their data.
    """
    model = recipe.model(seed)
    x, y, w = inner_data(data, weights)
    return accuracy(model, fit(model, dict(model.named_parameters()), x, y, w, recipe), data.x_test, data.y_test)


# ------------------------------------------------------------------- reporting
ROWS = {
    "noisy": "1000 training images, 50% of labels flipped",
    "val_only": "300 clean validation images only",
    "oracle": "1000 training images with their clean labels",
    "nestgrad": "1000 training images weighted by the learned weights + 300 validation images",
}


def format_table(results: dict[str, Any]) -> str:
    """The summary printed by ``nestgrad demo``."""
    acc = results["accuracy"]
    lines = [
        f"Test accuracy on {results['n_test']} clean test images "
        f"(every row: {results['recipe']}, same initial weights)",
        "",
        f"  {'':<10}{'trained on':<80}{'test acc':>9}",
    ]
    lines += [f"  {name:<10}{ROWS[name]:<80}{acc[name]:>9.1%}" for name in ROWS]
    lines += ["  The nestgrad row is a fresh model, retrained from scratch with the final learned weights."]
    return "\n".join(lines + footer(results))


MODE_NOTES = {
    "online": f" (online: {ONLINE_K} warm-started minibatch steps each)",
    "full": f" (full: each retrains from scratch for {DEFAULT_RECIPE.steps} steps)",
}


def footer(results: dict[str, Any]) -> list[str]:
    """The lines after the accuracy table, shared by both demos: label detection, run, figure."""
    det = results["detection"]
    return [
        "",
        f"Spotting flipped labels (flagged when learned weight < {results['threshold']}): "
        f"F1 {det['f1']:.3f}, precision {det['precision']:.3f}, recall {det['recall']:.3f} "
        f"({det['flagged']} flagged, {results['n_flipped']} actually flipped)",
        f"Outer steps: {results['steps']}{MODE_NOTES.get(results.get('mode', ''), '')}, seed {results['seed']}. "
        f"Wall time: {results['wall_time']:.1f} s",
        f"Figure: {results['figure']}",
    ]


def caption(curve: list[float], final: float, curve_label: str) -> str:
    """The figure's caption: what the curve is, where it peaked and ended, and what reached the table's number."""
    peak = int(np.argmax(curve))
    return (
        f"Green curve: the {curve_label}, i.e. the model trained during the run, not the table's recipe. It peaks at "
        f"{curve[peak]:.1%} at outer step {peak + 1} and ends at {curve[-1]:.1%}. The table's nestgrad number, "
        f"{final:.1%}, is a fresh model retrained on the final weights (the dot); the dashed lines are fresh "
        f"models too."
    )


def plot(
    results: dict[str, Any],
    path: Path,
    *,
    weight_label: str = "learned example weight",
    curve_label: str = "inner model of each outer step",
    baseline_label: str = "{name}",
    accuracy_label: str = "test accuracy",
) -> None:
    """Save the two-panel figure: learned weights by true label status, and test accuracy over outer steps.

    The labels let the three-level demo reuse it for its student.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    weights, flipped = results["weights"].numpy(), results["flipped"].numpy()
    fig = Figure(figsize=(14, 5.8), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)

    # Step outlines, not filled bars: where the two histograms overlap no third colour appears.
    bins = np.linspace(0, 1, 41)
    left.hist(weights[~flipped], bins=bins, histtype="step", linewidth=1.6, color="tab:blue",
              label=f"clean label ({(~flipped).sum()})")  # fmt: skip
    left.hist(weights[flipped], bins=bins, histtype="step", linewidth=1.6, color="tab:red",
              label=f"flipped label ({flipped.sum()})")  # fmt: skip
    left.axvline(results["threshold"], color="black", linestyle=":", linewidth=1, label="threshold")
    left.set(xlabel=weight_label, ylabel="training examples", yscale="log")
    left.set_title(f"Learned weights (F1 {results['detection']['f1']:.3f} at spotting flipped labels)")
    # Legends go below the axes, where they cannot hide a bar or a line.
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False, fontsize="small")

    acc = results["accuracy"]
    steps = np.arange(1, len(results["test_accuracy"]) + 1)
    right.plot(steps, np.array(results["test_accuracy"]) * 100, color="tab:green", label=curve_label)
    styles = {"oracle": ("tab:purple", "--"), "val_only": ("tab:orange", "--"), "noisy": ("tab:red", "--")}
    for name, (color, style) in styles.items():
        label = f"{baseline_label.format(name=name)} {acc[name]:.1%}"
        right.axhline(acc[name] * 100, color=color, linestyle=style, label=label)
    right.plot(
        [steps[-1]],
        [acc["nestgrad"] * 100],
        "o",
        color="black",
        label=f"fresh model trained on the final weights: {acc['nestgrad']:.1%} (the table's nestgrad row)",
    )
    title = f"{accuracy_label[0].upper()}{accuracy_label[1:]} over outer steps"
    right.set(xlabel="outer step", ylabel=f"{accuracy_label} (%)", title=title)
    # The dashed lines and the dot are fresh models trained with the table's recipe; the curve is not.
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False, fontsize="small")
    fig.supxlabel(caption(results["test_accuracy"], acc["nestgrad"], curve_label), fontsize="small", wrap=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run(
    steps: int | None = None,
    seed: int = 0,
    out: str | Path = DEFAULT_OUT,
    progress: bool = True,
    *,
    mode: str = DEFAULT_MODE,
    recipe: Recipe = DEFAULT_RECIPE,
    lr: float | None = None,
) -> dict[str, Any]:
    """Run the whole demo: data, baselines, hyper-cleaning, final model, figure.

    Args:
        steps: outer steps (default ``DEFAULT_STEPS`` online, ``FULL_STEPS`` full).
        seed: seed of the data split, label noise, initial weights and minibatches.
        out: folder for the figure.
        progress: show a tqdm bar.
        mode: ``"online"`` (``learn_weights_online()``) or ``"full"`` (``learn_weights()``).
        recipe: how the baselines and the final model are trained.
        lr: the outer learning rate (default ``ONLINE_LR`` online, ``OUTER_LR`` full).

    Returns a dict with ``accuracy`` (``noisy``, ``val_only``, ``oracle``,
    ``nestgrad``), ``detection`` (``f1``, ``precision``, ``recall``,
    ``flagged``), the learned ``weights`` and the true ``flipped`` mask, the
    per-step ``val_loss`` and ``test_accuracy``, the ``figure`` path and the
    ``wall_time`` in seconds. Test labels are used for reporting only.
    """
    if mode not in MODES:
        raise ValueError(f"nestgrad demo: mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}.")
    online = mode == "online"
    if steps is None:
        steps = DEFAULT_STEPS if online else FULL_STEPS
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"nestgrad demo: steps must be an int >= 1; got {steps!r}.")
    start = time.perf_counter()
    data = load_data(seed)
    accuracy_ = baselines(data, recipe, seed)
    learn = learn_weights_online if online else learn_weights
    lr = lr if lr is not None else ONLINE_LR if online else OUTER_LR
    cleaning = learn(data, steps, recipe=recipe, seed=seed, lr=lr, progress=progress)
    accuracy_["nestgrad"] = retrain(data, cleaning.weights, recipe, seed)
    results: dict[str, Any] = {
        "seed": seed,
        "steps": steps,
        "mode": mode,
        "recipe": recipe.describe(),
        "accuracy": accuracy_,
        "detection": detection_scores(cleaning.weights, data.flipped),
        "threshold": THRESHOLD,
        "weights": cleaning.weights,
        "flipped": data.flipped,
        "val_loss": cleaning.val_loss,
        "test_accuracy": cleaning.test_accuracy,
        "n_test": len(data.y_test),
        "n_flipped": int(data.flipped.sum().item()),
        "figure": Path(out) / FIGURE_NAME,
    }
    curve = "running classifier (warm start)" if online else "inner model of each outer step"
    plot(results, results["figure"], curve_label=curve)
    results["wall_time"] = time.perf_counter() - start
    return results
