"""Compiled training steps: ``train(..., compile=True)`` or ``compile=Compile(...)``.

A compiled step is the loss and its gradient with respect to the trained weights, traced with
``torch.func.grad_and_value`` and compiled by ``torch.compile`` (inductor): the gradient is a set
of ordinary ops of one forward graph, so when Unroll differentiates across steps, autograd only
takes first derivatives of compiled graphs (AOTAutograd supports these; double backward through a
compiled graph it does not). The optimizer's update runs eagerly after it, as in an eager step:
its step counts and schedules are Python values that would otherwise be compiled into the graph
(one graph per step). Every check of an eager step runs around the compiled call: non-finite
values, in-place writes to the weights, the device of the inputs.

The first step of a run, and every step while a check needs the recorded graph (the path from the
hparams to the loss), run eagerly. Anything that cannot be compiled (a graph break, an op without
a compiled kernel, a module with buffers) makes the rest of the run eager, with one warning that
names the step and the reason, or raises with ``Compile(strict=True)``.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._nonfinite import NonFiniteError

if TYPE_CHECKING:
    from ._problem import Problem
    from .optim._base import OptState


class CompileError(RuntimeError):
    """A step of a run with ``compile=Compile(strict=True)`` could not be compiled."""


@dataclass
class CompileReport:
    """What a compiled run did: how many graphs it compiled, and which steps ran eagerly.

    Attributes:
        compiles: graphs compiled during the run (0 when every graph came from an earlier run
            with the same shapes; more than 1 means recompilations).
        compiled_steps: steps that ran the compiled graph.
        eager_steps: steps that ran eagerly (the first one, those of a check, and all after a fallback).
        recompiled_at: the steps at which a graph was compiled again after the first.
        fallback: why the run went on eagerly, or ``None``.
    """

    compiles: int = 0
    compiled_steps: int = 0
    eager_steps: int = 0
    recompiled_at: list[int] = field(default_factory=list)
    fallback: str | None = None


@dataclass
class Compile:
    """How ``nestgrad.train`` compiles the steps of a run: ``train(..., compile=Compile(...))``.

    ``compile=True`` is ``Compile()``. The loss and its gradient are compiled with
    ``torch.compile`` over ``torch.func.grad_and_value``; the first step runs eagerly (it
    checks the loss function, the path from the hparams and the memory), the later ones run
    one compiled graph, reused across steps and across calls with the same shapes.

    Args:
        strict: raise ``CompileError`` when a step cannot be compiled, instead of warning once
            and running the rest of the run eagerly.
        mode: ``torch.compile``'s ``mode`` (``None``, ``"reduce-overhead"``: CUDA graphs where
            shapes are static, ``"max-autotune"``).
        dynamic: ``torch.compile``'s ``dynamic``: ``False`` compiles one graph per set of shapes
            (a last batch of another size compiles a second graph once), ``None`` lets torch mark
            shapes that change dynamic, ``True`` compiles for any shape.
        backend: ``torch.compile``'s backend: ``"inductor"`` (generated kernels), or
            ``"aot_eager"`` (the same traced graphs run by eager kernels: quick to compile, no speed-up;
            for tests).
        whole_run: trace every step of a run (each step's gradient and its optimizer update, step
            counts and schedules included) into one graph, for short runs called many times, such
            as MAML's inner loops: no eager step and no Python between steps. The first run of a
            ``loss_fn`` in a process still goes step by step (its first step eager, with every
            check); later runs with the same shapes and number of steps run the one graph. Its
            trace grows with the number of steps: keep it for runs of tens of steps. Unroll and
            plain training only (other methods compile step by step).

    After a run, ``last_run`` holds its ``CompileReport``: the graphs compiled (recompilations
    included), the steps compiled and eager, and the reason of a fallback.

    Examples:
        >>> c = nestgrad.Compile()
        >>> trained = nestgrad.train(loss_fn, params, opt, data, steps=100, hparams=A, compile=c)
        >>> c.last_run.compiles, c.last_run.compiled_steps
        (1, 99)
    """

    strict: bool = False
    mode: str | None = None
    dynamic: bool | None = False
    backend: str = "inductor"
    whole_run: bool = False
    last_run: CompileReport | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.strict, bool):
            raise TypeError(f"nestgrad.Compile: strict must be True or False; got {self.strict!r}.")
        if self.mode is not None and not isinstance(self.mode, str):
            raise TypeError(
                f"nestgrad.Compile: mode must be None or a torch.compile mode such as 'reduce-overhead'; got "
                f"{self.mode!r}."
            )
        if self.mode is not None:
            from torch._inductor import list_mode_options  # imported only when a mode is asked for

            modes = list(list_mode_options())
            if self.mode not in modes:
                raise ValueError(f"nestgrad.Compile: mode must be None or one of {modes}; got {self.mode!r}.")
        if not isinstance(self.backend, str):
            raise TypeError(f"nestgrad.Compile: backend must be a torch.compile backend name; got {self.backend!r}.")
        if not isinstance(self.whole_run, bool):
            raise TypeError(f"nestgrad.Compile: whole_run must be True or False; got {self.whole_run!r}.")
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise TypeError(f"nestgrad.Compile: dynamic must be None, True or False; got {self.dynamic!r}.")


def as_compile(compile: Any) -> Compile | None:
    """``train``'s ``compile=`` argument as a ``Compile`` (``None``: eager)."""
    if compile is False:
        return None
    if compile is True:
        return Compile()
    if isinstance(compile, Compile):
        return compile
    raise TypeError(
        f"nestgrad.train: compile must be True, False or a nestgrad.Compile(...); got {type(compile).__name__} "
        f"{compile!r}."
    )


