"""``nestgrad.higher``: a drop-in for ``higher.innerloop_ctx``, checked against ``higher`` itself.

References, in order of preference: a hand-written unroll in float64, central finite differences,
``torch.optim`` (for trajectories), and the real ``higher`` 0.2.1 where it works.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertConfig, BertModel

import nestgrad as ng
import nestgrad.higher as higher
from optim_db import OptimInfo, case_id, cases

try:
    import higher as real_higher
except ImportError as error:  # pragma: no cover - higher comes with the optional "bench" extra
    real_higher = None
    _NO_HIGHER = f"the real higher library does not import ({error}); only the comparison with it is skipped"


def need_real_higher() -> None:
    """Skip the rest of a test (the comparison with the real higher) when it is not installed."""
    if real_higher is None:
        pytest.skip(_NO_HIGHER)


Batch = tuple[Tensor, Tensor]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def mlp_forward(ps: Sequence[Tensor], x: Tensor) -> Tensor:
    """``mlp()``'s forward written by hand, for reference unrolls."""
    return torch.tanh(x @ ps[0].T + ps[1]) @ ps[2].T + ps[3]


def batch(seed: int, n: int = 6, d_in: int = 4, d_out: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    shape = {"generator": g, "dtype": torch.float64}
    return torch.randn(n, d_in, **shape), torch.randn(n, d_out, **shape)


def mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def sgd_unroll(ps: list[Tensor], lrs: Sequence[float | Tensor], batches: Sequence[Batch]) -> list[Tensor]:
    """Plain SGD through ``mlp_forward``, keeping the graph."""
    for lr, (x, y) in zip(lrs, batches):
        grads = torch.autograd.grad(mse(mlp_forward(ps, x), y), ps, create_graph=True)
        ps = [p - lr * g for p, g in zip(ps, grads)]
    return ps


def assert_lists_close(a: Sequence[Tensor | None], b: Sequence[Tensor | None], tol: float = 1e-10) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), f"entry {i}: {x} vs {y}"
        if x is not None:
            torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m, i=i: f"entry {i}: {m}")


def central_fd(f: Callable[[float], Tensor], x: float, eps: float = 1e-6) -> float:
    return ((f(x + eps) - f(x - eps)) / (2 * eps)).item()


# ------------------------------------------------------------ the seed snippet
SEED_SNIPPET = """\
import torch
import torch.nn as nn
import higher

model = nn.Linear(10, 10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.001)

x = torch.rand(10)
y = torch.rand(10, requires_grad=True)

with higher.innerloop_ctx(model, optimizer, copy_initial_weights=True) as (fmodel, diffopt):
    for i in range(2):
        loss = (fmodel(x) * y).sum()
        diffopt.step(loss)

        out = fmodel(x).sum()
        print(torch.autograd.grad(out, y))
"""


def run_snippet(code: str, use_nestgrad: bool) -> tuple[str, str | None, dict]:
    """Run ``code`` from a fixed seed; return what it printed, the error it raised, and its globals."""
    if use_nestgrad:
        code = code.replace("import higher\n", "import nestgrad.higher as higher\n")
    torch.manual_seed(0)
    scope: dict = {"__name__": "seed_snippet"}
    printed = io.StringIO()
    error = None
    with contextlib.redirect_stdout(printed):
        try:
            exec(compile(code, "<forum snippet>", "exec"), scope)
        except RuntimeError as e:
            error = str(e)
    return printed.getvalue(), error, scope


