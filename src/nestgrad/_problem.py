"""``Problem``: everything a method needs to run or replay a training run, one step at a time."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._attention import AttentionUse, attention
from ._buffers import RunBuffers, running
from ._compile import CompiledSteps
from ._data import Batches
from ._distributed import Sync
from ._nonfinite import CHECK_EVERY, NonFiniteError, all_finite, finite, training_error
from .diagnostics._explain import PathReport, graph_nodes, reaches, require_path
from .optim._base import Optimizer, OptState, _describe

LossFn = Callable[[dict[str, Tensor], Any, Any], Tensor]

_NOT_USED = (
    "nestgrad.train: at step {t}, the loss does not depend on any of the trained params. "
    "loss_fn must compute its output from the params it receives, e.g. "
    "nestgrad.call(model, params, x), not model(x) (which uses the module's own weights)."
)


def hparam_leaves(tree: Any, path: str = "hparams") -> Iterator[tuple[str, Tensor]]:
    """Yield ``(path, tensor)`` for every leaf of a tuple/list/dict nesting of Tensors."""
    if isinstance(tree, Tensor):
        yield path, tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from hparam_leaves(v, f"{path}[{k!r}]")
    elif isinstance(tree, (tuple, list)):
        for i, v in enumerate(tree):
            yield from hparam_leaves(v, f"{path}[{i}]")
    else:
        raise TypeError(
            f"nestgrad.train: {path} must be a Tensor or a tuple/list/dict of Tensors; got "
            f"{_describe(tree)}. Wrap numbers as tensors (torch.tensor(0.1, requires_grad=True)), "
            f"or close over constants in loss_fn instead of passing them as hparams."
        )


def detach_tree(tree: Any) -> Any:
    """The same nesting with every Tensor detached."""
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: detach_tree(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(detach_tree(v) for v in tree)
    return tree


_OUTSIDE = (
    "nestgrad.train ({method}): at step {t}, the training loss depends on {what}, which requires grad but was "
    "passed neither in params nor as hparams. {method} trains with its own copies of the params and hparams "
    "and gives gradients only through them, so the gradient through this tensor would be silently lost "
    "(Unroll would have given it). If it is one of the hparams, loss_fn must read it from its third argument, "
    "not from a closure or a global. Otherwise pass it as hparams (ng.train(..., hparams=A) and read it from loss_fn's "
    "third argument; a tuple or dict holds several), also when a data function uses it: compute that part "
    "of the batch inside loss_fn from hparams. If it is a constant, .detach() it. If it is a module's own "
    "weight (loss_fn calls model(x), or ng.call with a dict that leaves it out), pass it in params "
    "(with requires_grad=False to keep it fixed)."
)


_IN_PLACE = (
    "nestgrad.train ({method}): at step {t}, loss_fn changed {what} in place (add_, mul_, copy_, an "
    "assignment into it, ...). The weights loss_fn receives are the state of the run: writing them "
    "changes the training step and its gradient behind the method's back (and Reverse's replays would "
    "differ). Compute new tensors instead (w = params['w'] * 0.5), or move the change into the optimizer "
    "or between runs. (Your own tensors are never written: loss_fn only ever receives copies.)"
)


def _walks(t: int, steps: int) -> bool:
    """The steps whose graph is searched for tensors outside params and hparams: 0-3, powers of 2, the last.

    O(log T) walks per run: a tensor used from some step on is found by the next power of 2.
    """
    return t < 4 or t & (t - 1) == 0 or t == steps - 1


@functools.cache
def _probe() -> Tensor:
    """A leaf that is only ever viewed: one autograd node per call, no kernel.

    Made on first use, not at import, and always as an ordinary CPU float32 leaf, whatever the
    caller's grad mode, inference mode, default dtype or default device.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return torch.zeros((), dtype=torch.float32, device="cpu", requires_grad=True)


