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
import datetime
import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._nonfinite import _OPT_OUT, NonFiniteError, _names, _what, bad_names, training_error
from .optim._base import Optimizer, OptState
from .optim._schedule import Schedule

_F = torch._C._functorch

_NOT_INITIALIZED = (
    "nestgrad.train(parallel=DataParallel(...)): torch.distributed has no initialized process group{why}. "
    "Initialize one on every rank first, e.g. launch with `torchrun --nproc_per_node 2 script.py` and call "
    "torch.distributed.init_process_group('gloo')  (or 'nccl' on GPUs) before ng.train; or drop parallel= "
    "for a single-process run."
)

_DISAGREE = (
    "nestgrad.train(parallel=DataParallel(...)): the ranks disagree on {what}. Every rank must call ng.train "
    "with the same steps, method (and its settings), optimizer (every hyperparameter, group and schedule), "
    "DataParallel settings (reduce, bucket_mb, shard_hparams), check_finite and return_state, the same params "
    "(names, shapes, dtypes, requires_grad) and the same structure of hparams and state; only the data and the "
    "sharded hparams' leading dimension differ between ranks. Every rank raises this error."
)

_VALUES = (
    "nestgrad.train(parallel=DataParallel(...)): {what} {has} different values on different ranks ({shown}). "
    "Replicated inputs (params, frozen weights, buffers, hparams not in shard_hparams, the optimizer's Tensor "
    "hyperparameters and the given state=) must be identical on every rank, or the ranks would train different "
    "models: create them from the same seed on every rank (torch.manual_seed before building the model), load "
    "the same checkpoint, or broadcast them from rank 0 (torch.distributed.broadcast); buffers or a state that "
    "each rank updated on its own shard must be averaged or broadcast first. Per-rank values belong in "
    "shard_hparams. Every rank raises this error."
)

_UNSEEDED = (
    "nestgrad.train(parallel=DataParallel(...)): ZerothOrder draws its random directions from its own generator, "
    "and {which} ZerothOrder without a seed, so each rank would perturb the hparams along other directions and "
    "the ranks would estimate different hypergradients. Pass ng.ZerothOrder(..., seed=...) with the same seed "
    "on every rank (e.g. seed=0). Every rank raises this error."
)

_GENERATOR = (
    "nestgrad.train(parallel=DataParallel(...)): the ZerothOrder methods have the same seed on every rank but "
    "their direction generators are in different states (ranks {ranks} differ from rank 0): the same method "
    "object was used a different number of times on some ranks. Make the same calls with it on every rank, or "
    "create a fresh ng.ZerothOrder(..., seed=...) for this run. Every rank raises this error."
)

_PEER_FAILED = (
    "nestgrad.train(parallel=DataParallel(...)): rank {rank} of {world} failed{where}: {cause} This rank "
    "({me}) stops too: it was waiting for rank {rank} in {what}, which cannot complete. The cause is rank "
    "{rank}'s error (its traceback is in rank {rank}'s output). (The transport said: {raw})"
)

_PEER_UNKNOWN = (
    "nestgrad.train(parallel=DataParallel(...)): a collective of this data-parallel run failed on rank {me} of "
    "{world}, in {what}: another rank crashed, raised outside nestgrad (e.g. in the outer loss or between "
    "calls), stopped calling the same collectives, or did not answer within the process group's timeout "
    "({timeout}). No rank left a message for this run: look at the other ranks' output for the first error "
    "(the rank that failed first), and check that every rank makes the same ng.train calls. (The transport "
    "said: {raw})"
)

_NONFINITE_PEER = (
    "nestgrad.train ({method}): at step {t} of {steps}{late} on rank {me} of {world}, the gradient all-reduced "
    "across the ranks is not finite ({bad}), but this rank's own loss ({loss:.6g}) and gradient are finite: "
    "the non-finite values came from {culprits}. Look at {their} error, which names what went wrong there, "
    "and at {their} batch of step {t} (a NaN or inf in the data, a label out of range). Every rank raises at "
    "this step. " + _OPT_OUT
)

