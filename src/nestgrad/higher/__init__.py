r"""A drop-in for the ``higher`` library, built on ``nestgrad.call()`` and ``nestgrad.optim``.

Change one import and existing ``higher`` code runs on nestgrad:

    import nestgrad.higher as higher

    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in support:
            diffopt.step(loss_fn(fmodel(x), y))
        meta_loss = loss_fn(fmodel(x_query), y_query)
    meta_loss.backward()  # reaches model.parameters(), through every inner step

What is provided, with ``higher``'s names and signatures: ``innerloop_ctx`` (which is
``monkeypatch`` + ``get_diff_optim``, as in ``higher``), ``monkeypatch``, ``get_diff_optim``,
``create_diff_optim``, ``register_optim`` and the submodules ``patch`` (functional models,
``make_functional``, ``buffer_sync``), ``optim`` (``DifferentiableOptimizer``
and ``DifferentiableSGD``, ``...Adam``, ``...AdamW``, ``...Adagrad``, ``...Adadelta``,
``...Adamax``, ``...ASGD``, ``...RMSprop``, ``...Rprop``, ``...NAdam``, ``...RAdam``;
``get_trainable_opt_params``, ``apply_trainable_opt_params``) and ``utils``. A user's optimizer
is added as in ``higher``'s README: subclass ``DifferentiableOptimizer``, implement
``_update(grouped_grads, **kwargs)``, and ``register_optim(MyOptimizer, MyDifferentiableOptimizer)``.
``fmodel(*args, **kwargs)`` runs your module through ``nestgrad.call()`` with the fast weights,
and ``diffopt.step(loss)`` takes ``torch.autograd.grad(loss, fast_weights, create_graph=True)``
and applies the pure update of the ``nestgrad.optim`` twin of your ``torch.optim`` optimizer.

Differences from ``higher``
---------------------------
* **No monkeypatching.** ``higher`` builds a patched copy of every submodule, so forward hooks
  registered on your model never fire and outputs that models collect with hooks are lost:
  with transformers 5, ``fmodel(ids, output_hidden_states=True).hidden_states`` is ``None``
  under ``higher``. Here ``fmodel`` runs *your* module (``torch.func.functional_call``), so
  hooks, hidden states, attentions and every other output are exactly those of ``model(...)``.
* **Nesting works.** ``innerloop_ctx(fmodel, opt)`` starts an inner loop from the current fast
  weights of an outer loop (``higher`` raises "Monkey-patching monkey-patched modules is
  untested"). With ``copy_initial_weights=False`` the inner loop is differentiable with
  respect to the outer fast weights, so an outer unroll can contain inner unrolls.
* **Optimizers match torch.optim.** The built-in differentiable optimizers run the
  ``nestgrad.optim`` rules (one copy of the math), which match ``torch.optim`` step for step,
  with every flag honoured (``maximize``, ``amsgrad``, ``nesterov``, ``centered``,
  ``decoupled_weight_decay``; ``higher`` ignores several). AdamW (missing from ``higher`` 0.2.1),
  NAdam and RAdam are added. ``higher``'s Adam adds ``eps`` before the bias correction (an older
  formula than ``torch.optim.Adam``'s), so its trajectories differ from ``torch.optim``'s by about
  ``eps / sqrt(1 - beta2**t)`` in the denominator; these do not. Where ``higher`` masks
  gradients at a zero second moment, the Adam family and RMSprop add ``eps_root=1e-30`` inside
  the square root (see ``nestgrad.optim.Adam``), which keeps meta-gradients finite and
  leaves the trajectory unchanged to float precision; RMSprop's meta-gradients are correct, so
  ``higher``'s warning about them is not raised. A ``nestgrad.optim`` optimizer may be
  passed instead of a ``torch.optim`` one.
* **SGD rounding.** ``DifferentiableSGD`` rounds ``p - lr * g`` as a product then a difference,
  as ``higher`` and hand-written unrolls do, so it is bit-identical to them; ``torch.optim.SGD``
  computes ``torch.add(p, g, alpha=-lr)``, rounded once (FMA), which differs in the last bit and,
  in float32 through BatchNorm, can drift past ``higher``'s own tolerances over an unroll. For
  ``torch.optim.SGD``'s rounding, pass ``nestgrad.optim.SGD(lr=...)`` as the optimizer.
* **state_dict.** ``fmodel.state_dict()`` holds the latest fast weights and the buffer copies,
  with ``higher``'s keys. ``fmodel.load_state_dict()`` checks every key and shape before it
  loads anything (``higher`` copies the keys before a bad one) and appends the loaded values as
  a new version of the fast weights, detached copies (``higher`` writes into the current ones in
  place); ``assign=True`` uses the given tensors, graph included.
* **Loud errors.** An unsupported optimizer raises an error that is both a ``TypeError`` and
  a ``ValueError`` (``higher`` raises ``ValueError``); an ``override`` of a hyperparameter the
  optimizer does not have, a hyperparameter out of range, a non-scalar loss, a wrong number of
  fast weights or of gradients returned by ``grad_callback`` raise with the fix.
* ``get_trainable_opt_params`` leaves out flags (``amsgrad``, ``nesterov``, ...), which are not
  trainable; ``higher`` turns them into tensors. Tensor hyperparameters are shared with the
  ``torch.optim`` optimizer, not deep-copied, so gradients reach them.
* ``copy_initial_weights=False``: the initial fast weights *are* ``model.parameters()``
  (``higher`` uses ``clone()`` of them); the gradients are the same.
* ``innerloop_ctx(..., method=...)`` raises: the loop records every step, as
  ``nestgrad.Unroll()``, and a method that re-runs the steps in the backward pass
  (``nestgrad.Reverse()``, checkpointed or not) needs the step's loss as a function, which
  ``diffopt.step(loss)`` does not receive. docs/higher.md shows the same loop as a
  ``nestgrad.train`` call, where ``method=nestgrad.Reverse()`` holds far less memory.

As in ``higher``
----------------
* ``copy_initial_weights=True`` (the default) starts from detached copies of the weights, so
  no gradient reaches ``model.parameters()`` through the unroll; ``False`` is what MAML needs.
* ``track_higher_grads=False`` is first order: no ``create_graph``, and the fast weights are
  detached after every step (they still require grad). No gradient flows through the steps.
* ``override={"lr": [value, ...]}`` sets a hyperparameter per param group (one value for all
  groups, or one per group); values may be Tensors that require grad. An override passed to
  ``step`` replaces the current value and stays in force for later steps.
* The optimizer's existing state (momentum buffers, Adam's moments and step count, ...) is
  copied, detached, into ``diffopt.state`` (one dict per group, keyed by the position in the
  group, with ``torch.optim``'s entry names); the ``torch.optim`` optimizer itself is never
  changed. Entries of ``diffopt.state`` and values in ``diffopt.param_groups`` may be changed
  between steps and take effect. Parameters that the optimizer does not hold keep their value.
* ``grad_callback`` (at construction, or per ``step``) maps the list of gradients, in
  ``model.parameters()`` order (``None`` for unused or frozen weights), before the update.
* ``fmodel(x, params=fast_weights)`` runs with ``fast_weights``, which become the current ones.
* ``fmodel`` keeps its own train/eval mode per submodule, taken from the model when it is
  created: a later ``model.eval()`` does not change it, and ``fmodel.eval()`` does not change
  the model (during a call the module's flags are set, then restored, so one module should not
  run in two threads at once). Submodules are reached as attributes (``fmodel.encoder``,
  ``fmodel[0]``) and run with the fast weights when called.

Second-order gradients and attention kernels
--------------------------------------------
PyTorch implements no double backward for its fused attention kernels, which
``scaled_dot_product_attention`` (and so transformers' default ``attn_implementation="sdpa"``)
picks on CPU. A hypergradient through such a model then fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" with ``higher``.
Like ``nestgrad.train``, ``fmodel`` selects the math attention kernel, which has a double
backward, whenever it records higher-order gradients, so the same model works here unchanged.

Buffers and BatchNorm
---------------------
``fmodel`` owns copies of the model's buffers, taken when the context is entered. In train
mode, BatchNorm normalises with batch statistics (differentiably) and updates the running
statistics in place on those copies; the model's own buffers are never changed. In eval mode
it reads them. See ``nestgrad.higher.patch`` for ``fmodel.train()`` / ``fmodel.eval()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from .. import optim as _optim
from ..methods._base import Method
from . import optim, patch, utils
from .optim import (
    DifferentiableOptimizer,
    Override,
    apply_trainable_opt_params,
    create_diff_optim,
    get_diff_optim,
    get_trainable_opt_params,
    register_optim,
)
from .patch import FunctionalModel, _Functional, monkeypatch

__all__ = [
    "DifferentiableOptimizer",
    "FunctionalModel",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "innerloop_ctx",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "utils",
]


def __dir__() -> list[str]:
    """The public API and the module's dunders; not the helpers this file imports (``torch``, ``Any``)."""
    return sorted([*__all__, *(k for k in globals() if k.startswith("__") and k.endswith("__"))])


