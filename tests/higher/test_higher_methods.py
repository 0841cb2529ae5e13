"""``innerloop_ctx(..., method=...)``, the migration from a ``higher`` loop to ``ng.train``, and ``dir()``.

The ``higher`` API hands ``diffopt.step`` a loss whose graph is already built, so there is no
function that Reverse could re-run in the backward pass: ``method=`` raises and says so, and
docs/higher.md shows the same loop as an ``ng.train`` call, whose Reverse and checkpointed
Reverse meta-gradients equal the ``higher`` loop's (checked here to 1e-12 in float64).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad as ng
import nestgrad.higher as higher

DOCS = pathlib.Path(__file__).parents[2] / "docs" / "higher.md"
MIGRATION = "## Outgrowing the unrolled loop: moving to ng.train"


@pytest.fixture(autouse=True)
def f64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, generator=g), torch.randn(6, 1, generator=g)) for _ in range(steps)]


# ----------------------------------------------------------------- method=
@pytest.mark.parametrize(
    "method", [ng.Reverse(), ng.Reverse(checkpoint_every=2), ng.Forward(), ng.Unroll(), ng.Unroll(truncate=2)]
)
def test_method_raises_at_the_call_saying_why_and_where_to_go(method) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        higher.innerloop_ctx(model, opt, method=method)  # raised by the call, before any `with`
    msg = str(info.value)
    assert isinstance(info.value, TypeError)  # what the call raised before method= existed
    assert msg.startswith("nestgrad.higher.innerloop_ctx: method=")
    assert type(method).__name__ in msg
    assert "diffopt.step(loss)" in msg and "re-run" in msg  # why
    assert "ng.train(" in msg and "docs/higher.md" in msg and "Outgrowing the unrolled loop" in msg  # where to go


def test_method_that_is_not_a_method_is_a_type_error() -> None:
    model = mlp()
    with pytest.raises(TypeError, match=r"^nestgrad.higher.innerloop_ctx: method= takes a nestgrad Method.*got str"):
        higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), method="reverse")


def test_method_none_is_the_unrolled_loop() -> None:
    model = mlp()
    (x, y), (xq, yq) = batches(2)
    grads = []
    for kwargs in ({}, {"method": None}):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **kwargs) as (fmodel, diffopt):
            diffopt.step(F.mse_loss(fmodel(x), y))
            meta = F.mse_loss(fmodel(xq), yq)
        grads.append(torch.autograd.grad(meta, list(model.parameters())))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_the_raise_names_no_missing_docs_section() -> None:
    """The message points to a section of docs/higher.md: it must exist."""
    assert MIGRATION in DOCS.read_text()


# ----------------------------------------------------------------- the migration, computed
def higher_loop(model: nn.Module, data: list[tuple[Tensor, Tensor]], query) -> list[Tensor]:
    """The ``higher`` idiom: a learnable inner lr (``override``) and MAML's gradient to the init."""
    lr = torch.tensor(0.05, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(F.mse_loss(fmodel(x), y))
        meta = F.mse_loss(fmodel(query[0]), query[1])
    return list(torch.autograd.grad(meta, [lr, *model.parameters()]))


def train_loop(model: nn.Module, data: list[tuple[Tensor, Tensor]], query, method) -> list[Tensor]:
    """The same computation as one ``ng.train`` call."""

    def loss_fn(p, batch, hparams=None):
        return F.mse_loss(ng.call(model, p, batch[0]), batch[1])

    lr = torch.tensor(0.05, requires_grad=True)
    params = dict(model.named_parameters())
    opt = ng.optim.SGD(lr=lr, momentum=0.9, weight_decay=0.01)
    fast = ng.train(loss_fn, params, opt, data, steps=len(data), method=method)
    meta = F.mse_loss(ng.call(model, fast, query[0]), query[1])
    return list(torch.autograd.grad(meta, [lr, *params.values()]))


@pytest.mark.parametrize(
    "method", [ng.Unroll(), ng.Reverse(), ng.Reverse(checkpoint_every=2), ng.Reverse(checkpoint_every=3)], ids=repr
)
def test_higher_loop_equals_ng_train(method) -> None:
    model = mlp()
    *data, query = batches(8)
    ref = higher_loop(model, data, query)
    got = train_loop(model, data, query, method)
    assert ref[0].abs() > 1e-3  # the lr's meta-gradient is not trivially zero
    for name, a, b in zip(["lr", *dict(model.named_parameters())], ref, got):
        err = ((a - b).norm() / a.norm()).item()
        assert err < 1e-12, f"{method}: d meta-loss / d {name} differs from the higher loop's by {err:.1e}"


def migration_blocks() -> list[str]:
    text = DOCS.read_text()
    start = text.index(MIGRATION)
    end = text.find("\n## ", start + len(MIGRATION))
    section = text[start : end if end >= 0 else len(text)]
    return re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)


def test_the_docs_migration_example_agrees() -> None:
    """Run docs/higher.md's migration section; its higher loop and its ng.train calls agree to 1e-12."""
    blocks = migration_blocks()
    assert blocks, "the migration section has no python block"
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(DOCS), "exec"), ns)
    ref = ns["higher_grads"]
    assert len(ref) == 1 + len(list(ns["model"].parameters()))
    for name in ("reverse_grads", "checkpointed_grads"):
        got = ns[name]
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            assert a.dtype == torch.float64
            assert ((a - b).norm() / a.norm()).item() < 1e-12, name


# ----------------------------------------------------------------- dir()
@pytest.mark.parametrize("module", [higher, higher.optim, higher.patch, higher.utils], ids=lambda m: m.__name__)
def test_dir_lists_the_public_api(module) -> None:
    listed = dir(module)
    extra = [n for n in listed if not n.startswith("__") and n not in module.__all__]
    assert not extra, f"dir({module.__name__}) lists names outside its __all__: {extra}"
    assert set(module.__all__) <= set(listed)
    assert "__name__" in listed and "__doc__" in listed
    for name in ("torch", "Any", "nn", "contextmanager", "Iterator"):
        assert name not in listed
