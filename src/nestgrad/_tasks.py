"""``Tasks``: train a batch of independent tasks in one vectorised run (``ng.train(..., tasks=...)``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import vmap

from .optim._base import _describe

Dims = Any  # 0, None, or a pytree prefix of them, as torch.func.vmap's in_dims

_RANDOMNESS = ("error", "different", "same")

_LEADING = (
    "nestgrad.train(tasks={n}): {what} has shape {shape}, but {why} a leading task dimension of size {n}. "
    "Stack the {n} tasks' {kind} along dimension 0 (torch.stack), or mark it shared with "
    "ng.Tasks({n}, {field}=None) so that every task reads the same tensor."
)

_NOT_SCALAR = (
    "nestgrad.train(tasks={n}): loss_fn must return one scalar per task: it is run on one task at a time "
    "(under torch.func.vmap), and returned {got}. Reduce each task's loss with .mean() or .sum()."
)

_RANDOM = (
    "nestgrad.train(tasks={n}): loss_fn draws random numbers (dropout, torch.rand, ...), and "
    "ng.Tasks(randomness='error') (the default, as in torch.func.vmap) forbids that. Pass "
    "ng.Tasks({n}, randomness='different') for independent draws per task (a Python loop over tasks would "
    "also draw independently, but not the same numbers), or 'same' for one draw shared by all tasks."
)

_IN_PLACE = (
    "nestgrad.train(tasks={n}): loss_fn writes a tensor in place that is shared by all tasks (most often "
    "BatchNorm's running statistics in train mode), which a vectorised run cannot do. Build the norm layers "
    "with track_running_stats=False (each task normalizes with its own batch statistics, as MAML does), "
    "run the module in eval mode, or train the tasks one at a time in a Python loop."
)


@dataclass(frozen=True)
class Tasks:
    """Train ``n`` independent tasks at once: the same model, loss and optimizer, per-task data.

    Pass it as ``ng.train(..., tasks=ng.Tasks(n, ...))`` (or ``tasks=n`` for the defaults).
    ``loss_fn`` is written for **one** task, exactly as for a single run; nestgrad runs it on
    every task at once with ``torch.func.vmap()``, and trains the stacked weights with one
    optimizer whose updates are elementwise, so each task trains exactly as it would alone.
    The trained weights have a leading task dimension of size ``n``.

    Each field says, like ``in_dims`` of ``torch.func.vmap()``, which inputs have a leading
    task dimension (``0``) and which every task shares (``None``):

    Args:
        n: the number of tasks, >= 1.
        params: ``None`` (default): the initial weights are shared by all tasks (MAML's
            meta-initialisation), and the hypergradient w.r.t. them sums over the tasks;
            ``0``: every entry of ``params`` already has a leading task dimension (an ensemble,
            or warm-started per-task weights). A dict ``name -> 0 | None`` mixes them.
        data: ``0`` (default): every Tensor in a batch has a leading task dimension (other
            values, such as ints, are shared); ``None``: all tasks see the same batch; or a
            pytree prefix of the batch, as vmap's ``in_dims``.
        hparams: ``None`` (default): the ``hparams`` are shared by all tasks; ``0``: every
            Tensor in them has a leading task dimension (per-task loss weights); or a pytree
            prefix of ``hparams``. The optimizer's own Tensor hyperparameters are shared, and
            broadcast against the stacked weights (a per-task learning rate is a Tensor of shape
            ``(n, 1, ...)`` with as many trailing ones as the weight has dimensions).
        randomness: ``torch.func.vmap``'s ``randomness``: ``"error"`` (default) refuses random
            operations inside ``loss_fn``; ``"different"`` draws independently for each task;
            ``"same"`` shares one draw.

    The tasks form one training problem whose loss is the sum of the tasks' losses: each task's
    weights get exactly the gradient of its own loss, so every method runs unchanged. Unroll,
    Reverse and Forward give each task exactly what a run of that task alone gives. Iterative
    solvers (``Implicit``'s CG) solve for all tasks jointly, with one stopping rule for the whole
    batch; ``FiniteDiff`` scales its step by the norm over all tasks and ``ZerothOrder`` perturbs
    all tasks' hparams together, so both estimate the joint problem, not task by task.

    Modules that write a shared tensor in place inside ``loss_fn`` (BatchNorm's running
    statistics in train mode) raise: use ``track_running_stats=False`` or eval mode.

    Example:
        >>> # MAML: 25 tasks, shared initial weights, 5 inner steps, one meta-gradient.
        >>> fast = ng.train(loss_fn, dict(model.named_parameters()), ng.optim.SGD(lr=0.01),
        ...                 [(x_support, y_support)], steps=5, tasks=25)  # x_support: (25, K, 1)
        >>> query = torch.func.vmap(query_loss)(fast, x_query, y_query).sum()
        >>> query.backward()  # reaches model.parameters(), through every task's inner steps
    """

    n: int
    params: Dims = None
    data: Dims = 0
    hparams: Dims = None
    randomness: str = "error"

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"nestgrad.Tasks: n must be an int >= 1 (the number of tasks); got {self.n!r}.")
        if self.randomness not in _RANDOMNESS:
            raise ValueError(
                f"nestgrad.Tasks: randomness must be one of {', '.join(map(repr, _RANDOMNESS))}, as in "
                f"torch.func.vmap; got {self.randomness!r}."
            )
        if not (self.params in (0, None) or isinstance(self.params, Mapping)):
            raise ValueError(
                f"nestgrad.Tasks: params must be 0 (every weight has a leading task dimension), None (shared "
                f"initial weights) or a dict name -> 0 | None; got {self.params!r}."
            )


def as_tasks(tasks: Any) -> Tasks:
    """``tasks`` as given to ``train``: an int is ``Tasks(n)``."""
    if isinstance(tasks, Tasks):
        return tasks
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        return Tasks(tasks)
    raise TypeError(
        f"nestgrad.train: tasks must be the number of tasks (an int) or an ng.Tasks(...); got {_describe(tasks)}."
    )


def _param_dims(tasks: Tasks, params: Mapping[str, Tensor]) -> dict[str, int | None]:
    spec = tasks.params
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(params))
        if unknown:
            raise KeyError(
                f"nestgrad.Tasks: params names {unknown} that params does not have; it has {sorted(params)}."
            )
        bad = {k: v for k, v in spec.items() if v not in (0, None)}
        if bad:
            raise ValueError(f"nestgrad.Tasks: params must map names to 0 or None; got {bad}.")
        return {k: spec.get(k) for k in params}
    return dict.fromkeys(params, spec)


def stack_params(
    tasks: Tasks, params: Mapping[str, Tensor], differentiable: bool
) -> tuple[dict[str, Tensor], dict[str, int | None]]:
    """The weights the vectorised run trains, and the task dimension of each entry of ``params``.

    Shared trainable weights are expanded to ``(n, *shape)``: a view, so the gradient w.r.t.
    them sums over the tasks, or (for methods that do not differentiate the initial weights)
    a detached copy. Frozen weights keep the dimension ``tasks.params`` gives them.
    """
    dims = _param_dims(tasks, params)
    out: dict[str, Tensor] = {}
    for k, v in params.items():
        if not v.requires_grad:
            out[k] = v
            if dims[k] == 0:
                _check_leading(tasks, v, f"params[{k!r}]", "params")
            continue
        if dims[k] == 0:
            _check_leading(tasks, v, f"params[{k!r}]", "params")
            out[k] = v
        else:
            base = v if differentiable else v.detach()
            with torch.enable_grad():  # under no_grad too, the tasks' weights are the ones to train
                out[k] = base.unsqueeze(0).expand(tasks.n, *v.shape)
            if not differentiable:
                out[k] = out[k].clone().requires_grad_()
            dims[k] = 0
    return out, dims


def _check_leading(tasks: Tasks, t: Tensor, what: str, kind: str) -> None:
    if t.ndim == 0 or t.shape[0] != tasks.n:
        why = "it is a scalar, with no room for" if t.ndim == 0 else "ng.Tasks marks it as having"
        plural = {"params": "weights", "data": "batches", "hparams": "hparams"}[kind]
        raise ValueError(_LEADING.format(n=tasks.n, what=what, shape=tuple(t.shape), why=why, kind=plural, field=kind))


def _tree_dims(tree: Any, spec: Dims, kind: str, tasks: Tasks) -> Dims:
    """vmap in_dims for ``tree``: ``spec`` for every Tensor leaf (None for other leaves), or ``spec`` itself."""
    if spec is not None and not isinstance(spec, int):
        return spec  # a pytree prefix: vmap checks it
    leaves, treespec = pytree.tree_flatten(tree)
    dims = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor) and spec == 0:
            _check_leading(tasks, leaf, f"a Tensor in {kind} (leaf {i})", kind)
            dims.append(0)
        else:
            dims.append(None)
    return pytree.tree_unflatten(dims, treespec)


def vectorise(
    tasks: Tasks, loss_fn: Callable[..., Tensor], param_dims: Mapping[str, int | None]
) -> Callable[..., Tensor]:
    """``loss_fn`` for one task -> the summed loss of all tasks, computed under ``torch.func.vmap``."""

    def total(params: dict[str, Tensor], batch: Any, hparams: Any) -> Tensor:
        in_dims = (
            {k: param_dims.get(k, 0) for k in params},
            _tree_dims(batch, tasks.data, "data", tasks),
            _tree_dims(hparams, tasks.hparams, "hparams", tasks),
        )
        try:
            losses = vmap(loss_fn, in_dims=in_dims, randomness=tasks.randomness)(params, batch, hparams)
        except RuntimeError as err:
            text = str(err)
            if "randomness" in text and "error" in text:
                raise RuntimeError(_RANDOM.format(n=tasks.n)) from err
            if ("vmap" in text and ("inplace" in text or "in-place" in text)) or "updated in place" in text:
                raise RuntimeError(_IN_PLACE.format(n=tasks.n)) from err
            raise
        if not isinstance(losses, Tensor) or losses.shape != (tasks.n,):
            got = (
                _describe(losses) if not isinstance(losses, Tensor) else f"a Tensor of shape {tuple(losses.shape[1:])}"
            )
            raise ValueError(_NOT_SCALAR.format(n=tasks.n, got=got))
        total.last_losses = losses.detach()  # type: ignore[attr-defined]  # to name a task that diverges
        return losses.sum()

    total.last_losses = None  # type: ignore[attr-defined]
    return total


def nonfinite_tasks(loss_fn: Callable[..., Tensor]) -> str:
    """Which tasks' losses were not finite at the most recent step of a vectorised run ("" if none or unknown)."""
    losses = getattr(loss_fn, "last_losses", None)
    if not isinstance(losses, Tensor):
        return ""
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if not bad:
        return ""
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return f" (tasks=): the loss is not finite for task {shown} of {losses.numel()} (counting from 0)."
