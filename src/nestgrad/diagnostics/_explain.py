"""``explain``: say where and why the path from hyperparameters to a loss is cut.

When ``torch.autograd.grad(loss, A)`` raises "One of the differentiated Tensors
appears to not have been used in the graph", or returns a gradient that is
zero, autograd cannot say where ``A`` was lost. ``explain()`` runs the
computation under a ``Tracker``, which follows every value derived
from the hyperparameters through every torch operation, differentiable or not,
and records each place where such a value leaves autograd: the operation
(``argmax``, ``detach``, an op inside ``torch.no_grad()``, ``.item()``, an
integer cast, ...), the user's file and line, and how to fix it.

How it works. A ``torch.overrides.TorchFunctionMode`` sees every torch function
and Tensor method called from Python, including those inside ``torch.no_grad()``
(grad mode is below it) and those that return Python numbers (``.item()``,
``float(t)``). Each Tensor derived from the hyperparameters is *tainted*; the
tracker remembers, per tainted Tensor (by identity, through a weak reference):

* whether autograd still connects it to the hyperparameters, found by walking
  its ``grad_fn`` graph a few nodes back to the inputs of the operation; and
* the set of *cuts* upstream of it: operations whose output is tainted but
  which autograd no longer connects to the hyperparameters.

Python floats returned by ``.item()``/``float()`` are followed by identity as
arguments of later torch calls; a number that goes through Python arithmetic
first is lost, and the report then lists the conversions it saw. Only cuts that
reach the loss are reported: an ``argmax`` for an accuracy metric is not.
Whether the loss reaches the hyperparameters at all is decided by autograd's own
graph (``reaches()``), not by the tracker; the tracker only explains.

Limits. A call implemented in C++ (``F.cross_entropy``, ``nn.LSTM``) is one
operation to the tracker; the autograd engine's own work inside
``torch.autograd.grad``/``.backward()`` is seen as that one call; all outputs
of a call that takes lists (``torch._foreach_*``) share what its inputs carry,
so a cut on one element is attributed to all (this affects the explanation,
never the verdict, which autograd's graph decides); code under ``torch.compile``
is not followed.

A TorchDispatchMode would see the aten operations below autograd too, but at that
level an output has no ``grad_fn`` yet, so a cut can only be seen one operation
late, and each user-level call is split into many internal operations whose
names the user never wrote. The function mode sees the calls the user wrote,
with their autograd state, which is what a report needs.

Cost. Nothing when no tracker is active: the mode exists only inside the
``with`` block, and nothing is installed at import. When active, it is a fixed
cost per torch call made from Python (measured: about +5 us for a call on
untracked Tensors, +18 us for one on tainted Tensors, on a shared 2-core CPU,
torch 2.13), so the ratio is largest for small layers and fades for large ones.
A 2-layer MLP (16-32-4, batch 64, float32, one thread) trained by
``nestgrad.train()`` with ``Unroll`` for 30 steps, then a validation loss:
the run takes 2.0x to 2.1x as long with SGD(momentum) and 2.2x to 2.3x with Adam
(27 -> 54 ms, 35 -> 79 ms); with the hypergradient's backward pass included, which
is not tracked, 1.5x to 1.85x. Medians of 7 runs, several repeats. The check
``reaches()`` alone (no tracker) is one walk over the graph: 0.3 ms for a
455-node graph (a 6-layer transformer encoder) that does not reach the hparams,
less when it does (it stops at the first hparam it finds).

Examples:
    >>> def outer(A):
    ...     trained = nestgrad.train(loss_fn, params, nestgrad.optim.SGD(lr=0.1), data, steps=20, hparams=A)
    ...     return F.cross_entropy(nestgrad.call(model, trained, x_val), y_val)
    >>> report = nestgrad.explain(outer, A)  # raises DisconnectedError if A cannot reach the loss
    >>> (dA,) = torch.autograd.grad(report.loss, A)
"""

from __future__ import annotations

import linecache
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

Status = Literal["connected", "partly cut", "cut", "unused"]

# ---------------------------------------------------------------------------------------------- what cuts a path
_INDEX_OPS = frozenset(
    "argmax argmin argsort sort msort topk max min kthvalue mode median nanmedian cummax cummin nonzero "
    "nonzero_static argwhere where unique unique_consecutive searchsorted bucketize multinomial histc "
    "bincount count_nonzero".split()
)
_VALUES_AND_INDICES = frozenset("sort topk max min kthvalue mode median nanmedian cummax cummin".split())
_CAST_OPS = frozenset("long int short char byte bool to type type_as".split())
_ZERO_GRAD_OPS = frozenset("round floor ceil trunc fix sign sgn".split())
_TENSOR_GETTERS = frozenset([".data", ".grad", ".real", ".imag", ".T", ".mT", ".H", ".mH", ".data ="])
_DETACH_OPS = frozenset(["detach", "detach_", ".data", ".data ="])
_TO_PYTHON = frozenset("item __float__ __int__ __index__ __complex__ tolist numpy".split())
# Outputs that depend on the shape, dtype or device of their input but not on its values.
_NO_VALUE = frozenset(
    "zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros new_ones new_empty "
    "new_full requires_grad_ retain_grad __bool__".split()
)
# In-place ops that overwrite their target entirely: its old value does not flow into the new one.
_OVERWRITE = frozenset(
    [*"copy_ zero_ fill_ normal_ uniform_ random_ exponential_ geometric_ cauchy_ log_normal_ set_".split(), ".data ="]
)

