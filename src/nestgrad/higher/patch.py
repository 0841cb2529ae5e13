"""Functional views of a module for ``nestgrad.higher``: fast weights run through ``nestgrad.call()``.

``monkeypatch(model)`` returns a ``FunctionalModel``: an ``nn.Module`` that holds no copy
of ``model``, only a list of fast weights (in ``model.parameters()`` order), copies of its
buffers and its own train/eval flags. Every call runs ``model`` itself through
``torch.func.functional_call``; ``model`` is never patched and its tensors never change.
Submodules are reached as attributes (``fmodel.encoder``, ``fmodel[0]``) and run with the
fast weights too.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys
from torch.nn.parameter import is_lazy

from .._attention import AttentionUse, attention
from .._call import call

__all__ = ["FunctionalModel", "FunctionalSubmodule", "buffer_sync", "make_functional", "monkeypatch"]


def __dir__() -> list[str]:
    """The public API and the module's dunders; not the helpers this file imports."""
    return sorted([*__all__, *(k for k in globals() if k.startswith("__") and k.endswith("__"))])


Device = torch.device | str | None

_LOAD = "nestgrad.higher: {cls}.load_state_dict: {what} Nothing was loaded."

_NOT_HELD = (
    "{keys} of the state_dict belong to the wrapped module itself (extra state or a state_dict hook), not "
    "to the functional model, which holds only fast weights and buffer copies; load them into the module "
    "(fmodel.module.load_state_dict(..., strict=False))."
)


def _copy(t: Tensor, device: Device, like: Tensor | None = None) -> Tensor:
    """A detached copy of ``t`` on ``device`` (and with ``like``'s dtype and device, if given)."""
    if like is not None:
        return t.detach().to(device=like.device, dtype=like.dtype, copy=True)
    return t.detach().to(device=device, copy=True)


