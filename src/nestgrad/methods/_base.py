"""How gradients get back through a training run: one small object per method."""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._data import Batches
from .._nonfinite import any_nonfinite, backward_error, bad_names, watch_gradients
from .._problem import is_out_of_memory, out_of_memory
from ..optim._base import OptState
from ._memory import SavedBytes, available_bytes, best_checkpoint_every, nbytes, size

if TYPE_CHECKING:
    from .._problem import Problem


class Method(abc.ABC):
    """Base class of the hypergradient methods passed as ``train(..., method=...)``.

    A method receives a ``Problem`` and the trainable
    initial weights, runs the training, and returns the trained weights wired
    into autograd however it sees fit.
    """

    #: Whether ``train`` checks that the hparams reach the loss, raising DisconnectedError if not.
    needs_path: ClassVar[bool] = True

    def batches(self, data: Any, steps: int) -> Batches:
        """How this method reads ``data``. Methods that replay steps keep iterator batches."""
        return Batches(data, steps)

    @abc.abstractmethod
    def run(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], OptState]:
        """Train ``params`` for ``problem.steps`` steps from ``problem.init_state(params)``.

        Returns the trained weights and the final optimizer state.
        """


class AdjointMethod(Method):
    """Base class of methods that train without recording a graph and supply their own backward.

    ``run`` trains inside a ``torch.autograd.Function`` whose inputs are the initial
    params and ``Problem.hparam_tensors()``, so the result composes with anything
    else autograd knows, including other levels trained by any other method.
    Subclasses implement ``forward()`` and ``backward()``.

    What ``forward()`` saves (a trajectory, a Jacobian) lives as long as autograd's own
    saved tensors would: a backward pass without ``retain_graph=True`` frees it, and a
    second backward through the same run then raises, naming ``retain_graph=True``.

    A method whose ``differentiates_params`` is False gives gradients w.r.t. the
    hyperparameters only: the trained weights are then not connected to the initial
    params at all, so asking autograd for that gradient raises instead of
    returning a silent zero.
    """

    differentiates_params: ClassVar[bool] = True
    #: Whether ``backward()`` takes the cotangents of the final optimizer state (``state_grads``)
    #: and returns a third element, dL/d(initial state tensors). Methods without it raise when the
    #: final state returned by ``train(..., return_state=True)`` is differentiated.
    differentiates_state: ClassVar[bool] = False
    # Whether ``backward`` re-runs the training steps with a graph, so that a data-parallel
    # run's all-reduces are replayed too (otherwise the cotangent is averaged across ranks first).
    replays_steps: ClassVar[bool] = False
    #: What ``backward()`` reads again of the user's tensors: some of "params" (the initial weights),
    #: "hparams", "frozen" (also the module weights ng.call used), "state" (a given ``state=``) and
    #: "trained" (the outputs). Changing them in place before backward raises (``Reads``).
    rereads: ClassVar[frozenset[str]] = frozenset({"hparams", "frozen"})
    #: What a NaN or inf hypergradient from finite inputs means for this method, and what to do.
    nonfinite_hint: ClassVar[str] = ""

    def run(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], OptState]:
        if not torch.is_grad_enabled():
            return problem.fit(params)
        names = tuple(params)
        state = problem.state  # a given initial state is an input; a fresh one is made inside the run
        slots = [] if state is None else state.tensors()
        if not self.differentiates_params:
            params = {k: v.detach() for k, v in params.items()}
            slots = [x.detach() for x in slots]
        final: list[OptState] = []  # _Adjoint.forward leaves the final state's structure here
        outs = _Adjoint.apply(self, problem, (names, state, final), *params.values(), *slots, *problem.hparam_tensors())
        n = len(names)
        return dict(zip(names, outs[:n], strict=True)), final[0].with_tensors(outs[n:])

    @abc.abstractmethod
    def forward(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], OptState, Any]:
        """Train (autograd is off) from ``problem.init_state(params)``.

        Returns ``(trained_params, final_state, saved)``; ``saved`` goes to ``backward()``.
        """

    @abc.abstractmethod
    def backward(self, problem: Problem, saved: Any, grads: dict[str, Tensor]) -> Any:
        """Given dL/d(trained params), return dL/d(initial params) and dL/d(``problem.hparam_tensors()``).

        With ``differentiates_state``, it is called with ``state_grads`` too (the cotangents of the
        final state's tensors, ``None`` where unused) and returns dL/d(initial state tensors) third.
        """


_FREED = (
    "nestgrad.train: backward through the same training run a second time, but what the {method} method "
    "saved for its backward pass was freed after the first one. Pass retain_graph=True to the first "
    "backward() / torch.autograd.grad() call, as for any autograd graph, to differentiate it again."
)


