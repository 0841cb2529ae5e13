"""``Tasks``: train a batch of independent tasks in one vectorised run (``ng.train(..., tasks=...)``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import vmap

from .optim._base import Optimizer, _describe
from .optim._schedule import Schedule

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

_VMAP_VALUE = (
    "nestgrad.train(tasks={n}): loss_fn {did}, which torch.func.vmap cannot do. nestgrad runs loss_fn once "
    "for all {n} tasks together (under vmap), so a tensor inside it stands for {n} values, one per task, and "
    "vmap forbids turning it into one Python number or bool: .item(), float(t), int(t), bool(t), and "
    "`if t > 1:` / `while t ...` on a tensor. Write the per-task choice with tensor operations: torch.where("
    "cond, a, b) or a mask (a * cond + b * ~cond) instead of if/else on a tensor, torch.clamp / "
    "torch.minimum / torch.maximum instead of comparing and choosing, and keep values as tensors instead of "
    ".item() (log them after train returns). Or train the tasks one at a time: tasks=None and a Python loop "
    "over the tasks."
)

_VMAP_ITEM = "calls .item() (or float() / int()) on a tensor"
_VMAP_CONTROL = "uses a tensor in Python control flow (if / while / bool() / and / or on a tensor)"

_VMAP_SHAPE = (
    "nestgrad.train(tasks={n}): loss_fn calls an operation whose output shape depends on the values (t[mask] "
    "with a boolean mask, nonzero, masked_select, unique, ...), which torch.func.vmap cannot do: nestgrad runs "
    "loss_fn once for all {n} tasks together, and each task would get a different shape. Keep the shapes "
    "fixed: multiply by the mask or use torch.where(mask, t, 0) and divide by mask.sum() instead of "
    "t[mask].mean(). Or train the tasks one at a time: tasks=None and a Python loop over the tasks."
)

_STACKED = (
    "nestgrad.train(tasks={n}): loss_fn failed, and params {names} look like stacked per-task weights: they "
    "already have a leading dimension of size {n} (as the weights that train(..., tasks={n}) returns have), "
    "but they were passed as initial weights shared by all tasks (ng.Tasks(params=None), the default), so "
    "every task received the whole stacked tensor ({first!r} has shape {shape} in each task). To continue "
    "from stacked per-task weights, pass tasks=ng.Tasks({n}, params=0) (with the state the earlier run "
    "returned, state=...); for shared initial weights, pass each weight without the task dimension. "
    "loss_fn raised {kind}: {err}"
)

_AMBIGUOUS = (
    "nestgrad.train(tasks={n}): {cls}'s {label} has shape {shape}, whose leading size {n} equals the number "
    "of tasks, but it has fewer dimensions than the stacked weight {name!r} of shape {stacked} (tasks "
    "first). Broadcasting aligns trailing dimensions, so it would apply along the dimensions of {name!r} "
    "itself, the same values for every task, not one value per task. For one value per task, give it the shape "
    "{per_task}; for the same per-element values in every task, give it the shape {shared} (the task "
    "dimension of size 1)."
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
            prefix of ``hparams``. The optimizer's own Tensor hyperparameters broadcast against
            the stacked weights ``(n, *shape)``: a per-task learning rate is a Tensor of shape
            ``(n, 1, ...)`` with as many trailing ones as the weight has dimensions. A value
            with fewer dimensions than the stacked weight whose leading size is ``n`` (a ``(n,)``
            lr for a matrix) is ambiguous and raises with the shape to use; per-element values
            shared by the tasks whose leading size is ``n`` take a leading 1, ``(1, *shape)``.
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
    statistics in train mode) raise: use ``track_running_stats=False`` or eval mode. ``vmap``
    forbids ``.item()`` and Python control flow on tensors (``if loss > 1:``) inside
    ``loss_fn``: these raise and say what to write instead (``torch.where``, masks,
    ``torch.clamp``). To continue from the stacked weights a run returned, pass
    ``Tasks(n, params=0)``.

    Examples:
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


def check_hparams(tasks: Tasks, optimizer: Optimizer, trainable: Mapping[str, Tensor]) -> None:
    """Refuse optimizer Tensor hyperparameters whose reading against the stacked weights is ambiguous.

    ``trainable`` holds the stacked weights, ``(n, *shape)``. A value broadcasts against them
    from the right, so one with fewer dimensions than a stacked weight never reaches the task
    dimension: it is shared by the tasks. When its leading size is ``n`` all the same (``(n,)``
    for a matrix, the shape a per-task value would have alone), it was most likely meant per
    task, and this raises with the shape that says so. A value of exactly one task's weight shape,
    with two dimensions or more, is per element (as without ``tasks=``), not ambiguous; ``(n,)`` for
    a bias of size ``n`` is. Values with ``1 + len(shape)`` dimensions
    (tasks first), 1-element values and function schedules (which have no shape before they run)
    are not checked here; ``optimizer.init`` checks that every value broadcasts. Runs once, before
    the first step.
    """
    n = tasks.n
    if n == 1:
        return  # a leading size of 1 broadcasts the same way on either reading
    cls = type(optimizer).__name__
    for v in optimizer._values(trainable):  # the walk optimizer.init's checks share
        x, label, p = v.value, v.label, v.param
        if isinstance(x, Schedule) and x.values is not None:
            shape, label = tuple(x.values.shape[1:]), f"{label} (each step's value of a Schedule)"
        elif isinstance(x, Tensor) and x.numel() != 1:
            shape = tuple(x.shape)
        else:
            continue  # a float, a function schedule, or a dict without this parameter (init names it)
        own = shape == tuple(p.shape[1:]) and len(shape) > 1  # one task's weight shape: per element
        if shape and shape[0] == n and len(shape) < p.ndim and not own:
            per_task, shared = (n, *([1] * (p.ndim - 1))), (1, *shape)
            fields = dict(n=n, cls=cls, label=label, shape=shape, name=v.name, stacked=tuple(p.shape))
            raise ValueError(_AMBIGUOUS.format(**fields, per_task=per_task, shared=shared))


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
        except (RuntimeError, ValueError) as err:
            text = str(err)
            if isinstance(err, RuntimeError):
                if "randomness" in text and "error" in text:
                    raise RuntimeError(_RANDOM.format(n=tasks.n)) from err
                if ("vmap" in text and ("inplace" in text or "in-place" in text)) or "updated in place" in text:
                    raise RuntimeError(_IN_PLACE.format(n=tasks.n)) from err
                if "vmap" in text and "calling .item() on a Tensor" in text:
                    raise RuntimeError(_VMAP_VALUE.format(n=tasks.n, did=_VMAP_ITEM)) from err
                if "vmap" in text and "data-dependent control flow" in text:
                    raise RuntimeError(_VMAP_VALUE.format(n=tasks.n, did=_VMAP_CONTROL)) from err
                if "vmap" in text and "dynamic shape" in text:
                    raise RuntimeError(_VMAP_SHAPE.format(n=tasks.n)) from err
            stacked = _stacked_shared(tasks, params, param_dims)
            if stacked:
                k = stacked[0]
                shape = tuple(params[k].shape[1:] if param_dims.get(k, 0) == 0 else params[k].shape)
                raise (RuntimeError if isinstance(err, RuntimeError) else ValueError)(
                    _STACKED.format(
                        n=tasks.n, kind=type(err).__name__, err=text, names=stacked[:4], first=k, shape=shape
                    )
                ) from err
            raise
        if not isinstance(losses, Tensor) or losses.shape != (tasks.n,):
            got = (
                _describe(losses) if not isinstance(losses, Tensor) else f"a Tensor of shape {tuple(losses.shape[1:])}"
            )
            raise ValueError(_NOT_SCALAR.format(n=tasks.n, got=got))
        if not torch.compiler.is_compiling():  # a compiled step that is not finite is re-run eagerly (_compile.py)
            total.last_losses = losses.detach()  # type: ignore[attr-defined]  # to name a task that diverges
        return losses.sum()

    total.last_losses = None  # type: ignore[attr-defined]
    return total


def _stacked_shared(tasks: Tasks, params: Mapping[str, Tensor], param_dims: Mapping[str, int | None]) -> list[str]:
    """Names of the weights given as shared (``Tasks(params=None)``), if every one has leading size ``n``.

    ``params`` are the tensors the vectorised loss received: shared trainable weights were
    expanded to ``(n, *shape)`` (their ``param_dims`` is 0), frozen ones kept their shape. Stacked
    weights passed again all have the task dimension; a model whose weights happen to start
    with ``n`` rarely has it in every one, so the hint is given only then.
    """
    spec = tasks.params
    shared, out = 0, []
    for k, v in params.items():
        if (spec.get(k) if isinstance(spec, Mapping) else spec) is not None:
            continue
        shared += 1
        own = v.shape[1:] if param_dims.get(k, 0) == 0 else v.shape
        if len(own) >= 1 and own[0] == tasks.n:
            out.append(k)
    return out if out and len(out) == shared else []


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
