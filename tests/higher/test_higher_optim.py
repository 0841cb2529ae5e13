"""nestgrad.higher.optim: higher's differentiable-optimizer API on nestgrad.optim's rules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import nestgrad as ng
import nestgrad.higher as higher
from nestgrad.higher import optim as hoptim

pytestmark = pytest.mark.usefixtures("float64")


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def batch(seed: int, n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)


def mse(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).mean()


def two_groups(model: nn.Sequential, cls: type, kwargs: dict[str, Any], second: dict[str, Any]) -> Any:
    return cls([{"params": model[0].parameters()}, {"params": model[2].parameters(), **second}], **kwargs)


def central_fd(f: Callable[[float], Tensor], x: float, h: float = 1e-6) -> float:
    return ((f(x + h) - f(x - h)) / (2 * h)).item()


def close(xs: Sequence[Tensor], ys: Sequence[Tensor], tol: float = 1e-12) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


OPTIMIZERS = {
    "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "Adam": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    "AdamW": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    "Adagrad": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    "Adadelta": (torch.optim.Adadelta, {"lr": 0.5}),
    "Adamax": (torch.optim.Adamax, {"lr": 0.01}),
    "ASGD": (torch.optim.ASGD, {"lr": 0.05, "t0": 1}),
    "RMSprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    "Rprop": (torch.optim.Rprop, {"lr": 0.01}),
    "NAdam": (torch.optim.NAdam, {"lr": 0.01}),
    "RAdam": (torch.optim.RAdam, {"lr": 0.01}),
}


def torch_run(cls: type, kwargs: dict[str, Any], warm: int, steps: int) -> list[list[Tensor]]:
    model = mlp()
    opt = two_groups(model, cls, kwargs, {"lr": kwargs["lr"] / 2})
    out = []
    for s in range(warm + steps):
        opt.zero_grad()
        mse(model(*batch(s)[:1]), batch(s)[1]).backward()
        opt.step()
        if s >= warm:
            out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_differentiable_optimizer_follows_torch_optim_from_carried_state(name: str) -> None:
    cls, kwargs = OPTIMIZERS[name]
    expected = torch_run(cls, kwargs, warm=2, steps=3)
    model = mlp()
    opt = two_groups(model, cls, kwargs, {"lr": kwargs["lr"] / 2})
    for s in range(2):  # the torch optimizer has stepped: its state is carried, detached
        opt.zero_grad()
        mse(model(batch(s)[0]), batch(s)[1]).backward()
        opt.step()
    saved = str(opt.state_dict())
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert type(diffopt) is getattr(hoptim, f"Differentiable{name}")
        ours = [[p.detach() for p in diffopt.step(mse(fmodel(batch(s)[0]), batch(s)[1]))] for s in range(2, 5)]
    for t in range(3):
        close(ours[t], expected[t])
    assert str(opt.state_dict()) == saved  # the torch optimizer is untouched


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam"])
def test_hypergradient_wrt_initial_weights_matches_central_differences(name: str) -> None:
    cls, kwargs = OPTIMIZERS[name]
    model = mlp()
    w0 = model[2].bias.detach().clone()

    def val_loss(bias: Tensor) -> Tensor:
        with torch.no_grad():
            model[2].bias.copy_(bias)
        with higher.innerloop_ctx(model, cls(model.parameters(), **kwargs), copy_initial_weights=False) as (f, d):
            for s in range(3):
                d.step(mse(f(batch(s)[0]), batch(s)[1]))
            return mse(f(batch(9)[0]), batch(9)[1])

    (grad,) = torch.autograd.grad(val_loss(w0), model[2].bias)
    for i in range(2):
        e = torch.zeros_like(w0)
        e[i] = 1.0
        fd = central_fd(lambda h, e=e: val_loss(w0 + h * e).detach(), 0.0)
        assert abs(fd) > 1e-4
        assert grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_maml_reaches_model_parameters_as_a_hand_written_unroll() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for s in range(3):
            diffopt.step(mse(fmodel(batch(s)[0]), batch(s)[1]))
        meta = mse(fmodel(batch(9)[0]), batch(9)[1])
    ours = torch.autograd.grad(meta, list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    ps = list(model.parameters())
    for s in range(3):
        gs = torch.autograd.grad(
            mse(ng.call(model, dict(zip(names, ps)), batch(s)[0]), batch(s)[1]), ps, create_graph=True
        )
        ps = [p - 0.3 * g for p, g in zip(ps, gs)]
    by_hand = torch.autograd.grad(
        mse(ng.call(model, dict(zip(names, ps)), batch(9)[0]), batch(9)[1]), list(model.parameters())
    )
    assert all(g.abs().sum() > 0 for g in ours)
    close(ours, by_hand)
    # copy_initial_weights=True: nothing reaches the model's own weights.
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(batch(0)[0]), batch(0)[1]))
        meta = mse(fmodel(batch(9)[0]), batch(9)[1])
    assert all(g is None for g in torch.autograd.grad(meta, list(model.parameters()), allow_unused=True))


def test_override_of_lr_and_momentum_with_learnable_tensors_matches_finite_differences() -> None:
    def val_loss(lr: Any, momentum: Any, at_step: bool = False) -> Tensor:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.0)
        override = {"lr": [lr], "momentum": [momentum]}
        with higher.innerloop_ctx(model, opt, override=None if at_step else override) as (fmodel, diffopt):
            for s in range(3):
                diffopt.step(mse(fmodel(batch(s)[0]), batch(s)[1]), override=override if at_step else None)
            return mse(fmodel(batch(9)[0]), batch(9)[1])

    lr, mom = torch.tensor(0.1, requires_grad=True), torch.tensor(0.6, requires_grad=True)
    ours = torch.autograd.grad(val_loss(lr, mom), (lr, mom))
    # Given at step() instead (momentum 0 -> a Tensor needs a momentum buffer from then on).
    close(ours, torch.autograd.grad(val_loss(lr, mom, at_step=True), (lr, mom)))
    fd = [central_fd(lambda v: val_loss(v, 0.6), 0.1), central_fd(lambda v: val_loss(0.1, v), 0.6)]
    assert all(abs(f) > 1e-3 for f in fd)
    for g, f in zip(ours, fd):
        assert g.item() == pytest.approx(f, rel=1e-6)


def test_track_higher_grads_false_is_first_order_and_same_trajectory() -> None:
    def run(track: bool) -> tuple[list[Tensor], Any]:
        model = mlp()
        with higher.innerloop_ctx(model, torch.optim.Adam(model.parameters(), lr=0.01), track_higher_grads=track) as (
            fmodel,
            diffopt,
        ):
            for s in range(3):
                new = diffopt.step(mse(fmodel(batch(s)[0]), batch(s)[1]))
            return new, diffopt

    tracked, _ = run(True)
    first, diffopt = run(False)
    close([p.detach() for p in tracked], first)
    assert all(p.grad_fn is not None for p in tracked)
    assert all(p.grad_fn is None and p.requires_grad for p in first)
    assert all(
        t.grad_fn is None for entry in diffopt.state[0].values() for t in entry.values() if isinstance(t, Tensor)
    )


def test_param_groups_with_different_lrs_and_state_layout() -> None:
    expected = torch_run(torch.optim.SGD, {"lr": 0.2, "momentum": 0.5}, warm=0, steps=2)
    model = mlp()
    opt = two_groups(model, torch.optim.SGD, {"lr": 0.2, "momentum": 0.5}, {"lr": 0.1})
    fmodel = higher.monkeypatch(model)
    diffopt = higher.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    assert [g["lr"] for g in diffopt.param_groups] == [0.2, 0.1]
    assert diffopt._group_to_param_list == [[0, 1], [2, 3]]
    outs = [diffopt.step(mse(fmodel(batch(s)[0]), batch(s)[1])) for s in range(2)]
    close([p.detach() for p in outs[-1]], expected[-1], tol=1e-15)
    assert outs[-1] == fmodel.parameters()
    entry = diffopt.state[1][0]  # group 1, first parameter: model[2].weight
    assert entry["step"] == 2 and entry["momentum_buffer"].shape == model[2].weight.shape
    # Without an fmodel, params must be passed to step.
    bare = higher.get_diff_optim(opt, model.parameters())
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    new = bare.step(
        mse(ng.call(model, dict(zip([n for n, _ in model.named_parameters()], params)), batch(0)[0]), batch(0)[1]),
        params=params,
    )
    close([p.detach() for p in new], [p.detach() for p in outs[0]])
    with pytest.raises(ValueError, match="params must be passed"):
        bare.step(new[0].sum())


def test_user_modified_state_and_param_groups_take_effect() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(batch(0)[0]), batch(0)[1]))
        before = [p.detach() for p in fmodel.parameters()]
        for entry in diffopt.state[0].values():
            entry["momentum_buffer"] = torch.zeros_like(entry["momentum_buffer"])
        diffopt.param_groups[0]["lr"] = 0.0
        after = diffopt.step(mse(fmodel(batch(1)[0]), batch(1)[1]))
    close([p.detach() for p in after], before)


def test_register_optim_with_a_user_optimizer_in_highers_style() -> None:
    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params: Any, lr: float = 0.01) -> None:
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure: Any = None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        state = self.state[p]
                        state["count"] = state.get("count", 0) + 1
                        p.add_(p.grad.sign(), alpha=-group["lr"])

    class DifferentiableSignSGD(hoptim.DifferentiableOptimizer):
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                    if g is None:
                        continue
                    state = self.state[group_idx][p_idx]
                    state["count"] = state.get("count", 0) + 1
                    group["params"][p_idx] = p - group["lr"] * kwargs.get("scale", 1.0) * torch.tanh(g / 1e-3)

    model = mlp()
    opt = SignSGD(model.parameters(), lr=0.05)
    with pytest.raises(TypeError, match="register_optim"):
        higher.get_diff_optim(opt, model.parameters())
    higher.register_optim(SignSGD, DifferentiableSignSGD)
    try:
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            assert isinstance(diffopt, DifferentiableSignSGD)
            new = diffopt.step(mse(fmodel(batch(0)[0]), batch(0)[1]), scale=2.0)
            assert diffopt.state[0][0]["count"] == 1
        reference = mlp()
        mse(reference(batch(0)[0]), batch(0)[1]).backward()
        expected = [p.detach() - 0.1 * torch.tanh(p.grad / 1e-3) for p in reference.parameters()]
        close([p.detach() for p in new], expected)
    finally:
        del hoptim._opt_mapping[SignSGD]
    with pytest.raises(TypeError, match="DifferentiableOptimizer"):
        higher.register_optim(SignSGD, object)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="class, not an instance"):
        higher.register_optim(opt, DifferentiableSignSGD)  # type: ignore[arg-type]


def test_trainable_opt_params_round_trip_and_learn() -> None:
    model = mlp()
    opt = two_groups(model, torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99)}, {"lr": 0.003})
    override = hoptim.get_trainable_opt_params(opt)
    assert set(override) == {"lr", "betas", "eps", "weight_decay"}  # flags and None are not trainable
    assert override["lr"][1].item() == 0.003 and override["lr"][1].requires_grad
    assert isinstance(override["betas"][0], tuple) and override["betas"][0][1].item() == 0.99
    with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for s in range(2):
            diffopt.step(mse(fmodel(batch(s)[0]), batch(s)[1]))
        loss = mse(fmodel(batch(9)[0]), batch(9)[1])
    grads = torch.autograd.grad(loss, [override["lr"][0], override["betas"][1][0]])
    assert all(torch.isfinite(g) and g != 0 for g in grads)
    with torch.no_grad():
        override["lr"][0].fill_(0.5)
    other = two_groups(mlp(), torch.optim.Adam, {"lr": 1.0}, {"lr": 2.0})
    hoptim.apply_trainable_opt_params(other, override)
    assert [g["lr"] for g in other.param_groups] == [0.5, 0.003]
    assert other.param_groups[0]["betas"] == (0.8, 0.99) and type(other.param_groups[0]["eps"]) is float
    with pytest.raises(ValueError, match="one per param group"):
        hoptim.apply_trainable_opt_params(other, {"lr": [0.1, 0.2, 0.3]})


def test_grad_callback_at_construction_and_at_step() -> None:
    seen: list[list[Any]] = []

    def halve(grads: list[Tensor | None]) -> list[Tensor | None]:
        seen.append(grads)
        return [None if g is None else g / 2 for g in grads]

    def run(**kw: Any) -> list[Tensor]:
        model = mlp()
        model[0].bias.requires_grad_(False)
        opt = torch.optim.SGD([model[0].weight, *model[2].parameters()], lr=0.2)
        fmodel = higher.monkeypatch(model)
        diffopt = higher.get_diff_optim(opt, model.parameters(), fmodel=fmodel, grad_callback=kw.get("init"))
        return diffopt.step(mse(fmodel(batch(0)[0]), batch(0)[1]), grad_callback=kw.get("step"))

    plain, at_init, at_step = run(), run(init=halve), run(step=halve)
    assert len(seen) == 2 and seen[0][1] is None and len(seen[0]) == 4  # frozen bias: None, in order
    close(at_init, at_step)
    model = mlp()
    base = list(model.parameters())
    close(
        [p.detach() - b.detach() for p, b in zip(at_init, base)],
        [(p.detach() - b.detach()) / 2 for p, b in zip(plain, base)],
    )
    model = mlp()
    fmodel = higher.monkeypatch(model)
    diffopt = higher.get_diff_optim(torch.optim.SGD(model.parameters(), lr=0.1), model.parameters(), fmodel=fmodel)
    with pytest.raises(ValueError, match="one gradient"):
        diffopt.step(fmodel(batch(0)[0]).sum(), grad_callback=lambda g: g[:1])


def test_create_diff_optim_from_fmodel_and_from_param_groups() -> None:
    model = mlp()
    fmodel = higher.monkeypatch(model)
    diffopt = hoptim.create_diff_optim(torch.optim.Adam, {"lr": 0.01}, fmodel=fmodel)
    assert isinstance(diffopt, hoptim.DifferentiableAdam)
    new = [p.detach() for p in diffopt.step(mse(fmodel(batch(0)[0]), batch(0)[1]))]
    reference = mlp()
    ropt = torch.optim.Adam(reference.parameters(), lr=0.01)
    mse(reference(batch(0)[0]), batch(0)[1]).backward()
    ropt.step()
    close(new, [p.detach() for p in reference.parameters()])
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    grouped = hoptim.create_diff_optim(
        torch.optim.SGD, {"lr": 0.1}, params=[{"params": params[:2], "lr": 0.0}, {"params": params[2:]}]
    )
    out = grouped.step(sum((p**2).sum() for p in params), params=params)
    close(out[:2], params[:2])
    close(out[2:], [p * 0.8 for p in params[2:]])
    with pytest.raises(ValueError, match=r"give params \(the fast weights, for their shapes\) or fmodel"):
        hoptim.create_diff_optim(torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(ValueError, match="LBFGS"):
        hoptim.create_diff_optim(torch.optim.LBFGS, params=params)


def test_sgd_rounding_is_highers_in_nestgrad_higher_and_torchs_in_nestgrad_optim() -> None:
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(1)
    model = nn.Linear(64, 64)
    x = torch.randn(32, 64)
    grads = torch.autograd.grad(model(x).pow(2).mean(), list(model.parameters()))
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.01)) as (fmodel, diffopt):
        ours = diffopt.step(fmodel(x).pow(2).mean())
    by_hand = [p - 0.01 * g for p, g in zip(model.parameters(), grads)]
    assert all(torch.equal(a, b) for a, b in zip(ours, by_hand))  # bit for bit, as higher
    fused = [torch.add(p, g, alpha=-0.01) for p, g in zip(model.parameters(), grads)]
    names = [n for n, _ in model.named_parameters()]
    params = dict(zip(names, [p.detach() for p in model.parameters()]))
    for unfused, target in ((False, fused), (True, by_hand)):
        opt = ng.optim.SGD(lr=0.01, unfused_add=unfused)
        new, _ = opt.update(dict(zip(names, grads)), opt.init(params), params)
        assert all(torch.equal(new[n], t.detach()) for n, t in zip(names, target))
    # torch.optim.SGD rounds as nestgrad.optim.SGD's default; passing that optimizer keeps it.
    with higher.innerloop_ctx(model, ng.optim.SGD(lr=0.01)) as (fmodel, diffopt):
        ours = diffopt.step(fmodel(x).pow(2).mean())
    assert all(torch.equal(a, b) for a, b in zip(ours, fused))
    with pytest.raises(TypeError, match="unfused_add must be True or False"):
        ng.optim.SGD(unfused_add=1)  # type: ignore[arg-type]


def test_misuse_raises_clear_errors() -> None:
    model = mlp()
    opt = two_groups(model, torch.optim.SGD, {"lr": 0.1}, {"lr": 0.2})
    with pytest.raises(TypeError, match=r"torch\.optim\.SGD, Adam") as info:
        higher.get_diff_optim(torch.optim.LBFGS(model.parameters()), model.parameters())
    assert isinstance(info.value, ValueError)  # higher raises ValueError here
    with pytest.raises(ValueError, match="not in reference_params"):
        higher.get_diff_optim(opt, mlp().parameters())
    with pytest.raises(ValueError, match="one per param group"):
        higher.get_diff_optim(opt, model.parameters(), override={"lr": [0.1, 0.2, 0.3]})
    with pytest.raises(TypeError, match="dict of hyperparameter name"):
        higher.get_diff_optim(opt, model.parameters(), override=[0.1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'lrr', which is not a hyperparameter of SGD"):
        higher.get_diff_optim(opt, model.parameters(), override={"lrr": [0.1]})
    with pytest.raises(TypeError, match=r"must be a torch\.optim optimizer"):
        hoptim.DifferentiableSGD(object(), model.parameters())  # type: ignore[arg-type]
    fmodel = higher.monkeypatch(model)
    diffopt = higher.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    with pytest.raises(ValueError, match="requires grad"):
        diffopt.step(torch.tensor(1.0))
    with pytest.raises(ValueError, match="must be a scalar"):
        diffopt.step(fmodel(batch(0)[0]))
    with pytest.raises(ValueError, match="list of 4 Tensors"):
        diffopt.step(fmodel(batch(0)[0]).sum(), params=list(fmodel.parameters())[:2])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        diffopt.step(fmodel(batch(0)[0]).sum(), override={"lr": [-1.0]})
    with pytest.raises(ValueError, match="has groups, which name parameters"):
        higher.get_diff_optim(ng.optim.SGD(lr=0.1, groups=[{"params": ["0.*"], "lr": 0.2}]), model.parameters())