def test_seed_snippet_behaves_exactly_like_higher() -> None:
    """The forum's snippet with only its import changed.

    As written, it cannot finish with any correct implementation: the first
    ``autograd.grad(out, y)`` frees the graph of step 1, which the second one needs (y reaches the
    weights through step 1). higher 0.2.1 raises on the second iteration, and so does nestgrad,
    after printing the same first gradient. With ``retain_graph=True`` both print the same two.
    """
    printed, error, scope = run_snippet(SEED_SNIPPET, use_nestgrad=True)
    assert scope["higher"] is higher
    assert printed.count("tensor(") == 1
    assert error is not None and "backward through the graph a second time" in error
    # out = sum(W x + b) with W, b after t steps of lr * (y x^T, y): d out / dy = -t * lr * (|x|^2 + 1).
    x = scope["x"]
    first = -0.001 * (x @ x + 1)
    assert f"{first.item():.4f}" in printed

    fixed = SEED_SNIPPET.replace("grad(out, y)", "grad(out, y, retain_graph=True)")
    printed_fixed, error_fixed, scope = run_snippet(fixed, use_nestgrad=True)
    assert error_fixed is None and printed_fixed.count("tensor(") == 2
    x, y = scope["x"], scope["y"]
    fmodel, model = scope["fmodel"], scope["model"]
    out = fmodel(x).sum()
    (grad,) = torch.autograd.grad(out, y)
    torch.testing.assert_close(grad, torch.full((10,), -2 * 0.001 * (x @ x + 1).item()), rtol=1e-5, atol=1e-7)
    assert model.weight.grad is None
    assert fmodel.weight is fmodel.fast_params[0] and fmodel.training is model.training

    need_real_higher()
    printed_real, error_real, _ = run_snippet(SEED_SNIPPET, use_nestgrad=False)
    assert (printed, error) == (printed_real, error_real)
    printed_real_fixed, error_real_fixed, _ = run_snippet(fixed, use_nestgrad=False)
    assert error_real_fixed is None
    assert printed_fixed == printed_real_fixed


# ----------------------------------------------------------------- transformers
def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=50, max_position_embeddings=16,
    )  # fmt: skip
    return BertModel(config).eval()


def test_bert_hidden_states_are_intact() -> None:
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = model(ids, output_hidden_states=True).hidden_states
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        out = fmodel(ids, output_hidden_states=True)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        for ours, ref in zip(out.hidden_states, expected):
            # fmodel uses the math attention kernel (it has a double backward); model() the fused one.
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        diffopt.step(out.last_hidden_state.pow(2).mean())
        after = fmodel(ids, output_hidden_states=True).hidden_states
        assert len(after) == model.config.num_hidden_layers + 1
        assert not torch.allclose(after[-1], expected[-1])


@pytest.mark.slow
def test_bert_hypergradient_matches_finite_differences(float64: None) -> None:
    """lr -> two SGD steps -> a validation loss that reads hidden_states[1].

    PyTorch has no double backward for the CPU flash-attention kernel that ``sdpa`` picks, so
    second-order gradients through this model need the math kernel (or ``attn_implementation="eager"``).
    """
    model = tiny_bert()
    g = torch.Generator().manual_seed(0)
    ids, ids_val = torch.randint(0, 50, (2, 7), generator=g), torch.randint(0, 50, (2, 7), generator=g)

    def val_loss(lr: float | Tensor) -> Tensor:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(2):
                out = fmodel(ids, output_hidden_states=True)
                diffopt.step(out.hidden_states[-1].pow(2).mean() + out.pooler_output.sum())
            out = fmodel(ids_val, output_hidden_states=True)
            return out.hidden_states[1].sum() + out.last_hidden_state.pow(2).mean()

    with sdpa_kernel(SDPBackend.MATH):
        lr = torch.tensor(0.1, requires_grad=True)
        (grad,) = torch.autograd.grad(val_loss(lr), lr)
        expected = central_fd(val_loss, 0.1, eps=1e-5)
    assert abs(grad.item()) > 1e-3
    assert grad.item() == pytest.approx(expected, rel=1e-6)


def test_real_higher_loses_bert_hidden_states() -> None:
    """Observed with higher 0.2.1 on transformers 5: the monkeypatched copy returns no hidden states.

    transformers 5 collects them with hooks on the original submodules, which higher's patched
    copies never call. The last hidden state itself is right.
    """
    need_real_higher()
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = model(ids, output_hidden_states=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with real_higher.innerloop_ctx(model, opt) as (fmodel, _):
        out = fmodel(ids, output_hidden_states=True)
    assert len(expected.hidden_states) == 3
    assert out.hidden_states is None
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state)


def test_forward_hooks_fire_and_the_model_is_untouched(float64: None) -> None:
    model = mlp()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    seen: list[Tensor] = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output))
    x, y = batch(0)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(x), y))
        fmodel(x)
        w, b = fmodel.parameters()[:2]
    assert len(seen) == 2
    torch.testing.assert_close(seen[-1], F.linear(x, w, b), rtol=0, atol=0)
    assert type(model) is nn.Sequential and type(model[0]) is nn.Linear
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]) and v.grad is None

    need_real_higher()  # observed with higher 0.2.1: hooks on the model never fire under its fmodel
    seen.clear()
    with real_higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, _):
        fmodel(x)
    assert seen == []


