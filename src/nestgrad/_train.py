"""``train``: a whole training run as a differentiable function."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._buffers import RunBuffers
from ._compile import Compile, CompiledSteps, as_compile
from ._distributed import DataParallel, enter, leave
from ._nonfinite import NonFiniteError
from ._problem import LossFn, Problem, check_loss_fn, hparam_leaves
from ._tasks import Tasks, as_tasks, check_hparams, nonfinite_tasks, stack_params, vectorise
from .diagnostics._explain import tracked
from .methods._base import AdjointMethod, Method, Unroll
from .optim._base import Optimizer, OptState, _check_given_state, _check_params, _describe


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
    compile: bool | Compile = False,
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
            ``nestgrad.call()``.
        params: initial weights, name -> Tensor, e.g.
            ``dict(model.named_parameters())``. Tensors with
            ``requires_grad=False`` are frozen: passed to ``loss_fn`` unchanged.
            Buffers passed here (``**dict(model.named_buffers())``) are training
            state: ``nestgrad.call()`` runs them on copies that advance once per
            training step, and the result holds the trained ones.
        optimizer: a ``nestgrad.optim`` optimizer.
        data: a sequence of batches (cycled), an iterator or iterable of
            batches, or a function ``step -> batch``.
        steps: number of updates, >= 1.
        hparams: a Tensor or any tuple/list/dict nesting of Tensors, passed to
            ``loss_fn`` as its third argument. Another level's trained weights
            are a fine ``hparams``: that is how levels compose.
        method: a ``Method``; default ``Unroll``.
        progress: show a tqdm progress bar over the steps.
        check_finite: raise ``NonFiniteError`` at the first step whose loss or
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
            or a ``Tasks`` that says which of ``params``, the batches and
            ``hparams`` have a leading task dimension (default: shared initial weights,
            per-task batches, shared hparams). ``loss_fn`` stays the loss of one task; the
            trained weights come back with a leading task dimension.
        parallel: train data-parallel across the ranks of a ``torch.distributed`` process group:
            a ``DataParallel``. Each rank passes its shard of the data and the same
            params; every step's gradients are all-reduced before the update, and hypergradients
            equal one process's on the concatenated data (see ``DataParallel`` for the convention).
        compile: compile the steps with ``torch.compile``: ``True``, or a ``Compile`` with settings
            (strict, mode, dynamic), whose ``last_run`` reports the graphs compiled. The loss and its
            gradient run as one compiled graph from the second step on; what cannot compile runs
            eagerly with one warning. See the "Compiling" docs page for when it pays.

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

    Examples:
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
    check_loss_fn(loss_fn)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "nestgrad.train: called inside torch.inference_mode(), which forbids the autograd that every "
            "training step needs (even without hypergradients). For plain training without hypergradients, "
            "use torch.no_grad() instead."
        )
    if not isinstance(optimizer, Optimizer):
        raise TypeError(_not_an_optimizer(optimizer))
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
    compiled = as_compile(compile)
    if not isinstance(return_state, bool):
        raise TypeError(f"nestgrad.train: return_state must be True or False; got {_describe(return_state)}.")
    if tasks is not None:
        tasks = as_tasks(tasks)
        params, dims = stack_params(tasks, params, differentiable=getattr(method, "differentiates_params", True))
        loss_fn = vectorise(tasks, loss_fn, dims)
    trainable = _trainable(params) if state is None else _stated(params, state, optimizer, tasks)
    frozen = {k: v for k, v in params.items() if k not in trainable}
    if tasks is not None:
        check_hparams(tasks, optimizer, trainable)
    _check_start(method, trainable, state)
    leaves = list(hparam_leaves(hparams)) if hparams is not None else []
    untracked = not any(tracked(t) for _, t in leaves)  # under ng.explain, the cut is reported instead
    if leaves and torch.is_grad_enabled() and not any(t.requires_grad for _, t in leaves) and untracked:
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
            parallel, loss_fn, params, trainable, optimizer, data, steps, hparams, method, state, tasks,
            check_finite, return_state,
        )  # fmt: skip
    check = bool(leaves) and torch.is_grad_enabled() and method.needs_path and any(t.requires_grad for _, t in leaves)
    strict = isinstance(method, AdjointMethod) and torch.is_grad_enabled()
    buffers = RunBuffers(frozen)
    problem = Problem(
        loss_fn, optimizer, method.batches(data, steps), steps, hparams, frozen,
        progress=progress, check_path=check, method=type(method).__name__, check_finite=check_finite,
        strict=strict, buffers=buffers, state=state, returns_state=return_state, parallel=sync,
        compiled=None if compiled is None else CompiledSteps(compiled, type(method).__name__),
    )  # fmt: skip
    versions = _write_counts(frozen)
    # Clones: loss_fn never receives the caller's own tensors, so an in-place write cannot reach them.
    try:
        clones = {k: v.clone() for k, v in trainable.items()}
        # Data-parallel: a rank that fails leaves its error for the others, which then raise naming it.
        trained, final = method.run(problem, clones) if sync is None else sync.guard(method.run, problem, clones)
    except NonFiniteError as err:
        where = nonfinite_tasks(loss_fn) if tasks is not None else ""
        if not where:
            raise
        raise NonFiniteError(f"{err}{where}") from err
    _check_unwritten(frozen, versions)
    buffers.warn_discarded()
    trained = {**trained, **buffers.trained()}
    weights = {k: trained[k] if k in trained else v for k, v in params.items()}
    if sync is not None:  # data-parallel: mark the outputs, whose backward already crosses ranks
        weights, marked = leave(weights, final if return_state else None)
        final = marked if return_state else final
    return (weights, final) if return_state else weights


_TORCH_OPTIMIZER = (
    "nestgrad.train: optimizer must be a nestgrad.optim optimizer; got {got}. nestgrad's optimizers take "
    "hyperparameters only (the params go to train): use nestgrad.optim.{name}({args}) with the same "
    "hyperparameters."
)
_NO_TWIN = (
    "nestgrad.train: optimizer must be a nestgrad.optim optimizer; got {got}, which nestgrad.optim does not "
    "have. Its optimizers are {known}; construct one with hyperparameters only, e.g. nestgrad.optim.Adam(lr=1e-3)."
)


def _not_an_optimizer(optimizer: object) -> str:
    """The message for an ``optimizer`` that is not a nestgrad one: a torch.optim class or instance gets
    its nestgrad twin, in a short description (class name and lr), never the instance's whole repr."""
    import nestgrad.optim as ours

    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if issubclass(cls, Optimizer):  # the class itself
        return (
            f"nestgrad.train: optimizer must be a nestgrad.optim optimizer object; got the class "
            f"nestgrad.optim.{cls.__name__}. Construct it: nestgrad.optim.{cls.__name__}(lr=...)."
        )
    if not issubclass(cls, torch.optim.Optimizer):
        return f"nestgrad.train: optimizer must be a nestgrad.optim optimizer; got {_describe(optimizer)}."
    name = cls.__name__
    if isinstance(optimizer, type):
        got, args = f"the class torch.optim.{name}, not an optimizer object", "lr=..."
    else:
        groups = getattr(optimizer, "param_groups", None) or [{}]
        lr = groups[0].get("lr", getattr(optimizer, "defaults", {}).get("lr"))
        got = f"a torch.optim.{name} (lr={lr!r}, {len(groups)} param group{'s' if len(groups) != 1 else ''})"
        args = f"lr={lr!r}, ..." if lr is not None else "..."
    twin = getattr(ours, name, None)
    if not (isinstance(twin, type) and issubclass(twin, Optimizer)):
        known = ", ".join(n for n in ours.__all__ if n not in ("Optimizer", "OptState", "Schedule"))
        return _NO_TWIN.format(got=got, known=known)
    return _TORCH_OPTIMIZER.format(got=got, name=name, args=args)


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


def _stated(
    params: Mapping[str, Tensor], state: OptState, optimizer: Optimizer, tasks: Tasks | None = None
) -> dict[str, Tensor]:
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
    trainable = {k: params[k] if params[k].requires_grad else params[k].detach().requires_grad_() for k in state.step}
    # Shapes, dtypes, devices and step counts, with OptState.load_state_dict's rules, before the first step.
    _check_given_state(optimizer, state, trainable, "nestgrad.train", None if tasks is None else tasks.n)
    return trainable


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