_NO_REPLAY = (
    "nestgrad.higher.innerloop_ctx: method={method!r} is not available here. A higher-style loop "
    "runs one method, Unroll() (every step recorded; leave method= out): diffopt.step(loss) receives, "
    "one step at a time, a loss whose graph your code has already built. The other methods need the "
    "whole run as one call, with the step's loss as a function they can re-run (Reverse re-runs the "
    "steps in the backward pass, keeping each step's weights and not its graph) and the number of "
    "steps (Unroll(truncate=k) records only the last k). Write the step's loss as "
    "loss_fn(params, batch, hparams) and call ng.train(loss_fn, dict(model.named_parameters()), "
    "optimizer, batches, steps=T, method={method!r}): docs/higher.md, 'Outgrowing the unrolled loop: "
    "moving to ng.train', shows one loop written both ways, with the same meta-gradients."
)


class UnsupportedMethodError(TypeError, ValueError):
    """A ``method=`` that a higher-style loop cannot run: a ``ValueError``, and a ``TypeError`` as before."""


def innerloop_ctx(
    model: nn.Module | FunctionalModel,
    opt: torch.optim.Optimizer | _optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Override | None = None,
    track_higher_grads: bool = True,
    *,
    method: Method | None = None,
) -> AbstractContextManager[tuple[Any, DifferentiableOptimizer]]:
    """A context manager for differentiable inner loops: ``monkeypatch(model)`` and ``get_diff_optim(opt)``.

    Args:
        model: the ``nn.Module`` to train, or the ``fmodel`` of an enclosing ``innerloop_ctx``
            (the inner loop then starts from its current fast weights).
        opt: a ``torch.optim`` optimizer over ``model``'s parameters (SGD, Adam, AdamW,
            RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam, Rprop, ASGD, or a type added
            with ``register_optim()``), whose param groups, hyperparameters and state are
            copied; or a ``nestgrad.optim`` optimizer.
        device: where to put the fast weights, buffers and optimizer state (default: where
            the model's are).
        copy_initial_weights: start from detached copies of the weights (``True``, no gradient
            reaches the model's weights) or from the weights themselves (``False``, for MAML).
        override: ``{name: [value]}`` or ``{name: [value_group0, value_group1, ...]}``;
            values may be Tensors that require grad.
        track_higher_grads: ``False`` for a first-order inner loop (no ``create_graph``,
            fast weights detached after each step).
        method: only ``None``. Every step is recorded as with ``nestgrad.Unroll()``: the loss
            given to ``diffopt.step`` arrives with its graph built, so a method that re-runs the
            steps in the backward pass (``Reverse``) has nothing to re-run. Any ``Method``
            raises an error (a ``ValueError`` and a ``TypeError``) that says how to move the
            loop to ``nestgrad.train(..., method=...)`` (docs/higher.md, "Outgrowing the
            unrolled loop").

    Yields:
        ``(fmodel, diffopt)``: the functional model and a ``DifferentiableOptimizer``.

    Examples:
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> with innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                    override={"lr": [lr]}) as (fmodel, diffopt):
        ...     diffopt.step(loss_fn(fmodel(x), y))
        ...     val_loss = loss_fn(fmodel(x_val), y_val)
        >>> (lr_grad,) = torch.autograd.grad(val_loss, lr)
    """
    if method is not None:
        if not isinstance(method, Method):
            raise TypeError(
                f"nestgrad.higher.innerloop_ctx: method= takes a nestgrad Method (and a higher-style "
                f"loop runs none but the default, None); got {type(method).__name__} {method!r}."
            )
        raise UnsupportedMethodError(_NO_REPLAY.format(method=method))
    return _innerloop_ctx(model, opt, device, copy_initial_weights, override, track_higher_grads)


@contextmanager
def _innerloop_ctx(
    model: nn.Module | FunctionalModel,
    opt: torch.optim.Optimizer | _optim.Optimizer,
    device: torch.device | str | None,
    copy_initial_weights: bool,
    override: Override | None,
    track_higher_grads: bool,
) -> Iterator[tuple[Any, DifferentiableOptimizer]]:
    """The context of :func:`innerloop_ctx`, after its arguments are checked."""
    # The fmodel of an enclosing loop (nesting) is an nn.Module too: its optimizer is over the
    # parameters of the module it runs.
    base = model.module if isinstance(model, _Functional) else model
    if not isinstance(base, nn.Module):
        raise TypeError(
            f"nestgrad.higher.innerloop_ctx: model must be an nn.Module or the fmodel of another "
            f"innerloop_ctx; got {type(model).__name__}."
        )
    fmodel = monkeypatch(
        model, device, copy_initial_weights=copy_initial_weights, track_higher_grads=track_higher_grads
    )
    reference = list(base.parameters())
    diffopt = get_diff_optim(
        opt, reference, fmodel=fmodel, device=device, override=override, track_higher_grads=track_higher_grads
    )
    yield fmodel, diffopt