_NONFINITE_SUM = (
    "nestgrad.train ({method}): at step {t} of {steps}{late} on rank {me} of {world}, the gradient all-reduced "
    "across the ranks is not finite ({bad}), although every rank's own loss and gradient are finite: their "
    "{reduce} overflowed the dtype. Lower the learning rate (the weights may be diverging), scale the loss "
    "down, or train in a wider dtype. Every rank raises at this step. " + _OPT_OUT
)

_NONFINITE_UNKNOWN = (
    "nestgrad.train ({method}): at step {t} of {steps}{late} on rank {me} of {world}, the gradient all-reduced "
    "across the ranks is not finite ({bad}), but this rank's own loss ({loss:.6g}) and gradient are finite: the "
    "non-finite values came from another rank; ranks {silent} did not say within {wait:g} s which of them. Look "
    "at the other ranks' errors and at their batches of step {t}. " + _OPT_OUT
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

_TASKS_RANK = (
    "it was called with tasks=, which cannot be combined with parallel= yet. Split the tasks across ranks "
    "yourself (each rank trains its own tasks, without parallel=), or train each task data-parallel."
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

    Each call checks once, with one small all-gather before any other collective, that the ranks
    agree on every setting (``steps``, the method and its settings, every optimizer hyperparameter,
    group and schedule, ``reduce``, ``bucket_mb``, ``shard_hparams``, ``check_finite``,
    ``return_state``, the names, shapes and dtypes of params, hparams and state) and that every
    replicated tensor (params, frozen weights, replicated hparams, the optimizer's Tensors, the given
    ``state=``) has the same bits, and raises on every rank naming what differs otherwise. A rank
    whose run raises leaves its error in the process group's store: the others raise
    ``nestgrad.distributed.RankFailedError`` naming it. Every rank must then build the same
    graph: the collectives of a backward pass run in the order autograd visits them.

    Example (on every rank, launched with ``torchrun --nproc_per_node 2``):

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


class RankFailedError(RuntimeError):
    """Another rank of a data-parallel run failed, so this rank cannot go on.

    Raised instead of the transport's own error (gloo's "Connection closed by peer", a timeout)
    by every collective of ``ng.train(..., parallel=...)``, its backward pass and
    ``ng.distributed.mean``: it names the rank that failed and its error when that rank left
    one (every rank whose training run raises leaves its error in the process group's store
    before re-raising it), and otherwise says where to look.
    """


_RUNS: dict[int, int] = {}  # per process group (by id; 0: the default group): data-parallel train calls so far


@dataclass(frozen=True, eq=False)
class Sync:
    """The communication of one data-parallel ``train`` call (kept by ``Problem``)."""

    group: Any
    world: int
    rank: int
    mean: bool  # the step gradients are averaged (else summed)
    bucket_bytes: int
    store: Any = None  # the process group's store: failed ranks leave their error there (None: unavailable)
    run: int = 0  # which data-parallel train call this is on the group: the same number on every rank
    # Mutable notes for messages only: the step being all-reduced, this rank's last local gradients.
    notes: dict[str, Any] = field(default_factory=dict)

    def gradients(self, grads: dict[str, Tensor | None], t: int | None = None) -> dict[str, Tensor | None]:
        """The step's gradients all-reduced across ranks (differentiably when they carry a graph).

        With ``check_finite``, this rank's own gradients are kept until the next step, so that a
        non-finite all-reduced gradient can be blamed on the rank it came from (``nonfinite``).
        """
        names = [k for k, g in grads.items() if g is not None]
        self.notes["where"] = t  # a step: formatted only for a message (no per-step string work)
        if self.notes.get("keep"):
            self.notes["local"] = (t, grads)
        reduced = all_reduce([grads[k] for k in names], self, mean=self.mean)  # type: ignore[misc]
        return {**grads, **dict(zip(names, reduced, strict=True))}

    # ------------------------------------------------------------------------------------- failures
    def _key(self, what: str, rank: int) -> str:
        return f"nestgrad/data-parallel/{self.run}/{what}/{rank}"

    def guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; if it raises, leave the error in the store for the other ranks, then re-raise."""
        try:
            return fn(*args)
        except BaseException as err:
            if not isinstance(err, RankFailedError):
                self.leave_error(err)
            raise
        finally:
            self.notes.pop("local", None)  # kept for messages only: not held after the run
            self.notes["where"] = "an all-reduce of a backward pass through the run"

    def leave_error(self, err: BaseException) -> None:
        if self.store is None:
            return
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
        try:
            self.store.set(self._key("failed", self.rank), _clip(text, 1200))
        except Exception:  # (the store itself may be gone: the peers then say where to look)
            pass

    def peer_failed(self, raw: BaseException, what: str | None = None) -> RankFailedError:
        """The error for a collective that failed because another rank did: who, and why, when it said so."""
        where = self.notes.get("where")
        if isinstance(where, int):
            where = f"the all-reduce of the gradients of step {where}"
        what = what or where or "a collective of the data-parallel run"
        raw_text = _clip(" ".join(str(raw).split()), 300)
        failed: list[tuple[int, str]] = []
        if self.store is not None:
            for r in range(self.world):
                if r == self.rank:
                    continue
                try:
                    if self.store.check([self._key("failed", r)]):
                        failed.append((r, self.store.get(self._key("failed", r)).decode(errors="replace")))
                except Exception:  # the store is gone too (it lived on the failed rank): say where to look
                    break
        if not failed:
            timeout = getattr(self.store, "timeout", None)
            return RankFailedError(
                _PEER_UNKNOWN.format(
                    me=self.rank, world=self.world, what=what, raw=raw_text, timeout=timeout or "see timeout="
                )
            )
        r, cause = failed[0]
        others = f" (and ranks {[q for q, _ in failed[1:]]})" if len(failed) > 1 else ""
        cause = cause if cause.endswith((".", "!", "?")) else cause + "."
        return RankFailedError(
            _PEER_FAILED.format(
                rank=r, world=self.world, where=others, cause=cause, me=self.rank, what=what, raw=raw_text
            )
        )

    def nonfinite(
        self,
        method: str,
        t: int,
        steps: int,
        loss: Tensor,
        before: Mapping[str, Tensor],
        grads: Mapping[str, Tensor | None],
        after: Mapping[str, Tensor],
        slots: Mapping[str, Mapping[str, Tensor]],
        hparams: Sequence[tuple[str, Tensor]],
        late: str = "",
    ) -> NonFiniteError:
        """``training_error`` for a data-parallel step: names the rank whose data produced the non-finite values.

        A non-finite all-reduced gradient is the same on every rank, so every rank gets here at the same
        step: each leaves in the store whether its own loss and gradient were finite and reads the others'.
        """
        here = f"{late} on rank {self.rank} of {self.world}"
        reduced_bad = bad_names(grads)
        kept = self.notes.get("local")
        local = kept[1] if kept is not None and kept[0] in (t, None) else None
        # Only a non-finite all-reduced gradient is the same on every rank (and so met by all at this step); a
        # non-finite start, hparam or loss alone is this rank's own, and training_error describes it.
        if not reduced_bad or local is None or bad_names(before) or bad_names(dict(hparams)):
            return training_error(method, t, steps, loss, before, grads, after, slots, hparams, here)
        local_bad = bad_names(local)
        source = "loss" if not bool(torch.isfinite(loss.detach()).all()) else "gradient"
        if source == "loss":
            mine = f"its loss was {_what(loss)}"
        elif local_bad:
            shown_local = _names(local_bad, {k: g for k, g in local.items() if g is not None})
            mine = f"its loss was finite ({float(loss.detach()):.6g}) but its gradient of {shown_local} was not"
        else:
            mine = ""
        wait = _wait_seconds(self.store)
        answers = self._exchange(f"nonfinite-{t}", mine or "finite", wait)
        if mine:  # this rank's own loss or gradient: the message about its loss_fn and batch is the right one
            err = training_error(method, t, steps, loss, before, local, after, slots, hparams, here)
            others = [r for r in range(self.world) if r != self.rank]
            return NonFiniteError(
                f"{err} (Data-parallel: this rank's own {source} on its "
                f"batch of step {t} was not finite: also check that batch for NaN or inf. The all-reduce carried it "
                f"to every rank; ranks {others} raise too, naming this rank.)"
            )
        shown = _names(reduced_bad, {k: g for k, g in grads.items() if g is not None})
        culprits = [(r, a) for r, a in answers.items() if a not in (None, "finite")]
        silent = [r for r, a in answers.items() if a is None]
        fields = {"method": method, "t": t, "steps": steps, "late": late, "me": self.rank, "world": self.world}
        if culprits:
            named = "; ".join(f"rank {r} ({a})" for r, a in culprits[:4])
            their = f"rank {culprits[0][0]}'s" if len(culprits) == 1 else "those ranks'"
            return NonFiniteError(
                _NONFINITE_PEER.format(**fields, bad=shown, loss=float(loss.detach()), culprits=named, their=their)
            )
        if silent:
            return NonFiniteError(
                _NONFINITE_UNKNOWN.format(**fields, bad=shown, loss=float(loss.detach()), silent=silent, wait=wait)
            )
        return NonFiniteError(_NONFINITE_SUM.format(**fields, bad=shown, reduce="mean" if self.mean else "sum"))

    def _exchange(self, what: str, value: str, wait: float) -> dict[int, str | None]:
        """Leave ``value`` in the store and read the other ranks' (``None``: not there within ``wait`` seconds)."""
        out: dict[int, str | None] = {r: None for r in range(self.world) if r != self.rank}
        if self.store is None:
            return out
        try:
            self.store.set(self._key(what, self.rank), value)
            keys = [self._key(what, r) for r in out]
            try:
                self.store.wait(keys, datetime.timedelta(seconds=wait))
            except Exception:  # (some did not answer: read those that did)
                pass
            for r in out:
                if self.store.check([self._key(what, r)]):
                    out[r] = self.store.get(self._key(what, r)).decode(errors="replace")
        except Exception:  # (no store: the message says the others did not answer)
            pass
        return out

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
        try:
            dist.all_reduce(flat, group=sync.group)
        except RuntimeError as err:  # another rank failed (gloo: "Connection closed by peer"), or a timeout
            raise sync.peer_failed(err) from err
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
    store = None
    try:
        store = dist.distributed_c10d._get_process_group_store(group or dist.distributed_c10d._get_default_group())
    except Exception:  # (no store: a peer's failure is then reported without its cause)
        pass
    run = _RUNS.get(0 if group is None else id(group), 0)
    return Sync(group, world, rank, reduce == "mean", int(bucket_mb * 2**20), store, run)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _wait_seconds(store: Any) -> float:
    """How long to wait for the other ranks' notes: the group's timeout, at most 30 s."""
    timeout = getattr(store, "timeout", None)
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else 30.0
    return max(1.0, min(seconds, 30.0))


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


_CHUNK = 1 << 22  # elements per piece when digesting a tensor (bounds the temporary int64 copy)
_SCHEDULE_SAMPLES = 64  # steps at which a function Schedule is evaluated for the agreement check


def _words(x: Tensor) -> Tensor:
    """The bits of a contiguous 1-D tensor as signed integers of the same width (bool as bytes)."""
    if x.dtype == torch.bool:
        return x.view(torch.uint8)
    size = x.element_size()
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(size, torch.int64))


def _digests(tensors: Sequence[Tensor]) -> list[tuple[int, int, float, int]]:
    """Per tensor: two wrapping int64 sums of its bits (plain and position-weighted) that differ when its bits
    differ (any single changed element always changes the plain one; a permutation, the weighted one), the
    float64 sum of its values (for messages) and its size. One host read per device, once per train call."""
    per_device: dict[torch.device, list[int]] = {}
    ints: list[Tensor] = []
    sums: list[Tensor] = []
    for i, t in enumerate(tensors):
        x = t.detach().reshape(-1).contiguous()
        w = _words(x)
        s1 = torch.zeros((), dtype=torch.int64, device=x.device)
        s2 = torch.zeros((), dtype=torch.int64, device=x.device)
        for start in range(0, w.numel(), _CHUNK):
            c = w[start : start + _CHUNK].to(torch.int64)
            s1 = s1 + c.sum()
            s2 = s2 + (c * torch.arange(2 * start + 1, 2 * (start + c.numel()), 2, device=x.device)).sum()
        value = x.abs() if x.is_complex() else x
        ints.append(torch.stack([s1, s2]))
        sums.append(value.to(torch.float64).sum() if value.numel() else torch.zeros((), dtype=torch.float64))
        per_device.setdefault(x.device, []).append(i)
    out: list[tuple[int, int, float, int]] = [(0, 0, 0.0, 0)] * len(tensors)
    for idx in per_device.values():
        pairs = torch.stack([ints[i] for i in idx]).cpu().tolist()
        values = torch.stack([sums[i].to(ints[i].device) for i in idx]).cpu().tolist()
        for i, (a, b), v in zip(idx, pairs, values, strict=True):
            out[i] = (a, b, v, tensors[i].numel())
    return out


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


def _method_settings(method: Any) -> dict[str, str]:
    """The method and each of its settings; for ZerothOrder also the state of its direction generator."""
    out = {"method": type(method).__name__}
    if dataclasses.is_dataclass(method):
        for f in dataclasses.fields(method):
            if f.repr:
                out[f"method {f.name}"] = repr(getattr(method, f.name))
    generator = getattr(method, "_generator", None)  # ZerothOrder's directions
    if isinstance(generator, torch.Generator):
        out["method's direction generator"] = (
            "state " + hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest()[:12]
        )
    return out


def _tensor_kind(x: Tensor) -> str:
    grad = ", requires_grad" if x.requires_grad else ""
    return f"a Tensor of shape {tuple(x.shape)}, {x.dtype}{grad}"


def _schedule_steps(steps: int, state: OptState | None) -> list[int]:
    """The steps (counting from 1) at which a function Schedule is evaluated for the check: those of this run,
    sampled evenly when there are more than ``_SCHEDULE_SAMPLES``."""
    counts = [c for c in state.step.values() if isinstance(c, int)] if state is not None else []
    first, last = (min(counts) + 1, max(counts) + steps) if counts else (1, steps)
    n = last - first + 1
    if n <= _SCHEDULE_SAMPLES:
        return list(range(first, last + 1))
    return sorted({first + round(i * (n - 1) / (_SCHEDULE_SAMPLES - 1)) for i in range(_SCHEDULE_SAMPLES)})


def _schedule_value(fn: Callable[[int], Any], t: int) -> str:
    try:
        v = fn(t)
    except Exception as err:  # training raises it at this step, on every rank alike
        return f"raises {type(err).__name__}"
    if isinstance(v, Tensor):
        v = v.detach()
        return repr(float(v)) if v.numel() == 1 else f"Tensor{tuple(v.shape)} sum {float(v.double().sum())!r}"
    return repr(v)


def _hparam_settings(out: dict[str, str], label: str, v: Any, sample: list[int]) -> None:
    if isinstance(v, tuple):
        for i, x in enumerate(v):
            _hparam_settings(out, f"{label}[{i}]", x, sample)
    elif isinstance(v, Tensor):
        out[label] = _tensor_kind(v)  # its values are compared bit for bit with the other tensors
    elif isinstance(v, Schedule):
        if v.values is not None:
            out[label] = "Schedule of " + _tensor_kind(v.values)
        else:
            shown = ", ".join(f"{t}: {_schedule_value(v.fn, t)}" for t in sample)  # type: ignore[arg-type]
            out[label] = f"a Schedule of a function, with values at steps {{{shown}}}"
    elif isinstance(v, Mapping):
        out[label] = f"per-parameter values for {sorted(v)}"
        for n in sorted(v):
            _hparam_settings(out, f"{label}[{n!r}]", v[n], sample)
    else:
        out[label] = repr(v)


def _optimizer_settings(optimizer: Optimizer, steps: int, state: OptState | None) -> dict[str, str]:
    """Every setting of the optimizer: its class, each float, flag and kind of hyperparameter, groups, schedules."""
    out = {"optimizer": type(optimizer).__name__, "optimizer foreach": repr(optimizer.foreach)}
    out["optimizer groups"] = repr([g["params"] for g in optimizer.groups])
    sample = _schedule_steps(steps, state)
    for prefix, hp in [("", optimizer.defaults), *((f"groups[{i}].", g) for i, g in enumerate(optimizer.groups))]:
        for k, v in hp.items():
            if k != "params":
                _hparam_settings(out, f"optimizer {prefix}{k}", v, sample)
    return out


def _shown(values: list[Any], world: int) -> str:
    """``rank 0 has a, rank 1 has b``: every rank for a few, else rank 0 and the first ranks that differ."""
    ranks = list(range(world))
    if world > 4:
        ranks = [0, *[r for r in range(1, world) if values[r] != values[0]][:3]]
    return ", ".join(f"rank {r} has {_short(values[r])}" for r in ranks)


def _value_text(digest: tuple[int, int, float, int]) -> str:
    _, _, total, n = digest
    return repr(total) if n == 1 else f"values summing to {total!r}"


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
    check_finite: bool = True,
    return_state: bool = False,
) -> tuple[Sync, Callable[..., Tensor], dict[str, Tensor], Optimizer, Any]:
    """Check that the ranks agree (one all-gather), then wrap the inputs of a data-parallel ``train``.

    Returns what ``train`` runs with: the communication, ``loss_fn``, the trainable params, the
    optimizer and the hparams.

    The check gathers, from every rank, a description of every setting (steps, the method's settings,
    every optimizer hyperparameter, group and schedule, the DataParallel settings, check_finite,
    return_state, the names, shapes and dtypes of params, hparams and state) and bitwise digests of every
    replicated tensor (params, frozen weights and buffers, replicated hparams, the optimizer's Tensor
    hyperparameters, the state's slots): one small collective, before any bucketed one, so ranks that would
    disagree on the collectives' sizes raise instead of hanging. Problems that only one rank can see (an empty
    shard, tasks=, a bad shard_hparams) travel in the same gather, so that every rank raises.

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
    group_key = 0 if parallel.group is None else id(parallel.group)
    _RUNS[group_key] = _RUNS.get(group_key, 0) + 1  # the same count on every rank: names this run in the store
    sync = _sync(parallel.group, parallel.reduce, parallel.bucket_mb)
    sync.notes["keep"] = check_finite

    problems: list[str] = []
    if tasks is not None:
        problems.append(_TASKS_RANK)
    leaves, spec = pytree.tree_flatten(hparams) if hparams is not None else ([], None)
    sharded: list[int] = []
    if hparams is not None:
        flags = pytree._broadcast_to_and_flatten(parallel.shard_hparams, spec)
        if flags is None or any(not isinstance(f, bool) for f in flags):
            problems.append(
                f"shard_hparams must be True, False or a pytree prefix of hparams with booleans (hparams has the "
                f"structure {spec}); got {parallel.shard_hparams!r}."
            )
        else:
            sharded = [i for i, f in enumerate(flags) if f]
    for i in sharded:
        if leaves[i].ndim == 0:
            problems.append(_SHARD_SHAPE.format(what=f"hparams leaf {i}"))
    empty = _empty_shard(data)
    if empty is not None:
        problems.append(_EMPTY.format(what=empty))

    replicated_leaves = [i for i in range(len(leaves)) if i not in sharded]
    settings: dict[str, str] = {
        "steps": repr(steps),
        **_method_settings(method),
        "DataParallel reduce": repr(parallel.reduce),
        "DataParallel bucket_mb": repr(parallel.bucket_mb),
        "DataParallel shard_hparams": repr(parallel.shard_hparams),
        "check_finite": repr(check_finite),
        "return_state": repr(return_state),
        "torch.is_grad_enabled()": repr(torch.is_grad_enabled()),
        **_optimizer_settings(optimizer, steps, state),
        "params": repr(list(params)),
    }
    for k, v in params.items():
        settings[f"params[{k!r}]"] = f"{_tensor_kind(v)}{', trained' if k in trainable else ', frozen'}"
    settings["hparams structure"] = str(spec)
    for i, leaf in enumerate(leaves):
        kind = _tensor_kind(leaf[0] if i in sharded and leaf.ndim else leaf)
        settings[f"hparams leaf {i}"] = (
            kind.replace("a Tensor of shape", "sharded rows of shape") if i in sharded else kind
        )
    settings["state"] = "none (a fresh optimizer.init)" if state is None else "given"
    if state is not None:
        settings["state step counts"] = repr(sorted(state.step.items()))
        for slot, values in state.slots.items():
            for n, x in values.items():
                settings[f"state {slot}[{n!r}]"] = _tensor_kind(x)

    named: list[tuple[str, Tensor]] = [(f"params[{k!r}]", v) for k, v in params.items()]
    named += [(f"hparams leaf {i}", leaves[i]) for i in replicated_leaves]
    named += [(f"optimizer {n}", t) for n, t in zip(optimizer.tensor_names(), optimizer.tensors(), strict=True)]
    if state is not None:
        named += [(f"state {slot}[{n!r}]", x) for slot, values in state.slots.items() for n, x in values.items()]
    digests = _digests([t for _, t in named]) if not problems else []
    mine = {
        "settings": settings,
        "digests": dict(zip([n for n, _ in named], digests, strict=False)),
        "sizes": [leaves[i].shape[0] if leaves[i].ndim else 0 for i in sharded],
        "rows": _batch_rows(data),
        "problems": problems,
    }
    everyone: list[Any] = [None] * sync.world
    try:
        dist.all_gather_object(everyone, mine, group=sync.group)
    except RuntimeError as err:
        raise sync.peer_failed(err, "the agreement check at the start of the run") from err
    failed = [(r, o["problems"][0]) for r, o in enumerate(everyone) if o["problems"]]
    if failed:
        r, why = failed[0]
        raise ValueError(_RANK_FAILED.format(rank=r, why=why))
    _check_settings([o["settings"] for o in everyone], sync.world)
    rows = [o["rows"] for o in everyone]
    if parallel.reduce == "mean" and None not in rows and len(set(rows)) > 1:
        shown = ", ".join(f"rank {r}: {n}" for r, n in enumerate(rows))
        warnings.warn(_UNEVEN.format(rows=shown), UserWarning, stacklevel=3)
    _check_values([o["digests"] for o in everyone], sync.world)

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
    text = value if isinstance(value, str) else repr(value)
    return _clip(text, 160)


def _check_settings(settings: list[dict[str, str]], world: int) -> None:
    """Raise, on every rank alike (all hold the same gathered list), if the ranks' settings differ."""
    labels = list(dict.fromkeys(k for s in settings for k in s))
    diffs = []
    for label in labels:
        values = [s.get(label, "nothing") for s in settings]
        if any(v != values[0] for v in values):
            diffs.append((label, values))
    if not diffs:
        return
    methods = [s.get("method") for s in settings]
    if "ZerothOrder" in methods and any(label.startswith("method") for label, _ in diffs):
        unseeded = [
            r for r, s in enumerate(settings) if s.get("method") == "ZerothOrder" and s.get("method seed") == "None"
        ]
        if unseeded:
            which = (
                "every rank creates a"
                if len(unseeded) == world
                else f"rank {unseeded[0]} creates a"
                if len(unseeded) == 1
                else f"ranks {unseeded} create a"
            )
            raise ValueError(_UNSEEDED.format(which=which))
        if [label for label, _ in diffs] == ["method's direction generator"]:
            gen = [s.get("method's direction generator") for s in settings]
            raise ValueError(_GENERATOR.format(ranks=[r for r in range(world) if gen[r] != gen[0]]))
    what = "; ".join(f"{label}: {_shown(values, world)}" for label, values in diffs[:4])
    if len(diffs) > 4:
        what += f"; and {len(diffs) - 4} more ({', '.join(label for label, _ in diffs[4:8])}...)"
    raise ValueError(_DISAGREE.format(what=what))


def _check_values(digests: list[dict[str, tuple[int, int, float, int]]], world: int) -> None:
    """Raise, on every rank alike, if a replicated tensor's bits differ between ranks."""
    bad = [k for k, d in digests[0].items() if any(tuple(o[k][:2]) != tuple(d[:2]) for o in digests[1:])]
    if not bad:
        return
    texts = [_value_text(o[bad[0]]) for o in digests]
    shown = f"{bad[0]}: {_shown(texts, world)}"
    if all(t == texts[0] for t in texts):
        shown += " (the same sum, but different bits)"
    what = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    raise ValueError(_VALUES.format(what=what, has="has" if len(bad) == 1 else "have", shown=shown))


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
