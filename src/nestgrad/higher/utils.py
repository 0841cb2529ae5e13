"""Helpers with the names and behaviour of ``higher.utils``: copies of weights and maps over nested containers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["flatten", "get_func_params"]


def __dir__() -> list[str]:
    """The public API and the module's dunders; not the helpers this file imports."""
    return sorted([*__all__, *(k for k in globals() if k.startswith("__") and k.endswith("__"))])


_CONTAINERS = (list, tuple, dict, set)


def _check_module(module: Any, where: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"nestgrad.higher.{where}: module must be an nn.Module; got {type(module).__name__}.")


def _copy_tensor(t: Tensor, safe_copy: bool, device: torch.device | str | None = None) -> Tensor:
    """``t`` cut from the graph, with the same ``requires_grad``, on ``device`` if given.

    Args:
        t: the tensor.
        safe_copy: ``True`` for new storage (``clone``); ``False`` shares ``t``'s storage.
        device: where the result lives (default: where ``t`` is).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"nestgrad.higher.utils._copy_tensor: expected a Tensor; got {type(t).__name__}.")
    out = t.detach()
    if safe_copy:
        out = out.clone()
    if device is not None:
        out = out.to(device)
    return out.requires_grad_(t.requires_grad)


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """``target`` with ``map_fn`` applied to every leaf of its lists, tuples, dicts and sets.

    Containers keep their type (a subclass is rebuilt from an iterable, a dict's keys are kept).
    """
    if isinstance(target, dict):
        return type(target)({k: _recursive_map(v, map_fn) for k, v in target.items()})
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(x, map_fn) for x in target)
    return map_fn(target)


def _recursive_copy_and_cast(target: Any, device: torch.device | str | None) -> Any:
    """``target`` with every tensor in it replaced by a detached copy on ``device`` (other leaves kept)."""
    return _recursive_map(target, lambda x: _copy_tensor(x, True, device) if isinstance(x, Tensor) else x)


def _is_container(target: Any) -> bool:
    """Whether ``target`` is a list, tuple, dict or set (the containers that ``_recursive_map`` enters)."""
    return isinstance(target, _CONTAINERS)


def _find_param_in_list(param: Tensor, l: Iterable[Tensor]) -> int | None:  # noqa: E741 (higher's name)
    """The index of ``param`` in ``l`` by identity (not by value), or ``None``."""
    for i, p in enumerate(l):
        if p is param:
            return i
    return None


def _get_param_mapping(module: nn.Module, seen: list[Tensor], mapping: list[int]) -> list[int]:
    """For each parameter slot of ``module`` (own slots first, then each child's), its index in ``seen``.

    ``seen`` collects the distinct parameters in ``module.parameters()`` order, so a weight shared
    by several slots maps them all to one index. Both lists are extended in place and
    ``mapping`` is returned.
    """
    for p in module._parameters.values():
        if p is None:
            continue
        found = _find_param_in_list(p, seen)
        if found is None:
            found = len(seen)
            seen.append(p)
        mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def flatten(x: Any) -> list[Any]:
    """The leaves of nested lists, tuples, sets and dicts (dict values, not keys), depth first."""
    if isinstance(x, dict):
        x = x.values()
    elif not isinstance(x, (list, tuple, set)):
        return [x]
    out: list[Any] = []
    for y in x:
        out.extend(flatten(y))
    return out


def get_func_params(
    module: nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """Detached copies of ``module.parameters()``, each requiring grad as its source does.

    Args:
        module: the module.
        device: where the copies live (default: where the parameters are).
        safe_copy: ``True`` for new storage; ``False`` shares the parameters' storage.

    Returns:
        One tensor per parameter, in ``module.parameters()`` order.
    """
    _check_module(module, "utils.get_func_params")
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]
