"""Non-finite values in a training run: found at the step where they appear, named, never passed on.

Every step of every method is checked (``Problem.step``): the loss, the updated weights and
the optimizer state, with one fused reduction (an L2 norm per tensor, summed; an overflow of
that sum is only an alarm, confirmed exactly before anything is raised). A NaN
or inf in a gradient reaches the updated weights or the state in the same step, so these are
enough to detect anything; only when something is found is the step examined in detail
(which gradient, which state slot) to write the message. On the CPU the check runs every step (its
cost is in ``benchmarks/bench_unroll.py``); on an accelerator the flags stay on the device and
are read every ``CHECK_EVERY`` steps and at the end of the run, so there is no host sync
per step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.autograd import Variable

#: Steps between two host reads of the accumulated flags on an accelerator.
CHECK_EVERY = 32

_OPT_OUT = "To let NaN and inf through (e.g. to inspect them yourself), pass check_finite=False to nestgrad.train."


class NonFiniteError(RuntimeError):
    """A loss, gradient, weight, optimizer state or hypergradient became NaN or inf.

    Raised by ``nestgrad.train()`` at the first step where it happens (naming the step,
    the method, what went non-finite and the likely fixes), and by the backward pass of
    every method that computes its own hypergradient. ``check_finite=False`` turns it off.
    """


def finite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool Tensor, computed without a sync: False if any element of ``tensors`` is NaN or inf.

    On the CPU, one L2 norm per tensor (13x faster there than the infinity norm: 18 against
    230 us for the benchmark MLP's weights): NaN and inf always reach it, but a finite tensor with
    entries near the dtype's limit can overflow it, so False is only an alarm, which
    ``all_finite()`` confirms exactly before anything is raised. There is no sync to avoid on the
    CPU, so the norms are read and summed in Python (``finite_now()``) and the flag is one of two
    constant tensors. On an accelerator, where the flag is read later, the infinity norm: exact.
    """
    # No detach(): under no_grad the norms record no graph, and a detach per tensor costs as much.
    floats = [x for x in tensors if x.is_floating_point() or x.is_complex()]
    true, false = _TRUE, _FALSE
    if true is None:
        true, false = _cpu_flags()
    if not floats:
        return true
    with torch.no_grad():
        if floats[0].device.type == "cpu":
            return true if _finite_norms(floats) else false
        return torch.stack(torch._foreach_norm(floats, ord=float("inf"))).isfinite().all()


def _cpu_flags() -> tuple[Tensor, Tensor]:
    """The CPU flags True and False: never written. Made on first use as ordinary CPU tensors,
    whatever the caller's inference mode or default device (nothing at import time depends on them)."""
    global _TRUE, _FALSE
    with torch.inference_mode(False):
        _TRUE, _FALSE = torch.tensor(True, device="cpu"), torch.tensor(False, device="cpu")
    return _TRUE, _FALSE


_TRUE: Tensor | None = None
_FALSE: Tensor | None = None


def _finite_norms(floats: list[Tensor]) -> bool:
    """Whether the L2 norms of ``floats`` (on the CPU, under no_grad) are finite, summed in float64 on the host.

    One ``torch.linalg.vector_norm`` per tensor, not ``torch._foreach_norm``: on the CPU the latter
    makes a temporary as large as each tensor, whose fresh pages (about 150 page faults a step for the
    benchmark MLP's weights) cost Unroll 3-4% of its time; the per-tensor norms make none (1-2%).
    """
    return math.isfinite(sum(torch.linalg.vector_norm(x).item() for x in floats))


def finite_now(tensors: Sequence[Tensor]) -> bool:
    """``finite()``, read at once (one sync off the CPU); False is an alarm for ``all_finite()``.

    On small CPU tensors the flag costs about a third of ``bool`` of the stacked norms' sum
    (2.4 against 7.4 us for one tensor, 11 against 21 us for a small MLP's seven).
    """
    floats = [x.detach() for x in tensors if x.is_floating_point() or x.is_complex()]
    if not floats:
        return True
    if floats[0].device.type == "cpu":
        return _finite_norms(floats)
    return bool(finite(floats))


def all_finite(tensors: Sequence[Tensor | None]) -> bool:
    """Whether every element of ``tensors`` is finite: exact (one sync per tensor; for confirmations)."""
    with torch.no_grad():
        return all(bool(x.isfinite().all()) for x in tensors if x is not None and x.is_floating_point())


def any_nonfinite(tensors: Sequence[Tensor | None]) -> bool:
    """Whether some element of ``tensors`` is NaN or inf: the fast check, confirmed exactly on alarm."""
    present = [x for x in tensors if x is not None]
    return not finite_now(present) and not all_finite(present)