# ------------------------------------------------------- documented semantics
SUPPORT = [batch(s) for s in (1, 2, 3)]
QUERY = batch(4)
TASKS = [([batch(10 * t + s) for s in range(3)], batch(10 * t + 9)) for t in (1, 2)]


def test_maml_meta_gradient_matches_hand_unroll_and_higher(float64: None) -> None:
    """copy_initial_weights=False: the meta-gradient reaches model.parameters()."""

    def meta_grads(lib) -> tuple[Tensor, ...]:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        meta = torch.zeros(())
        for support, (xq, yq) in TASKS:
            with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                if lib is higher:
                    assert all(a is b for a, b in zip(fmodel.init_fast_params, model.parameters()))
                for x, y in support:
                    diffopt.step(mse(fmodel(x), y))
                meta = meta + mse(fmodel(xq), yq)
        return torch.autograd.grad(meta, list(model.parameters()))

    model = mlp()
    ps = list(model.parameters())
    meta = sum(mse(mlp_forward(sgd_unroll(ps, [0.1] * 3, s), q[0]), q[1]) for s, q in TASKS)
    expected = torch.autograd.grad(meta, ps)
    ours = meta_grads(higher)
    assert_lists_close(ours, expected)
    need_real_higher()
    assert_lists_close(ours, meta_grads(real_higher))


def test_copy_initial_weights_starts_from_detached_copies(float64: None) -> None:
    """copy_initial_weights=True (the default): no gradient reaches model.parameters()."""

    def unroll(lib) -> tuple[list[Tensor], tuple[Tensor | None, ...]]:
        model = mlp()
        with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
            init = list(fmodel.parameters(time=0))
            for x, y in SUPPORT:
                diffopt.step(mse(fmodel(x), y))
            loss = mse(fmodel(QUERY[0]), QUERY[1])
        for a, b in zip(init, model.parameters()):
            assert a is not b and torch.equal(a, b) and a.requires_grad and a.grad_fn is None
        return init, torch.autograd.grad(loss, [*model.parameters(), *init], allow_unused=True)

    init, grads = unroll(higher)
    assert grads[:4] == (None,) * 4
    leaves = [p.detach().clone().requires_grad_() for p in init]
    loss = mse(mlp_forward(sgd_unroll(leaves, [0.1] * 3, SUPPORT), QUERY[0]), QUERY[1])
    assert_lists_close(grads[4:], torch.autograd.grad(loss, leaves))
    need_real_higher()
    _, real = unroll(real_higher)
    assert_lists_close(grads, real)


def two_group_sgd(model: nn.Sequential, momentum: float = 0.9) -> torch.optim.SGD:
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
    return torch.optim.SGD(groups, lr=0.1, momentum=momentum)


def test_override_lr_per_group_gradient_matches_fd_and_higher(float64: None) -> None:
    def val_loss(lib, lrs: list[float | Tensor]) -> Tensor:
        model = mlp()
        with lib.innerloop_ctx(model, two_group_sgd(model), override={"lr": lrs}) as (fmodel, diffopt):
            for x, y in SUPPORT:
                diffopt.step(mse(fmodel(x), y))
            return mse(fmodel(QUERY[0]), QUERY[1])

    lrs = [torch.tensor(0.1, requires_grad=True), torch.tensor(0.05, requires_grad=True)]
    ours = torch.autograd.grad(val_loss(higher, lrs), lrs)
    fd = [
        central_fd(lambda v: val_loss(higher, [v, 0.05]), 0.1),
        central_fd(lambda v: val_loss(higher, [0.1, v]), 0.05),
    ]
    assert all(abs(g) > 1e-3 for g in fd)
    for g, expected in zip(ours, fd):
        assert g.item() == pytest.approx(expected, rel=1e-6)
    need_real_higher()
    assert_lists_close(ours, torch.autograd.grad(val_loss(real_higher, lrs), lrs))


