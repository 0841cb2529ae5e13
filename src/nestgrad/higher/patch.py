"""Functional views of a module for ``nestgrad.higher``: fast weights run through :func:`nestgrad.call`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._attention import AttentionUse, attention
from .._call import call

__all__ = ["FunctionalModel"]


def _copy(t: Tensor, device: torch.device | str | None, like: Tensor | None = None) -> Tensor:
    """A detached copy of ``t`` on ``device`` (and with ``like``'s dtype and device, if given)."""
    if like is not None:
        return t.detach().to(device=like.device, dtype=like.dtype, copy=True)
    return t.detach().to(device=device, copy=True)


class FunctionalModel:
    """A view of a module with fast weights: ``fmodel(*args)`` is ``nestgrad.call(module, weights, *args)``.

    Yielded by :func:`innerloop_ctx`; not built directly. It holds no copy of the module,
    only the list of fast weights (in ``module.parameters()`` order) and copies of its buffers.

    Attributes:
        module: the wrapped ``nn.Module`` (never modified).
        track_higher_grads: whether earlier fast weights are kept and steps are recorded.
    """

    def __init__(
        self,
        module: nn.Module,
        params: list[Tensor],
        buffers: dict[str, Tensor],
        track_higher_grads: bool,
        training: bool | None,
    ) -> None:
        self.module = module
        self.track_higher_grads = track_higher_grads
        self._names = [n for n, _ in module.named_parameters()]
        self._buffers = buffers
        self._attention = AttentionUse()  # whether forward calls attention: after one call without, no mode
        self._history: list[list[Tensor]] = []
        self._training = training
        self.update_params(params)

    # ------------------------------------------------------------ weights
    @property
    def fast_params(self) -> list[Tensor]:
        """The current fast weights, in ``module.parameters()`` order."""
        return list(self._history[-1])

    @fast_params.setter
    def fast_params(self, value: Sequence[Tensor]) -> None:
        self.update_params(value)

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The fast weights the inner loop started from."""
        if not self.track_higher_grads:
            raise RuntimeError(
                "nestgrad.higher: init_fast_params is not kept when track_higher_grads=False "
                "(as in higher), to save memory. Read fmodel.fast_params before the first step."
            )
        return list(self._history[0])

    def update_params(self, params: Sequence[Tensor]) -> None:
        """Make ``params`` (in ``module.parameters()`` order) the current fast weights."""
        params = list(params)
        if len(params) != len(self._names) or not all(isinstance(p, Tensor) for p in params):
            raise ValueError(
                f"nestgrad.higher: expected a list of {len(self._names)} Tensors in the order of "
                f"model.parameters() (the first names: {self._names[:3]}); got "
                f"{len(params)} items."
            )
        if self.track_higher_grads:
            self._history.append(params)
        else:
            self._history = [params]

    def parameters(self, recurse: bool = True, time: int | None = None) -> list[Tensor]:
        """The fast weights after step ``time`` (default: the latest), in ``module.parameters()`` order.

        ``recurse`` is accepted for compatibility and ignored, as in ``higher``.
        """
        if time is None:
            return self.fast_params
        if not self.track_higher_grads and time not in (0, -1):
            raise ValueError(
                "nestgrad.higher: fmodel keeps only the latest fast weights when "
                "track_higher_grads=False; parameters(time=...) needs track_higher_grads=True."
            )
        return list(self._history[time])

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        """``(name, fast weight)`` pairs, with the names of ``module.named_parameters()``."""
        return list(zip(self._names, self._history[-1]))

    def buffers(self) -> list[Tensor]:
        """``fmodel``'s own copies of the module's buffers."""
        return list(self._buffers.values())

    def named_buffers(self) -> list[tuple[str, Tensor]]:
        return list(self._buffers.items())

    def tensors(self, params: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """The name -> Tensor dict that ``fmodel`` passes to :func:`nestgrad.call`."""
        weights = self._history[-1] if params is None else params
        return {**dict(zip(self._names, weights)), **self._buffers}

    # -------------------------------------------------------------- calls
    def __call__(self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        """Run the module with the current fast weights (or with ``params``, which become current)."""
        if params is not None:
            self.update_params(params)
        # As in ng.train: fused attention kernels have no double backward, the math kernel has.
        math = self.track_higher_grads and torch.is_grad_enabled()
        with attention(math, self._attention):  # in this thread only: no global flag is touched
            if self._training is None:
                return call(self.module, self.tensors(), *args, **kwargs)
            modes = [(m, m.training) for m in self.module.modules()]
            self.module.train(self._training)
            try:
                return call(self.module, self.tensors(), *args, **kwargs)
            finally:
                for m, mode in modes:
                    m.training = mode

    forward = __call__

    def train(self, mode: bool = True) -> FunctionalModel:
        """Run ``fmodel``'s calls in train mode (``mode=True``) or eval mode; the module is left as it is."""
        self._training = bool(mode)
        return self

    def eval(self) -> FunctionalModel:
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.module.training if self._training is None else self._training

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "module":
            raise AttributeError(name)
        module = self.module
        own = dict(module.named_parameters(recurse=False))
        if name in own:
            return dict(self.named_parameters())[name]
        if name in dict(module.named_buffers(recurse=False)):
            return self._buffers[name]
        value = getattr(module, name)
        if isinstance(value, nn.Module):
            raise AttributeError(
                f"nestgrad.higher: fmodel.{name} would run the submodule with the model's own "
                f"weights, not the fast weights. Call fmodel(...) on the whole model, or run the "
                f"submodule with nestgrad.call(model.{name}, weights) where weights are the "
                f"entries of dict(fmodel.named_parameters()) under '{name}.' with that prefix removed."
            )
        return value

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self.module).__name__}, steps={len(self._history) - 1})"