_KIND_TEXT = {
    "index": "{op} returns integer indices{detail}, which carry no gradient: the choice it makes is piecewise "
    "constant in the hparams.",
    "compare": "{op} returns a boolean mask (a hard threshold), which carries no gradient.",
    "cast": "{op} converts to an integer or boolean dtype, which carries no gradient.",
    "zero_grad": "{op} has derivative zero wherever it is defined, so autograd connects it but every gradient "
    "through it is exactly zero.",
    "detach": "{op} gives a tensor without autograd history: the gradient stops there.",
    "python": "{op} turns a tensor into a Python number, which re-enters later computations as a constant.",
    "no_grad": "{op} ran inside a torch.no_grad() region{region}, where autograd records nothing.",
    "inplace_no_grad": "the in-place update {op} ran inside a torch.no_grad() region{region}: it overwrites the "
    "tensor with values autograd does not connect to the hparams.",
    "no_create_graph": "{op} ran without create_graph=True, so the gradients it returns have no graph of their own.",
    "nondiff": "{op} returned a result that autograd does not connect to its inputs derived from the hparams "
    "(an operation without a derivative for that input).",
}
_RELAX = (
    "To differentiate through the choice, either relax it (soft labels softmax(logits / tau); "
    "F.gumbel_softmax(logits, tau=tau, hard=True) or the straight-through y_hard - y_soft.detach() + y_soft), or "
    "keep it hard and estimate the hypergradient without differentiating the path: "
    "nestgrad.train(..., method=nestgrad.ZerothOrder(samples=..., sigma=...))."
)
_FIX = {
    "index": _RELAX,
    "compare": "Replace the threshold by a smooth one, e.g. torch.sigmoid((x - t) / tau), or use nestgrad.ZerothOrder.",
    "cast": "Stay in floating point. If the value is genuinely discrete: " + _RELAX,
    "zero_grad": "Use a straight-through estimator x + (x.round() - x).detach(), a smooth relaxation, or "
    "nestgrad.ZerothOrder.",
    "detach": "Remove the .detach() (or .data) if the gradient should flow. If the stop-gradient is deliberate, "
    "the hparams do not reach the loss by design; nestgrad.ZerothOrder estimates the hypergradient anyway.",
    "python": "Keep the value a Tensor: never call .item(), float() or math.* on a value derived from hparams "
    "(a hyperparameter is float | Tensor).",
    "no_grad": "Move the computation out of torch.no_grad(). For a hand-written update, write it out of place with "
    "grad enabled, w = w - lr * g with g = torch.autograd.grad(loss, w, create_graph=True)[0], or let "
    "nestgrad.train(loss_fn, params, nestgrad.optim.SGD(lr=...), data, steps=..., hparams=...) do the updates.",
    "inplace_no_grad": "Do not update weights in place under torch.no_grad(): return new tensors with grad enabled "
    "(w = w - lr * g, g from torch.autograd.grad(..., create_graph=True)), or let nestgrad.train do the updates "
    "with a nestgrad.optim optimizer.",
    "no_create_graph": "Pass create_graph=True (torch.autograd.grad(loss, w, create_graph=True) or "
    "loss.backward(create_graph=True)), or let nestgrad.train do the inner updates.",
    "nondiff": "Use an operation that is differentiable in that input (a custom autograd.Function must return a "
    "gradient for it), or nestgrad.ZerothOrder.",
}
_NO_GRAD_KINDS = frozenset(["no_grad", "inplace_no_grad"])
_SOFT_KINDS = frozenset(["compare"])  # masks are everywhere (ReLU-like where, clipping): no warning when connected

_SYMPTOM = (
    'torch.autograd.grad(loss, hparams) raises "One of the differentiated Tensors appears to not have been used '
    'in the graph", and with allow_unused=True or materialize_grads=True the hypergradient is a silent zero.'
)
_ZERO_SYMPTOM = (
    "autograd links them only through operations whose derivative is zero, so torch.autograd.grad(loss, hparams) "
    "returns a silent zero."
)
_NEED_FN = (
    "nestgrad.explain: the first argument must be a function fn(hparams) -> loss, not a {got}. A loss computed "
    "without tracking has no record of the operations that produced it, so it cannot be explained after the fact. "
    "Pass the computation as a function, explain(lambda A: outer_loss(A), A), or wrap it: "
    "with nestgrad.tracking(A) as tracker: loss = ...; report = tracker.report(loss)."
)

