"""``call``: run any ``nn.Module`` with the weights you give it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from .optim._base import _check_params


def _tensor_names(module: nn.Module) -> frozenset[str]:
    params = (n for n, _ in module.named_parameters(remove_duplicate=False))
    buffers = (n for n, _ in module.named_buffers(remove_duplicate=False))
    return frozenset([*params, *buffers])


def call(module: nn.Module, params: Mapping[str, Tensor], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``module(*args, **kwargs)`` with its parameters and buffers taken from ``params``.

    This is ``torch.func.functional_call``: the module is neither copied nor
    patched, and its own tensors are restored afterwards, so forward hooks,
    ``output_hidden_states`` and every other output behave as in ``module(...)``.

    Args:
        module: any ``nn.Module``.
        params: name -> Tensor, with the names of ``module.named_parameters()``
            and ``module.named_buffers()``. A partial dict is fine: every name
            it leaves out falls back to the module's own tensor.
        *args, **kwargs: the module's inputs.

    Returns:
        Whatever ``module.forward`` returns.

    Buffers follow the usual torch rules. In train mode, BatchNorm updates its
    running statistics: in place on the module's own buffers, or on the tensors
    you pass for them. In eval mode it reads them.

    Example:
        >>> params = {k: v * 2 for k, v in model.named_parameters()}
        >>> out = nestgrad.call(model, params, x)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"nestgrad.call: the first argument must be an nn.Module; got {type(module).__name__}. "
            f"The order is call(module, params, *inputs)."
        )
    _check_params(params, "params", "nestgrad.call")
    # Recomputed on every call (a few microseconds per layer): a cache would go stale when a
    # submodule is replaced, and then accept names the module no longer has.
    known = _tensor_names(module)
    if not known.issuperset(params):
        unknown = sorted(set(params) - known)
        if unknown:
            raise KeyError(
                f"nestgrad.call: params has names that {type(module).__name__} does not have: "
                f"{unknown}. Its names look like {sorted(known)[:4]}. Build params from "
                f"dict(module.named_parameters()) so that the names match."
            )
    return functional_call(module, params, args, kwargs, strict=False)