# ---------------------------------------------------------------- the compiled function
_COMPILES = [0]  # graphs compiled by nestgrad's compiled steps, in this process


def _counting(name: str, mode: str | None) -> Callable[..., Any]:
    """The backend ``name`` (in ``mode``), counting the graphs it compiles (a run's recompilations are the
    count's increase)."""
    from torch._dynamo import lookup_backend

    backend = lookup_backend(name)
    if mode is not None:  # torch.compile takes a mode only with its own inductor backend: the same options
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        options = list_mode_options(mode)

        def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
            return compile_fx(gm, example_inputs, config_patches=options)

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        _COMPILES[0] += 1
        return backend(gm, example_inputs)

    return compile_graph


def _grad_and_loss(
    loss_fn: Callable[..., Tensor], params: dict[str, Tensor], frozen: dict[str, Tensor], batch: Any, hparams: Any
) -> tuple[dict[str, Tensor], Tensor]:
    """The gradients of the loss w.r.t. ``params``, and the loss: one forward graph when compiled."""

    def loss(p: dict[str, Tensor]) -> Tensor:
        return loss_fn({**p, **frozen} if frozen else p, batch, hparams)

    return torch.func.grad_and_value(loss)(params)


def _whole_run(
    loss_fn: Callable[..., Tensor],
    optimizer: Any,
    params: dict[str, Tensor],
    state: OptState,
    frozen: dict[str, Tensor],
    batches: list[Any],
    hparams: Any,
) -> tuple[dict[str, Tensor], OptState, Tensor]:
    """Every step of a run: the trained weights and state, and one finite flag per step.

    A step's flag is False where its loss, new weights or new state hold a NaN or inf (exact:
    ``isfinite``, fused into the graph's reductions).
    """
    flags = []
    for batch in batches:
        grads, loss = _grad_and_loss(loss_fn, params, frozen, batch, hparams)
        params, state = optimizer.update(grads, state, params)
        checked = [loss, *params.values(), *state.tensors()]
        flags.append(torch.stack([torch.isfinite(x).all() for x in checked if x.is_floating_point()]).all())
    return params, state, torch.stack(flags)