def _keeps_graph() -> bool:
    """Whether the backward pass now running was called with ``retain_graph=True``.

    torch has no public API for this; the private one is used by torch's own AOT autograd.
    Without it, nothing is freed early.
    """
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


_CHANGED = (
    "nestgrad.train ({method}): {what} was modified in place after nestgrad.train returned (its version "
    "counter went from {then} to {now}), but {method} reads it again in the backward pass, so the "
    "hypergradient would be computed at the new value. Call backward() / torch.autograd.grad() before "
    "changing it, or {fix}"
)

_OUT_OF_PLACE = "change it out of place (A = A - lr * A.grad instead of A -= ...)."
_FIXES = {
    "frozen": _OUT_OF_PLACE,
    "module": (
        "pass a copy of it in params (with requires_grad=False), which the run then reads instead of the "
        "module's own tensor: params={{**params, {name!r}: module_weight.detach().clone()}}."
    ),
    "state": (
        "pass a copy of the state, which the run then reads instead: "
        "state=state.with_tensors([x.clone() for x in state.tensors()])."
    ),
    "hparams": _OUT_OF_PLACE,
    "params": _OUT_OF_PLACE,
    "trained": "compute with a copy of it (w.clone()) instead of changing it.",
}


class Reads:
    """The caller's tensors that a method's ``backward()`` reads again, with their in-place write counts.

    Made when the forward pass (the training run) ends; ``check()`` runs at the top of the backward
    pass and raises, naming the tensor, if any of them was changed in place in between. A write count
    (``Tensor._version``) is a Python int: nothing is read from the device, and the check costs one
    comparison per tensor per backward pass. What is read again is ``method.rereads``:

    * ``"params"``: the initial weights. ``train`` passes clones, so only the method holds them;
    * ``"frozen"``: the tensors of ``params`` that do not require grad, and the module weights that
      ``params`` left out, which ``nestgrad.call`` ran the module with (``RunBuffers.module_weights``);
    * ``"state"``: the tensors of the optimizer state given as ``train(..., state=)``;
    * ``"hparams"``: the leaves of ``hparams`` and the optimizer's Tensor hyperparameters;
    * ``"trained"``: the trained weights returned to the caller.
    """

    def __init__(self, method: AdjointMethod, problem: Problem, params: dict[str, Tensor], trained: Any) -> None:
        kinds = method.rereads
        named: list[tuple[str, str, str, Tensor]] = []  # (kind, what, name, tensor)
        if "params" in kinds:
            named += [("params", f"params[{k!r}]", k, v) for k, v in params.items()]
        if "frozen" in kinds:
            named += [("frozen", f"params[{k!r}] (frozen)", k, v) for k, v in problem.frozen.items()]
            used = "left out of params, so nestgrad.call ran the module with its own tensor"
            module = problem.buffers.module_weights.values()
            named += [("module", f"the module weight {k!r} ({used})", k, v) for k, v in module]
        if "state" in kinds and problem.state is not None:
            named += [
                ("state", f"the given state's {slot!r} of {k!r}", k, v)
                for slot, values in problem.state.slots.items()
                for k, v in values.items()
            ]
        if "hparams" in kinds:
            hparams = zip(problem.hparam_names(), problem.hparam_tensors(), strict=True)
            named += [("hparams", n, n, h) for n, h in hparams]
        if "trained" in kinds:
            named += [("trained", f"the trained weight {k!r}", k, v) for k, v in trained.items()]
        # Inference tensors keep no write count (and cannot be written outside inference mode).
        self.tensors = [(*entry, entry[3]._version) for entry in named if not entry[3].is_inference()]

    def check(self, method: str) -> None:
        """Raise if a tensor the backward pass reads again was changed in place since training."""
        for kind, what, name, x, then in self.tensors:
            if x._version != then:
                fix = _FIXES[kind].format(name=name)
                raise RuntimeError(_CHANGED.format(method=method, what=what, then=then, now=x._version, fix=fix))


_OUTER_NAN = (
    "It comes from the loss computed from the trained weights (the outer loss, or the next level), not from "
    "this training run, whose steps were all checked and finite: look for NaN in that loss (log(0), division "
    "by zero, a NaN label or weight)."
)


_STATE_NOT_DIFFERENTIATED = (
    "nestgrad.train ({method}): the final optimizer state returned by train(..., return_state=True) is "
    "being differentiated, but {method} gives gradients through the trained weights only. Use "
    "nestgrad.Unroll() or nestgrad.Reverse() for a run whose returned state is differentiated (e.g. the "
    "first of two segments differentiated together), or .detach() the state before passing it on."
)


