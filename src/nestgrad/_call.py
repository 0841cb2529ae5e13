"""``call``: run any ``nn.Module`` with the weights you give it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parameter import is_lazy

from . import _buffers
from .optim._base import _check_params

_UNKNOWN = (
    "nestgrad.call: params has names that {module} does not have: {unknown}. Its names look like "
    "{known}. Build params from dict(module.named_parameters()) so that the names match."
)

_SHAPE = (
    "nestgrad.call: params[{name!r}] has shape {got}, but {module}'s {kind} {name!r} has shape {expected}. "
    "ng.call replaces the module's tensors and cannot change their shapes. Pass a tensor of shape "
    "{expected} (dict(module.named_parameters()) lists them); to resize the layer, build the module "
    "with the new size."
)

_TIED = (
    "nestgrad.call: params gives different tensors for {names}, which are one tensor in {module} (tied "
    "weights, or one submodule registered under several names). Pass it once, under any one of the names."
)


class _Layout(NamedTuple):
    """Every parameter and buffer slot of a module, read afresh at each call (a cache would go stale)."""

    tensors: dict[str, Tensor]  # every name, aliases included -> the module's tensor in that slot
    canonical: dict[str, str]  # every name -> the first name of its slot (a submodule under two names)
    buffers: dict[str, Tensor]  # canonical buffer name -> the module's own buffer
    tied: dict[int, list[str]]  # id(tensor) -> canonical names of the slots that hold it, where several do
    rnns: list[nn.RNNBase]  # modules that cache their weights (``_flat_weights``), to restore after a call


def _layout(module: nn.Module) -> _Layout:
    tensors: dict[str, Tensor] = {}
    canonical: dict[str, str] = {}
    buffers: dict[str, Tensor] = {}
    slots: dict[tuple[int, str], str] = {}
    holders: dict[int, list[str]] = {}
    rnns: list[nn.RNNBase] = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        if isinstance(m, nn.RNNBase):
            rnns.append(m)
        dot = f"{prefix}." if prefix else ""
        for table, is_buffer in ((m._parameters, False), (m._buffers, True)):
            for attr, t in table.items():
                if t is None:
                    continue
                name = dot + attr
                tensors[name] = t
                first = slots.setdefault((id(m), attr), name)
                canonical[name] = first
                if first is name:
                    holders.setdefault(id(t), []).append(name)
                    if is_buffer:
                        buffers[name] = t
    return _Layout(tensors, canonical, buffers, {k: v for k, v in holders.items() if len(v) > 1}, rnns)


def _slots(module: nn.Module, layout: _Layout, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``params`` keyed by canonical slot names, each tied tensor given to every slot that holds it.

    One name per slot and ``tie_weights=False``: ``functional_call``'s own tying also writes the
    aliases of a slot, and then restores the wrong tensor into it (pytorch#164759).
    """
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    for name, value in params.items():
        own = layout.tensors[name]
        if value.shape != own.shape and not is_lazy(own):
            kind = "buffer" if layout.canonical[name] in layout.buffers else "parameter"
            raise ValueError(
                _SHAPE.format(
                    name=name,
                    got=tuple(value.shape),
                    module=type(module).__name__,
                    kind=kind,
                    expected=tuple(own.shape),
                )
            )
        for slot in layout.tied.get(id(own), (layout.canonical[name],)):
            if slot in out and out[slot] is not value:
                raise ValueError(_TIED.format(names=sorted({source[slot], name}), module=type(module).__name__))
            out[slot], source[slot] = value, name
    return out