_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _compiled(
    settings: Compile, loss_fn: Any, traced: Callable[..., Any] = _grad_and_loss, extra: tuple[Any, ...] = ()
) -> Callable[..., Any]:
    """A compiled ``traced`` (``_grad_and_loss``: one step; ``_whole_run``) per (mode, dynamic, backend,
    loss_fn's code), shared by the runs of the process.

    Each gets its own copy of the code object: torch.compile keeps its graphs (and its limit of
    recompilations, 8) per code object, so that the runs of one loss_fn reuse their graphs and
    many different loss_fns do not exhaust one shared limit.
    """
    key = (settings.mode, settings.dynamic, settings.backend, _code_key(loss_fn), traced.__name__, *extra)
    if key not in _COMPILED:
        code = traced.__code__.replace(co_name=f"{traced.__name__}_{len(_COMPILED)}")
        fn = types.FunctionType(code, traced.__globals__, code.co_name)
        backend = _counting(settings.backend, settings.mode)
        _COMPILED[key] = torch.compile(fn, backend=backend, fullgraph=True, dynamic=settings.dynamic)
    return _COMPILED[key]


_FALLBACK = (
    "nestgrad.train ({method}): compile=True, but step {t} could not be compiled ({reason}); this step and "
    "the rest of the run run eagerly (same results, eager speed). {fix}"
)
_FIX = (
    "Graph breaks come from Python that torch.compile cannot trace inside loss_fn (print, .item(), "
    "data-dependent if/for on tensor values, numpy): remove them from loss_fn, or pass compile=False. "
    "Compile(strict=True) raises here instead."
)
_BUFFERS = "the module has buffers (BatchNorm running statistics), which compiled steps do not advance"
_UNUSED = (
    "the loss does not use params {names}, whose gradient is None in an eager step (the optimizer leaves "
    "them and their state unchanged) but would be 0 in a compiled one (weight decay, momentum and step "
    "counts would move)"
)
_PARALLEL = "data-parallel runs all-reduce every step's gradients in eager code"
_RECOMPILED = (
    "nestgrad.train ({method}): compile=True recompiled the step at steps {steps} of this run ({n} graphs): "
    "the shapes, dtypes or Python values the step depends on changed between steps, and each compilation "
    "costs seconds. Pass batches of one shape, or Compile(dynamic=None) (or True) to compile for changing shapes."
)


