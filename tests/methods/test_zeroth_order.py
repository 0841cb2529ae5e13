"""ZerothOrder (ES / SPSA re-runs): unbiasedness against Unroll with a test that rejects wrong estimators,
training through non-differentiable pseudo-labels, one-sided differences, replay, seeding and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import nestgrad as ng
from nestgrad.methods._zeroth_order import ZerothOrder

pytestmark = pytest.mark.usefixtures("float64")


# ------------------------------------------------- a smooth, stochastic problem
def ridge(seed: int = 0, n: int = 40, d: int = 4):
    """Ridge regression with per-coordinate penalties exp(lam), trained by minibatch SGD with lr a Tensor.

    The minibatches are drawn from the global RNG at every step, so every re-run must replay it.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = X @ torch.randn(d, generator=g) + 0.3 * torch.randn(n, generator=g)
    Xv = torch.randn(n, d, generator=g)
    yv = Xv @ torch.randn(d, generator=g)
    lam = (0.5 * torch.randn(d, generator=g)).requires_grad_()
    lr = torch.tensor(0.1, requires_grad=True)

    def loss_fn(p, idx, lam):
        return ((X[idx] @ p["w"] - y[idx]) ** 2).mean() + (torch.exp(lam) * p["w"] ** 2).sum()

    def outer(method, steps=25):
        w = ng.train(loss_fn, {"w": torch.zeros(d, requires_grad=True)}, ng.optim.SGD(lr=lr, momentum=0.5),
                     lambda t: torch.randint(0, n, (8,)), steps=steps, hparams=lam, method=method)  # fmt: skip
        return ((Xv @ w["w"] - yv) ** 2).mean()

    return outer, [lam, lr]


def exact_and_samples(antithetic: bool, n: int):
    """The exact hypergradient (Unroll) and ``n`` independent one-direction estimates, as rows."""
    outer, wrt = ridge()
    torch.manual_seed(0)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(outer(ng.Unroll()), wrt)])
    torch.manual_seed(0)
    loss = outer(ZerothOrder(samples=1, sigma=1e-3, antithetic=antithetic, seed=1))
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, wrt, retain_graph=True)]) for _ in range(n)]
    return exact, torch.stack(rows)  # each backward pass draws a fresh direction from the method's generator


def z_scores(samples, exact):
    """Per-coordinate z-scores of the sample mean, and the z-score of the projection on the exact direction."""
    n = len(samples)
    z = (samples.mean(0) - exact) / (samples.std(0) / math.sqrt(n))
    unit = exact / exact.norm()
    proj = samples @ unit
    z_proj = (proj.mean() - exact.norm()) / (proj.std() / math.sqrt(n))
    return z, z_proj


@pytest.mark.parametrize("antithetic", [True, False])
def test_estimate_is_unbiased_and_the_test_rejects_wrong_estimators(antithetic):
    exact, samples = exact_and_samples(antithetic, n=300)
    assert exact.abs().min() > 1e-3  # every coordinate (4 penalties and lr) matters
    z, z_proj = z_scores(samples, exact)
    assert z.abs().max() <= 4, z  # |mean - exact| <= 4 std / sqrt(N), per coordinate
    assert abs(z_proj) <= 4, z_proj
    # The same bound, on the same directions, rejects the usual mistakes: a flipped sign, forgetting
    # the 2 of the central difference (2x), or dividing a one-sided difference by 2 sigma (x/2).
    for wrong in (-samples, 2 * samples, samples / 2):
        z, z_proj = z_scores(wrong, exact)
        assert abs(z_proj) > 4 and z.abs().max() > 4, (z, z_proj)


@pytest.mark.parametrize("antithetic", [True, False])
def test_samples_average_the_directions_drawn_one_by_one(antithetic):
    outer, wrt = ridge(1)
    torch.manual_seed(0)
    loss = outer(ZerothOrder(samples=6, sigma=1e-2, antithetic=antithetic, seed=3), steps=8)
    together = torch.autograd.grad(loss, wrt)
    torch.manual_seed(0)
    loss = outer(ZerothOrder(samples=1, sigma=1e-2, antithetic=antithetic, seed=3), steps=8)
    one_by_one = [torch.autograd.grad(loss, wrt, retain_graph=True) for _ in range(6)]
    for i, g in enumerate(together):
        assert torch.allclose(g, sum(o[i] for o in one_by_one) / 6, rtol=1e-10, atol=1e-15)


