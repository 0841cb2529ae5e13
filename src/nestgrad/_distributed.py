r"""``DataParallel``: data-parallel training runs on ``torch.distributed``, with exact hypergradients.

Each rank of an initialized process group calls ``ng.train(..., parallel=ng.DataParallel())``
with its shard of the data and the same (replicated) initial weights and hyperparameters. Every
step's gradients are all-reduced (``reduce="mean"`` or ``"sum"``) before the optimizer update,
inside the recorded graph, by a differentiable collective (``_AllReduce``), so every
rank holds the same weights and every method differentiates through the communication.

The convention (derived in the README's "Distributed" section, checked against one process by
``tests/test_distributed.py``): a backward pass on every rank computes the gradient of one
global scalar, the sum over ranks of what each rank backpropagates. Backpropagate from
``mean()`` of the ranks' outer losses to get the hypergradient of their mean, which is what
one process computes on the concatenated data. A replicated input (initial weights, an hparam
shared by all ranks, the optimizer's Tensor hyperparameters) then receives that whole
hypergradient on every rank; a sharded hparam (``shard_hparams``: per-example weights of the
examples this rank holds) receives its own part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .optim._base import Optimizer, OptState

_F = torch._C._functorch

_NOT_INITIALIZED = (
    "nestgrad.train(parallel=DataParallel(...)): torch.distributed has no initialized process group{why}. "
    "Initialize one on every rank first, e.g. launch with `torchrun --nproc_per_node 2 script.py` and call "
    "torch.distributed.init_process_group('gloo')  (or 'nccl' on GPUs) before ng.train; or drop parallel= "
    "for a single-process run."
)

_DISAGREE = (
    "nestgrad.train(parallel=DataParallel(...)): the ranks disagree on {what}: {values}. Every rank must call "
    "ng.train with the same steps, method, optimizer, params (names, shapes, dtypes, requires_grad), the same "
    "structure of hparams and the same shard_hparams; only the data and the sharded hparams' leading dimension "
    "differ between ranks."
)

_VALUES = (
    "nestgrad.train(parallel=DataParallel(...)): {what} has different values on different ranks (ranks {ranks} "
    "differ from rank 0). Replicated inputs must be identical on every rank, or the ranks would train different "
    "models: create them from the same seed on every rank (torch.manual_seed before building the model), or "
    "broadcast them from rank 0 (torch.distributed.broadcast). Per-rank values belong in shard_hparams."
)

_RANK_FAILED = (
    "nestgrad.train(parallel=DataParallel(...)): rank {rank} cannot train: {why} Every rank raises this error, "
    "so that none waits for the others forever."
)

_EMPTY = (
    "its shard of the data is empty ({what}). Split the data so that every rank holds at least one example "
    "(e.g. torch.tensor_split(x, world_size)[rank] with at least world_size examples)."
)

_MIXED = (
    "nestgrad.train(parallel=DataParallel(...)): {what} is computed both from the output of a data-parallel "
    "computation (another ng.train(parallel=...) or ng.distributed.replicated) and from tensors that are local "
    "to each rank. Its gradient cannot be split between those paths. Pass the two parts as separate hparams "
    "(hparams=(trained, lr) instead of hparams=trained['w'] * lr), or wrap the local tensor with "
    "ng.distributed.replicated(x) before combining them."
)

_MEAN_INPUT = (
    "nestgrad.train(parallel=DataParallel(...)): {what} is computed from the output of ng.distributed.mean, "
    "which is an outer objective (its backward pass takes the gradient of the global objective). Pass the "
    "tensors it was computed from instead."
)

_TASKS = (
    "nestgrad.train: tasks= and parallel= cannot be combined yet. Split the tasks across ranks yourself "
    "(each rank trains its own tasks, without parallel=), or train each task data-parallel."
)

_SHARD_SHAPE = (
    "nestgrad.DataParallel: the sharded {what} must have a leading (example) dimension; got a scalar. Mark "
    "only per-example hparams as sharded (shard_hparams), and pass shared scalars as replicated hparams."
)


@dataclass(frozen=True)
class DataParallel:
    r"""Train data-parallel across the ranks of a ``torch.distributed`` process group.

    Pass it as ``ng.train(..., parallel=ng.DataParallel())`` on every rank of an initialized
    process group (``torchrun``, ``init_process_group``). Each rank passes its own shard of the
    data and the same initial ``params``, optimizer and replicated ``hparams``. At every step,
    the gradient each rank computes on its shard is all-reduced before the optimizer update:

    ```text
    g_t = \frac1R \sum_{r=1}^{R} \nabla_W L_r(W_t, \lambda) \quad (\text{``reduce="mean"``}),
    \qquad g_t = \sum_r \nabla_W L_r(W_t, \lambda) \quad (\text{``reduce="sum"``})
    ```

    so every rank holds the same weights, bit for bit. Use ``"mean"`` when each rank's loss is
    the mean over its shard and the shards have equal sizes (then ``g_t`` is the gradient of
    the mean over all examples, as one process computes it); use ``"sum"`` when each rank's loss
    is already normalized globally (the sum over its examples divided by the total count).

    The all-reduce is a differentiable operation in the recorded graph (its backward pass is
    the same all-reduce of the cotangents, self-adjoint), so every method differentiates
    through it, and all of them give the hypergradient one process would compute on the
    concatenated data (tested to 1e-12 in float64 for Unroll, Reverse, Forward, Implicit,
    FiniteDiff; ZerothOrder gives the same estimate with the same seed).

    Convention for hypergradients: every rank's backward pass computes the gradient of the
    **sum over ranks** of what each rank backpropagates. Backpropagate from
    ``nestgrad.distributed.mean()`` of each rank's outer loss (the mean over its validation
    shard) to get the hypergradient of the global mean, which is what one process computes.
    Then:

    * a replicated tensor (initial ``params``, ``hparams`` not marked sharded, the optimizer's
      Tensor hyperparameters) receives the whole hypergradient, the same on every rank, so
      every rank can take the same outer step;
    * a sharded hparam (``shard_hparams``, e.g. per-example weights of this rank's examples)
      receives its own part: its slice of the global hypergradient.

    A replicated tensor that the outer loss also uses outside ``ng.train`` (e.g. a
    regularizer on ``lr``) must be wrapped there with ``nestgrad.distributed.replicated()``,
    so that its gradient along that path is summed over ranks too.

    Args:
        group: the process group, ``None`` for the default (world) group.
        reduce: ``"mean"`` (default) or ``"sum"``: how the ranks' gradients combine.
        shard_hparams: which ``hparams`` are sharded, as a pytree prefix of ``hparams`` with
            booleans (``True``: every leaf below is this rank's shard along dimension 0;
            ``False``: replicated). ``True`` marks all of them, ``(True, False)`` the first of two.
            Sharded leaves may have a different leading size on each rank.
        bucket_mb: gradients are flattened into buckets of about this many MiB, one
            all-reduce per bucket (as DDP does), not one per tensor.

    Each call checks once, with one small all-gather, that the ranks agree on ``steps``, the
    method, the shapes of params and hparams, and that replicated tensors have the same values,
    and raises on every rank with what differs otherwise. Every rank must then build the same
    graph: the collectives of a backward pass run in the order autograd visits them.

    Example (on every rank, launched with ``torchrun --nproc_per_node 2``)::

        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        x_r, y_r, a_r = x.chunk(world)[rank], y.chunk(world)[rank], a.chunk(world)[rank]
        trained = ng.train(loss_fn, params, ng.optim.SGD(lr=lr), [(x_r, y_r)], steps=100,
                           hparams=(a_r, s), parallel=ng.DataParallel(shard_hparams=(True, False)))
        val = ng.distributed.mean(val_loss(trained, x_val_r, y_val_r))
        da_r, ds, dlr = torch.autograd.grad(val, [a_r, s, lr])  # as one process would get them

    Not supported: sharded weights (FSDP, tensor parallelism), ``tasks=`` together with
    ``parallel=``, uneven shards under ``reduce="mean"`` (use ``"sum"`` with a global
    normalization instead).
    """

    group: Any = None
    reduce: str = "mean"
    shard_hparams: Any = False
    bucket_mb: float = 25.0

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "sum"):
            raise ValueError(
                f"nestgrad.DataParallel: reduce must be 'mean' (each rank's loss is the mean over its shard, "
                f"shards of equal size) or 'sum' (each rank's loss is normalized globally); got {self.reduce!r}."
            )
        b = self.bucket_mb
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
            raise ValueError(f"nestgrad.DataParallel: bucket_mb must be a positive number; got {b!r}.")


@dataclass(frozen=True, eq=False)
class Sync:
    """The communication of one data-parallel ``train`` call (kept by ``Problem``)."""

    group: Any
    world: int
    rank: int
    mean: bool  # the step gradients are averaged (else summed)
    bucket_bytes: int

    def gradients(self, grads: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """The step's gradients all-reduced across ranks (differentiably when they carry a graph)."""
        names = [k for k, g in grads.items() if g is not None]
        reduced = all_reduce([grads[k] for k in names], self, mean=self.mean)  # type: ignore[misc]
        return {**grads, **dict(zip(names, reduced, strict=True))}

    def cotangents(self, method: Any, grads: Sequence[Tensor], state_grads: Sequence[Tensor | None]) -> Any:
        """The cotangents an adjoint method's backward pass starts from: the ranks' mean.

        Forward, Implicit, FiniteDiff and ZerothOrder compute the hypergradient of
        ``<v, trained>`` for a cotangent ``v`` that must be the same on every rank (the solve's
        right-hand side, the finite-difference direction, the perturbation's slope). The mean
        over ranks of the local cotangents, once the replicated inputs sum their gradients over
        ranks, gives the gradient of the sum over ranks of ``<v_r, trained>``, as the convention
        says. Reverse replays the steps' graphs (and their all-reduces): it needs nothing here.
        """
        if getattr(method, "replays_steps", False):
            return list(grads), list(state_grads)
        live = [i for i, g in enumerate(state_grads) if g is not None]
        reduced = all_reduce([*grads, *(state_grads[i] for i in live)], self, mean=True)
        out_state = list(state_grads)
        for i, g in zip(live, reduced[len(grads) :], strict=True):
            out_state[i] = g
        return reduced[: len(grads)], out_state

    def averaged(self, matvec: Callable[[list[Tensor]], list[Tensor]]) -> Callable[[list[Tensor]], list[Tensor]]:
        """``matvec`` followed by the mean over ranks: the global Hessian (or Jacobian) product.

        Implicit's products go through the step's all-reduced gradient, whose backward pass gives
        each rank its local Hessian times ``x``; their mean is the Hessian of the mean loss.
        """

        def mean_matvec(xs: list[Tensor]) -> list[Tensor]:
            return all_reduce(matvec(xs), self, mean=True)

        return mean_matvec


# ----------------------------------------------------------------------------------------------- collectives
def _flat_all_reduce(tensors: Sequence[Tensor], sync: Sync, mean: bool) -> list[Tensor]:
    """Sum (or average) each tensor over the ranks, in buckets: one all-reduce per bucket, on copies."""
    import torch.distributed as dist

    out: list[Tensor | None] = [None] * len(tensors)
    buckets: list[list[int]] = []
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        idx, size = open_.get(key, ([], 0))
        if idx and size + t.numel() * t.element_size() > sync.bucket_bytes:
            buckets.append(idx)
            idx, size = [], 0
        idx.append(i)
        open_[key] = (idx, size + t.numel() * t.element_size())
    buckets += [idx for idx, _ in open_.values() if idx]
    buckets.sort(key=lambda idx: idx[0])  # the same order on every rank
    for idx in buckets:
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, group=sync.group)
        if mean:
            flat.div_(sync.world)
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
            out[i] = piece.view(tensors[i].shape)
    return out  # type: ignore[return-value]