_WALK_LIMIT = 512  # graph nodes one operation may look through before falling back to requires_grad
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the nestgrad package
_THIS = os.path.abspath(__file__)
# Frames that only pass a call on: this module, and the attention mode that ng.train installs
# (a call made through it was still written by the user).
_TRANSPARENT = frozenset([_THIS, _OWN_DIR + "_attention.py"])
# The node type of a leaf's gradient accumulator; a constant of torch's, not computed at import time
# (nothing at import time may depend on the caller's grad mode, inference mode, dtype or device).
_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad
_SET_GRAD_ENABLED = torch._C._set_grad_enabled


class DisconnectedError(RuntimeError):
    """The hyperparameters do not reach the loss through autograd; ``report`` says where the path is cut."""

    def __init__(self, report: PathReport) -> None:
        super().__init__(str(report))
        self.report = report


class PartialPathWarning(UserWarning):
    """The loss reaches the hyperparameters, but some paths between them are cut (the gradient misses them)."""


@dataclass(eq=False)
class Cut:
    """One place where a value derived from the hyperparameters left autograd.

    Attributes:
        op: the operation, e.g. ``"argmax"``, ``"detach"``, ``"item"``, ``".data"``.
        kind: why it cuts: ``"index"``, ``"compare"``, ``"cast"``, ``"zero_grad"``,
            ``"detach"``, ``"python"``, ``"no_grad"``, ``"inplace_no_grad"``,
            ``"no_create_graph"`` or ``"nondiff"``.
        filename, lineno, function: where the user's code called it (the first
            frame outside torch and nestgrad).
        code: that source line.
        internal: the call came from nestgrad itself (e.g. ``Unroll(truncate=...)``
            detaching the weights on purpose); such cuts never warn.
        region: for cuts under ``torch.no_grad()``, where the region was entered.
        detail: e.g. ``"its indices output"`` for ``max(x, dim)``.
        count: how many times it happened (once per training step, typically).
    """

    op: str
    kind: str
    filename: str
    lineno: int
    function: str
    code: str
    internal: bool = False
    region: tuple[str, int] | None = None
    detail: str = ""
    count: int = 0
    order: int = field(default=0, repr=False)

    @property
    def where(self) -> str:
        """``"file:line"``, relative to the working directory when under it."""
        return f"{_short(self.filename)}:{self.lineno}"

    @property
    def why(self) -> str:
        """One sentence: why this operation cuts the path."""
        region = f" (entered at {_short(self.region[0])}:{self.region[1]})" if self.region else ""
        detail = f" ({self.detail})" if self.detail else ""
        return _KIND_TEXT[self.kind].format(op=self.op, region=region, detail=detail)

    @property
    def fix(self) -> str:
        """How to fix it."""
        return _FIX[self.kind]


@dataclass(frozen=True, eq=False)
class PathReport:
    """Whether, and through what, the hyperparameters reach a loss. ``str(report)`` explains it.

    Attributes:
        loss: the Tensor that was explained (what ``fn`` returned, for ``explain()``).
        status: ``"connected"`` (every path autograd can see reaches the loss),
            ``"partly cut"`` (the loss reaches the hparams, but some paths to it are
            cut, so the gradient misses them), ``"cut"`` (the loss depends on the
            hparams, but only through cuts: the gradient is missing or zero), or
            ``"unused"`` (no value derived from the hparams reached the loss).
        cuts: the cuts on paths from the hparams to the loss, in the order they first happened.
        notes: further findings (hparams that do not require grad, conversions to
            Python numbers that may have re-entered as constants, ...).
        graph_reaches: whether autograd's graph links the loss to the hparams at all
            (``reaches()``). With status ``"cut"`` it means: only through operations
            whose derivative is zero (``round``, ``sign``, ...).
    """

    loss: Tensor
    status: Status
    cuts: tuple[Cut, ...]
    notes: tuple[str, ...] = ()
    graph_reaches: bool = False

    @property
    def connected(self) -> bool:
        """True when at least one path from the hparams to the loss is not cut (status connected or partly cut)."""
        return self.status in ("connected", "partly cut")

    def __str__(self) -> str:
        head = {
            "connected": "nestgrad.explain: the loss reaches the hparams through autograd; no path is cut.",
            "partly cut": "nestgrad.explain: the loss reaches the hparams through autograd, but some paths from the "
            "hparams to it are CUT: the hypergradient ignores how the hparams act through them.",
            "cut": "nestgrad.explain: every path from the hparams to the loss is CUT, so autograd has no gradient "
            "for them: " + (_ZERO_SYMPTOM if self.graph_reaches else _SYMPTOM),
            "unused": "nestgrad.explain: no value computed from the hparams reached the loss, so autograd has no "
            "gradient for them: " + _SYMPTOM,
        }[self.status]
        lines = [head]
        user = [c for c in self.cuts if not c.internal]
        soft = [c for c in user if c.kind in _SOFT_KINDS]
        if self.status == "connected":
            user = []  # only soft cuts are left: masks, mentioned below
        if user:
            lines += ["", "Where the path is cut:" if self.status != "partly cut" else "The cut paths:"]
            fixed: set[str] = set()
            for i, c in enumerate(user[:10], 1):
                times = f" ({c.count} times)" if c.count > 1 else ""
                lines.append(f"  {i}. {c.op} at {c.where}, in {c.function}(){times}")
                if c.code:
                    lines.append(f"         {c.code}")
                lines.append(f"     {c.why}")
                lines.append(f"     Fix: {c.fix if c.kind not in fixed else 'as above.'}")
                fixed.add(c.kind)
            if len(user) > 10:
                lines.append(f"  ... and {len(user) - 10} more.")
        if soft and self.status == "connected":
            sites = ", ".join(f"{c.op} at {c.where}" for c in soft[:5])
            lines += ["", f"Masks on the way (their own values carry no gradient, which is usually intended): {sites}."]
        internal = [c for c in self.cuts if c.internal]
        if internal:
            sites = ", ".join(f"{c.op} (called from {c.where})" for c in internal[:5])
            lines += ["", f"Deliberate cuts inside nestgrad (e.g. Unroll(truncate=...)): {sites}."]
        if self.notes:
            lines.append("")
            lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- helpers