class CompiledSteps:
    """The compiled steps of one run: ``step`` runs one (or returns ``None``: run it eagerly)."""

    def __init__(self, settings: Compile, method: str) -> None:
        self.settings = settings
        self.method = method
        self.report = CompileReport()
        settings.last_run = self.report
        self.off = False  # after a fallback: every later step is eager
        self.seen_eager = False
        self.compiled_once = False
        self.unused: list[str] = []  # params an eager step gave no gradient (None)

    def step(
        self, problem: Problem, params: dict[str, Tensor], state: OptState, t: int, create_graph: bool
    ) -> tuple[dict[str, Tensor], OptState, Tensor] | None:
        """Step ``t`` compiled, or ``None`` where it must run eagerly (the caller then does)."""
        from ._problem import _walks, detach_tree

        # Eager: the first step, the path check, and the steps whose graph is searched for tensors
        # from outside params and hparams (O(log T) of them, ``Problem.loss``), in a run and in its
        # replays alike (a replay's loss and RNG state are compared with the run's: ReplayError if not equal).
        walk = problem.strict and _walks(t, problem.steps)
        path = create_graph and problem.check_path  # the check runs on recorded steps only (``Problem.loss``)
        if self.off or not self.seen_eager or path or walk:
            self._eager()
            return None
        if problem.parallel is not None:
            return self._fail(t, _PARALLEL, None)
        if problem.buffers.has_copies():
            return self._fail(t, _BUFFERS, None)
        if self.unused:
            return self._fail(t, _UNUSED.format(names=self.unused[:3]), None)
        if create_graph:
            hparams = problem.hparams
        else:
            params = {k: v.detach() for k, v in params.items()}
            hparams = detach_tree(problem.hparams)
        key = _code_key(problem.loss_fn)
        if key in _FAILED:  # tracing it failed before: do not pay for the attempt at every call
            return self._fail(t, f"{_FAILED[key]}, as in an earlier run of this loss_fn", None)
        batch = problem.batches(t)
        versions = [v._version for v in params.values()]
        before = _COMPILES[0]
        try:
            fn = _compiled(self.settings, problem.loss_fn)
            grads, loss = fn(problem.loss_fn, params, problem.frozen, batch, hparams)
        except Exception as err:  # anything torch.compile raises; a real error of loss_fn recurs eagerly
            problem.pending_batch = (t, batch)
            if key is not None:
                _FAILED[key] = _reason(err)
            return self._fail(t, _reason(err), err)
        if _COMPILES[0] > before:
            self.report.compiles += _COMPILES[0] - before
            if self.compiled_once:
                self.report.recompiled_at.append(t)
        self.compiled_once = True
        if any(v._version != n for v, n in zip(params.values(), versions, strict=True)):
            problem.pending_batch = (t, batch)
            return self._fail(t, "loss_fn wrote the params in place", None)
        self.report.compiled_steps += 1
        if create_graph:
            new, new_state = problem.optimizer.update(grads, state, params)
        else:
            with torch.no_grad():
                new, new_state = problem.optimizer.update(grads, state, params)
        if problem.check_finite:
            try:
                problem._check_finite(t, (loss, params, grads, new, new_state))
            except NonFiniteError:  # the eager step re-runs it and raises with every detail (tasks= names the task)
                self.off, self.report.fallback = True, f"step {t}: the compiled step was not finite"
                self.report.compiled_steps -= 1
                self.report.eager_steps += 1
                problem.pending_batch = (t, batch)
                return None
        return new, new_state, loss.detach()

    def run(
        self, problem: Problem, params: dict[str, Tensor], state: OptState, create_graph: bool
    ) -> tuple[dict[str, Tensor], OptState] | None:
        """The whole run as one compiled graph (``Compile(whole_run=True)``), or ``None``: run it step by step.

        Only once a run of the same ``loss_fn`` (and the same ``create_graph``) has gone step by
        step in this process without a fallback: its eager first step checked the loss function, the
        path from the hparams and the params it uses. Every check of an eager run that needs no graph
        walk stays on: a step that is not finite re-runs the whole run eagerly, from the same RNG
        state, so that the error names its step and tensor; in-place writes to the params raise.
        """
        from ._problem import detach_tree

        key = (_code_key(problem.loss_fn), create_graph)
        if not self.settings.whole_run or self.off or key[0] is None or key not in _READY:
            return None
        if problem.parallel is not None or problem.buffers.has_copies() or problem.replay:
            return None
        if key[0] in _FAILED_WHOLE:
            return None
        hparams = problem.hparams
        if not create_graph:
            params = {k: v.detach() for k, v in params.items()}
            hparams = detach_tree(hparams)
        batches = [problem.batches(t) for t in range(problem.steps)]
        versions = [v._version for v in params.values()]
        rng = torch.get_rng_state()
        before = _COMPILES[0]
        try:
            # One code object (and limit of 8 graphs) per optimizer class and number of steps as well.
            fn = _compiled(self.settings, problem.loss_fn, _whole_run, (type(problem.optimizer), problem.steps))
            new, new_state, flags = fn(
                problem.loss_fn, problem.optimizer, params, state, problem.frozen, batches, hparams
            )
        except Exception as err:  # the run goes on step by step (each step compiled), with one warning
            _FAILED_WHOLE[key[0]] = _reason(err)
            problem.batches = _Fetched(batches)
            message = _WHOLE_FALLBACK.format(method=self.method, reason=_reason(err))
            if self.settings.strict:
                raise CompileError(message) from err
            warnings.warn(message, UserWarning, stacklevel=5)
            return None
        self.report.compiles += _COMPILES[0] - before
        if any(v._version != n for v, n in zip(params.values(), versions, strict=True)):
            raise RuntimeError(
                f"nestgrad.train ({self.method}): loss_fn wrote the params in place during a compiled run; "
                f"compute with a copy of them (w.clone()) instead of changing them."
            )
        if problem.check_finite and not bool(flags.all()):  # the eager run raises at the step, with details
            torch.set_rng_state(rng)
            problem.batches = _Fetched(batches)
            self.off, self.report.fallback = True, f"step {int((~flags).nonzero()[0, 0])}: not finite"
            return None
        self.report.compiled_steps += problem.steps
        return new, new_state

    def ready(self, problem: Problem, create_graph: bool) -> None:
        """After a whole run step by step: note whether later runs of this loss_fn may run as one graph."""
        key = (_code_key(problem.loss_fn), create_graph)
        if self.report.fallback is None and not self.unused and problem._unused is None and key[0] is not None:
            _READY.add(key)

    def eager_grads(self, grads: dict[str, Tensor | None]) -> None:
        """Note the params that an eager step gave no gradient: their compiled gradient would be 0, not None."""
        if not self.unused:
            self.unused = [k for k, g in grads.items() if g is None]

    def _eager(self) -> None:
        self.seen_eager = True
        self.report.eager_steps += 1

    def _fail(self, t: int, reason: str, err: BaseException | None) -> None:
        """Run the rest of the run eagerly, with one warning (or raise ``CompileError`` when strict)."""
        self.off = True
        self.report.fallback = f"step {t}: {reason}"
        self.report.eager_steps += 1
        message = _FALLBACK.format(method=self.method, t=t, reason=reason, fix=_FIX if err is not None else "")
        if self.settings.strict:
            raise CompileError(message.replace("run eagerly (same results, eager speed)", "would run eagerly")) from err
        warnings.warn(message.rstrip(), UserWarning, stacklevel=6)
        return None

    def finish(self) -> None:
        """At the end of a run: warn when it recompiled at several steps."""
        steps = self.report.recompiled_at
        if len(steps) >= 2:
            shown = ", ".join(str(s) for s in steps[:5]) + (" ..." if len(steps) > 5 else "")
            warnings.warn(
                _RECOMPILED.format(method=self.method, steps=shown, n=self.report.compiles), UserWarning, stacklevel=4
            )