def test_override_at_each_step_matches_hand_unroll_and_higher(float64: None) -> None:
    """One learnable lr per step, passed to diffopt.step; a single value applies to every group."""

    def val_loss(lib, lrs: Tensor) -> Tensor:
        model = mlp()
        with lib.innerloop_ctx(model, two_group_sgd(model, momentum=0.0)) as (fmodel, diffopt):
            for t, (x, y) in enumerate(SUPPORT):
                diffopt.step(mse(fmodel(x), y), override={"lr": [lrs[t]]})
            return mse(fmodel(QUERY[0]), QUERY[1])

    lrs = torch.tensor([0.1, 0.05, 0.2], requires_grad=True)
    (ours,) = torch.autograd.grad(val_loss(higher, lrs), lrs)
    leaves = [p.detach().clone().requires_grad_() for p in mlp().parameters()]
    (expected,) = torch.autograd.grad(mse(mlp_forward(sgd_unroll(leaves, lrs, SUPPORT), QUERY[0]), QUERY[1]), lrs)
    assert_lists_close([ours], [expected])
    need_real_higher()
    (real,) = torch.autograd.grad(val_loss(real_higher, lrs), lrs)
    assert_lists_close([ours], [real])


def test_step_override_stays_in_force_like_higher(float64: None) -> None:
    def trajectory(lib) -> list[Tensor]:
        model = mlp()
        with lib.innerloop_ctx(model, two_group_sgd(model)) as (fmodel, diffopt):
            diffopt.step(mse(fmodel(SUPPORT[0][0]), SUPPORT[0][1]), override={"lr": [0.0, 0.3]})
            for x, y in SUPPORT[1:]:
                diffopt.step(mse(fmodel(x), y))
            return list(fmodel.parameters())

    model = mlp()
    ours = trajectory(higher)
    assert all(torch.equal(a, b) for a, b in zip(ours[:2], model[0].parameters()))  # lr 0 for group 0
    assert not torch.allclose(ours[2], model[2].weight)
    need_real_higher()
    assert_lists_close(ours, trajectory(real_higher))


def test_first_order_matches_torch_optim_and_higher(float64: None) -> None:
    """track_higher_grads=False: no create_graph, fast weights detached after every step."""

    def first_order(lib) -> tuple[list[Tensor], tuple[Tensor | None, ...]]:
        model = mlp()
        lr = torch.tensor(0.1, requires_grad=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        seen: list[bool] = []

        def spy(grads: list[Tensor | None]) -> list[Tensor | None]:
            seen.extend(g.requires_grad for g in grads if g is not None)
            return grads

        ctx = lib.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False, override={"lr": [lr]})
        with ctx as (fmodel, diffopt):
            for x, y in SUPPORT:
                new = diffopt.step(mse(fmodel(x), y), grad_callback=spy)
                assert all(p.grad_fn is None and p.requires_grad for p in new)
            final = list(fmodel.parameters())
            loss = mse(fmodel(QUERY[0]), QUERY[1])
        assert seen and not any(seen)
        return final, torch.autograd.grad(loss, [*final, *model.parameters(), lr], allow_unused=True)

    final, grads = first_order(higher)
    assert grads[4:] == (None,) * 5  # neither the model's weights nor lr get a gradient
    reference = mlp()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in SUPPORT:
        opt.zero_grad()
        mse(reference(x), y).backward()
        opt.step()
    assert_lists_close(final, [p.detach() for p in reference.parameters()])
    model = mlp()
    with pytest.raises(RuntimeError, match="init_fast_params"):
        with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters()), track_higher_grads=False) as (fmodel, _):
            fmodel.init_fast_params  # noqa: B018
    need_real_higher()
    real_final, real_grads = first_order(real_higher)
    assert_lists_close(final, real_final)
    assert_lists_close(grads, real_grads)


# ----------------------------------------------------- optimizers and their state
GROUP_CASES = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {"lr": 0.02, "weight_decay": 0.01}),
    "sgd-nesterov": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, {"lr": 0.02}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99)}, {"lr": 0.003, "weight_decay": 0.01}),
}


def make_opt(model: nn.Sequential, cls: type[torch.optim.Optimizer], kwargs: dict, second: dict):
    return cls([{"params": model[0].parameters()}, {"params": model[2].parameters(), **second}], **kwargs)


def torch_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Sequence[Batch]) -> list[list[Tensor]]:
    out = []
    for x, y in batches:
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def inner_steps(lib, model: nn.Module, opt: torch.optim.Optimizer, batches: Sequence[Batch]) -> list[list[Tensor]]:
    with lib.innerloop_ctx(model, opt) as (fmodel, diffopt):
        return [[p.detach() for p in diffopt.step(mse(fmodel(x), y))] for x, y in batches]