def _vmap_level() -> int:
    """The current level of torch's legacy vmap (``is_grads_batched``), which has no public accessor."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


class _AllReduce(torch.autograd.Function):
    """All-reduce (sum or mean) of a list of tensors, differentiable to any order.

    The map ``x_r \\mapsto \\sum_q x_q`` (on every rank) is linear and self-adjoint, so the
    backward pass is the same all-reduce of the cotangents, done by calling this Function again
    (double backward works: Forward's tangents, Implicit's Hessian-vector products). Written here
    rather than taken from ``torch.distributed.nn.functional.all_reduce``, whose backward scaling
    has been disputed (pytorch#58005); ``None`` cotangents arrive as zeros, so every rank takes part.
    """

    @staticmethod
    def forward(ctx: Any, sync: Sync, mean: bool, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.sync, ctx.mean = sync, mean
        if any(_F.is_legacy_batchedtensor(t) for t in tensors):
            # Inside autograd.grad(..., is_grads_batched=True) (Forward's batched tangents): no collective has a
            # batching rule, so reduce the physical tensors, whose leading dimension is the batch.
            level = _vmap_level()
            batched = [t for t in tensors if _F.is_legacy_batchedtensor(t)]
            size = torch._remove_batch_dim(batched[0], level, 0, 0).shape[0]
            physical = [torch._remove_batch_dim(t, level, size, 0) for t in tensors]
            return tuple(torch._add_batch_dim(t, 0, level) for t in _flat_all_reduce(physical, sync, mean))
        return tuple(_flat_all_reduce(tensors, sync, mean))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        return (None, None, *_AllReduce.apply(ctx.sync, ctx.mean, *grads))


def all_reduce(tensors: Sequence[Tensor], sync: Sync, mean: bool) -> list[Tensor]:
    """Differentiable bucketed all-reduce of ``tensors`` (sum, or mean with ``mean``)."""
    if not tensors:
        return []
    return list(_AllReduce.apply(sync, mean, *tensors))


class _Replicated(torch.autograd.Function):
    """Identity forward; the backward pass sums the gradient over ranks.

    The ranks' partials of J w.r.t. their own copies of a replicated input sum to dJ/dx, the
    derivative w.r.t. the one tensor they all hold: every rank gets it.
    """

    @staticmethod
    def forward(ctx: Any, sync: Sync, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.sync = sync
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        return (None, *_AllReduce.apply(ctx.sync, False, *grads))


class _Coupled(torch.autograd.Function):
    """Identity both ways: marks the outputs of a data-parallel ``train``, whose backward pass already
    routes cotangents across ranks (so a later data-parallel ``train`` must not sum them again)."""

    @staticmethod
    def forward(ctx: Any, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)  # an unused output stays None: methods tell "unused" from "zero"
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        return grads


class _Mean(torch.autograd.Function):
    """The mean over ranks, the same value J on every rank.

    J is one global objective that every rank backpropagates, so each rank's ``x`` enters it with
    weight 1/R: the backward pass divides the cotangent by R, with no communication.
    """

    @staticmethod
    def forward(ctx: Any, sync: Sync, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.world = sync.world
        return _flat_all_reduce([x], sync, mean=True)[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        return None, grad / ctx.world


def _sync(group: Any = None, reduce: str = "mean", bucket_mb: float = 25.0) -> Sync:
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(_NOT_INITIALIZED.format(why=" (this build of torch has no torch.distributed)"))
    if not dist.is_initialized():
        raise RuntimeError(_NOT_INITIALIZED.format(why=""))
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(
            "nestgrad.train(parallel=DataParallel(group=...)): this process is not a member of the given group; "
            "call ng.train with parallel= only on the group's ranks, or pass the group this rank belongs to."
        )
    return Sync(group, world, rank, reduce == "mean", int(bucket_mb * 2**20))


def mean(x: Tensor, group: Any = None) -> Tensor:
    r"""The mean over ranks of ``x``, as the global objective to backpropagate from on every rank.

    Forward: ``\frac1R \sum_r x_r``, the same value on every rank. Backward: the cotangent
    divided by ``R``, with no communication, because every rank backpropagates the same
    global value and the data-parallel runs sum over ranks. With each rank's ``x`` the mean
    outer loss over an equal-sized validation shard, the hypergradients are those of the mean over
    all validation examples, exactly as one process on the concatenated data computes them.

    Examples:
        >>> val = ng.distributed.mean(F.cross_entropy(ng.call(model, trained, x_val_r), y_val_r))
        >>> val.backward()
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"nestgrad.distributed.mean: x must be a Tensor; got {type(x).__name__}.")
    return _Mean.apply(_sync(group), x)