_FAILED: dict[tuple[Any, ...], str] = {}  # loss_fn code -> why tracing it failed (this process)
_FAILED_WHOLE: dict[tuple[Any, ...], str] = {}  # loss_fn code -> why tracing its whole run failed
_READY: set[tuple[Any, ...]] = set()  # (loss_fn code, create_graph) that ran step by step without a fallback
_WHOLE_FALLBACK = (
    "nestgrad.train ({method}): Compile(whole_run=True), but the run could not be traced as one graph "
    "({reason}); it runs step by step, each step compiled, as in later runs of this loss_fn. "
    "Compile(strict=True) raises here instead."
)


class _Fetched:
    """The batches a whole compiled run fetched, for the step-by-step run that replaces it."""

    def __init__(self, batches: list[Any]) -> None:
        self.fetched = batches

    def __call__(self, t: int) -> Any:
        return self.fetched[t]


def _code_key(fn: Any) -> tuple[Any, ...] | None:
    """``fn``'s code and that of the functions in its closure (``tasks=`` wraps the user's loss_fn)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    inner = tuple(
        c.cell_contents.__code__
        for c in (getattr(fn, "__closure__", None) or ())
        if callable(getattr(c, "cell_contents", None)) and hasattr(c.cell_contents, "__code__")
    )
    return (code, *inner)


def _reason(err: BaseException) -> str:
    """The first line of a compile error, for the warning."""
    text = str(err).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    return f"{type(err).__name__}: {first[:300]}" if first else type(err).__name__


__all__ = ["Compile", "CompileError", "CompileReport", "CompiledSteps", "as_compile"]