@pytest.mark.parametrize("warmup", [0, 2], ids=["fresh", "state-carried"])
@pytest.mark.parametrize("name", GROUP_CASES)
def test_param_group_trajectories_match_torch_optim_and_higher(float64: None, name: str, warmup: int) -> None:
    """Two groups with different lr; with warmup, the optimizer's state is carried into the inner loop."""
    cls, kwargs, second = GROUP_CASES[name]
    warm, steps = [batch(s) for s in range(20, 20 + warmup)], [batch(s) for s in range(30, 35)]

    def prepared() -> tuple[nn.Sequential, torch.optim.Optimizer]:
        model = mlp()
        opt = make_opt(model, cls, kwargs, second)
        torch_steps(model, opt, warm)
        return model, opt

    expected = torch_steps(*prepared(), steps)
    model, opt = prepared()
    saved = copy.deepcopy(opt.state_dict())
    ours = inner_steps(higher, model, opt, steps)
    for t in range(len(steps)):
        assert_lists_close(ours[t], expected[t], tol=1e-12)
    assert str(opt.state_dict()) == str(saved)  # the torch optimizer is not changed
    need_real_higher()
    # higher's Adam adds eps before the bias correction (torch.optim's formula before 1.x), so it
    # differs from torch.optim.Adam by about eps / sqrt(1 - beta2^t) in the denominator.
    tol = 1e-5 if cls is torch.optim.Adam else 1e-12
    real = inner_steps(real_higher, *prepared(), steps)
    for t in range(len(steps)):
        assert_lists_close(ours[t], real[t], tol=tol)


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_every_torch_optimizer_and_flag_matches_torch_optim(float64: None, case: tuple[OptimInfo, dict]) -> None:
    """All eleven optimizers with every flag setting of the optimizer tests, two groups, carried state."""
    info, kwargs = case
    second = {"lr": kwargs["lr"] * 0.5}
    warm, steps = [batch(s) for s in (20, 21)], [batch(s) for s in (30, 31, 32)]

    def prepared() -> tuple[nn.Sequential, torch.optim.Optimizer]:
        model = mlp()
        opt = make_opt(model, info.torch_cls, kwargs, second)
        torch_steps(model, opt, warm)
        return model, opt

    expected = torch_steps(*prepared(), steps)
    ours = inner_steps(higher, *prepared(), steps)
    for t in range(len(steps)):
        assert_lists_close(ours[t], expected[t])


def test_a_nestgrad_optimizer_can_be_passed(float64: None) -> None:
    model = mlp()
    opt = ng.optim.Adam(lr=0.01, groups=[{"params": ["2.*"], "lr": 0.003}])
    steps = [batch(s) for s in (30, 31, 32)]
    reference = mlp()
    expected = torch_steps(reference, make_opt(reference, torch.optim.Adam, {"lr": 0.01}, {"lr": 0.003}), steps)
    ours = inner_steps(higher, model, opt, steps)
    for t in range(len(steps)):
        assert_lists_close(ours[t], expected[t])


def test_parameters_outside_the_optimizer_or_frozen_stay_fixed(float64: None) -> None:
    def run(lib) -> list[Tensor]:
        model = mlp()
        model[2].bias.requires_grad_(False)
        opt = torch.optim.SGD([model[0].weight, model[2].weight, model[2].bias], lr=0.1, momentum=0.5)
        with lib.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for x, y in SUPPORT:
                diffopt.step(mse(fmodel(x), y))
            return list(fmodel.parameters())

    model = mlp()
    ours = run(higher)
    assert torch.equal(ours[1], model[0].bias) and torch.equal(ours[3], model[2].bias)
    assert not torch.allclose(ours[0], model[0].weight) and not torch.allclose(ours[2], model[2].weight)
    assert not ours[3].requires_grad
    need_real_higher()
    assert_lists_close(ours, run(real_higher))


def test_grad_callback_sees_gradients_in_parameter_order(float64: None) -> None:
    def clip(grads: list[Tensor | None]) -> list[Tensor | None]:
        return [None if g is None else g * torch.clamp(0.1 / g.norm(), max=1.0) for g in grads]

    def run(lib) -> list[Tensor]:
        model = mlp()
        with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.5)) as (fmodel, diffopt):
            for x, y in SUPPORT:
                diffopt.step(mse(fmodel(x), y), grad_callback=clip)
            return list(fmodel.parameters())

    ours = run(higher)
    leaves = [p.detach().clone().requires_grad_() for p in mlp().parameters()]
    ps = leaves
    for x, y in SUPPORT:
        ps = [p - 0.5 * g for p, g in zip(ps, clip(torch.autograd.grad(mse(mlp_forward(ps, x), y), ps)))]
    assert_lists_close(ours, ps)
    need_real_higher()
    assert_lists_close(ours, run(real_higher))