def test_seed_makes_estimates_reproducible_and_the_global_rng_is_untouched():
    outer, wrt = ridge(2)

    def estimate(method):
        torch.manual_seed(0)
        loss = outer(method, steps=8)
        after = torch.get_rng_state()
        grads = torch.autograd.grad(loss, wrt)
        assert torch.equal(torch.get_rng_state(), after)
        return torch.cat([g.reshape(-1) for g in grads])

    a, b = estimate(ZerothOrder(4, 1e-2, seed=5)), estimate(ZerothOrder(4, 1e-2, seed=5))
    assert torch.equal(a, b)
    assert not torch.allclose(a, estimate(ZerothOrder(4, 1e-2, seed=6)))
    assert not torch.allclose(estimate(ZerothOrder(4, 1e-2)), estimate(ZerothOrder(4, 1e-2)))


def test_iterator_batches_are_replayed_and_only_hparams_that_require_grad_are_perturbed():
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(12, 2, generator=g), torch.randn(12, generator=g)
    hp = {"reg": torch.tensor(0.3, requires_grad=True), "const": torch.tensor(1.0)}
    data = [torch.arange(i, i + 4) for i in range(0, 12, 4)]

    def loss_fn(p, idx, h):
        return h["const"] * ((X[idx] @ p["w"] - y[idx]) ** 2).mean() + h["reg"] * (p["w"] ** 2).sum()

    def grad(method, data):
        params = {"w": torch.zeros(2, requires_grad=True)}
        w = ng.train(loss_fn, params, ng.optim.SGD(lr=0.2), data, steps=6, hparams=hp, method=method)
        outer = (X @ w["w"] - y).pow(2).mean()
        if isinstance(method, ZerothOrder):
            with pytest.raises(RuntimeError):  # the initial weights are not differentiated
                torch.autograd.grad(outer, params["w"], retain_graph=True)
        return torch.autograd.grad(outer, hp["reg"])[0]

    exact = grad(ng.Unroll(), data)
    # The one direction component is reg's, so each sample is exactly eps_i^2 * exact up to O(sigma^2):
    # the estimate is exact * mean(eps_i^2) with the same eps_i as the method draws.
    est = grad(ZerothOrder(50, 1e-4, seed=0), iter(data * 2))
    gen = torch.Generator().manual_seed(0)
    eps = torch.stack([torch.randn((), generator=gen) for _ in range(50)])
    assert torch.allclose(est, exact * (eps**2).mean(), rtol=1e-6)


# ------------------------------------------- a non-differentiable training path
def pseudo_label_problem():
    """A student learns labels that a teacher assigns by argmax, with the teacher's threshold ``lam`` as
    hyperparameter. The labels are piecewise constant in ``lam``: autograd sees no path at all, yet the
    validation loss (whose labels use the threshold 0.5) clearly improves as ``lam`` moves from -0.5 to 0.5."""
    x = torch.linspace(-2, 2, 201)
    feats = torch.stack([x, torch.ones_like(x)], 1)
    xv = torch.linspace(-2, 2, 57)
    feats_v, labels_v = torch.stack([xv, torch.ones_like(xv)], 1), (xv > 0.5).double()

    def bce(logits, labels):  # binary_cross_entropy_with_logits, without its slow float64 CPU kernel
        return (F.softplus(logits) - labels * logits).mean()

    def loss_fn(p, batch, lam):
        teacher = torch.stack([(lam - x) / 0.1, (x - lam) / 0.1], 1)
        labels = teacher.argmax(1).double()  # non-differentiable pseudo-labels
        return bce(feats @ p["w"], labels)

    def outer(lam, method):
        params = {"w": torch.zeros(2, requires_grad=True)}
        w = ng.train(loss_fn, params, ng.optim.SGD(lr=2.0), [None], steps=40, hparams=lam, method=method)
        return bce(feats_v @ w["w"], labels_v)

    return outer