def replicated(x: Tensor, group: Any = None) -> Tensor:
    """``x`` itself, whose gradient is summed over ranks in the backward pass.

    ``ng.train(parallel=...)`` does this for its replicated inputs. Use it for a tensor shared by
    all ranks that the outer loss also uses outside ``ng.train`` (a penalty on an hparam), so that
    the gradient along that path is the total over ranks too.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"nestgrad.distributed.replicated: x must be a Tensor; got {type(x).__name__}.")
    return _Replicated.apply(_sync(group), x)[0]


# ----------------------------------------------------------------------------------------------- train entry
def _forward_cls(node: Any) -> Any:
    return getattr(node, "_forward_cls", None)


def _needs_sum(x: Tensor, what: str) -> bool:
    """Whether a replicated input's gradient must be summed over ranks at the entry of ``train``.

    A tensor computed only from tensors local to each rank (a leaf, ``exp(log_lr)``) needs it; the
    output of a data-parallel computation does not (its backward pass routes cotangents across ranks
    already). Walks the graph behind ``x``, stopping at nestgrad's collectives and at leaves.
    """
    if not x.requires_grad:
        return False
    if x.grad_fn is None:
        return True
    coupled = local = False
    stack, seen = [x.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        cls = _forward_cls(node)
        if cls is _Mean:
            raise ValueError(_MEAN_INPUT.format(what=what))
        if cls in (_Coupled, _Replicated):
            coupled = True
            continue
        if type(node).__name__ == "AccumulateGrad":
            local = True
            continue
        stack.extend(n for n, _ in node.next_functions)
    if coupled and local:
        raise ValueError(_MIXED.format(what=what))
    return local


def _fingerprint(tensors: Sequence[Tensor]) -> list[float]:
    """Three numbers per tensor that differ, almost surely, when its bits differ (compared across ranks)."""
    out: list[float] = []
    for t in tensors:
        v = t.detach().reshape(-1).to(torch.float64)
        w = torch.linspace(1.0, 2.0, v.numel(), dtype=torch.float64, device=v.device)
        out += torch.stack([v.sum(), (v * v).sum(), (v * w).sum()]).tolist() if v.numel() else [0.0, 0.0, 0.0]
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha1(repr(obj).encode()).hexdigest()[:12]


def _empty_shard(data: Any) -> str | None:
    """Why this rank's data is an empty shard, when that can be seen without reading an iterator."""
    if isinstance(data, Tensor):
        return f"a Tensor of shape {tuple(data.shape)}" if data.ndim and data.shape[0] == 0 else None
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if len(data) == 0:
            return "an empty sequence of batches"
        first = pytree.tree_leaves(data[0])
        for leaf in first:
            if isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == 0:
                return f"its first batch holds a Tensor of shape {tuple(leaf.shape)}"
    return None