def test_fmodel_params_keyword_history_and_names(float64: None) -> None:
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    x, y = batch(0)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu") as (fmodel, diffopt):
        first = diffopt.step(mse(fmodel(x), y))
        second = diffopt.step(mse(fmodel(x), y))
        assert [n for n, _ in fmodel.named_parameters()] == names
        assert fmodel.parameters(time=1) == first and fmodel.parameters() == second == fmodel.fast_params
        other = [p * 2 for p in fmodel.init_fast_params]
        torch.testing.assert_close(fmodel(x, params=other), ng.call(model, dict(zip(names, other)), x))
        assert fmodel.parameters() == other  # as in higher, params= become the current fast weights
        # A submodule, reached as in higher, runs with the fast weights (not the model's own).
        torch.testing.assert_close(fmodel[0](x), x @ other[0].T + other[1])


# ------------------------------------------------------------------- buffers
def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def test_batchnorm_updates_fmodel_buffers_only_like_higher(float64: None) -> None:
    def run(lib) -> tuple[Tensor, dict[str, Tensor], bool]:
        model = bn_model().train()
        with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
            for x, y in SUPPORT:
                diffopt.step(mse(fmodel(x), y))
            fmodel.eval()
            out = fmodel(QUERY[0])
            buffers = {k: v.clone() for k, v in fmodel.named_buffers()}
        assert model.training and model[1].training  # fmodel.eval() left the model's mode alone
        untouched = bn_model()
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), untouched.buffers()))
        return out, buffers

    out, buffers = run(higher)
    assert buffers["1.num_batches_tracked"].item() == len(SUPPORT)
    assert not torch.equal(buffers["1.running_mean"], torch.zeros(6))
    need_real_higher()
    real_out, real_buffers = run(real_higher)
    torch.testing.assert_close(out, real_out, rtol=1e-12, atol=1e-12)
    assert buffers.keys() == real_buffers.keys()
    for k in buffers:
        torch.testing.assert_close(buffers[k], real_buffers[k], rtol=1e-12, atol=1e-12, msg=k)


# ------------------------------------------------------------------- nesting
def linear_forward(ps: Sequence[Tensor], x: Tensor) -> Tensor:
    return x @ ps[0].T + ps[1]


def linear_model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


META_TASKS = [([batch(10 * t + s, 5, 3, 1) for s in range(2)], batch(10 * t + 9, 5, 3, 1)) for t in (1, 2)]
META_VAL = batch(99, 8, 3, 1)


def test_nested_inner_loop_from_outer_fast_weights(float64: None) -> None:
    """Meta-training unrolled: each outer step's loss comes from inner loops started from the
    outer fast weights. d(validation loss)/d(inner lr, outer lr) needs third derivatives."""

    def meta_val_loss(alpha: float | Tensor, beta: float | Tensor) -> Tensor:
        model = linear_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt, override={"lr": [beta]}) as (outer, outer_opt):
            for _ in range(2):
                meta = torch.zeros(())
                for support, (xq, yq) in META_TASKS:
                    ctx = higher.innerloop_ctx(outer, opt, copy_initial_weights=False, override={"lr": [alpha]})
                    with ctx as (inner, inner_opt):
                        assert all(a is b for a, b in zip(inner.init_fast_params, outer.fast_params))
                        for x, y in support:
                            inner_opt.step(mse(inner(x), y))
                        meta = meta + mse(inner(xq), yq)
                outer_opt.step(meta)
            return mse(outer(META_VAL[0]), META_VAL[1])

    def by_hand(alpha: Tensor, beta: Tensor) -> Tensor:
        ps = [p.detach().clone().requires_grad_() for p in linear_model().parameters()]
        for _ in range(2):
            meta = torch.zeros(())
            for support, (xq, yq) in META_TASKS:
                qs = ps
                for x, y in support:
                    grads = torch.autograd.grad(mse(linear_forward(qs, x), y), qs, create_graph=True)
                    qs = [q - alpha * g for q, g in zip(qs, grads)]
                meta = meta + mse(linear_forward(qs, xq), yq)
            grads = torch.autograd.grad(meta, ps, create_graph=True)
            ps = [p - beta * g for p, g in zip(ps, grads)]
        return mse(linear_forward(ps, META_VAL[0]), META_VAL[1])

    alpha, beta = torch.tensor(0.3, requires_grad=True), torch.tensor(0.2, requires_grad=True)
    ours = torch.autograd.grad(meta_val_loss(alpha, beta), (alpha, beta))
    assert_lists_close(ours, torch.autograd.grad(by_hand(alpha, beta), (alpha, beta)))
    fd = [central_fd(lambda a: meta_val_loss(a, 0.2), 0.3), central_fd(lambda b: meta_val_loss(0.3, b), 0.2)]
    assert all(abs(g) > 1e-3 for g in fd)
    for g, expected in zip(ours, fd):
        assert g.item() == pytest.approx(expected, rel=1e-6)

    need_real_higher()  # observed with higher 0.2.1: an inner loop on an fmodel is refused
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with real_higher.innerloop_ctx(model, opt) as (outer, _):
        with pytest.raises(ValueError, match="onkey-patching monkey-patched"):
            with real_higher.innerloop_ctx(outer, opt):
                pass