def test_only_zeroth_order_sees_through_argmax_pseudo_labels():
    outer = pseudo_label_problem()
    lam = torch.tensor(-0.51, requires_grad=True)  # halfway between two training points: far from label ties
    with torch.no_grad():  # piecewise constant: the exact derivative is zero
        assert outer(lam - 0.009, None) == outer(lam, None) == outer(lam + 0.009, None)
        h = 0.2
        fd = (outer(lam + h, None) - outer(lam - h, None)) / (2 * h)
    assert fd < -0.5  # but moving the threshold towards 0.5 helps, at the scale of the perturbations
    with pytest.raises(ng.DisconnectedError, match=r"argmax at .*test_zeroth_order.py"):
        outer(lam, ng.Unroll())  # autograd sees no path from lam to the trained weights: an error, not a zero
    (est,) = torch.autograd.grad(outer(lam, ZerothOrder(samples=48, sigma=h, seed=0)), lam)
    assert 0.5 < est / fd < 2, (est, fd)


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("samples", [0, -3, 2.0, True, "8"])
def test_samples_must_be_a_positive_int(samples):
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        ZerothOrder(samples=samples, sigma=0.1)


@pytest.mark.parametrize("sigma", [0, -0.1, math.inf, math.nan, "0.1", True, None])
def test_sigma_must_be_positive(sigma):
    with pytest.raises(ValueError, match="sigma must be a finite float > 0"):
        ZerothOrder(samples=4, sigma=sigma)


def test_antithetic_and_seed_are_checked():
    with pytest.raises(TypeError, match="antithetic must be True or False"):
        ZerothOrder(4, 0.1, antithetic="yes")
    with pytest.raises(TypeError, match="seed must be an int or None"):
        ZerothOrder(4, 0.1, seed=1.5)
    assert repr(ZerothOrder(4, 0.1, seed=2)) == "ZerothOrder(samples=4, sigma=0.1, antithetic=True, seed=2)"


def test_an_exactly_zero_estimate_warns_and_names_sigma():
    """h reaches the weights only through a threshold: perturbations smaller than the gap to it change nothing."""

    def loss_fn(params, batch, h):
        target = (h > 0).to(params["w"].dtype)  # piecewise constant in h
        return (params["w"] - target).square().sum()

    def hypergrad(sigma):
        h = torch.tensor([0.5], requires_grad=True)
        w = ng.train(loss_fn, {"w": torch.zeros(1, requires_grad=True)}, ng.optim.SGD(lr=0.1), [None], steps=5,
                     hparams=h, method=ng.ZerothOrder(samples=8, sigma=sigma, seed=0))  # fmt: skip
        return torch.autograd.grad(w["w"].sum(), h)[0]

    with pytest.warns(RuntimeWarning, match=r"(?s)moved the outer loss by exactly 0.*Raise sigma"):
        assert hypergrad(1e-3).item() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert hypergrad(2.0).item() != 0  # perturbations cross the threshold at 0


# ------------------------------------------------- checkpoints load all or nothing
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda g: g[:100], ValueError, r"'generator' has shape \(100,\), but .* has shape \(5056,\).*truncated"),
        (lambda g: torch.zeros_like(g), ValueError, r"'generator' has the right size but is not a valid state"),
        (lambda g: g.to(torch.int64), TypeError, r"'generator' must be the uint8 Tensor .* got a torch.int64 Tensor"),
    ],
    ids=["truncated", "corrupted", "dtype"],
)
def test_load_state_dict_with_a_bad_generator_state_raises_and_loads_nothing(change, error, match) -> None:
    saved = ng.ZerothOrder(samples=2, sigma=0.1, seed=1).state_dict()
    saved["generator"] = change(saved["generator"])
    method = ng.ZerothOrder(samples=2, sigma=0.1, seed=0)
    before = method.state_dict()["generator"]
    with pytest.raises(error, match=r"^nestgrad\.ZerothOrder\.load_state_dict: " + match):
        method.load_state_dict(saved)
    assert torch.equal(method.state_dict()["generator"], before)  # nothing was loaded


def test_load_state_dict_continues_the_directions() -> None:
    a = ng.ZerothOrder(samples=2, sigma=0.1, seed=3)
    b = ng.ZerothOrder(samples=2, sigma=0.1, seed=4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(torch.randn(5, generator=a._generator), torch.randn(5, generator=b._generator))