def _next_sequence_nr() -> int:
    """The sequence number the next autograd node created in this thread will get (at least)."""
    probe = _probe()
    if torch.is_grad_enabled():
        return probe.view_as(probe).grad_fn._sequence_nr() + 1  # type: ignore[union-attr]
    with torch.enable_grad():
        return probe.view_as(probe).grad_fn._sequence_nr() + 1  # type: ignore[union-attr]


def _describe_input(node: Any) -> str:
    if type(node).__name__ == "AccumulateGrad":
        v = node.variable
        kind = "an nn.Parameter" if isinstance(v, torch.nn.Parameter) else "a leaf Tensor"
        return f"{kind} of shape {tuple(v.shape)} and dtype {v.dtype}"
    return f"a Tensor computed before this step (by {node.name()}), e.g. a closed-over tensor or a precomputed batch"


def _require_inputs(loss: Tensor, allowed: set[int], start: int, t: int, method: str) -> None:
    """Raise if ``loss`` reaches a tensor that requires grad other than the ``allowed`` leaves.

    Walks the graph of this step back to its inputs: an ``AccumulateGrad`` of a leaf not in
    ``allowed``, or any node created before the step began (sequence number below ``start``),
    is a tensor from outside params and hparams. Only the step's own nodes are walked.
    """

    def outside(node: Any) -> bool:  # a leaf, or a node from before the step: the walk stops there
        return type(node).__name__ == "AccumulateGrad" or node._sequence_nr() < start

    for node in graph_nodes(loss.grad_fn, stop=outside):
        if outside(node) and id(getattr(node, "variable", None)) not in allowed:
            raise RuntimeError(_OUTSIDE.format(method=method, t=t, what=_describe_input(node)))


_LOSS_FN_ARGS = (
    "nestgrad.train: loss_fn is called as loss_fn(params, batch, hparams) (hparams is None when train gets no "
    "hparams=), but {name} {problem}. Give it three parameters, e.g. `def loss_fn(p, batch, hparams=None):` "
    "(the third may go unused), or wrap it: loss_fn=lambda p, batch, hparams: f(p, batch)."
)


def check_loss_fn(loss_fn: Any) -> None:
    """Raise before the first step if ``loss_fn`` cannot be called as ``loss_fn(params, batch, hparams)``.

    Read from ``inspect.signature`` once; a callable without one (some builtins) is not checked here,
    and ``Problem.loss`` says the same if the call itself fails to bind.
    """
    if not callable(loss_fn):
        raise TypeError(
            f"nestgrad.train: loss_fn must be a function loss_fn(params, batch, hparams) -> scalar Tensor; got "
            f"{_describe(loss_fn)}."
        )
    code = getattr(loss_fn, "__code__", None)
    key = None
    if code is not None and inspect.isfunction(loss_fn):  # the verdict depends on the code and the defaults only
        key = (code, len(loss_fn.__defaults__ or ()), tuple(loss_fn.__kwdefaults__ or ()))
        if key in _CALLABLE_AS_LOSS:
            return
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None, None)
    except TypeError as err:
        raise TypeError(_loss_fn_args(loss_fn, signature, str(err))) from None
    if key is not None:
        _CALLABLE_AS_LOSS.add(key)  # lambdas and closures made per call share their code: read once


_CALLABLE_AS_LOSS: set[tuple[Any, ...]] = set()  # (code, number of defaults, keyword defaults) that bind 3 args


def _loss_fn_args(loss_fn: Any, signature: Any, why: str) -> str:
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    name = "loss_fn" if name == "<lambda>" else name
    return _LOSS_FN_ARGS.format(name=f"{name}{signature if signature is not None else ''}", problem=f"cannot: {why}")