def watch_gradients(tensors: Sequence[Tensor], fn: Callable[[list[Tensor | None]], None]) -> None:
    """Call ``fn(grads)`` at the end of every backward pass that computes a gradient for some of ``tensors``.

    ``grads`` has one entry per tensor: its gradient in that pass, or ``None`` where the pass
    computed none. This is ``torch.autograd.graph.register_multi_grad_hook(tensors, fn)`` without
    its reference cycle: torch's hooks hold the tensors' autograd nodes, which hold the hooks, so
    every graph watched that way (with all its saved tensors) lived until Python's cycle collector
    ran, and that collector's passes cost more than the training run itself on small problems
    (about 1 ms per call on the sinusoid MAML task of ``benchmarks/bench_overhead.py``). Here each
    tensor's hook holds only ``fn`` and a buffer keyed by the backward pass (graph task); the first
    hook of a pass queues an engine callback, which runs once every gradient of the pass has been
    computed and passes the buffer to ``fn``. An exception from ``fn`` propagates out of
    ``backward()`` / ``torch.autograd.grad()`` unchanged.

    ``fn`` must not hold ``tensors`` (nor anything that holds their graph), or the cycle is back.
    """
    n = len(tensors)
    pending: dict[int, list[Tensor | None]] = {}
    lock = threading.Lock()  # engines of different devices may run hooks in several threads

    def hook(i: int) -> Callable[[Tensor], None]:
        def inner(grad: Tensor) -> None:
            task = torch._C._current_graph_task_id()
            with lock:
                grads = pending.get(task)
                if grads is None:
                    grads = pending[task] = [None] * n

                    def done() -> None:
                        with lock:
                            got = pending.pop(task)
                        fn(got)

                    Variable._execution_engine.queue_callback(done)
            grads[i] = grad

        return inner

    for i, x in enumerate(tensors):
        x.register_hook(hook(i))


def bad_names(named: Mapping[str, Tensor | None] | Iterable[tuple[str, Tensor | None]]) -> list[str]:
    """The names whose tensor holds a NaN or inf (one sync per tensor: only for messages)."""
    items = named.items() if isinstance(named, Mapping) else named
    return [k for k, x in items if x is not None and not all_finite([x])]


def _what(x: Tensor) -> str:
    """``"nan"``, ``"inf"``, or ``"3 NaN and 1 inf of 10 elements"``."""
    x = x.detach()
    if x.numel() == 1:
        return str(x.item())
    nan, inf = int(x.isnan().sum()), int(x.isinf().sum())
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    return f"{' and '.join(p for p in parts if p)} of {x.numel()} elements"


def _names(names: list[str], tensors: Mapping[str, Tensor]) -> str:
    shown = ", ".join(f"{k!r} ({_what(tensors[k])})" for k in names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def training_error(
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
    """The error for a step whose loss or update is non-finite: what went wrong first, and why."""
    head = f"nestgrad.train ({method}): at step {t} of {steps}{late}, "
    entering = bad_names(before)
    if entering:
        where = "the initial params" if t == 0 else "the weights entering this step"
        return NonFiniteError(
            f"{head}{where} are not finite: {_names(entering, before)}. "
            + ("Check how they were initialized or loaded. " if t == 0 else "")
            + _OPT_OUT
        )
    hp = dict(hparams)
    bad_hp = bad_names(hp)
    if bad_hp:
        return NonFiniteError(
            f"{head}a hyperparameter is not finite: {_names(bad_hp, hp)}. A NaN hyperparameter usually comes "
            f"from an outer step that diverged (lower the outer learning rate) or from a NaN hypergradient "
            f"applied without a check. {_OPT_OUT}"
        )
    if not all_finite([loss]):
        cause = (
            "loss_fn returned it from finite weights and hyperparameters: look for log(0) or log of a negative "
            "number (use F.log_softmax / F.cross_entropy, or clamp the argument), division by zero, sqrt of a "
            "negative number, or exp overflowing"
        )
        if t > 0:
            largest = max((float(x.detach().abs().max()) for x in before.values() if x.numel()), default=0.0)
            cause += (
                f"; the weights entering this step reach |w| = {largest:.3g}: after some finite steps this is "
                f"usually divergence, so lower the learning rate"
            )
        return NonFiniteError(f"{head}the training loss is {_what(loss)}: {cause}. {_OPT_OUT}")
    bad_g = bad_names(grads)
    if bad_g:
        finite_g = {k: g for k, g in grads.items() if g is not None}
        return NonFiniteError(
            f"{head}the loss is finite ({loss.item():.6g}) but the gradient of {_names(bad_g, finite_g)} is not: "
            f"loss_fn has a point where its derivative is infinite, e.g. sqrt or torch.norm at exactly 0 "
            f"(add a small constant inside: sqrt(x + 1e-12)), log near 0, or pow with a fractional exponent "
            f"at 0. {_OPT_OUT}"
        )
    for slot, values in slots.items():
        bad_s = bad_names(values)
        if bad_s:
            return NonFiniteError(
                f"{head}the loss and gradients are finite but the optimizer state {slot!r} of "
                f"{_names(bad_s, values)} is not: the update overflowed (a very large gradient squared, or "
                f"a NaN/inf hyperparameter such as eps). Lower the learning rate or clip the gradients in "
                f"loss_fn. {_OPT_OUT}"
            )
    bad_p = bad_names(after)
    return NonFiniteError(
        f"{head}the loss, gradients and optimizer state are finite but the update made "
        f"{_names(bad_p, after)} non-finite: check the optimizer's hyperparameters (a learning rate, momentum or "
        f"eps that is NaN or inf; eps=0 with eps_root=0 in Adam/RMSprop divides by zero where a gradient entry "
        f"has always been 0: keep eps > 0 or eps_root > 0), or lower a learning rate that overflows. {_OPT_OUT}"
    )


def backward_error(
    method: str, what: str, names: list[str], tensors: Mapping[str, Tensor], hint: str
) -> NonFiniteError:
    """The error for a non-finite value in a method's backward pass."""
    return NonFiniteError(
        f"nestgrad.train ({method}): in the backward pass, {what} {_names(names, tensors)}. {hint} {_OPT_OUT}"
    )
