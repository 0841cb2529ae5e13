"""``nestgrad demo --levels 3``: teacher -> student hyper-cleaning on scikit-learn's digits.

The same data as the two-level demo (``nestgrad.demos._demo.load_data()``: 1000
training images with half of the labels flipped, 300 clean validation images,
497 clean test images). Three nested levels:

1. the TEACHER trains with ``nestgrad.train()`` on the noisy training images,
   each example's loss weighted by ``sigmoid(a_i)`` (plus the 300 validation
   images at weight 1, as in the two-level demo); ``hparams`` = the weights;
2. the STUDENT trains with ``nestgrad.train()`` on the teacher's soft labels
   (``softmax(teacher logits / T)``) of the 1000 training images; ``hparams`` =
   the teacher's trained weights, so the student's weights are a differentiable
   function of the teacher's, which are a differentiable function of ``a``;
3. ``a`` moves with Adam to lower the student's cross-entropy on
   the 300 clean validation images: the hypergradient runs back through both
   unrolled training runs.

The student sees only the training *inputs*, never a label and never a
validation image: its validation loss is then a held-out measure of how good
the teacher's labels of the training images are, which is exactly what the
weights ``a`` control. (Had the student also trained on the teacher's labels of
the validation images, which the teacher fits almost perfectly, part of the
outer objective would be memorized rather than learned.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad as ng

from . import _demo
from ._defaults import DEFAULT_STEPS_3 as DEFAULT_STEPS
from ._demo import (
    DEFAULT_OUT,
    THRESHOLD,
    Digits,
    OuterAdam,
    Recipe,
    accuracy,
    detection_scores,
    fit,
    inner_data,
    load_data,
    torch_threads,
)

FIGURE_NAME = "teacher_student.png"
OUTER_LR = 0.3
INIT_WEIGHT = 0.3
TEMPERATURE = 2.0
TEACHER = Recipe(hidden=64, steps=60)
STUDENT = Recipe(hidden=32, lr=0.5, momentum=0.9, weight_decay=0.001, steps=60)


# ------------------------------------------------------------------ the student
def distill_loss(student: nn.Module, teacher: nn.Module, temperature: float) -> ng.LossFn:
    """``loss_fn(student_params, x, teacher_params)``: the student's cross-entropy against the teacher's soft labels.

    Both logits are divided by the temperature (knowledge distillation); the
    targets stay attached to ``teacher_params``, which is how the student's
    training depends on the teacher's weights.
    """

    def loss_fn(params: dict[str, Tensor], x: Tensor, teacher_params: dict[str, Tensor]) -> Tensor:
        targets = F.softmax(ng.call(teacher, teacher_params, x) / temperature, dim=1)
        return F.cross_entropy(ng.call(student, params, x) / temperature, targets)

    return loss_fn


def distill(
    student: nn.Module,
    init: dict[str, Tensor],
    teacher: nn.Module,
    teacher_params: dict[str, Tensor],
    x: Tensor,
    recipe: Recipe,
    temperature: float = TEMPERATURE,
) -> dict[str, Tensor]:
    """Train ``student`` from ``init`` on ``teacher``'s soft labels of ``x``; differentiable in ``teacher_params``."""
    params = {name: value.detach().clone().requires_grad_() for name, value in init.items()}
    loss_fn = distill_loss(student, teacher, temperature)
    return ng.train(loss_fn, params, recipe.optimizer(), [x], steps=recipe.steps, hparams=teacher_params)


@dataclass
class Pipeline:
    """The two models of the pipeline and their (fixed) initial weights."""

    teacher_recipe: Recipe
    student_recipe: Recipe
    seed: int
    temperature: float = TEMPERATURE
    teacher: nn.Module = field(init=False)
    student: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.teacher = self.teacher_recipe.model(self.seed)
        self.student = self.student_recipe.model(self.seed + 1000)

    def student_of(self, data: Digits, x: Tensor, y: Tensor, w: Tensor, normalize: bool = True) -> dict[str, Tensor]:
        """Train a teacher on ``(x, y)`` weighted by ``w``, then a student on its soft labels of the training images."""
        teacher_params = fit(
            self.teacher, dict(self.teacher.named_parameters()), x, y, w, self.teacher_recipe, normalize=normalize
        )
        return distill(
            self.student,
            dict(self.student.named_parameters()),
            self.teacher,
            teacher_params,
            data.x_train,
            self.student_recipe,
            self.temperature,
        )

    def test_accuracy(self, data: Digits, params: dict[str, Tensor]) -> float:
        return accuracy(self.student, params, data.x_test, data.y_test)


# --------------------------------------------------------------- hyper-cleaning
@dataclass
class Cleaning3:
    """What ``learn_weights()`` returns: the weights, a per-outer-step history and the first hypergradient."""

    weights: Tensor
    val_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    first_grad: Tensor | None = None


