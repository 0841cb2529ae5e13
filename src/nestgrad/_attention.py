"""Attention on the math kernel while ``loss_fn`` runs, in the calling thread only.

Fused attention kernels (flash, memory-efficient, cuDNN, and the CPU flash kernel) have no
double backward; the math kernel has one. torch's switch between them,
``torch.nn.attention.sdpa_kernel``, sets process-wide flags, which two threads that save and
restore them interleave, leaving fused attention off for the whole process; torch 2.13 has
no thread-local selection. A torch function mode is thread-local: this one routes
``F.scaled_dot_product_attention`` to ``aten::_scaled_dot_product_attention_math``, which
is what ``sdpa_kernel(SDPBackend.MATH)`` runs (bit for bit, tests/test_attention.py).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode, _pop_mode, _push_mode

_SDPA = F.scaled_dot_product_attention


def _math_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` on the math kernel, as ``sdpa_kernel(SDPBackend.MATH)`` runs it."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # what sdpa does before choosing a kernel
        attn_mask = torch.zeros((), dtype=query.dtype, device=attn_mask.device).masked_fill(
            attn_mask.logical_not(), float("-inf")
        )
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )[0]


def _never(*args: Any) -> bool:
    return False


def _unguarded(fn: Any) -> Any:
    """A copy of a Python-level torch function without its ``has_torch_function`` guard.

    Inside a mode's ``__torch_function__`` the mode is off, so the torch calls inside a
    Python-level function such as ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``,
    ``nn.Transformer*``) would escape it. Running this copy with the mode on keeps them in
    it. Nothing global changes: the copy has its own globals.
    """
    guards = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")
    scope = {**fn.__globals__, **dict.fromkeys(guards, _never)}
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


_MHA = F.multi_head_attention_forward
_MHA_INSIDE = _unguarded(_MHA)  # calls F.scaled_dot_product_attention


@dataclass
class AttentionUse:
    """Whether a run's ``loss_fn`` calls attention: ``None`` until its first loss is computed."""

    seen: bool | None = None


class _MathAttention(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` to the math kernel, in this thread only; nothing outlives it."""

    def __init__(self, use: AttentionUse) -> None:
        super().__init__()
        self.use = use

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA and not any(isinstance(x, Tensor) and x.is_nested for x in args[:3]):
            self.use.seen = True
            return _math_sdpa(*args, **kwargs)
        if func is _MHA:
            with self._again():
                return _MHA_INSIDE(*args, **kwargs)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def _again(self) -> Any:
        """This mode on again, inside its own ``__torch_function__`` (where torch turns it off)."""
        _push_mode(self)
        try:
            yield
        finally:
            _pop_mode()

    def __exit__(self, *exc: Any) -> Any:
        if self.use.seen is None and exc[0] is None:
            self.use.seen = False
        return super().__exit__(*exc)


def attention(math_sdpa: bool, use: AttentionUse) -> contextlib.AbstractContextManager[Any]:
    """Where ``loss_fn`` runs: with attention on the math kernel when ``math_sdpa``, else as torch chooses.

    Fused attention kernels have no double backward; the math kernel has one, and a method
    that replays a step with a graph also trains on it, so that training and replay compute
    the same thing. The mode costs about 1 us per torch call inside ``loss_fn``, so it is
    dropped once a run's first loss called no attention at all (a ``loss_fn`` that calls
    attention only from some later step on gets torch's choice there).
    """
    return _MathAttention(use) if math_sdpa and use.seen is not False else contextlib.nullcontext()