def _short(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith("..") else rel


def _user_frame() -> tuple[FrameType | None, bool]:
    """The first frame outside torch, nestgrad and this module; and whether nestgrad made the call."""
    frame: FrameType | None = sys._getframe(1)
    internal: bool | None = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name in _TRANSPARENT or name.startswith(_TORCH_DIR):
            frame = frame.f_back
            continue
        ours = name.startswith(_OWN_DIR)
        if internal is None:
            internal = ours
        if not ours:
            return frame, bool(internal)
        frame = frame.f_back
    return None, bool(internal)


def _scan(obj: Any, tensors: list[Tensor], floats: list[float]) -> None:
    if isinstance(obj, Tensor):
        tensors.append(obj)
    elif type(obj) is float:
        floats.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _scan(o, tensors, floats)
    elif isinstance(obj, dict):
        for o in obj.values():
            _scan(o, tensors, floats)


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name in ("__get__", "__set__"):  # a Tensor property such as .grad or .data
        attr = "." + getattr(getattr(func, "__self__", None), "__name__", "?")
        return attr if name == "__get__" else attr + " ="
    if func is torch.autograd.grad:
        return "torch.autograd.grad"
    return name


def _leaves(hparams: Any) -> list[Tensor]:
    leaves = pytree.tree_leaves(hparams)
    bad = [type(x).__name__ for x in leaves if not isinstance(x, Tensor)]
    if bad or not leaves:
        got = f"leaves of type {sorted(set(bad))}" if bad else "no Tensor"
        raise TypeError(
            f"nestgrad.explain: hparams must be a Tensor or a tuple/list/dict of Tensors; got {got}. "
            f"Wrap numbers as tensors, e.g. torch.tensor(0.1, requires_grad=True)."
        )
    return leaves


def reaches(output: Tensor, hparams: Any) -> bool:
    """Whether autograd connects ``output`` to any Tensor in ``hparams``, by walking ``output.grad_fn``.

    Exact and cheap (one pass over the graph, no backward): this is the check to run by
    default before a hypergradient is asked for.
    """
    leaves = _leaves(hparams)
    if any(output is h for h in leaves):
        return output.requires_grad
    if output.grad_fn is None:
        return False
    leaf_ids = {id(h) for h in leaves if h.grad_fn is None and h.requires_grad}
    nodes = {id(h.grad_fn) for h in leaves if h.grad_fn is not None}
    return any(
        id(node) in nodes or (type(node) is _ACCUMULATE_GRAD and id(node.variable) in leaf_ids)
        for node in graph_nodes(output.grad_fn)
    )


def graph_nodes(root: Any, stop: Callable[[Any], bool] | None = None) -> Iterator[Any]:
    """Every node of the autograd graph behind ``root`` once, depth first, not walking past a node where ``stop``."""
    stack: list[Any] = [root]
    seen: dict[int, Any] = {}  # holds the nodes, so that no id is reused during the walk
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        if stop is None or not stop(node):
            stack.extend(n for n, _ in node.next_functions)


# ---------------------------------------------------------------------------------------------------- tracker
class _Ref(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a tracked tensor that remembers the tensor's id, for its callback."""

    __slots__ = ("key",)

    def __init__(self, t: Tensor, callback: Callable[[_Ref], None]) -> None:
        super().__init__(t, callback)
        self.key = id(t)


@dataclass
class _Info:
    connected: bool
    cuts: frozenset[Cut]
    node: Any  # the grad_fn the tensor had when this was recorded


_EMPTY: frozenset[Cut] = frozenset()


class _Mode(TorchFunctionMode):
    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        return self.tracker._call(func, args, kwargs or {})


INFERENCE_MODE = (
    "{where}: called inside torch.inference_mode(), where autograd records nothing, so there is no "
    "hypergradient to find a path for or to check. Call it outside inference_mode (torch.no_grad() inside "
    "fn is fine: it is reported as a cut)."
)


def tracked(t: Tensor) -> bool:
    """Whether a ``tracking()`` active in this thread follows ``t``: it was computed from the tracked hparams.

    ``train`` asks, so that it does not tell a user to call ``.requires_grad_()`` on a weight that
    ``explain`` is about to report as computed from the hparams through a cut (a comparison, a detach).
    """
    for mode in _get_current_function_mode_stack():
        if isinstance(mode, _Mode) and mode.tracker._get(t) is not None:
            return True
    return False


class Tracker:
    """Follows values derived from ``hparams`` through every torch operation while active.

    Use ``tracking()`` to make one, as a context manager; then ``report()``
    on the loss computed inside the block. Trackers are single-use.

    Examples:
        >>> with nestgrad.tracking(A) as tracker:
        ...     loss = outer_loss(A)
        >>> report = tracker.report(loss)
        >>> print(report)
    """

    def __init__(self, hparams: Any) -> None:
        self.hparams = hparams
        self._leaves = _leaves(hparams)
        self._hparam_ids = {id(h) for h in self._leaves}
        self._info: dict[int, tuple[_Ref, _Info]] = {}
        self._by_node: dict[int, _Ref] = {}  # id(grad_fn) -> the tracked tensor it belongs to
        self._floats: dict[int, tuple[float, frozenset[Cut]]] = {}
        self._cuts: dict[tuple[Any, ...], Cut] = {}
        self._python_cuts: list[Cut] = []
        self._names: dict[Any, str] = {}
        self._no_grad_at: tuple[str, int] | None = None
        self._backward: tuple[bool, frozenset[Cut], Cut | None] | None = None
        self._pruned_at = 1024
        self._mode: _Mode | None = None
        self._used = False
        for h in self._leaves:
            self._set(h, _Info(h.requires_grad, _EMPTY, h.grad_fn))

    # -- context
    def __enter__(self) -> Tracker:
        if self._used:
            raise RuntimeError("nestgrad.tracking: a Tracker can be entered once; make a new one with tracking(...).")
        self._used = True
        if not torch.is_grad_enabled():
            self._no_grad_at = _location()
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        self._mode = None

    # -- tensor bookkeeping
    def _get(self, t: Tensor) -> _Info | None:
        entry = self._info.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        info = entry[1]
        node = t.grad_fn
        if node is not info.node and id(t) not in self._hparam_ids:
            # Its history changed outside the tracker's view: the output of a custom
            # autograd.Function (whose forward ran without grad), or an untracked in-place op.
            linked = self._walk(node, {}, {})
            if linked is not None and linked != info.connected:
                info = _Info(linked, _EMPTY if linked else info.cuts, node)
            else:
                info = _Info(info.connected, info.cuts, node)
            self._set(t, info)
        return info

    def _set(self, t: Tensor, info: _Info) -> None:
        entry = self._info.get(id(t))
        ref = entry[0] if entry is not None and entry[0]() is t else _Ref(t, self._drop)
        self._info[id(t)] = (ref, info)
        if info.node is not None:
            self._by_node[id(info.node)] = ref
            if len(self._by_node) > self._pruned_at:
                self._by_node = {k: r for k, r in self._by_node.items() if r() is not None}
                self._pruned_at = max(1024, 2 * len(self._by_node))

    def _drop(self, ref: _Ref) -> None:
        """When a tracked tensor dies, forget it (and release the graph node its entry holds)."""
        entry = self._info.get(ref.key)
        if entry is not None and entry[0] is ref:
            del self._info[ref.key]

    def _known(self, node: Any) -> bool | None:
        """Whether a graph node belongs to a tracked tensor that is connected; None when unknown."""
        if type(node) is _ACCUMULATE_GRAD:
            entry = self._info.get(id(node.variable))
            return entry is not None and entry[0]() is node.variable and entry[1].connected
        ref = self._by_node.get(id(node))
        t = None if ref is None else ref()
        if t is None or t.grad_fn is not node:
            return None
        entry = self._info.get(id(t))
        return None if entry is None or entry[0]() is not t else entry[1].connected

    def _walk(self, start: Any, stops: dict[Any, bool], dead: dict[int, Any]) -> bool | None:
        """Whether ``start`` reaches a connected tensor's node; None when that takes too many nodes to tell.

        ``dead`` collects nodes known not to reach one (shared by the outputs of one operation); it and
        ``seen`` hold the nodes themselves, so that no id is reused while they are in use.
        """
        if start is None:
            return False
        stack = [start]
        seen: dict[int, Any] = {}
        budget = _WALK_LIMIT
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen or id(node) in dead:
                continue
            seen[id(node)] = node
            known = stops.get(node)
            if known is None:
                known = self._known(node)
            if known is not None:
                if known:
                    return True
                continue
            budget -= 1
            if budget < 0:
                return None
            stack.extend(n for n, _ in node.next_functions)
        dead.update(seen)
        return False

    def _cut(self, op: str, kind: str, detail: str = "") -> Cut:
        frame, internal = _user_frame()
        filename, lineno, function = ("<unknown>", 0, "?") if frame is None else (
            frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name
        )  # fmt: skip
        region = self._no_grad_at if kind in _NO_GRAD_KINDS else None
        key = (op, kind, filename, lineno, detail)
        cut = self._cuts.get(key)
        if cut is None:
            code = linecache.getline(filename, lineno).strip() if frame is not None else ""
            cut = Cut(op, kind, filename, lineno, function, code, internal, region, detail, order=len(self._cuts))
            self._cuts[key] = cut
        cut.count += 1
        return cut

    # -- the mode
    def _call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if func is _SET_GRAD_ENABLED:
            before = torch.is_grad_enabled()
            out = func(*args, **kwargs)
            if before and not torch.is_grad_enabled():
                self._no_grad_at = _location()
            elif torch.is_grad_enabled():
                self._no_grad_at = None
            return out
        try:
            name = self._names.get(func)
            if name is None:
                name = self._names[func] = _name(func)
        except TypeError:  # an unhashable callable
            name = _name(func)
        if name[0] == "." and name not in _TENSOR_GETTERS:  # .shape, .dtype, .requires_grad, ...
            return func(*args, **kwargs)
        tensors: list[Tensor] = []
        floats: list[float] = []
        _scan(args, tensors, floats)
        if kwargs:
            _scan(kwargs, tensors, floats)
        tainted = [(t, info) for t in tensors if (info := self._get(t)) is not None]
        from_floats = [self._floats[id(f)][1] for f in floats if id(f) in self._floats]
        if not tainted and not from_floats and name not in (".grad", "backward"):
            return func(*args, **kwargs)
        if name in _NO_VALUE or name.startswith("is_") or name in ("size", "dim", "numel", "stride"):
            return func(*args, **kwargs)
        stops = {t.grad_fn: info.connected for t, info in tainted if t.grad_fn is not None}
        for t in tensors:
            if t.grad_fn is not None:
                stops.setdefault(t.grad_fn, False)
        out = func(*args, **kwargs)
        self._record(name, args, kwargs, out, tainted, from_floats, stops)
        return out

    def _record(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
        tainted: list[tuple[Tensor, _Info]],
        from_floats: list[frozenset[Cut]],
        stops: dict[Any, bool],
    ) -> None:
        grad_on = torch.is_grad_enabled()
        if name == "backward":
            self._record_backward(args, kwargs)
            return
        if name == ".grad":
            self._record_grad(out)
            return
        has_out = kwargs.get("out") is not None
        inplace = (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", ".data =") or has_out
        if inplace:
            targets: list[Tensor] = []
            _scan(kwargs["out"] if has_out else args[0], targets, [])
            if name in _OVERWRITE:  # the target's old value does not flow into its new one
                tainted = [(t, i) for t, i in tainted if not any(t is x for x in targets)]
                if not tainted and not from_floats:
                    for t in targets:
                        if id(t) not in self._hparam_ids:
                            self._info.pop(id(t), None)
                    return
        else:
            targets = []
            floats: list[float] = []
            _scan(out, targets, floats)
            if name in _TO_PYTHON:
                self._record_python(name, tainted, from_floats, floats)
                return
        connected_in = False
        cuts_in = _EMPTY
        for _, info in tainted:
            connected_in = connected_in or info.connected
            if info.cuts:
                cuts_in = cuts_in | info.cuts
        for cuts in from_floats:
            cuts_in = cuts_in | cuts
        dead: dict[int, Any] = {}
        memo: dict[int, tuple[Any, bool | None]] = {}  # id(node) -> (node, walk result)
        for o in targets:
            if id(o) in self._hparam_ids:
                continue  # a hyperparameter stays itself, whatever is done to it in place
            if not connected_in or name in _ZERO_GRAD_OPS or not o.requires_grad:
                linked = False
            else:
                node = o.grad_fn
                if id(node) not in memo:  # outputs of one op often share a node (torch._foreach_*, max)
                    memo[id(node)] = (node, self._walk(node, stops, dead))
                walked = memo[id(node)][1]
                linked = True if walked is None else walked  # too far to tell: trust requires_grad
            cuts = cuts_in
            if connected_in and not linked:
                cuts = cuts | {self._cut(name, _kind(name, o, grad_on, inplace), _detail(name, o, out))}
            elif inplace and not grad_on and o.requires_grad:
                cuts = cuts | {self._cut(name, "inplace_no_grad")}
            self._set(o, _Info(linked, cuts, o.grad_fn))
            base = o._base if inplace else None
            if base is not None and id(base) not in self._hparam_ids:  # an in-place write into a view changes its base
                before = self._get(base)
                walked = self._walk(base.grad_fn, stops, {}) if grad_on else False
                connected = (before is not None and before.connected) if walked is None else walked
                self._set(base, _Info(connected, cuts | (before.cuts if before else _EMPTY), base.grad_fn))

    def _record_python(
        self, name: str, tainted: list[tuple[Tensor, _Info]], from_floats: list[frozenset[Cut]], floats: list[float]
    ) -> None:
        cuts = _EMPTY.union(*(info.cuts for _, info in tainted), *from_floats)
        if any(info.connected for _, info in tainted):
            cut = self._cut(name, "python")
            self._python_cuts.append(cut)
            cuts = cuts | {cut}
        for f in floats:
            self._floats[id(f)] = (f, cuts)

    def _record_backward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        root = self._get(args[0]) if args and isinstance(args[0], Tensor) else None
        if root is None:
            self._backward = None
            return
        create_graph = kwargs.get("create_graph", args[3] if len(args) > 3 else False)
        cut = self._cut("backward", "no_create_graph") if root.connected and not create_graph else None
        self._backward = (root.connected and bool(create_graph), root.cuts, cut)

    def _record_grad(self, g: Any) -> None:
        if not isinstance(g, Tensor) or self._backward is None or self._get(g) is not None:
            return
        connected, cuts, cut = self._backward
        walked = self._walk(g.grad_fn, {}, {}) if connected else False
        linked = walked is None or walked
        if cut is not None:
            cuts = cuts | {cut}
        self._set(g, _Info(linked, cuts, g.grad_fn))

    # -- the result
    def report(self, loss: Tensor) -> PathReport:
        """Explain how ``loss`` (computed while this tracker was active) depends on the hparams.

        Returns a ``PathReport``; it raises and warns nothing (``explain()`` does).
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"nestgrad.explain: the loss must be a Tensor; got {type(loss).__name__}.")
        info = self._get(loss)
        linked = reaches(loss, self._leaves)
        cuts = tuple(sorted(info.cuts, key=lambda c: c.order)) if info is not None else ()
        user = [c for c in cuts if not c.internal]
        notes = []
        status: Status
        if not linked:
            status = "cut" if info is not None else "unused"
        elif info is not None and not info.connected and any(c.kind == "zero_grad" for c in cuts):
            status = "cut"
        elif any(c.kind not in _SOFT_KINDS for c in user):
            status = "partly cut"
        else:
            status = "connected"
        stiff = [i for i, h in enumerate(self._leaves) if not h.requires_grad]
        if stiff:
            which = f"hparams leaf {stiff[0]} does" if len(stiff) == 1 else f"hparams leaves {stiff} do"
            notes.append(
                f"{which} not require grad, so autograd does not follow it: call .requires_grad_() on it "
                f"(leaves count in the order of torch.utils._pytree.tree_leaves(hparams))."
            )
        if status == "cut" and not user and not stiff:
            notes.append(
                "The tracker saw no operation cut the path: it was cut where the tracker could not look (inside C++ "
                "code or a custom autograd.Function, or before tracking started)."
            )
        if status == "unused":
            seen = [c for c in self._python_cuts if not c.internal]
            if seen:
                sites = ", ".join(f"{c.op} at {c.where}" for c in seen[:5])
                notes.append(
                    f"Values derived from the hparams were turned into Python numbers ({sites}); a number that went "
                    f"through Python arithmetic before reaching the loss cannot be followed, and is a constant to "
                    f"autograd. {_FIX['python']}"
                )
            elif not self._cuts:
                notes.append(
                    "fn never used a value derived from the hparams in a torch operation. Check that fn computes "
                    "with the hparams it receives, not with other tensors (e.g. a copy, or a module's own weights)."
                )
        return PathReport(loss, status, cuts, tuple(notes), linked)


def _location() -> tuple[str, int] | None:
    frame, _ = _user_frame()
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


def _kind(name: str, o: Tensor, grad_on: bool, inplace: bool) -> str:
    if not grad_on:
        return "inplace_no_grad" if inplace else "no_grad"
    if name in _ZERO_GRAD_OPS:
        return "zero_grad"
    if name in _DETACH_OPS:
        return "detach"
    if name in ("torch.autograd.grad", "backward"):
        return "no_create_graph"
    if not (o.is_floating_point() or o.is_complex()):
        if name in _INDEX_OPS:
            return "index"
        if name in _CAST_OPS:
            return "cast"
        return "compare" if o.dtype is torch.bool else "cast"
    return "nondiff"


def _detail(name: str, o: Tensor, out: Any) -> str:
    if name in _VALUES_AND_INDICES and isinstance(out, tuple) and not (o.is_floating_point() or o.is_complex()):
        return "its indices output"
    return ""


def tracking(hparams: Any) -> Tracker:
    """A ``Tracker`` for ``hparams``: use it as ``with tracking(hparams) as tracker: ...``.

    Inside the block, every torch operation on a value derived from ``hparams``
    is followed; after it, ``tracker.report(loss)`` explains how ``loss`` depends
    on them. Use this when the computation cannot be passed as a function; otherwise
    ``explain()`` is shorter.

    Args:
        hparams: a Tensor or a tuple/list/dict of Tensors (those to explain the path from).

    Examples:
        >>> with nestgrad.tracking(A) as tracker:
        ...     trained = nestgrad.train(loss_fn, params, opt, data, steps=20, hparams=A)
        ...     val = F.cross_entropy(nestgrad.call(model, trained, x_val), y_val)
        >>> print(tracker.report(val))
    """
    return Tracker(hparams)


def explain(fn: Callable[[Any], Tensor], hparams: Any) -> PathReport:
    """Run ``fn(hparams)`` and explain how its result depends on ``hparams``; raise if it does not.

    Every operation is followed, differentiable or not (see the module
    documentation for how, and for its cost), so the report names each
    operation that cut a path from the hparams to the loss, with the file and
    line that called it and how to fix it.

    Args:
        fn: ``fn(hparams) -> loss Tensor``: the whole computation from the
            hyperparameters to the loss, e.g. a call to ``nestgrad.train()``
            and a validation loss. A function, not a loss, because a loss computed
            without tracking cannot be explained after the fact (see
            ``tracking()`` for code that cannot be wrapped in one).
        hparams: a Tensor or a tuple/list/dict of Tensors, passed to ``fn`` as they are.

    Returns:
        A ``PathReport``; ``report.loss`` is what ``fn`` returned, ready for
        ``torch.autograd.grad(report.loss, hparams)``.

    Raises:
        DisconnectedError: the loss does not reach the hparams through autograd
            (status ``"cut"`` or ``"unused"``): the hypergradient would be missing or
            zero. The message is the report.

    Warns:
        PartialPathWarning: the loss reaches the hparams, but also depends on them
            through cut paths (e.g. ``argmax`` pseudo-labels of the same logits), so
            the gradient ignores part of their effect. Comparisons (masks) and
            cuts made by nestgrad itself do not warn.

    Examples:
        >>> def outer(A):
        ...     trained = nestgrad.train(loss_fn, params, opt, data, steps=20, hparams=A)
        ...     return F.cross_entropy(nestgrad.call(model, trained, x_val), y_val)
        >>> report = nestgrad.explain(outer, A)
        DisconnectedError: nestgrad.explain: every path from the hparams to the loss is CUT, ...
          1. argmax at train.py:14, in loss_fn() (20 times)
                 labels = teacher(x).argmax(dim=1)
             argmax returns integer indices, which carry no gradient: ...
             Fix: To differentiate through the choice, either relax it ... or ... nestgrad.ZerothOrder(...)
    """
    if isinstance(fn, Tensor) or not callable(fn):
        raise TypeError(_NEED_FN.format(got=type(fn).__name__))
    if torch.is_inference_mode_enabled():
        raise RuntimeError(INFERENCE_MODE.format(where="nestgrad.explain"))
    with tracking(hparams) as tracker:
        loss = fn(hparams)
    report = tracker.report(loss)
    _enforce(report, stacklevel=3)
    return report


def _enforce(report: PathReport, stacklevel: int) -> None:
    if not report.connected:
        raise DisconnectedError(report)
    if report.status == "partly cut":
        warnings.warn(str(report), PartialPathWarning, stacklevel=stacklevel)


def require_path(loss: Tensor, hparams: Any, rerun: Callable[[Any], Tensor]) -> PathReport | None:
    """Raise ``DisconnectedError`` when ``loss`` does not reach ``hparams``, explaining why.

    The check is ``reaches()``, one pass over ``loss``'s graph. Only when it
    fails is ``rerun(hparams)`` (the same computation again) run under a
    ``Tracker``, with the RNG state restored afterwards, to say where the
    path is cut. Returns ``None`` when the path exists, and the report when
    ``rerun`` does not use the hparams at all: the caller decides, since they may
    be used later (e.g. from some training step on).
    """
    leaves = _leaves(hparams)
    if not any(h.requires_grad for h in leaves) or reaches(loss, leaves):
        return None
    cuda = [loss.device.index or 0] if loss.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), tracking(hparams) as tracker:
        again = rerun(hparams)
    report = tracker.report(again)
    if report.status != "unused":
        _enforce(report, stacklevel=4)
    return report