class _Functional(nn.Module):
    """What ``FunctionalModel`` and its submodule views share: a module, run with the root's fast weights.

    Nothing of the wrapped module is registered on this ``nn.Module``: ``module`` and the root
    live in ``__dict__`` only, so ``fmodel.zero_grad()``, ``fmodel.train()`` and the like never
    reach the user's module. Children are views, one per child of the module.
    """

    module: nn.Module
    _root: FunctionalModel

    def __init__(self, module: nn.Module, root: FunctionalModel | None) -> None:
        super().__init__()
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "_root", self if root is None else root)
        object.__setattr__(self, "_attention", AttentionUse())  # one per view: each runs its own forward
        self.training = module.training
        for name, child in module._modules.items():
            if child is not None:
                self._modules[name] = FunctionalSubmodule(child, self._root)

    # ------------------------------------------------------------ slots
    def _slots(self, remove_duplicate: bool = True) -> list[tuple[str, int]]:
        """``(name in self.module, index in the root's fast weights)`` for each parameter slot."""
        index = self._root._param_index()
        out: list[tuple[str, int]] = []
        seen: set[int] = set()
        for name, p in self.module.named_parameters(remove_duplicate=False):
            i = index[id(p)]
            if remove_duplicate and i in seen:
                continue
            seen.add(i)
            out.append((name, i))
        return out

    def _buffer_slots(self) -> list[tuple[str, str]]:
        """``(name in self.module, name in the root's buffers)`` for each buffer the root holds a copy of."""
        root = self._root
        canonical = {id(b): n for n, b in root.module.named_buffers()}
        out = []
        for name, b in self.module.named_buffers():
            key = canonical.get(id(b))
            if key is not None and key in root._buffers:
                out.append((name, key))
        return out

    def _weights(self, time: int | None = None) -> list[Tensor]:
        return self._root._version(time)

    def _tensors(self) -> dict[str, Tensor]:
        """The name -> Tensor dict that runs ``self.module`` with the current fast weights and buffer copies."""
        fast = self._weights()
        out = {name: fast[i] for name, i in self._slots()}
        root_buffers = self._root._buffers
        out.update({name: root_buffers[key] for name, key in self._buffer_slots()})
        return out

    # ------------------------------------------------------------ calls
    def _run(self, fn: Callable[..., Any], tensors: dict[str, Tensor], args: Any, kwargs: Any) -> Any:
        """``call(self.module, tensors, ...)`` (or ``fn`` on it) with this view's train/eval flags."""
        root = self._root
        originals: dict[int, tuple[nn.Module, bool]] = {}
        for view in self.modules():
            m = view.module
            if m.training != view.training and id(m) not in originals:
                originals[id(m)] = (m, m.training)
            m.training = view.training
        # torch's RNNs cache their weights in _flat_weights; functional_call leaves the fast weights
        # there after the call. Put the module's own cache back, so that it holds no fast weight.
        rnns = [
            (m, list(m._flat_weights), list(m._flat_weight_refs))
            for m in self.module.modules()
            if isinstance(m, nn.RNNBase) and hasattr(m, "_flat_weights")
        ]
        math = root.track_higher_grads and torch.is_grad_enabled()
        try:
            with attention(math, self._attention), warnings.catch_warnings():
                if rnns:  # cuDNN cannot flatten fast weights; they work unflattened (as in higher)
                    warnings.filterwarnings("ignore", "RNN module weights are not part of single contiguous")
                return fn(self.module, tensors, *args, **kwargs)
        finally:
            for m, mode in originals.values():
                m.training = mode
            for m, flat, refs in rnns:
                m._flat_weights, m._flat_weight_refs = flat, refs

    def forward(self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        """Run the module with the current fast weights (or with ``params``, which become current).

        Args:
            *args, **kwargs: the module's inputs.
            params: a full list of fast weights, in the order of the *whole* model's
                ``parameters()`` (as in ``higher``, also for a submodule).
        """
        if params is not None:
            self._root.update_params(params)
        return self._run(call, self._tensors(), args, kwargs)

    def train(self, mode: bool = True) -> _Functional:
        """Set the mode of this functional model's calls (and of its submodules'); the wrapped module is left alone."""
        if not isinstance(mode, bool):
            raise ValueError(f"nestgrad.higher: train(mode) expects a bool; got {type(mode).__name__}.")
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> _Functional:
        raise NotImplementedError(
            "nestgrad.higher: a functional model cannot be moved or cast (.to, .cuda, .double, ...): its "
            "fast weights belong to the inner loop. Move or cast the model before monkeypatch(model), or "
            "pass device= to monkeypatch / innerloop_ctx."
        )

    # ------------------------------------------------------------ weights
    def parameters(self, recurse: bool = True, time: int | None = None) -> list[Tensor]:  # type: ignore[override]
        """The fast weights of this (sub)module after update ``time`` (default: the latest).

        ``recurse`` is accepted for compatibility and ignored, as in ``higher``. Returns a
        list (``higher`` returns an iterator).
        """
        fast = self._weights(time)
        return [fast[i] for _, i in self._slots()]

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> list[tuple[str, Tensor]]:
        """``(name, fast weight)`` pairs, with the names of ``module.named_parameters()``."""
        fast = self._weights()
        dot = f"{prefix}." if prefix else ""
        return [(dot + name, fast[i]) for name, i in self._slots(remove_duplicate)]

    def named_buffers(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> list[tuple[str, Tensor]]:
        """``(name, buffer copy)`` pairs: this functional model's own copies of the module's buffers."""
        dot = f"{prefix}." if prefix else ""
        root_buffers = self._root._buffers
        return [(dot + name, root_buffers[key]) for name, key in self._buffer_slots()]

    def buffers(self, recurse: bool = True) -> list[Tensor]:  # type: ignore[override]
        """This functional model's own copies of the module's buffers."""
        return [b for _, b in self.named_buffers()]

    # ------------------------------------------------------------ state dicts
    def _entries(self) -> list[tuple[str, str, Any]]:
        """``(key, kind, where)`` for each key of ``self.module.state_dict()``, in its order.

        ``kind`` is ``"param"`` (``where``: the index in the root's fast weights), ``"buffer"``
        (``where``: the buffer's name in the root's module) or ``"other"`` (extra state, or a
        key a state_dict hook added: the module's own).
        """
        index = self._root._param_index()
        params = {n: index[id(p)] for n, p in self.module.named_parameters(remove_duplicate=False)}
        canonical = {id(b): n for n, b in self._root.module.named_buffers()}
        buffers = {n: canonical[id(b)] for n, b in self.module.named_buffers(remove_duplicate=False)}
        out: list[tuple[str, str, Any]] = []
        for key in self.module.state_dict(keep_vars=True):
            if key in params:
                out.append((key, "param", params[key]))
            elif key in buffers:
                out.append((key, "buffer", buffers[key]))
            else:
                out.append((key, "other", None))
        return out

    def _entry_value(self, kind: str, where: Any, key: str, fast: Sequence[Tensor]) -> Any:
        if kind == "param":
            return fast[where]
        if kind == "buffer":
            own = self._root._buffers.get(where)
            return own if own is not None else self._root.module.get_buffer(where)
        return self.module.state_dict(keep_vars=True)[key]

    def state_dict(  # type: ignore[override]
        self, *, destination: dict[str, Any] | None = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The module's state_dict with the current fast weights and buffer copies (as ``higher``'s).

        Keys and order are those of ``self.module.state_dict()``; parameters hold the latest fast
        weights (``fmodel.parameters()``), buffers this functional model's copies. Values are
        detached unless ``keep_vars=True``, which returns the fast weights themselves, with
        their graph. Before any fast weights exist (``make_functional``) this raises.
        """
        out: dict[str, Any] = OrderedDict() if destination is None else destination
        fast = self._weights()
        for key, kind, where in self._entries():
            value = self._entry_value(kind, where, key, fast)
            out[prefix + key] = value if keep_vars or not isinstance(value, Tensor) else value.detach()
        return out

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Make a state_dict's weights the current fast weights, and its buffers the buffer copies.

        As ``nn.Module.load_state_dict`` on ``higher``'s functional model: keys are those of
        ``state_dict()``; ``strict=True`` raises on missing or unexpected keys. Everything is
        checked first (keys, shapes, tied weights given two values), then loaded, so a failed call
        loads nothing. The loaded weights become a new version of the fast weights
        (``parameters(time=-1)``; ``higher`` writes into the current ones in place): detached copies
        with the current fast weights' dtype, device and ``requires_grad``, so inner steps continue
        from them, and gradients do not flow into ``state_dict``'s tensors. With ``assign=True``
        the given tensors themselves become the fast weights (and buffers), graph included.
        The wrapped module is never changed.

        Returns:
            ``(missing_keys, unexpected_keys)``, as ``nn.Module.load_state_dict``.
        """
        cls = self._get_name()
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                _LOAD.format(cls=cls, what=f"expected a dict of name -> Tensor; got {type(state_dict).__name__}.")
            )
        fast = list(self._weights())
        entries = self._entries()
        expected = {key for key, _, _ in entries}
        missing = [key for key, kind, _ in entries if key not in state_dict and kind != "other"]
        unexpected = [key for key in state_dict if key not in expected]
        if strict and (missing or unexpected):
            parts = [
                f"missing keys {missing}" if missing else "",
                f"unexpected keys {unexpected}" if unexpected else "",
            ]
            raise RuntimeError(
                _LOAD.format(
                    cls=cls,
                    what=f"{' and '.join(p for p in parts if p)} (it has keys like {sorted(expected)[:4]}). Pass "
                    f"strict=False to load the keys that match.",
                )
            )
        other = [key for key, kind, _ in entries if kind == "other" and key in state_dict]
        if other:
            raise RuntimeError(_LOAD.format(cls=cls, what=_NOT_HELD.format(keys=other)))
        problems: list[str] = []
        loads: list[tuple[str, Any, Tensor, Tensor]] = []
        given_for: dict[Any, tuple[str, Tensor]] = {}
        for key, kind, where in entries:
            if key not in state_dict:
                continue
            value, current = state_dict[key], self._entry_value(kind, where, key, fast)
            if not isinstance(value, Tensor):
                problems.append(f"{key!r} is {type(value).__name__}, not a Tensor")
            elif value.shape != current.shape:
                problems.append(
                    f"{key!r} has shape {tuple(value.shape)}, but the fast weight or buffer has shape "
                    f"{tuple(current.shape)}"
                )
            else:
                if kind == "param":
                    seen = given_for.setdefault(where, (key, value))
                    if seen[1] is not value and not torch.equal(seen[1].detach().to(value), value.detach()):
                        problems.append(
                            f"{seen[0]!r} and {key!r} are one tied weight, but the state_dict gives them "
                            f"different values"
                        )
                loads.append((kind, where, value, current))
        if problems:
            raise RuntimeError(_LOAD.format(cls=cls, what="; ".join(problems) + "."))
        for kind, where, value, current in loads:
            if assign:
                new = value
            else:
                new = value.detach().to(dtype=current.dtype, device=current.device, copy=True)
            if kind == "param":
                fast[where] = new if assign else new.requires_grad_(current.requires_grad)
            else:
                self._root._buffers[where] = new
        if any(kind == "param" for kind, *_ in loads):
            self._root.update_params(fast)
        return _IncompatibleKeys(missing, unexpected)

    def _own_index(self, name: str) -> int | None:
        p = self.module._parameters.get(name)
        return None if p is None else self._root._param_index()[id(p)]

    def _own_buffer_key(self, name: str) -> str | None:
        b = self.module._buffers.get(name)
        if b is None:
            return None
        for key, t in self._root.module.named_buffers():
            if t is b:
                return key if key in self._root._buffers else None
        return None

    # ------------------------------------------------------------ attributes
    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if name in d.get("_modules", ()):
            return d["_modules"][name]
        if name in d.get("_buffers", ()):
            return d["_buffers"][name]
        module = d.get("module")
        if module is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        i = self._own_index(name)
        if i is not None:
            return self._weights()[i]
        if name in module._buffers and module._buffers[name] is not None:
            key = self._own_buffer_key(name)
            return module._buffers[name] if key is None else self._root._buffers[key]
        value = getattr(module, name)
        if callable(value) and getattr(value, "__self__", None) is module:
            return self._method(name, value)
        return value

    def _method(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        """``module.<name>`` bound to the fast weights: it runs inside ``functional_call``."""

        @functools.wraps(method)
        def run(*args: Any, **kwargs: Any) -> Any:
            wrapper = _MethodCall(self.module, name)
            tensors = {f"inner.{k}": v for k, v in self._tensors().items()}
            return self._run(lambda _m, t, *a, **k: call(wrapper, t, *a, **k), tensors, args, kwargs)

        return run

    def __setattr__(self, name: str, value: Any) -> None:
        module = self.__dict__.get("module")
        i = None if module is None or name.startswith("_") else self._own_index(name)
        if i is not None:
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"nestgrad.higher: fmodel.{name} is a fast weight and takes a Tensor; got {type(value).__name__}."
                )
            fast = list(self._weights())
            fast[i] = value
            self._root.update_params(fast)
            return
        key = None if module is None or name.startswith("_") else self._own_buffer_key(name)
        if key is not None:
            if not isinstance(value, Tensor):
                raise TypeError(f"nestgrad.higher: buffer {name!r} takes a Tensor; got {type(value).__name__}.")
            self._root._buffers[key] = value
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------ containers
    def _wrap(self, item: Any) -> Any:
        """A submodule of ``module`` as its view, a parameter as its fast weight, anything else as is."""
        if isinstance(item, nn.Module):
            for name, child in self.module._modules.items():
                if child is item and name in self._modules:
                    return self._modules[name]
            raise TypeError(
                f"nestgrad.higher: {type(self.module).__name__}[...] returned a new {type(item).__name__} "
                f"(a slice?), which has no fast weights. Index single layers: fmodel[i]."
            )
        if isinstance(item, Tensor):
            for name, p in self.module._parameters.items():
                if p is item:
                    return getattr(self, name)
        return item

    def __getitem__(self, idx: Any) -> Any:
        if not hasattr(type(self.module), "__getitem__"):
            raise TypeError(f"nestgrad.higher: {type(self.module).__name__} is not subscriptable.")
        return self._wrap(self.module[idx])  # type: ignore[index]

    def __iter__(self) -> Iterator[Any]:
        if not hasattr(type(self.module), "__iter__"):
            raise TypeError(f"nestgrad.higher: {type(self.module).__name__} is not iterable.")
        return iter([self._wrap(x) for x in self.module])  # type: ignore[attr-defined]

    def __len__(self) -> int:
        if not hasattr(type(self.module), "__len__"):
            raise TypeError(f"nestgrad.higher: {type(self.module).__name__} has no len().")
        return len(self.module)  # type: ignore[arg-type]

    def __bool__(self) -> bool:
        return True

    def _get_name(self) -> str:
        return f"Functional{type(self.module).__name__}"

    def extra_repr(self) -> str:
        return self.module.extra_repr()


class _MethodCall(nn.Module):
    """Runs ``inner.<name>(...)`` as its forward, so that ``functional_call`` can run any method."""

    def __init__(self, inner: nn.Module, name: str) -> None:
        super().__init__()
        self.inner = inner
        self._name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, self._name)(*args, **kwargs)