def test_nested_pipeline_of_two_models_matches_fd_and_higher(float64: None) -> None:
    """The forum's pipeline: A weights model1's loss; model2 trains on model1's outputs; the
    validation loss of model2 is differentiated with respect to A through both inner loops."""

    def pipeline(lib, a: Tensor) -> Tensor:
        torch.manual_seed(0)
        m1, m2 = nn.Linear(4, 3), nn.Linear(3, 2)
        # Not Adam for model1: Adam's step barely depends on the scale of a loss weight.
        opt1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.5)
        opt2 = torch.optim.Adam(m2.parameters(), lr=0.05)
        with lib.innerloop_ctx(m1, opt1) as (f1, d1):
            for x, y in SUPPORT[:2]:
                d1.step((((f1(x) - y) ** 2) * a).mean())
            with lib.innerloop_ctx(m2, opt2) as (f2, d2):
                for s in (5, 6):
                    x, y = batch(s, d_out=2)
                    d2.step(mse(f2(torch.tanh(f1(x))), y))
                xv, yv = batch(7, d_out=2)
                return mse(f2(torch.tanh(f1(xv))), yv)

    a = torch.tensor([1.0, 0.5, 2.0], requires_grad=True)
    (ours,) = torch.autograd.grad(pipeline(higher, a), a)
    for i in range(3):
        fd = central_fd(
            lambda v, i=i: pipeline(higher, torch.cat([a[:i], torch.tensor([v]), a[i + 1 :]]).detach()), a[i].item()
        )
        assert abs(fd) > 1e-4
        assert ours[i].item() == pytest.approx(fd, rel=1e-6)
    need_real_higher()
    (real,) = torch.autograd.grad(pipeline(real_higher, a), a)
    assert_lists_close([ours], [real], tol=1e-5)  # higher's Adam: see the trajectory test


# -------------------------------------------------------------------- errors
def test_unsupported_optimizers_and_bad_overrides_raise_clear_errors() -> None:
    model = mlp()
    with pytest.raises(TypeError, match="SGD, Adam, AdamW, RMSprop"):
        with higher.innerloop_ctx(model, torch.optim.LBFGS(model.parameters())):
            pass

    class MySGD(torch.optim.SGD):
        pass

    with pytest.raises(TypeError, match="Subclasses are not mapped"):
        with higher.innerloop_ctx(model, MySGD(model.parameters(), lr=0.1)):
            pass
    with pytest.raises(ValueError, match=r"not in model\.named_parameters"):
        with higher.innerloop_ctx(model, torch.optim.SGD(mlp().parameters(), lr=0.1)):
            pass
    opt = two_group_sgd(model)
    with pytest.raises(ValueError, match="one per param group"):
        with higher.innerloop_ctx(model, opt, override={"lr": [0.1, 0.2, 0.3]}):
            pass
    with pytest.raises(TypeError, match="'learning_rate'"):
        with higher.innerloop_ctx(model, opt, override={"learning_rate": [0.1]}):
            pass