def _batch_rows(data: Any) -> int | None:
    """The leading size of the first Tensor of the first batch, when it can be seen without reading an iterator."""
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and len(data):
        for leaf in pytree.tree_leaves(data[0]):
            if isinstance(leaf, Tensor) and leaf.ndim:
                return int(leaf.shape[0])
    return None


_UNEVEN = (
    "nestgrad.DataParallel(reduce='mean'): the ranks' first batches have different numbers of rows ({rows}). "
    "'mean' averages the ranks' gradients, which equals one process's gradient on the whole batch only when every "
    "rank's loss averages the same number of examples; with these shards the result is a differently weighted "
    "mean. Use reduce='sum' and normalize each rank's loss by the global number of examples, or split the data "
    "evenly. (If the first dimension is not the examples', e.g. sequence-first tensors, this warning is moot.)"
)


def _method_key(method: Any) -> str:
    """The method and its settings; for ZerothOrder also the state of its direction generator."""
    fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.repr}
    key = f"{type(method).__name__}{sorted(fields.items(), key=lambda kv: kv[0])!r}"
    generator = getattr(method, "_generator", None)  # ZerothOrder's directions
    if isinstance(generator, torch.Generator):
        key += " generator " + hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest()[:12]
    return key


def enter(
    parallel: DataParallel,
    loss_fn: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    trainable: dict[str, Tensor],
    optimizer: Optimizer,
    data: Any,
    steps: int,
    hparams: Any,
    method: Any,
    state: OptState | None,
    tasks: Any,
) -> tuple[Sync, Callable[..., Tensor], dict[str, Tensor], Optimizer, Any]:
    """Check that the ranks agree (one all-gather), then wrap the inputs of a data-parallel ``train``.

    Returns what ``train`` runs with: the communication, ``loss_fn``, the trainable params, the
    optimizer and the hparams.

    Replicated inputs that need it get an identity whose backward pass sums over ranks. Each sharded
    hparam ``a_r`` becomes a tensor of the global size (the ranks' shards concatenated, zeros outside
    this rank's rows), replicated like the others, which ``loss_fn`` sees sliced back to ``a_r``: so
    every method treats every hparam as replicated, and ``a_r`` gets its rows of the global gradient.
    """
    import torch.distributed as dist

    if not isinstance(parallel, DataParallel):
        raise TypeError(
            f"nestgrad.train: parallel must be an ng.DataParallel(...) or None; got {type(parallel).__name__}."
        )
    if tasks is not None:
        raise ValueError(_TASKS)
    sync = _sync(parallel.group, parallel.reduce, parallel.bucket_mb)

    leaves, spec = pytree.tree_flatten(hparams) if hparams is not None else ([], None)
    if hparams is None:
        sharded = []
    else:
        flags = pytree._broadcast_to_and_flatten(parallel.shard_hparams, spec)
        if flags is None or any(not isinstance(f, bool) for f in flags):
            raise ValueError(
                f"nestgrad.DataParallel: shard_hparams must be True, False or a pytree prefix of hparams with "
                f"booleans (hparams has the structure {spec}); got {parallel.shard_hparams!r}."
            )
        sharded = [i for i, f in enumerate(flags) if f]
    problem: str | None = None
    for i in sharded:
        if leaves[i].ndim == 0:
            raise ValueError(_SHARD_SHAPE.format(what=f"hparams leaf {i}"))
    empty = _empty_shard(data)
    if empty is not None:
        problem = _EMPTY.format(what=empty)

    replicated_leaves = [i for i in range(len(leaves)) if i not in sharded]
    shape = {
        "steps": steps,
        "method": _method_key(method),
        "reduce": parallel.reduce,
        "optimizer": (
            type(optimizer).__name__,
            [(n, tuple(t.shape)) for n, t in zip(optimizer.tensor_names(), optimizer.tensors(), strict=True)],
        ),
        "params": [(k, tuple(v.shape), str(v.dtype), v.requires_grad, k in trainable) for k, v in params.items()],
        "hparams": (
            str(spec),
            [
                (
                    i,
                    tuple(leaves[i].shape[1:] if i in sharded else leaves[i].shape),
                    str(leaves[i].dtype),
                    leaves[i].requires_grad,
                    i in sharded,
                )
                for i in range(len(leaves))
            ],
        ),
        "state": state is not None,
        "grad": torch.is_grad_enabled(),
    }
    replicas = [*trainable.values(), *(leaves[i] for i in replicated_leaves), *optimizer.tensors()]
    mine = {
        "shape": shape,
        "values": _fingerprint(replicas),
        "sizes": [leaves[i].shape[0] for i in sharded],
        "rows": _batch_rows(data),
        "problem": problem,
    }
    everyone: list[Any] = [None] * sync.world
    dist.all_gather_object(everyone, mine, group=sync.group)
    failed = [(r, o["problem"]) for r, o in enumerate(everyone) if o["problem"] is not None]
    if failed:
        r, why = failed[0]
        raise ValueError(_RANK_FAILED.format(rank=r, why=why))
    for key in shape:
        values = [o["shape"][key] for o in everyone]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
            raise ValueError(_DISAGREE.format(what=key, values=shown))
    rows = [o["rows"] for o in everyone]
    if parallel.reduce == "mean" and None not in rows and len(set(rows)) > 1:
        shown = ", ".join(f"rank {r}: {n}" for r, n in enumerate(rows))
        warnings.warn(_UNEVEN.format(rows=shown), UserWarning, stacklevel=3)
    differ = [r for r, o in enumerate(everyone) if o["values"] != everyone[0]["values"]]
    if differ:
        names = [f"params[{k!r}]" for k in trainable] + [f"hparams leaf {i}" for i in replicated_leaves]
        names += [f"optimizer {n}" for n in optimizer.tensor_names()]
        bad = {
            n
            for r in differ
            for j, n in enumerate(names)
            if everyone[r]["values"][3 * j : 3 * j + 3] != everyone[0]["values"][3 * j : 3 * j + 3]
        }
        raise ValueError(_VALUES.format(what=", ".join(sorted(bad)[:4]), ranks=differ))

    # Replicated inputs: one identity whose backward sums the gradients over ranks (one bucketed collective).
    grad_on = torch.is_grad_enabled()
    candidates: list[tuple[str, Tensor, bool]] = []  # (what, tensor, whether it is a widened shard)
    if grad_on and getattr(method, "differentiates_params", True):
        candidates += [(f"params[{k!r}]", v, False) for k, v in trainable.items()]
    # Sharded leaves, widened to the global size: rows of the other ranks are zeros.
    sizes = [o["sizes"] for o in everyone]
    slices: dict[int, tuple[int, int]] = {}
    new_leaves = list(leaves)
    for j, i in enumerate(sharded):
        counts = [s[j] for s in sizes]
        start = sum(counts[: sync.rank])
        stop = start + counts[sync.rank]
        a = leaves[i]
        before = a.new_zeros((start, *a.shape[1:]))
        after = a.new_zeros((sum(counts) - stop, *a.shape[1:]))
        with torch.set_grad_enabled(grad_on):
            new_leaves[i] = torch.cat([before, a, after]) if a.requires_grad else torch.cat([before, a.detach(), after])
        slices[i] = (start, stop)
    for i in range(len(leaves)):
        candidates.append((f"hparams leaf {i}", new_leaves[i], i in slices))
    n_opt = len(optimizer.tensors())
    candidates += [
        (f"optimizer {n}", t, False) for n, t in zip(optimizer.tensor_names(), optimizer.tensors(), strict=True)
    ]
    # A widened shard is summed always: each rank adds its share of every row (its own rows' gradient, or
    # for Forward and the other adjoint methods a share of all rows).
    chosen = [
        j
        for j, (what, t, widened) in enumerate(candidates)
        if grad_on and t.requires_grad and (widened or _needs_sum(t, what))
    ]
    values = [t for _, t, _ in candidates]
    if chosen:
        for j, t in zip(chosen, _Replicated.apply(sync, *(values[j] for j in chosen)), strict=True):
            values[j] = t
    n_params = len(candidates) - len(leaves) - n_opt
    new_trainable = dict(zip(trainable, values[:n_params], strict=True)) if n_params else dict(trainable)
    new_hparams = pytree.tree_unflatten(values[n_params : n_params + len(leaves)], spec) if spec else hparams
    new_optimizer = optimizer.with_tensors(values[n_params + len(leaves) :]) if n_opt else optimizer

    wrapped_loss = loss_fn
    if slices:

        def sliced_loss(p: dict[str, Tensor], batch: Any, h: Any) -> Tensor:
            flat, tree = pytree.tree_flatten(h)
            for i, (a, b) in slices.items():
                flat[i] = flat[i][a:b]
            return loss_fn(p, batch, pytree.tree_unflatten(flat, tree))

        wrapped_loss = sliced_loss
    return sync, wrapped_loss, new_trainable, new_optimizer, new_hparams


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def leave(weights: dict[str, Tensor], final: OptState | None) -> tuple[dict[str, Tensor], OptState | None]:
    """Mark the outputs of a data-parallel ``train`` (see ``_Coupled``)."""
    names = [k for k, v in weights.items() if v.requires_grad]
    slots = [] if final is None else final.tensors()
    live = [i for i, x in enumerate(slots) if x.requires_grad]
    if not names and not live:
        return weights, final
    outs = _Coupled.apply(*(weights[k] for k in names), *(slots[i] for i in live))
    weights = {**weights, **dict(zip(names, outs[: len(names)], strict=True))}
    if final is not None and live:
        new = list(slots)
        for i, x in zip(live, outs[len(names) :], strict=True):
            new[i] = x
        final = final.with_tensors(new)
    return weights, final