class FunctionalSubmodule(_Functional):
    """A submodule of a ``FunctionalModel`` (``fmodel.encoder``, ``fmodel[0]``), run with its fast weights.

    Calling it runs the submodule alone with the fast weights of the whole model's current
    version; ``params=`` takes a full list for the whole model, as in ``higher``.
    ``parameters()`` and ``named_parameters()`` list this submodule's fast weights.
    """

    def __init__(self, module: nn.Module, root: FunctionalModel) -> None:
        super().__init__(module, root)


class FunctionalModel(_Functional):
    """A view of a module with fast weights: ``fmodel(*args)`` is ``nestgrad.call(module, weights, *args)``.

    Returned by ``monkeypatch()`` and yielded by ``innerloop_ctx``; not built directly. It
    holds no copy of the module, only the list of fast weights (in ``module.parameters()``
    order), copies of its buffers and its own train/eval flags, taken from the module when it
    is created (as in ``higher``: a later ``model.eval()`` does not change ``fmodel``).
    During a call the wrapped modules' ``training`` flags are set to ``fmodel``'s and restored
    afterwards, so one module should not be run by two threads at once.

    Attributes:
        module: the wrapped ``nn.Module`` (never modified).
        track_higher_grads: whether earlier fast weights are kept (``parameters(time=k)``).
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[Tensor] | None,
        buffers: dict[str, Tensor],
        track_higher_grads: bool,
        training: bool | None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"nestgrad.higher: module must be an nn.Module; got {type(module).__name__}.")
        super().__init__(module, None)
        object.__setattr__(self, "_names", [n for n, _ in module.named_parameters()])
        object.__setattr__(self, "_history", [])
        object.__setattr__(self, "_track_higher_grads", True)
        self.__dict__["_buffers"] = dict(buffers)
        self.track_higher_grads = track_higher_grads
        if training is not None:
            self.train(training)
        if params is not None:
            self.update_params(params)

    # ------------------------------------------------------------ weights
    def _param_index(self) -> dict[int, int]:
        """id of each of the module's parameters -> its index in the fast weights."""
        index = {id(p): i for i, p in enumerate(self.module.parameters())}
        if len(index) != len(self._names):
            raise RuntimeError(
                f"nestgrad.higher: {type(self.module).__name__} has {len(index)} parameters now, but "
                f"{len(self._names)} when fmodel was created. Create the functional model again "
                f"(monkeypatch / innerloop_ctx) after changing the model's structure."
            )
        return index

    def _version(self, time: int | None) -> list[Tensor]:
        if not self._history:
            raise ValueError(
                "nestgrad.higher: this functional model has no fast weights yet (make_functional). "
                "Pass params=[...] to the call, or call fmodel.update_params(params) first."
            )
        if time is None:
            return self._history[-1]
        if not self.track_higher_grads and time not in (0, -1):
            raise ValueError(
                "nestgrad.higher: fmodel keeps only the latest fast weights when "
                "track_higher_grads=False; parameters(time=...) needs track_higher_grads=True."
            )
        if not -len(self._history) <= time < len(self._history):
            raise IndexError(
                f"nestgrad.higher: parameters(time={time}), but fmodel holds {len(self._history)} versions "
                f"of its fast weights (time 0 to {len(self._history) - 1}, or negative from the latest)."
            )
        return self._history[time]

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The current fast weights, in ``module.parameters()`` order (``None`` before any)."""
        return list(self._history[-1]) if self._history else None

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
        return list(self._version(0))

    @property
    def track_higher_grads(self) -> bool:
        """Whether every version of the fast weights is kept (for ``parameters(time=k)``) and steps record graphs."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"nestgrad.higher: track_higher_grads must be a bool; got {type(value).__name__}.")
        object.__setattr__(self, "_track_higher_grads", value)
        if not value:
            del self._history[:-1]

    @property
    def _training(self) -> bool:
        return self.training

    def update_params(self, params: Sequence[Tensor]) -> None:
        """Make ``params`` (in ``module.parameters()`` order) the current fast weights."""
        if isinstance(params, Tensor | str) or not isinstance(params, Iterable):
            raise TypeError(
                f"nestgrad.higher: fast weights must be a list of Tensors in the order of model.parameters(); "
                f"got {type(params).__name__}."
            )
        params = list(params)
        own = list(self.module.parameters())
        if len(params) != len(self._names) or not all(isinstance(p, Tensor) for p in params):
            kinds = sorted({type(p).__name__ for p in params})
            raise ValueError(
                f"nestgrad.higher: expected a list of {len(self._names)} Tensors in the order of "
                f"model.parameters() (the first names: {self._names[:3]}); got {len(params)} items "
                f"of type {', '.join(kinds) or '-'}."
            )
        for name, p, mine in zip(self._names, params, own, strict=False):
            if p.shape != mine.shape and not is_lazy(mine):
                raise ValueError(
                    f"nestgrad.higher: the fast weight for {name!r} has shape {tuple(p.shape)}, but the "
                    f"model's has shape {tuple(mine.shape)}. Pass the weights in model.parameters() order."
                )
        if self.track_higher_grads:
            self._history.append(params)
        else:
            self._history[:] = [params]

    def tensors(self, params: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """The name -> Tensor dict that ``fmodel`` passes to ``nestgrad.call()``."""
        weights = self._version(None) if params is None else params
        return {**dict(zip(self._names, weights, strict=True)), **self._buffers}

    def _tensors(self) -> dict[str, Tensor]:
        self._param_index()  # the model still has the parameters it had
        return self.tensors()

    def named_buffers(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> list[tuple[str, Tensor]]:
        """``(name, buffer copy)`` pairs: ``fmodel``'s own copies of the module's buffers."""
        dot = f"{prefix}." if prefix else ""
        return [(dot + k, v) for k, v in self._buffers.items()]

    def __repr__(self) -> str:
        return f"{super().__repr__()}  # {len(self._history)} version(s) of the fast weights"


# ============================================================== higher's functions
def _source(module: Any, where: str) -> tuple[nn.Module, list[Tensor] | None, dict[str, Tensor], _Functional | None]:
    """``(module to wrap, its current weights, its buffers, the functional model it came from)``."""
    if isinstance(module, _Functional):
        root = module._root
        weights = module.parameters() if root._history else None
        buffers = {}
        own = dict(module.module.named_buffers())
        given = dict(module._buffer_slots())
        for name, b in own.items():
            buffers[name] = root._buffers[given[name]] if name in given else b
        return module.module, weights, buffers, module
    if isinstance(module, nn.Module):
        return module, list(module.parameters()), dict(module.named_buffers()), None
    raise TypeError(
        f"nestgrad.higher.{where}: module must be an nn.Module (or a functional model from monkeypatch / "
        f"innerloop_ctx); got {type(module).__name__}."
    )


def _copy_modes(fmodel: _Functional, source: nn.Module) -> None:
    """Give ``fmodel``'s views the training flags of ``source``'s (a functional model's views, or modules)."""
    for (_, view), (_, src) in zip(fmodel.named_modules(), source.named_modules(), strict=True):
        view.training = src.training


def buffer_sync(module: nn.Module, fmodule: _Functional, device: Device = None) -> None:
    """Copy ``module``'s buffers (detached) into ``fmodule``, once; later updates do not propagate.

    Args:
        module: a module with the structure of ``fmodule.module`` (often that module itself).
        fmodule: a functional model from ``monkeypatch()`` or ``make_functional()``.
        device: where the copies live (default: where ``module``'s buffers are).

    Raises:
        TypeError: ``fmodule`` is not a functional model.
        KeyError: ``module`` has a buffer that ``fmodule``'s module does not have.
        ValueError: a buffer whose shape differs.
    """
    if not isinstance(fmodule, _Functional):
        raise TypeError(
            f"nestgrad.higher.buffer_sync: fmodule must be a functional model (monkeypatch / make_functional); "
            f"got {type(fmodule).__name__}."
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"nestgrad.higher.buffer_sync: module must be an nn.Module; got {type(module).__name__}.")
    if isinstance(module, _Functional):
        module = module.module
    root = fmodule._root
    prefix = next(name for name, m in root.named_modules() if m is fmodule)
    dot = f"{prefix}." if prefix else ""
    target = {n: b for n, b in root.module.named_buffers(remove_duplicate=False)}
    canonical = {id(b): n for n, b in root.module.named_buffers()}
    for name, b in module.named_buffers():
        own = target.get(dot + name)
        if own is None:
            raise KeyError(
                f"nestgrad.higher.buffer_sync: {type(module).__name__} has buffer {name!r}, which "
                f"{type(fmodule.module).__name__} does not have. Sync from a module of the same structure."
            )
        if own.shape != b.shape:
            raise ValueError(
                f"nestgrad.higher.buffer_sync: buffer {name!r} has shape {tuple(b.shape)}, but the functional "
                f"model's has shape {tuple(own.shape)}."
            )
        root._buffers[canonical[id(own)]] = _copy(b, device)


def make_functional(
    module: nn.Module, encapsulator: Callable[[FunctionalModel, nn.Module], None] | None = None
) -> FunctionalModel:
    """A functional model of ``module`` with no fast weights yet: pass ``params=`` to its calls.

    It runs ``module``'s own buffers on throwaway copies until ``buffer_sync()`` gives it
    its own (as in ``higher``, nothing is written back to ``module``).

    Args:
        module: the ``nn.Module`` (never modified).
        encapsulator: called as ``encapsulator(fmodel, module)`` before returning, to set up
            fast weights or buffers (``monkeypatch()`` uses it so).

    Returns:
        A ``FunctionalModel`` with ``fast_params`` ``None``.
    """
    if isinstance(module, _Functional):
        raise TypeError(
            "nestgrad.higher.make_functional: module is already a functional model. Use "
            "monkeypatch(fmodel) to start a new functional model from its current fast weights."
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"nestgrad.higher.make_functional: module must be an nn.Module; got {type(module).__name__}.")
    fmodel = FunctionalModel(module, None, {}, True, None)
    if encapsulator is not None:
        encapsulator(fmodel, module)
    return fmodel


def monkeypatch(
    module: nn.Module,
    device: Device = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModel:
    """A functional model of ``module``, with fast weights and copies of its buffers (``higher.monkeypatch``).

    Nothing is patched: calls run ``module`` through ``nestgrad.call()``, and ``module``
    keeps its own weights, buffers and modes.

    Args:
        module: an ``nn.Module``, or a functional model (then the new one starts from its
            current fast weights, buffers and modes: nested inner loops).
        device: where the fast weights and buffer copies live (default: where ``module``'s are).
        copy_initial_weights: ``True``: the initial fast weights are detached copies, so no
            gradient reaches ``module``'s weights; ``False``: they are the weights themselves
            (moved to ``device`` if given), for MAML.
        track_higher_grads: ``True`` keeps every version of the fast weights, so that
            gradients flow back through the updates; ``False`` keeps the latest only.

    Returns:
        A ``FunctionalModel``: ``fmodel(x)``, ``fmodel(x, params=[...])``,
        ``fmodel.parameters(time=k)``, ``fmodel.update_params([...])``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.

    Examples:
        >>> fmodel = monkeypatch(model)
        >>> grads = torch.autograd.grad(loss_fn(fmodel(x)), fmodel.parameters(), create_graph=True)
        >>> fmodel.update_params([p - 0.1 * g for p, g in zip(fmodel.parameters(), grads)])
    """
    inner, start, buffers, parent = _source(module, "monkeypatch")
    if not isinstance(copy_initial_weights, bool) or not isinstance(track_higher_grads, bool):
        raise TypeError(
            "nestgrad.higher.monkeypatch: copy_initial_weights and track_higher_grads must be bools; got "
            f"{type(copy_initial_weights).__name__} and {type(track_higher_grads).__name__}."
        )
    if start is None:
        raise ValueError(
            "nestgrad.higher.monkeypatch: the functional model has no fast weights yet (make_functional); "
            "give it some with update_params first."
        )
    if copy_initial_weights:
        params = [_copy(p, device).requires_grad_(p.requires_grad) for p in start]
    else:
        params = [p if device is None else p.to(device) for p in start]
    fmodel = FunctionalModel(inner, params, {k: _copy(b, device) for k, b in buffers.items()}, track_higher_grads, None)
    if parent is not None:
        _copy_modes(fmodel, parent)
    return fmodel