def _binding_error(err: TypeError, frame: Any) -> bool:
    """Whether ``err`` was raised by the call in ``frame`` itself (its arguments did not bind), not inside it."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame is frame and "positional argument" in str(err)


_DEVICE_ERRORS = ("Expected all tensors to be on the same device", "is not on the expected device",
                  "found at least two devices")  # fmt: skip


def _devices_message(
    method: str, t: int, params: Mapping[str, Tensor], batch: Any, hparams: Any, err: Exception
) -> str:
    """Where loss_fn's inputs live, for a device mismatch inside it: params, hparams and the batch."""

    def devices(tree: Any) -> str:
        found = sorted({str(x.device) for x in pytree.tree_leaves(tree) if isinstance(x, Tensor)})
        return " and ".join(found) if found else "no tensors"

    where = f"params on {devices(dict(params))}, hparams on {devices(hparams)}, the batch on {devices(batch)}"
    return (
        f"nestgrad.train ({method}): at step {t}, loss_fn combined tensors on different devices ({where}); "
        f"torch said: {str(err).rstrip('.!')}. Move them to one device before calling train: the model and params with "
        f"model.to(device), the hparams with A.to(device) (a leaf: torch.zeros(n, device=device, "
        f"requires_grad=True)), the batches with x.to(device)."
    )


def _check_loss(loss: Any, t: int) -> None:
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        got = _describe(loss)
        raise ValueError(
            f"nestgrad.train: loss_fn must return a scalar Tensor; at step {t} it returned {got}. "
            f"Reduce it with .mean() or .sum() (per-example weights go inside the reduction)."
        )
    if loss.is_complex():
        raise TypeError(
            f"nestgrad.train: loss_fn returned a complex scalar ({loss.dtype}) at step {t}; a loss to minimize "
            f"must be real. Return loss.abs() or loss.real, or a real loss of the complex model's outputs."
        )
    if not loss.is_floating_point():
        raise TypeError(
            f"nestgrad.train: loss_fn returned a {loss.dtype} Tensor at step {t}, which has no gradient. "
            f"Counts and accuracies such as (logits.argmax(1) == y).sum() are not differentiable; return a "
            f"floating-point loss such as F.cross_entropy(logits, y)."
        )


def _tensor_hparam_names(optimizer: Optimizer) -> list[str]:
    """Names of ``optimizer.tensors()``, in the same order: ``lr``, ``betas[0]``, ``groups[1].lr``, ..."""
    return optimizer.tensor_names()


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocator's out-of-memory error (CUDA's, or the CPU's plain RuntimeError)."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def out_of_memory(method: str, where: str) -> torch.OutOfMemoryError:
    """The allocator's out-of-memory error, re-raised with the method, the step and what uses less memory."""
    return torch.OutOfMemoryError(
        f"nestgrad.train ({method}): out of memory {where}. Memory per method, for T steps: Unroll keeps T "
        f"autograd graphs; Unroll(truncate=k) keeps k; Reverse() keeps T copies of the weights and optimizer "
        f"state instead of graphs; Reverse(checkpoint_every=k) keeps T/k copies and one segment of k steps "
        f"(k = sqrt(T) is the classic choice); Forward() and Implicit() keep memory independent of T. Smaller "
        f"batches, or float32 instead of float64, help every method."
    )