@torch_threads(1)
def learn_weights(
    data: Digits,
    steps: int,
    *,
    teacher: Recipe = TEACHER,
    student: Recipe = STUDENT,
    seed: int = 0,
    lr: float = OUTER_LR,
    init_weight: float = INIT_WEIGHT,
    temperature: float = TEMPERATURE,
    progress: bool = True,
) -> Cleaning3:
    """Learn one weight per training example from the student's clean validation loss.

    Each outer step trains a teacher from scratch on the weighted data (see
    ``nestgrad.demos._demo.inner_data()``, unnormalized loss), a student from
    scratch on the teacher's soft labels of the training images, computes the
    student's validation cross-entropy, and moves the logits ``a`` (weights
    ``sigmoid(a)``) with Adam (``OuterAdam``) along ``d val_loss / d a``, which
    autograd takes back through both unrolled training runs. The history keeps
    the student's validation loss and test accuracy (reporting only) per step,
    and the first hypergradient.
    """
    from tqdm.auto import tqdm

    pipe = Pipeline(teacher, student, seed, temperature)
    logits = torch.full((len(data.y_train),), math.log(init_weight / (1 - init_weight)), requires_grad=True)
    outer = OuterAdam(logits, lr)
    history = Cleaning3(weights=torch.sigmoid(logits.detach()))
    bar = tqdm(range(steps), desc="teacher->student hyper-cleaning", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        x, y, w = inner_data(data, torch.sigmoid(logits))
        trained = pipe.student_of(data, x, y, w, normalize=False)
        val_loss = F.cross_entropy(ng.call(pipe.student, trained, data.x_val), data.y_val)
        (grad,) = torch.autograd.grad(val_loss, logits)
        if history.first_grad is None:
            history.first_grad = grad.detach().clone()
        outer.step(grad)
        history.val_loss.append(val_loss.item())
        history.test_accuracy.append(pipe.test_accuracy(data, trained))
        bar.set_postfix(val_loss=f"{history.val_loss[-1]:.3f}", test_acc=f"{history.test_accuracy[-1]:.3f}")
    history.weights = torch.sigmoid(logits.detach())
    return history


@torch_threads(1)
@torch.no_grad()
def evaluate(data: Digits, weights: Tensor, pipe: Pipeline) -> dict[str, float]:
    """Test accuracy of the student of each teacher: three baselines and the teacher retrained with ``weights``."""
    ones = torch.ones(len(data.y_train))

    def score(x: Tensor, y: Tensor, w: Tensor) -> float:
        return pipe.test_accuracy(data, pipe.student_of(data, x, y, w))

    return {
        "noisy": score(data.x_train, data.y_train, ones),
        "val_only": score(data.x_val, data.y_val, torch.ones(len(data.y_val))),
        "oracle": score(data.x_train, data.y_train_clean, ones),
        "nestgrad": score(*inner_data(data, weights)),
    }


# ------------------------------------------------------------------- reporting
ROWS = {
    "noisy": "teacher on 1000 training images, 50% of labels flipped",
    "val_only": "teacher on 300 clean validation images only",
    "oracle": "teacher on 1000 training images with their clean labels",
    "nestgrad": "teacher on 1000 images weighted by the learned weights + 300 val",
}


def format_table(results: dict[str, Any]) -> str:
    """The summary printed by ``nestgrad demo --levels 3``."""
    acc = results["accuracy"]
    lines = [
        f"Student test accuracy on {results['n_test']} clean test images. Every student learns the soft labels "
        f"(T={results['temperature']}) its teacher gives the 1000 training images.",
        f"  teacher: {results['teacher']}",
        f"  student: {results['student']}",
        "",
        f"  {'':<10}{'student of':<70}{'test acc':>9}",
    ]
    lines += [f"  {name:<10}{ROWS[name]:<70}{acc[name]:>9.1%}" for name in ROWS]
    lines += [
        "  The nestgrad row is a fresh teacher and student, retrained from scratch with the final learned weights."
    ]
    return "\n".join(lines + _demo.footer(results))


def plot(results: dict[str, Any], path: Path) -> None:
    """Save the two-panel figure: learned weights by true label status, student test accuracy over outer steps."""
    _demo.plot(
        results,
        path,
        weight_label="learned weight of the teacher's example",
        curve_label="student of each outer step",
        baseline_label="student of {name} teacher",
        accuracy_label="student test accuracy",
    )


def run(
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    out: str | Path = DEFAULT_OUT,
    progress: bool = True,
    *,
    teacher: Recipe = TEACHER,
    student: Recipe = STUDENT,
    lr: float = OUTER_LR,
    temperature: float = TEMPERATURE,
) -> dict[str, Any]:
    """Run the three-level demo: data, hyper-cleaning through teacher and student, baselines, figure.

    Returns the same keys as ``nestgrad.demos._demo.run()`` (``accuracy`` holds the
    students' test accuracies), plus ``first_grad``: the hypergradient of the
    student's validation loss w.r.t. the weight logits at the first outer step.
    Test labels are used for reporting only.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"nestgrad demo: steps must be an int >= 1; got {steps!r}.")
    start = time.perf_counter()
    data = load_data(seed)
    cleaning = learn_weights(
        data, steps, teacher=teacher, student=student, seed=seed, lr=lr, temperature=temperature, progress=progress
    )
    accuracy_ = evaluate(data, cleaning.weights, Pipeline(teacher, student, seed, temperature))
    results: dict[str, Any] = {
        "levels": 3,
        "seed": seed,
        "steps": steps,
        "teacher": teacher.describe(),
        "student": student.describe(),
        "temperature": temperature,
        "accuracy": accuracy_,
        "detection": detection_scores(cleaning.weights, data.flipped),
        "threshold": THRESHOLD,
        "weights": cleaning.weights,
        "flipped": data.flipped,
        "val_loss": cleaning.val_loss,
        "test_accuracy": cleaning.test_accuracy,
        "first_grad": cleaning.first_grad,
        "n_test": len(data.y_test),
        "n_flipped": int(data.flipped.sum().item()),
        "figure": Path(out) / FIGURE_NAME,
    }
    plot(results, results["figure"])
    results["wall_time"] = time.perf_counter() - start
    return results