def call(module: nn.Module, params: Mapping[str, Tensor], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``module(*args, **kwargs)`` with its parameters and buffers taken from ``params``.

    This is ``torch.func.functional_call``: the module is neither copied nor
    patched, and its own tensors are restored afterwards (also when ``forward``
    raises), so forward hooks, ``output_hidden_states`` and every other output
    behave as in ``module(...)``.

    Args:
        module: any ``nn.Module``.
        params: name -> Tensor, with the names of ``module.named_parameters()``
            and ``module.named_buffers()``. A partial dict is fine: every name
            it leaves out falls back to the module's own tensor. Tied weights
            (one tensor under several names) take the value given under any
            one of their names.
        *args, **kwargs: the module's inputs.

    Returns:
        Whatever ``module.forward`` returns.

    Buffers: the module's own tensors are never written. In train mode, BatchNorm
    updates its running statistics in place, as in ``module(x)``, on the buffer
    tensors you pass in ``params``; a buffer you do not pass (or pass as the
    module's own tensor) is run on a throwaway copy. Inside ``nestgrad.train()``,
    the run owns copies of the module's buffers and of those given to ``train``:
    they advance once per training step, never in the replays of a backward pass.
    In eval mode BatchNorm reads the running statistics.

    Raises:
        KeyError: a name the module does not have.
        ValueError: a tensor whose shape differs from the module's, or different
            tensors for names that are tied in the module.

    Examples:
        >>> params = {k: v * 2 for k, v in model.named_parameters()}
        >>> out = nestgrad.call(model, params, x)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"nestgrad.call: the first argument must be an nn.Module; got {type(module).__name__}. "
            f"The order is call(module, params, *inputs)."
        )
    _check_params(params, "params", "nestgrad.call")
    if _is_ddp(module):  # data-parallel: run the wrapped module (DDP's hooks would not see this call anyway)
        module, params = _unwrap_ddp(module, params)
    layout = _layout(module)
    if not layout.tensors.keys() >= params.keys():
        unknown = sorted(set(params) - layout.tensors.keys())
        known = sorted(layout.tensors)[:4]
        raise KeyError(_UNKNOWN.format(module=type(module).__name__, unknown=unknown, known=known))
    slots = _slots(module, layout, params)
    run = _buffers.current()
    if run is not None:  # the module's own weights that params left out: a replay reads them again
        for name, own in layout.tensors.items():
            slot = layout.canonical[name]
            if slot not in slots and slot not in layout.buffers:
                run.read(name, own)
    owned: list[tuple[str, Tensor]] = []  # (slot, tensor) that the training run's copies replace
    scratch: dict[int, Tensor] = {}  # throwaway copies outside a run, one per tensor (tied buffers share one)
    for slot, own in layout.buffers.items():
        given = slots.get(slot)
        if given is None or given is own:
            original = own
        elif run is not None and run.owns(given):
            original = given
        else:
            continue  # a tensor the caller passed: updated in place, as module(x) updates its own
        if run is None:
            if id(own) not in scratch:
                scratch[id(own)] = own.detach().clone()
            slots[slot] = scratch[id(own)]
        else:
            slots[slot] = run.copy(original, slot)
            owned.append((slot, original))
    copies = [slots[slot] for slot, _ in owned]
    # RNNs cache their weights in _flat_weights, which functional_call leaves holding the given tensors
    # (and their graph): put the module's own back.
    rnns = [(m, m._flat_weights) for m in layout.rnns]
    try:
        out = functional_call(module, slots, args, kwargs, tie_weights=False, strict=False)
    finally:
        for m, flat in rnns:
            m._flat_weights = flat
    for (slot, original), copy in zip(owned, copies, strict=True):
        if slots[slot] is not copy:  # forward assigned a new tensor to the buffer
            run.replaced(original, slots[slot])  # type: ignore[union-attr]
    return out


_DDP_NAMES = (
    "nestgrad.call: module is a DistributedDataParallel wrapper, and params mixes names with and without its "
    "'module.' prefix ({names}). Pass dict(ddp.module.named_parameters()) (or the names of ddp.named_parameters(), "
    "all with the prefix)."
)


_FSDP = (
    "nestgrad.call: module is sharded by FSDP ({kind}): each rank holds only a shard of its weights, and "
    "nestgrad does not support sharded weights yet. Pass the unsharded module on every rank, and train it "
    "data-parallel with ng.train(..., parallel=ng.DataParallel())."
)


def _is_ddp(module: nn.Module) -> bool:
    """Whether ``module`` is a DDP wrapper (unwrapped by ``call``); raise for FSDP, which shards the weights."""
    from torch.nn.parallel import DistributedDataParallel

    kinds = {c.__name__ for c in type(module).__mro__}
    if kinds & {"FullyShardedDataParallel", "FSDPModule"}:
        raise NotImplementedError(_FSDP.format(kind=type(module).__name__))
    return isinstance(module, DistributedDataParallel)


def _unwrap_ddp(module: nn.Module, params: Mapping[str, Tensor]) -> tuple[nn.Module, Mapping[str, Tensor]]:
    """``ddp.module``, and ``params`` keyed by its names: ng.call runs the wrapped module itself.

    DDP's all-reduce runs in hooks of ``.backward()`` on the module's own parameters, which neither
    ``functional_call`` nor ``torch.autograd.grad`` trigger (pytorch#47562); for data-parallel
    training with ng.train, pass ``parallel=ng.DataParallel()``, which all-reduces every step.
    """
    prefixed = [k.startswith("module.") for k in params]
    if any(prefixed) and not all(prefixed):
        mixed = sorted(params)[:4]
        raise KeyError(_DDP_NAMES.format(names=mixed))
    if any(prefixed):
        params = {k[len("module.") :]: v for k, v in params.items()}
    return module.module, params
