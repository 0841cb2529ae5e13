"""nestgrad.optim against torch.optim itself, in float64.

1. Trajectories: 40+ steps of a digits MLP match torch.optim to 1e-10 relative, for every
   optimizer over a grid of flags, with both the foreach and the per-tensor back end.
2. Meta-gradients of the final loss w.r.t. hyperparameters match central finite
   differences of torch.optim's own trajectory to 1e-6.
3. torch.autograd.gradcheck of one step w.r.t. params, grads, state and hyperparameters.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import nestgrad as ng
from optim_db import OPTIMIZERS, OptimInfo, case_id, cases

STEPS = 45


pytestmark = pytest.mark.usefixtures("float64")


def mlp(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def loss_of(p: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(mlp(p, x), y)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X[:256, X[:256].std(0) > 0]  # drop blank pixels: no exactly-zero gradients (see the eps_root test)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    return X, torch.tensor(y[:256])


def init_params(hidden: int = 16, seed: int = 0, inputs: int = 54) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(inputs, hidden, generator=g, dtype=torch.float64) * 0.3,
        "b1": torch.zeros(hidden, dtype=torch.float64),
        "w2": torch.randn(hidden, 10, generator=g, dtype=torch.float64) * 0.3,
        "b2": torch.randn(10, generator=g, dtype=torch.float64) * 0.1,
    }


def batch(digits, t: int, size: int = 32):
    X, y = digits
    i = (t * size) % len(X)
    return X[i : i + size], y[i : i + size]


def torch_trajectory(torch_cls, kwargs: dict[str, Any], digits, steps: int, params=None) -> list[dict]:
    leaves = {k: v.clone().requires_grad_() for k, v in (params or init_params()).items()}
    opt = torch_cls(list(leaves.values()), foreach=False, **kwargs)
    out = []
    for t in range(steps):
        opt.zero_grad()
        loss_of(leaves, batch(digits, t)).backward()
        opt.step()
        out.append({k: v.detach().clone() for k, v in leaves.items()})
    return out


def ours_trajectory(opt: ng.optim.Optimizer, digits, steps: int, params=None) -> list[dict]:
    p = dict(params or init_params())
    state = opt.init(p)
    out = []
    for t in range(steps):
        with torch.enable_grad():
            q = {k: v.detach().requires_grad_() for k, v in p.items()}
            grads = torch.autograd.grad(loss_of(q, batch(digits, t)), list(q.values()))
        p, state = opt.update(dict(zip(q, grads, strict=True)), state, p)
        out.append(p)
    return out


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300)).item() for k in b)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_trajectory_matches_torch_optim(case, foreach, digits):
    info, kwargs = case
    ref = torch_trajectory(info.torch_cls, kwargs, digits, STEPS)
    ours = ours_trajectory(info.ours(**kwargs, foreach=foreach), digits, STEPS)
    moved = max_rel(ref[-1], init_params())
    assert moved > 1e-3, "the reference barely trained: the comparison would prove nothing"
    for t in range(STEPS):
        assert max_rel(ours[t], ref[t]) <= 1e-10, f"diverged from torch.optim at step {t + 1}"


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_foreach_equals_per_tensor(case, digits):
    info, kwargs = case
    a = ours_trajectory(info.ours(**kwargs, foreach=True), digits, 10)[-1]
    b = ours_trajectory(info.ours(**kwargs, foreach=False), digits, 10)[-1]
    assert max_rel(a, b) <= 1e-13


def tensor_hparams_trajectory(info: OptimInfo, kwargs, digits, steps, requires_grad: bool):
    def as_tensor(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return v
        return torch.tensor(float(v), requires_grad=requires_grad)

    targs = {k: tuple(as_tensor(x) for x in v) if isinstance(v, tuple) else as_tensor(v) for k, v in kwargs.items()}
    if info.ours is ng.optim.ASGD:
        targs["t0"] = kwargs.get("t0", 1e6)  # t0 is a step count
    return ours_trajectory(info.ours(**targs), digits, steps)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["tensor", "tensor-requires-grad"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_tensor_hparams_follow_the_same_trajectory(info, requires_grad, digits):
    kwargs = {**info.base, **info.meta_base}
    ref = torch_trajectory(info.torch_cls, kwargs, digits, 20)
    ours = tensor_hparams_trajectory(info, kwargs, digits, 20, requires_grad)
    assert max_rel(ours[-1], ref[-1]) <= 1e-10


# ------------------------------------------------------------- meta-gradients
META_STEPS = 12


def _name(key) -> str:
    return key[0] if isinstance(key, tuple) else key


def _get(kwargs, key):
    return kwargs[key[0]][key[1]] if isinstance(key, tuple) else kwargs[key]


def _set(kwargs, key, value):
    out = dict(kwargs)
    if isinstance(key, tuple):
        pair = list(out[key[0]])
        pair[key[1]] = value
        out[key[0]] = tuple(pair)
    else:
        out[key] = value
    return out


def _defaults(cls) -> dict[str, Any]:
    import inspect

    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def final_loss_torch(info, kwargs, digits):
    p = torch_trajectory(info.torch_cls, kwargs, digits, META_STEPS)[-1]
    return loss_of(p, batch(digits, 99, 64)).item()


@pytest.mark.parametrize(
    "info, key",
    [(info, key) for info in OPTIMIZERS for key in info.meta],
    ids=lambda x: x.name if isinstance(x, OptimInfo) else str(x),
)
def test_meta_gradient_matches_finite_differences_of_torch_optim(info, key, digits):
    kwargs = {**info.base, **info.meta_base}
    value = _get({**_defaults(info.ours), **kwargs}, key)
    kwargs = _set({**_defaults(info.torch_cls), **kwargs}, key, value)
    kwargs = {k: v for k, v in kwargs.items() if k in _defaults(info.ours) and k not in ("foreach",)}
    hp = torch.tensor(float(value), requires_grad=True)
    # A 32-example batch can leave a pixel blank, so a gradient entry can be exactly 0: the
    # default eps_root keeps the meta-gradient finite there (see test_eps_root_*).
    params = {k: v.requires_grad_() for k, v in init_params().items()}
    ours = ng.train(
        lambda p, b, _: loss_of(p, b),
        params,
        info.ours(**_set(kwargs, key, hp)),
        lambda t: batch(digits, t),
        steps=META_STEPS,
    )
    (g,) = torch.autograd.grad(loss_of(ours, batch(digits, 99, 64)), hp)
    h = 1e-4 * abs(value)
    if _name(key) in ("betas", "rho", "alpha"):
        h = min(h, 1e-4 * (1 - value))  # small against the distance to 1
    fd = (
        final_loss_torch(info, _set(kwargs, key, value + h), digits)
        - final_loss_torch(info, _set(kwargs, key, value - h), digits)
    ) / (2 * h)
    assert abs(fd) > 1e-8, "the hyperparameter has no effect: the test would prove nothing"
    assert abs(g.item() - fd) <= 1e-6 * max(abs(fd), 1e-3), f"autograd {g.item()} vs central FD {fd}"


# ----------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_gradcheck_one_step(case, foreach):
    info, kwargs = case
    g = torch.Generator().manual_seed(1)
    params = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}
    base = {**_defaults(info.ours), **kwargs}
    base = {k: v for k, v in base.items() if k not in ("groups", "foreach")}
    # A hyperparameter equal to 0 switches its feature off (and its state slot), as in torch.
    hp_keys = [k for k in info.meta if _get(base, k) != 0]
    opt0 = info.ours(**base, foreach=foreach)
    state = opt0.init(params)
    for _ in range(3):  # step 4 takes the general branch of every rule
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        params, state = opt0.update(grads, state, params)
    # Slots of order 1 and away from 0, so that finite differences of gradcheck neither cross
    # a kink (Rprop's sign, amsgrad's max) nor swamp a tiny accumulator.
    # RMSprop's centered variance needs square_avg > grad_avg**2.
    scale = {"grad_avg": 0.1}
    slots = {
        s: {n: (torch.rand(v.shape, generator=g) + 0.5) * scale.get(s, 1.0) for n, v in d.items()}
        for s, d in state.slots.items()
    }
    state = ng.optim.OptState(state.step, slots)
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    slot_keys = [(s, n) for s in state.slots for n in state.slots[s]]
    names = list(params)
    # gradcheck perturbs each input by 1e-6, which takes eps=1e-8 below 0, out of its range:
    # build the optimizer once with valid values and swap the perturbed Tensors in, as the
    # hypergradient methods do (with_tensors does not re-check values).
    hp0 = [torch.tensor(float(_get(base, k))) for k in hp_keys]
    template_kwargs = base
    for k, x in zip(hp_keys, hp0, strict=True):
        template_kwargs = _set(template_kwargs, k, x)
    template = info.ours(**template_kwargs, foreach=foreach)
    position = {id(x): i for i, x in enumerate(hp0)}
    order = [position[id(x)] for x in template.tensors()]

    def one_step(*flat):
        i = 0
        p = dict(zip(names, flat[i : i + len(names)], strict=True))
        i += len(names)
        gr = dict(zip(names, flat[i : i + len(names)], strict=True))
        i += len(names)
        slots: dict[str, dict[str, torch.Tensor]] = {}
        for s, n in slot_keys:
            slots.setdefault(s, {})[n] = flat[i]
            i += 1
        hps = flat[i:]
        opt = template.with_tensors([hps[j] for j in order])
        new_p, new_state = opt.update(gr, ng.optim.OptState(state.step, slots), p)
        return (*new_p.values(), *(new_state.slots[s][n] for s, n in slot_keys))

    inputs = [
        *params.values(),
        *grads.values(),
        *(state.slots[s][n] for s, n in slot_keys),
        *(torch.tensor(float(_get(base, k))) for k in hp_keys),
    ]
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(one_step, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "cls", [ng.optim.Adam, ng.optim.AdamW, ng.optim.NAdam, ng.optim.RAdam, ng.optim.RMSprop, ng.optim.Adagrad]
)
def test_eps_root_keeps_meta_gradients_finite_when_a_gradient_is_exactly_zero(cls):
    # The second input is always 0 (like the blank border pixels of digits), so the gradient
    # of the second weight is exactly 0 and v stays exactly 0 there.
    x = torch.tensor([1.0, 0.0])
    lr = torch.tensor(0.1, requires_grad=True)

    def loss_fn(p, batch, _):
        return ((p["w"] * x).sum() - 3.0) ** 2

    def meta_grad(eps_root: float, check_finite: bool = True) -> torch.Tensor:
        p = {"w": torch.tensor([0.5, 0.5], requires_grad=True)}
        extra = {"betas": (0.9, 0.9)} if cls is ng.optim.RAdam else {}  # reach RAdam's adaptive branch
        opt = cls(lr=lr, eps_root=eps_root, **extra)
        out = ng.train(loss_fn, p, opt, [None], steps=8, check_finite=check_finite)
        return torch.autograd.grad(loss_fn(out, None, None), lr)[0]

    assert torch.isnan(meta_grad(0.0, check_finite=False)), "expected the documented NaN without eps_root"
    with pytest.raises(ng.NonFiniteError, match="eps_root"):  # which nestgrad.train reports by default
        meta_grad(0.0)
    g = meta_grad(1e-30)
    assert torch.isfinite(g) and g != 0
    assert cls().defaults["eps_root"] == 1e-30  # the default is the safe one


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_float64_results_do_not_depend_on_the_default_dtype(case, digits):
    """float64 weights train the same, bit for bit, whatever the default dtype: no constant made inside an
    update may take the default dtype (Rprop's step-size factors were float32 under a float32 default)."""
    info, kwargs = case
    ref = ours_trajectory(info.ours(**kwargs), digits, 10)[-1]  # under the float64 fixture
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        got = ours_trajectory(info.ours(**kwargs), digits, 10)[-1]
    finally:
        torch.set_default_dtype(previous)
    for k in ref:
        assert got[k].dtype is torch.float64
        assert torch.equal(got[k], ref[k]), f"{k} differs by {max_rel(got, ref):.2e} under a float32 default"