def _distinct(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The outputs, each a tensor of its own: a second occurrence of one tensor is returned as a copy.

    An optimizer may return one tensor both as a weight and as a state slot (ASGD's average is the
    weight itself until averaging starts). A tensor has one place in the graph, so autograd would
    route the gradient of both outputs to the last one's position: the weight's would be lost.
    """
    seen: set[int] = set()
    out = []
    for x in outputs:
        out.append(x.clone() if id(x) in seen else x)
        seen.add(id(x))
    return tuple(out)


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, method: AdjointMethod, problem: Problem, layout: Any, *tensors: Tensor) -> Any:
        names, state, final = layout
        n, m = len(names), 0 if state is None else len(state.tensors())
        params = dict(zip(names, tensors[:n], strict=True))
        if state is not None:
            problem = dataclasses.replace(problem, state=state.with_tensors(tensors[n : n + m]))
        trained, state, saved = method.forward(problem, params)
        final.append(state)
        ctx.set_materialize_grads(False)  # an unused output (a state slot, usually) gets None, not zeros
        ctx.run = (method, problem, names, saved, m)
        ctx.zeros = [(v.shape, v.dtype, v.device) for v in (trained[k] for k in names)]
        ctx.reads = Reads(method, problem, params, trained)
        return _distinct((*(trained[k] for k in names), *state.tensors()))

    @staticmethod
    @once_differentiable  # methods give first derivatives; a second one must raise, not be silently wrong
    def backward(ctx: Any, *grads: Tensor) -> Any:
        if ctx.run is None:
            raise RuntimeError(_FREED.format(method=ctx.method_name))
        method, problem, names, saved, m = ctx.run
        name = type(method).__name__
        n = len(names)
        state_grads: list[Tensor | None] = list(grads[n:])
        grads = grads[:n]
        ctx.reads.check(name)
        if not _keeps_graph():
            # Like autograd's own saved tensors: free the trajectory / Jacobian now, not when
            # the trained weights die.
            ctx.run, ctx.method_name = None, name
        # Zeros where an output was unused, as autograd's default materialization would give (made only there).
        grads = tuple(
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads, ctx.zeros, strict=True)
        )
        if problem.parallel is not None:  # data-parallel (_distributed.py): the same cotangent on every rank
            grads, state_grads = problem.parallel.cotangents(method, grads, state_grads)
        incoming = dict(zip(names, grads, strict=True))
        if problem.check_finite and any_nonfinite([*grads, *state_grads]):
            arriving = {**incoming, **{f"the returned optimizer state[{i}]": g for i, g in enumerate(state_grads)}}
            what = "the gradient arriving at the trained weights (or the returned state) is not finite:"
            raise backward_error(name, what, bad_names(arriving), arriving, _OUTER_NAN)  # type: ignore[arg-type]
        replay = dataclasses.replace(problem, replay=True)  # re-running steps must not advance buffers again
        grad_state: list[Tensor | None] = [None] * m
        try:
            if method.differentiates_state:
                got = method.backward(replay, saved, incoming, state_grads=state_grads)
                grad_params, grad_hparams, grad_state = got
            elif any(g is not None for g in state_grads):
                raise RuntimeError(_STATE_NOT_DIFFERENTIATED.format(method=name))
            else:
                grad_params, grad_hparams = method.backward(replay, saved, incoming)
        except RuntimeError as err:
            if not is_out_of_memory(err) or str(err).startswith("nestgrad."):
                raise
            raise out_of_memory(name, "in the backward pass") from err
        if problem.check_finite:
            _check_hypergradient(name, method.nonfinite_hint, problem, grad_params, [*grad_hparams, *grad_state])
        return (None, None, None, *(grad_params.get(k) for k in names), *grad_state, *grad_hparams)


def _check_hypergradient(
    name: str, hint: str, problem: Problem, grad_params: dict[str, Tensor | None], grad_hparams: list[Tensor | None]
) -> None:
    """Raise NonFiniteError if a method's backward pass gave NaN or inf from finite inputs."""
    if not any_nonfinite([*grad_params.values(), *grad_hparams]):
        return
    named = {f"the initial params[{k!r}]": g for k, g in grad_params.items() if g is not None}
    names = [*problem.hparam_names(), *(f"the initial optimizer state[{i}]" for i in range(len(grad_hparams)))]
    named |= {k: g for k, g in zip(names, grad_hparams, strict=False) if g is not None}
    what = "the hypergradient is not finite although the training run and the incoming gradient were, for"
    raise backward_error(name, what, bad_names(named), named, hint)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Unroll(Method):
    """Reverse mode through the unrolled training run (backprop through time).

    Every step is recorded by autograd with ``create_graph=True``, so the
    trained weights are an exact, differentiable function of the hyperparameters
    and of the initial weights. Memory grows linearly with the number of
    differentiated steps.

    Args:
        truncate: differentiate only the last ``truncate`` steps; the earlier
            ones run as plain first-order training and are treated as constants
            (truncated backpropagation). ``None`` differentiates every step.
        warn_memory: warn once (a ``ResourceWarning``, with the figures and the
            alternatives) when the recorded graph passes this fraction of the memory that
            was available on the weights' device after the first recorded step. The graph's size
            is estimated from the first recorded step (the bytes autograd saves for it,
            plus the new weights and state) times the steps recorded so far. Runs that
            record fewer than 16 steps are not measured (an out-of-memory error names the
            methods that need less). ``None`` never warns.

    Examples:
        >>> trained = nestgrad.train(loss_fn, params, opt, data, steps=100,
        ...                          hparams=A, method=nestgrad.Unroll(truncate=20))
    """

    truncate: int | None = None
    warn_memory: float | None = 0.5

    def __post_init__(self) -> None:
        t = self.truncate
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(
                f"nestgrad.Unroll: truncate must be None (differentiate every step) or an int >= 1; got {t!r}."
            )
        w = self.warn_memory
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1):
            raise ValueError(
                f"nestgrad.Unroll: warn_memory must be None (never warn) or a fraction of the available memory "
                f"in (0, 1]; got {w!r}."
            )

    def run(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], OptState]:
        differentiable = torch.is_grad_enabled()
        first = 0 if self.truncate is None else max(problem.steps - self.truncate, 0)
        watch = differentiable and problem.check_finite
        if watch:  # raise on a NaN or inf hypergradient, as the other methods do
            problem, params = _watch_inputs(problem, params)
        state = problem.init_state(params)
        measured = differentiable and self.warn_memory and problem.steps - first >= _MEASURED_FROM
        memory = _GraphSize(self, problem, params, first) if measured else None
        whole = problem.compiled.run(problem, params, state, differentiable) if problem.compiled and not first else None
        if whole is not None:  # Compile(whole_run=True): every step in one compiled graph
            params, state = whole
        for t in problem.range() if whole is None else ():
            if t == first and first > 0:  # start a fresh graph after the truncated steps
                params = {k: v.detach().requires_grad_() for k, v in params.items()}
                state = state.with_tensors([x.detach() for x in state.tensors()])
            if memory is not None and t == first:  # measure the first recorded step
                params, state = memory.measure(params, state, t)
            else:
                params, state, _ = problem.step(params, state, t, create_graph=differentiable and t >= first)
            if memory is not None and t == memory.warn_at:
                memory.warn(t)
        if whole is None and problem.compiled is not None and not first:
            problem.compiled.ready(problem, differentiable)
        if not differentiable or first == problem.steps:
            return {k: v.detach() for k, v in params.items()}, state.with_tensors([x.detach() for x in state.tensors()])
        return (_watch_outputs(params) if watch else params), state


