"""``train``: a whole training run as a differentiable function."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._attention import AttentionUse, attention
from ._buffers import RunBuffers, running
from ._data import Batches
from ._distributed import DataParallel, Sync, enter, leave
from ._explain import PathReport, graph_nodes, reaches, require_path
from ._methods import AdjointMethod, Method, Unroll, is_out_of_memory, out_of_memory
from ._nonfinite import CHECK_EVERY, NonFiniteError, all_finite, finite, training_error
from ._tasks import Tasks, as_tasks, stack_params, vectorise
from .optim._base import Optimizer, OptState, _check_params, _describe

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


_PROBE = torch.zeros((), requires_grad=True)  # only ever viewed: one autograd node per call, no kernel


def _next_sequence_nr() -> int:
    """The sequence number the next autograd node created in this thread will get (at least)."""
    if torch.is_grad_enabled():
        return _PROBE.view_as(_PROBE).grad_fn._sequence_nr() + 1  # type: ignore[union-attr]
    with torch.enable_grad():
        return _PROBE.view_as(_PROBE).grad_fn._sequence_nr() + 1  # type: ignore[union-attr]


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


@dataclass
class Problem:
    """Everything a :class:`~nestgrad.Method` needs to run or replay a training run.

    A method calls :meth:`step` (or :meth:`loss` and :meth:`grads`) for
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
        """Names of :meth:`hparam_tensors` for messages: ``hparams[0]``, ``optimizer lr``, ..."""
        names = [name for name, _ in hparam_leaves(self.hparams)] if self.hparams is not None else []
        return names + [f"optimizer {k}" for k in _tensor_hparam_names(self.optimizer)]

    def with_hparam_tensors(self, tensors: Sequence[Tensor]) -> Problem:
        """The same problem with :meth:`hparam_tensors` replaced (e.g. by fresh leaves)."""
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
        batch = self.batches(t)
        versions = [v._version for v in params.values()]
        try:
            buffers = self.buffers.throwaway() if self.replay else self.buffers
            with attention(math_sdpa, self.attention), running(buffers):
                loss = self.loss_fn(full, batch, hp)
        except RuntimeError as err:
            if "leaf Variable that requires grad is being used in an in-place operation" in str(err):
                raise RuntimeError(_IN_PLACE.format(method=self.method, t=t, what="one of the params")) from err
            raise
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
            return self.parallel.gradients(dict(zip(params, grads, strict=True)))
        return dict(zip(params, grads, strict=True))

    def step(
        self, params: dict[str, Tensor], state: OptState, t: int, create_graph: bool
    ) -> tuple[dict[str, Tensor], OptState, Tensor]:
        """One optimizer step at step ``t``; returns the new weights and state, and the loss (detached).

        With ``create_graph`` the new weights are a differentiable function of
        ``params``, ``state`` and the hyperparameters. Without it, the step is
        plain first-order training and returns fresh leaves. With ``check_finite``,
        a non-finite loss or update raises :class:`~nestgrad.NonFiniteError`.
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
        self._read_flags()
        self._last = ()  # the last step's tensors were kept for a message only
        if self.check_path and self._unused is not None and stop == self.steps:
            self.check_path = False
            warnings.warn(f"at none of the {self.steps} steps: {self._unused}", UserWarning, stacklevel=4)


def train(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    optimizer: Optimizer,
    data: Any,
    *,
    steps: int,
    hparams: Any = None,
    method: Method | None = None,
    progress: bool = False,
    check_finite: bool = True,
    state: OptState | None = None,
    return_state: bool = False,
    tasks: int | Tasks | None = None,
    parallel: DataParallel | None = None,
) -> Any:
    """Run ``steps`` optimizer updates and return the trained weights.

    The result is a differentiable function of ``hparams``, of the initial
    ``params`` and of any Tensor hyperparameter of ``optimizer``: call
    ``torch.autograd.grad`` (or ``.backward()``) on any loss computed from it.
    ``method`` chooses how gradients get back through the run. Under
    ``torch.no_grad()``, ``train`` is plain first-order training.

    Args:
        loss_fn: ``loss_fn(params, batch, hparams) -> scalar Tensor``. It must
            compute with the ``params`` it receives, e.g. via
            :func:`nestgrad.call`.
        params: initial weights, name -> Tensor, e.g.
            ``dict(model.named_parameters())``. Tensors with
            ``requires_grad=False`` are frozen: passed to ``loss_fn`` unchanged.
            Buffers passed here (``**dict(model.named_buffers())``) are training
            state: :func:`nestgrad.call` runs them on copies that advance once per
            training step, and the result holds the trained ones.
        optimizer: a :mod:`nestgrad.optim` optimizer.
        data: a sequence of batches (cycled), an iterator or iterable of
            batches, or a function ``step -> batch``.
        steps: number of updates, >= 1.
        hparams: a Tensor or any tuple/list/dict nesting of Tensors, passed to
            ``loss_fn`` as its third argument. Another level's trained weights
            are a fine ``hparams``: that is how levels compose.
        method: a :class:`~nestgrad.Method`; default :class:`~nestgrad.Unroll`.
        progress: show a tqdm progress bar over the steps.
        check_finite: raise :class:`~nestgrad.NonFiniteError` at the first step whose loss or
            update is NaN or inf (naming the step, the tensor and likely fixes), and when a
            method's backward pass meets one. ``False`` lets NaN and inf through. On the CPU
            each step is checked; on an accelerator the flags are read every 32 steps and at the
            end, without a sync per step.
        state: the optimizer state to start from, e.g. the one a previous call returned: its step
            counts continue (Adam's bias correction, schedules), so 10 steps and then 10 more from
            the returned state are the 20-step run. It names the params it trains (also when they
            do not require grad, as the weights a ``torch.no_grad()`` run returns); the others stay
            frozen. ``None`` starts fresh (``optimizer.init``).
            A state that carries a graph (from an earlier segment) is differentiated through by
            Unroll and Reverse; the other methods raise instead of dropping that path.
        return_state: also return the final optimizer state: ``(weights, state)``. Its tensors are
            differentiable outputs with Unroll and Reverse.
        tasks: train a batch of independent tasks in one vectorised call: the number of tasks,
            or a :class:`~nestgrad.Tasks` that says which of ``params``, the batches and
            ``hparams`` have a leading task dimension (default: shared initial weights,
            per-task batches, shared hparams). ``loss_fn`` stays the loss of one task; the
            trained weights come back with a leading task dimension.
        parallel: train data-parallel across the ranks of a ``torch.distributed`` process group:
            a :class:`~nestgrad.DataParallel`. Each rank passes its shard of the data and the same
            params; every step's gradients are all-reduced before the update, and hypergradients
            equal one process's on the concatenated data (see ``DataParallel`` for the convention).

    Returns:
        ``dict[str, Tensor]`` with the same names as ``params``; with ``return_state``, the pair
        ``(weights, OptState)``.

    Your tensors and module are never changed: ``loss_fn`` receives clones of
    the trainable ``params`` (gradients still reach them), and buffers that a
    module updates in train mode (BatchNorm) run on the run's copies. Replays in
    a backward pass use throwaway copies, which assumes the loss does not read
    the buffers it updates (true for BatchNorm in train mode, which normalizes
    with batch statistics). Buffers not passed in ``params`` are discarded at
    the end, with a warning if they changed.

    Example:
        >>> def loss_fn(p, batch, A):
        ...     x, y = batch
        ...     losses = F.cross_entropy(nestgrad.call(model, p, x), y, reduction="none")
        ...     return (A * losses).mean()
        >>> trained = nestgrad.train(loss_fn, dict(model.named_parameters()),
        ...                          nestgrad.optim.SGD(lr=0.1), [(x, y)], steps=50, hparams=A)
        >>> val = F.cross_entropy(nestgrad.call(model, trained, x_val), y_val)
        >>> (dA,) = torch.autograd.grad(val, A)
    """
    _check_params(params, "params", "nestgrad.train")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "nestgrad.train: called inside torch.inference_mode(), which forbids the autograd that every "
            "training step needs (even without hypergradients). For plain training without hypergradients, "
            "use torch.no_grad() instead."
        )
    if not isinstance(optimizer, Optimizer):
        hint = ""
        if isinstance(optimizer, torch.optim.Optimizer):
            hint = f" Use nestgrad.optim.{type(optimizer).__name__}(...) with the same arguments."
        raise TypeError(
            f"nestgrad.train: optimizer must be a nestgrad.optim optimizer; got {_describe(optimizer)}.{hint}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"nestgrad.train: steps must be an int >= 1; got {steps!r}.")
    if not isinstance(check_finite, bool):
        raise TypeError(f"nestgrad.train: check_finite must be True or False; got {_describe(check_finite)}.")
    method = Unroll() if method is None else method
    if not isinstance(method, Method):
        raise TypeError(
            f"nestgrad.train: method must be a nestgrad method object such as nestgrad.Unroll(); "
            f"got {_describe(method)}."
        )
    if not isinstance(return_state, bool):
        raise TypeError(f"nestgrad.train: return_state must be True or False; got {_describe(return_state)}.")
    if tasks is not None:
        tasks = as_tasks(tasks)
        params, dims = stack_params(tasks, params, differentiable=getattr(method, "differentiates_params", True))
        loss_fn = vectorise(tasks, loss_fn, dims)
    trainable = _trainable(params) if state is None else _stated(params, state)
    frozen = {k: v for k, v in params.items() if k not in trainable}
    _check_start(method, trainable, state)
    leaves = list(hparam_leaves(hparams)) if hparams is not None else []
    if leaves and torch.is_grad_enabled() and not any(t.requires_grad for _, t in leaves):
        names = ", ".join(p for p, _ in leaves[:3])
        warnings.warn(
            f"nestgrad.train: hparams were given ({names}) but none requires grad, so the trained "
            f"weights cannot be differentiated with respect to them, and torch.autograd.grad(..., "
            f"hparams) will fail. Call .requires_grad_() on them, or run under torch.no_grad() if "
            f"you only want the trained weights.",
            stacklevel=2,
        )
    sync = None
    if parallel is not None:  # data-parallel (_distributed.py): check the ranks agree, wrap replicated inputs
        sync, loss_fn, trainable, optimizer, hparams = enter(
            parallel, loss_fn, params, trainable, optimizer, data, steps, hparams, method, state, tasks
        )
    check = bool(leaves) and torch.is_grad_enabled() and method.needs_path and any(t.requires_grad for _, t in leaves)
    strict = isinstance(method, AdjointMethod) and torch.is_grad_enabled()
    buffers = RunBuffers(frozen)
    problem = Problem(
        loss_fn, optimizer, method.batches(data, steps), steps, hparams, frozen,
        progress=progress, check_path=check, method=type(method).__name__, check_finite=check_finite,
        strict=strict, buffers=buffers, state=state, returns_state=return_state, parallel=sync,
    )  # fmt: skip
    versions = _write_counts(frozen)
    # Clones: loss_fn never receives the caller's own tensors, so an in-place write cannot reach them.
    trained, final = method.run(problem, {k: v.clone() for k, v in trainable.items()})
    _check_unwritten(frozen, versions)
    buffers.warn_discarded()
    trained = {**trained, **buffers.trained()}
    weights = {k: trained[k] if k in trained else v for k, v in params.items()}
    if sync is not None:  # data-parallel: mark the outputs, whose backward already crosses ranks
        weights, marked = leave(weights, final if return_state else None)
        final = marked if return_state else final
    return (weights, final) if return_state else weights


_NOT_A_STATE = (
    "nestgrad.train: state must be the OptState that optimizer.init(params) or a previous "
    "train(..., return_state=True) returned; got {got}."
)

_STATE_NAMES = (
    "nestgrad.train: state holds step counts for {have}, but params has the floating-point tensors {want}. "
    "Pass the state returned for these same params: the state names the params it trains (the others "
    "stay frozen)."
)

_UNSTATED = (
    "nestgrad.train: params {names} require grad, but the given state has no entry for them (it has "
    "{have}). A state names the params it trains; to train these too, pass a state made for all of them "
    "(optimizer.init(params)); to keep them fixed, pass them with requires_grad=False."
)

_PATH_DROPPED = (
    "nestgrad.train ({method}): {what} carries a graph (it is the output of a differentiable computation, "
    "e.g. an earlier nestgrad.train segment), but {method} does not differentiate through the initial "
    "weights and optimizer state, so that path would be silently dropped. Use nestgrad.Unroll() or "
    "nestgrad.Reverse() for this run, or .detach() it to drop the path on purpose (warm-starting from "
    "weights you do not differentiate through)."
)


def _stated(params: Mapping[str, Tensor], state: OptState) -> dict[str, Tensor]:
    """The params a given ``state`` trains: those it has step counts for, whether or not they require grad.

    So the weights a run under ``torch.no_grad()`` returned (which do not require grad) continue
    training with the state it returned.
    """
    if not isinstance(state, OptState):
        raise TypeError(_NOT_A_STATE.format(got=_describe(state)))
    floats = {k for k, v in params.items() if v.is_floating_point()}
    if not set(state.step) <= floats:
        raise ValueError(_STATE_NAMES.format(have=sorted(state.step), want=sorted(floats)))
    unstated = [k for k, v in params.items() if v.requires_grad and k not in state.step]
    if unstated:
        raise ValueError(_UNSTATED.format(names=unstated[:4], have=sorted(state.step)))
    return {k: params[k] if params[k].requires_grad else params[k].detach().requires_grad_() for k in state.step}


def _check_start(method: Method, trainable: dict[str, Tensor], state: OptState | None) -> None:
    """Raise if ``method`` would drop a path into the start (initial weights or state that carry a graph)."""
    if not torch.is_grad_enabled() or getattr(method, "differentiates_params", True):
        return
    connected = [f"params[{k!r}]" for k, v in trainable.items() if v.grad_fn is not None]
    if state is not None and any(x.grad_fn is not None for x in state.tensors()):
        connected.append("the given optimizer state")
    if connected:
        raise RuntimeError(_PATH_DROPPED.format(method=type(method).__name__, what=connected[0]))


def _trainable(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``params`` that require grad; raise clearly when there are none, or they cannot train."""
    meta = [k for k, v in params.items() if v.is_meta]
    if meta:
        raise ValueError(
            f"nestgrad.train: params {meta[:3]} are on the meta device: they have a shape but no values, so "
            f"there is nothing to train. Materialize the model first, e.g. model.to_empty(device='cpu') and "
            f"then initialize its weights (or load a state dict), and pass dict(model.named_parameters())."
        )
    inference = [k for k, v in params.items() if v.is_inference()]
    if inference:
        raise RuntimeError(
            f"nestgrad.train: params {inference[:3]} were created under torch.inference_mode(), and such tensors "
            f"can never take part in autograd. Create the model outside inference mode, or pass clones made "
            f"outside it: {{k: v.clone() for k, v in params.items()}}."
        )
    trainable = {k: v for k, v in params.items() if v.requires_grad}
    if trainable:
        return trainable
    if not params:
        raise ValueError(
            "nestgrad.train: params is empty, so there is nothing to train. Pass the weights to train, "
            "e.g. dict(model.named_parameters())."
        )
    floats = [k for k, v in params.items() if v.is_floating_point() or v.is_complex()]
    if not floats:
        dtypes = sorted({str(v.dtype) for v in params.values()})
        raise TypeError(
            f"nestgrad.train: params holds only non-floating-point tensors ({', '.join(dtypes)}), which cannot "
            f"require grad or be trained by gradient descent. Pass floating-point weights (e.g. "
            f"torch.randn(3, dtype=torch.float64, requires_grad=True)); integer data such as token ids belongs "
            f"in data, not params."
        )
    raise ValueError(
        "nestgrad.train: every tensor in params has requires_grad=False, so there is nothing to train. "
        "Call .requires_grad_() on the weights to train (frozen ones may stay as they are)."
    )


_FROZEN_WRITTEN = (
    "nestgrad.train: loss_fn wrote params[{name!r}] in place (requires_grad=False, so ng.train passes it "
    "to loss_fn as it is, without a copy), and so changed your tensor. Compute new tensors from the params "
    "loss_fn receives instead of writing them; a module's buffers (BatchNorm) are fine: nestgrad.call runs "
    "them on the run's copies."
)


def _write_counts(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """The in-place write counters of ``tensors`` (a Python int each, no device sync)."""
    return {k: v._version for k, v in tensors.items() if not v.is_inference()}


def _check_unwritten(tensors: Mapping[str, Tensor], before: Mapping[str, int]) -> None:
    for k, version in before.items():
        if tensors[k]._version != version:
            raise RuntimeError(_FROZEN_WRITTEN.format(name=k))