@dataclass
class Problem:
    """Everything a ``Method`` needs to run or replay a training run.

    A method calls ``step()`` (or ``loss()`` and ``grads()``) for
    ``t in range(steps)`` and decides what to keep for the backward pass.
    """

    loss_fn: LossFn
    optimizer: Optimizer
    batches: Batches
    steps: int
    hparams: Any
    frozen: dict[str, Tensor]
    progress: bool = False
    check_path: bool = False  # check that the hparams reach the loss, until a step's loss does (see ``loss``)
    method: str = "Unroll"  # for messages
    check_finite: bool = True  # raise NonFiniteError at the first non-finite loss or update (see ``step``)
    strict: bool = False  # raise if the loss reaches a tensor that requires grad besides params and hparams
    # Buffers (BatchNorm's running statistics): the run's copies advance in training steps only;
    # a replay (``replay=True``: a backward pass re-running steps) gets throwaway copies.
    replay: bool = False
    buffers: RunBuffers = field(default_factory=RunBuffers, repr=False, compare=False)
    # Attention on the math kernel in first-order steps too: set by methods that replay steps with a graph.
    math_attention: bool = False
    attention: AttentionUse = field(default_factory=AttentionUse, repr=False)  # shared by copies of a run
    origin: Any = None  # the caller's hparams when ``hparams`` holds views of them (Unroll): the path check's target
    state: OptState | None = None  # the optimizer state to start from; None: ``optimizer.init(params)``
    returns_state: bool = False  # whether train returns the final state (so a method keeps what it needs)
    parallel: Sync | None = None  # data-parallel: how step gradients are all-reduced (see _distributed.py)
    compiled: CompiledSteps | None = None  # train(..., compile=...): the run's compiled steps (_compile.py)
    # A batch a compiled step fetched before falling back: the eager step reads it instead of fetching again.
    pending_batch: tuple[int, Any] | None = field(default=None, init=False, repr=False)
    _unused: PathReport | None = field(default=None, init=False, repr=False)
    _flags: list[tuple[int, Tensor]] = field(default_factory=list, init=False, repr=False)
    _last: tuple[Any, ...] = field(default=(), init=False, repr=False)

    def init_state(self, params: dict[str, Tensor]) -> OptState:
        """The optimizer state the run starts from: the one given to ``train``, else a fresh one."""
        return self.optimizer.init(params) if self.state is None else self.state

    def hparam_tensors(self) -> list[Tensor]:
        """Every tensor a hypergradient can reach besides the initial params: the leaves of
        ``hparams``, then the optimizer's Tensor hyperparameters."""
        leaves = [] if self.hparams is None else pytree.tree_leaves(self.hparams)
        return [*leaves, *self.optimizer.tensors()]

    def hparam_names(self) -> list[str]:
        """Names of ``hparam_tensors()`` for messages: ``hparams[0]``, ``optimizer lr``, ..."""
        names = [name for name, _ in hparam_leaves(self.hparams)] if self.hparams is not None else []
        return names + [f"optimizer {k}" for k in _tensor_hparam_names(self.optimizer)]

    def with_hparam_tensors(self, tensors: Sequence[Tensor]) -> Problem:
        """The same problem with ``hparam_tensors()`` replaced (e.g. by fresh leaves)."""
        if self.hparams is None:
            hparams, n = None, 0
        else:
            leaves, spec = pytree.tree_flatten(self.hparams)
            hparams, n = pytree.tree_unflatten(list(tensors[: len(leaves)]), spec), len(leaves)
        rest = tensors[n:]  # the optimizer's: none is common, and then it is the same optimizer
        optimizer = self.optimizer.with_tensors(rest) if len(rest) else self.optimizer
        return dataclasses.replace(self, hparams=hparams, optimizer=optimizer)

    def loss(self, params: dict[str, Tensor], t: int, hparams: Any = None, math_sdpa: bool = True) -> Tensor:
        """The scalar training loss at step ``t``."""
        full = {**params, **self.frozen} if self.frozen else params
        hp = self.hparams if hparams is None else hparams
        walk = self.strict and torch.is_grad_enabled() and _walks(t, self.steps)
        start = _next_sequence_nr() if walk else 0
        batch = self.batches(t) if self.pending_batch is None else self._pending(t)
        versions = [v._version for v in params.values()]
        try:
            buffers = self.buffers.throwaway() if self.replay else self.buffers
            with attention(math_sdpa, self.attention), running(buffers):
                loss = self.loss_fn(full, batch, hp)
        except RuntimeError as err:
            if "leaf Variable that requires grad is being used in an in-place operation" in str(err):
                raise RuntimeError(_IN_PLACE.format(method=self.method, t=t, what="one of the params")) from err
            if any(m in str(err) for m in _DEVICE_ERRORS):
                raise RuntimeError(_devices_message(self.method, t, full, batch, hp, err)) from err
            raise
        except TypeError as err:  # a loss_fn whose signature inspect could not read, called with 3 arguments
            if not _binding_error(err, inspect.currentframe()):
                raise
            raise TypeError(_loss_fn_args(self.loss_fn, None, str(err))) from err
        written = [k for (k, v), n in zip(params.items(), versions) if v._version != n]
        if written:
            raise RuntimeError(_IN_PLACE.format(method=self.method, t=t, what=f"params[{written[0]!r}]"))
        _check_loss(loss, t)
        if walk and loss.grad_fn is not None:
            # The method's own leaves: the params, and the hparams when they are live (not detached).
            allowed = {id(v) for v in params.values()}
            if hparams is None:
                allowed |= {id(h) for h in self.hparam_tensors()}
            _require_inputs(loss, allowed, start, t, self.method)
        if self.check_path and hparams is None and torch.is_grad_enabled():
            self._check_path(loss, full, batch, math_sdpa)
        return loss

    def _pending(self, t: int) -> Any:
        """The batch of step ``t`` that a compiled step fetched before falling back to eager."""
        pending, self.pending_batch = self.pending_batch, None
        return pending[1] if pending is not None and pending[0] == t else self.batches(t)

    def _check_path(self, loss: Tensor, full: dict[str, Tensor], batch: Any, math_sdpa: bool) -> None:
        """Raise DisconnectedError if the hparams reach this step's loss only through cut paths.

        One graph walk when the path exists; when it does not, loss_fn runs again under a tracker to
        say where it was cut. hparams that this step does not use at all may be used by a later one
        (a schedule, a warm-up): the check goes on, and warns at the end of a run that never used them.
        """
        target = self.hparams if self.origin is None else self.origin
        if self._unused is not None:  # not used by an earlier step: only look for a path from now on
            self.check_path = not reaches(loss, target)
            return

        def rerun(h: Any) -> Tensor:
            with attention(math_sdpa, self.attention), running(self.buffers.throwaway()):
                return self.loss_fn(full, batch, h)

        report = require_path(loss, target, rerun)
        if report is not None and report.status == "unused":
            self._unused = report
        else:
            self.check_path = False

    def grads(self, params: dict[str, Tensor], loss: Tensor, t: int, create_graph: bool) -> dict[str, Tensor | None]:
        """Gradients of ``loss`` w.r.t. ``params``; ``None`` where it does not depend on one."""
        if not loss.requires_grad:
            raise RuntimeError(_NOT_USED.format(t=t))
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
        if all(g is None for g in grads):
            raise RuntimeError(_NOT_USED.format(t=t))
        if self.parallel is not None:  # data-parallel (_distributed.py): the ranks' gradients, all-reduced
            return self.parallel.gradients(dict(zip(params, grads, strict=True)), t)
        return dict(zip(params, grads, strict=True))

    def step(
        self, params: dict[str, Tensor], state: OptState, t: int, create_graph: bool
    ) -> tuple[dict[str, Tensor], OptState, Tensor]:
        """One optimizer step at step ``t``; returns the new weights and state, and the loss (detached).

        With ``create_graph`` the new weights are a differentiable function of
        ``params``, ``state`` and the hyperparameters. Without it, the step is
        plain first-order training and returns fresh leaves. With ``check_finite``,
        a non-finite loss or update raises ``NonFiniteError``.
        """
        try:
            return self._step(params, state, t, create_graph)
        except RuntimeError as err:
            if not is_out_of_memory(err) or str(err).startswith("nestgrad."):
                raise
            where = f"while replaying step {t} of {self.steps} in the backward pass" if self.replay else None
            raise out_of_memory(self.method, where or f"at step {t} of {self.steps}") from err

    def _step(
        self, params: dict[str, Tensor], state: OptState, t: int, create_graph: bool
    ) -> tuple[dict[str, Tensor], OptState, Tensor]:
        if self.compiled is not None:
            done = self.compiled.step(self, params, state, t, create_graph)
            if done is not None:
                return done
        if create_graph:
            loss = self.loss(params, t)
            grads = self.grads(params, loss, t, True)
            new, new_state = self.optimizer.update(grads, state, params)
        else:
            params = {k: v.detach().requires_grad_() for k, v in params.items()}
            with torch.enable_grad():
                loss = self.loss(params, t, detach_tree(self.hparams), math_sdpa=self.math_attention)
                grads = self.grads(params, loss, t, False)
            with torch.no_grad():
                new, new_state = self.optimizer.update(grads, state, params)
        if self.compiled is not None:  # compiled gradients are zeros where eager ones are None
            self.compiled.eager_grads(grads)
        if self.check_finite:
            self._check_finite(t, (loss, params, grads, new, new_state))
        return new, new_state, loss.detach()

    def _check_finite(self, t: int, step: tuple[Any, ...]) -> None:
        """Raise NonFiniteError if step ``t``'s loss, updated weights or optimizer state are not finite.

        On the CPU, at once. Elsewhere the flag stays on the device, and the flags are read
        every ``CHECK_EVERY`` steps and at the end of the run (``range``): no sync per step.
        """
        loss, _, _, new, new_state = step
        checked = [loss, *new.values(), *new_state.tensors()]
        ok = finite(checked)
        if ok.device.type == "cpu":
            if not ok and not all_finite(checked):
                raise self._nonfinite(t, step)
            return
        self._flags.append((t, ok))
        self._last = step
        if len(self._flags) >= CHECK_EVERY:
            self._read_flags()

    def _read_flags(self) -> None:
        """Read the flags accumulated on an accelerator (one sync) and raise at the first bad step."""
        self.optimizer._read_schedule_flags()  # the range flags of what function schedules returned there
        if not self._flags:
            return
        steps = [t for t, _ in self._flags]
        oks = torch.stack([ok for _, ok in self._flags])
        self._flags.clear()
        if bool(oks.all()):  # exact flags off the CPU (infinity norms): False is never an overflow
            return
        first = steps[int((~oks).nonzero()[0, 0])]
        late = (
            "" if first == steps[-1] else f" (details from step {steps[-1]}: flags are read every {CHECK_EVERY} steps)"
        )
        raise self._nonfinite(first, self._last, late)

    def _nonfinite(self, t: int, step: tuple[Any, ...], late: str = "") -> NonFiniteError:
        loss, before, grads, new, new_state = step
        hp = list(zip(self.hparam_names(), self.hparam_tensors(), strict=True))
        if self.parallel is not None:  # data-parallel (_distributed.py): blames the rank whose data was not finite
            sync = self.parallel
            return sync.nonfinite(self.method, t, self.steps, loss, before, grads, new, new_state.slots, hp, late)
        return training_error(self.method, t, self.steps, loss, before, grads, new, new_state.slots, hp, late)

    def fit(
        self,
        params: dict[str, Tensor],
        state: OptState | None = None,
        start: int = 0,
        stop: int | None = None,
        before_step: Callable[[int, dict[str, Tensor], OptState], None] | None = None,
        after_step: Callable[[int, Tensor], None] | None = None,
    ) -> tuple[dict[str, Tensor], OptState]:
        """Plain first-order training over steps ``[start, stop)``; returns detached weights and state.

        ``before_step(t, params, state)`` runs before each step, e.g. to store the trajectory;
        ``after_step(t, loss)`` after it.
        """
        stop = self.steps if stop is None else stop
        state = self.init_state(params) if state is None else state
        for t in self.range(start, stop):
            if before_step is not None:
                before_step(t, params, state)
            params, state, loss = self.step(params, state, t, create_graph=False)
            if after_step is not None:
                after_step(t, loss)
        return {k: v.detach() for k, v in params.items()}, state

    def range(self, start: int = 0, stop: int | None = None) -> Iterator[int]:
        """The steps ``start, ..., stop - 1``, with a tqdm bar when ``progress`` is set.

        After the last step of a whole run, the finite flags still on an accelerator are read,
        and hparams that no step's loss used are reported.
        """
        stop = self.steps if stop is None else stop
        steps: Iterable[int] = range(start, stop)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"nestgrad.train ({self.method})", leave=False, dynamic_ncols=True)
        yield from steps
        if self.compiled is not None and stop == self.steps:
            self.compiled.finish()
        self._read_flags()
        self._last = ()  # the last step's tensors were kept for a message only
        if self.check_path and self._unused is not None and stop == self.steps:
            self.check_path = False
            warnings.warn(f"at none of the {self.steps} steps: {self._unused}", UserWarning, stacklevel=4)