class _GraphSize:
    """Unroll's recorded graph: its size, estimated from the first recorded step, and the step to warn at."""

    def __init__(self, method: Unroll, problem: Problem, params: dict[str, Tensor], first: int) -> None:
        self.method, self.problem, self.first = method, problem, first
        self.device = next(iter(params.values())).device if params else torch.device("cpu")
        self.available: int | None = None
        self.per_step = self.weights = 0
        self.warn_at = -1  # no step

    def measure(self, params: dict[str, Tensor], state: OptState, t: int) -> tuple[dict[str, Tensor], OptState]:
        """Run step ``t`` with a graph, counting the bytes autograd saves for it; set the step to warn at."""
        problem = self.problem
        exclude = [*params.values(), *state.tensors(), *problem.hparam_tensors(), *problem.frozen.values()]
        counter = SavedBytes(exclude)
        with counter.counting():
            params, state, _ = problem.step(params, state, t, create_graph=True)
        self.weights = nbytes([*params.values(), *state.tensors()])  # what Reverse would store per step
        self.per_step = counter.bytes + self.weights
        if (problem.steps - self.first) * self.per_step < _SMALL_GRAPH:
            return params, state  # too small to matter anywhere: no need to ask the device
        self.available = available_bytes(self.device)  # after the step: what is left for the other steps
        if self.available is not None and self.per_step > 0:
            threshold = self.method.warn_memory * self.available  # type: ignore[operator]
            at = self.first + math.ceil(threshold / self.per_step) - 1
            self.warn_at = at if at < problem.steps else -1
        return params, state

    def warn(self, t: int) -> None:
        recorded = t - self.first + 1
        total = self.problem.steps - self.first
        k, copies = best_checkpoint_every(self.problem.steps)
        weights = self.weights
        message = _GRAPH_GROWS.format(
            size=size(recorded * self.per_step), steps=recorded, per=size(self.per_step),
            share=self.method.warn_memory, available=size(self.available or 0), device=self.device,
            total=total, need=size(total * self.per_step), reverse=size(self.problem.steps * weights),
            k=k, need_k=size(copies * weights), truncate=max(1, recorded // 2),
        )  # fmt: skip
        warnings.warn(message, ResourceWarning, stacklevel=4)


_SMALL_GRAPH = 64 * 2**20  # a whole run's graph below this never warns (and the device is not asked)
# Runs recording fewer steps are not measured (it cost about 0.25 ms per call, a seventh of a 5-step
# MAML inner run): a graph that outgrows the memory in so few steps fails at once, with the
# out-of-memory message that names the methods needing less.
_MEASURED_FROM = 16

_GRAPH_GROWS = (
    "nestgrad.train (Unroll): the recorded graph of the run now holds about {size} after {steps} recorded "
    "step(s) ({per} a step), more than warn_memory={share:g} of the {available} that {device} had available "
    "after the first step; the {total} recorded steps of this run need about {need}. Unroll keeps every "
    "step's graph until backward(). Alternatives: Reverse() stores only the weights and optimizer state of "
    "each step ({reverse} for this run) and recomputes the steps in the backward pass, exactly; "
    "Reverse(checkpoint_every={k}) needs {need_k}; Reverse(checkpoints=c) holds c copies for any number of "
    "steps (binomial checkpointing, exact, more recomputation); Unroll(truncate=k) differentiates only the "
    "last k steps (approximate, e.g. truncate={truncate}); Forward() (few hyperparameters) keeps memory "
    "independent of the number of steps. Unroll(warn_memory=None) silences this warning."
)


def _watch_inputs(problem: Problem, params: dict[str, Tensor]) -> tuple[Problem, dict[str, Tensor]]:
    """Raise if the gradient reaching Unroll's inputs (initial params, hparams) through the run is not finite.

    The hparams are replaced by views of themselves (one autograd node each, so that none looks
    connected through another), and one hook watches those and the initial params, which
    ``train`` already passes as clones; the user's own tensors get no hook.
    """
    tensors = problem.hparam_tensors()
    views = [h.view_as(h) if h.requires_grad else h for h in tensors]
    named = {f"the initial params[{k!r}]": v for k, v in params.items() if v.requires_grad}
    named |= {k: h for k, h in zip(problem.hparam_names(), views, strict=True) if h.requires_grad}
    what = "the hypergradient is not finite although the training run and the incoming gradient were, for"
    _raise_if_not_finite(named, what, _UNROLL_NAN)
    # Training differentiates the first step w.r.t. views, so the hook sees only gradients that
    # reach the initial params from beyond the run.
    watched = dataclasses.replace(problem.with_hparam_tensors(views), origin=problem.hparams)
    return watched, {k: v.view_as(v) for k, v in params.items()}


def _watch_outputs(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Raise if the gradient arriving at Unroll's trained weights is not finite: it comes from the outer loss."""
    named = {k: v for k, v in params.items() if v.requires_grad}
    _raise_if_not_finite(named, "the gradient arriving at the trained weights is not finite:", _OUTER_NAN)
    return params


def _raise_if_not_finite(named: dict[str, Tensor], what: str, hint: str) -> None:
    """One hook on all of ``named``: when backward has computed their gradients, raise if any is not finite.

    The hook holds the names only: holding the tensors would make a cycle through their autograd
    nodes (tensor -> node -> hook -> tensor) that Python's garbage collector cannot see, and leak
    every run. ``watch_gradients()`` makes no cycle either (torch's ``register_multi_grad_hook``
    does: one garbage collection of the whole run per call).
    """
    if not named:
        return
    names = list(named)

    def check(grads: Any) -> None:
        if any_nonfinite(grads):
            got = {k: g for k, g in zip(names, grads, strict=True) if g is not None}
            raise backward_error("Unroll", what, bad_names(got), got, hint)

    watch_gradients(list(named.values()), check)


_UNROLL_NAN = (
    "A step of the recorded graph has an infinite derivative: with Adam/RMSprop/Adagrad keep eps_root > 0 (the "
    "default 1e-30), since sqrt has an infinite derivative at 0; otherwise look for sqrt, norm or pow at exactly "
    "0 in loss_fn."
)
