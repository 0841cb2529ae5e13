"""examples/seed_pipeline.py, checked: the forum thread's pipeline on tiny Bert2Bert models, in float64.

dL3/dA from every pair of exact methods at the two levels is checked against central finite
differences of L3 and against the other pairs. Both levels train with SGD(momentum), whose
trained weights are smooth in A, so a plain central difference converges (as h²).

``Implicit`` is exact only where its level is trained to an optimum (CG) or to a fixed point
of the optimizer (FixedPoint). The BERT levels take 3-4 steps from random weights and are
nowhere near one, so there Implicit is an approximation, and it says so with a warning. The
example's "probe" variant trains a linear head on M2's frozen decoder, with an L2 penalty,
to convergence (gradient norm ~1e-16 after 300 steps): there Implicit at level 2, after any
exact level 1, matches Unroll and central differences.

Notes:

* ``Forward`` at level 1 works once the token losses are flattened to (N, C) logits: torch
  2.13's 2-D NLL loss (``cross_entropy`` on (N, C, d) logits) raises "grad_input must be
  contiguous" in the double backward that Forward's JVPs use. At level 2, Forward is refused
  by design (M1's ~40k weights are more than ``max_hparams``).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

import nestgrad as ng

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed_pipeline.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("seed_pipeline_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the file executes
    spec.loader.exec_module(module)
    return module


sp = load_example()

EXACT_PAIRS = {
    "unroll/unroll": (ng.Unroll, ng.Unroll),
    "reverse/unroll": (ng.Reverse, ng.Unroll),
    "unroll/reverse": (ng.Unroll, ng.Reverse),
    "reverse/reverse": (ng.Reverse, ng.Reverse),
    "reverse-ckpt/unroll": (lambda: ng.Reverse(checkpoint_every=2), ng.Unroll),
}


pytestmark = pytest.mark.usefixtures("float64_module")


@pytest.fixture(scope="module")
def pipeline(float64_module: None):  # -> sp.Pipeline
    return sp.build(0, torch.float64)


@pytest.fixture(scope="module")
def grads(pipeline) -> dict[str, torch.Tensor]:
    return {name: sp.hypergradient(pipeline, m1(), m2()) for name, (m1, m2) in EXACT_PAIRS.items()}


def test_exact_methods_agree(grads: dict[str, torch.Tensor]) -> None:
    reference = grads["unroll/unroll"]
    assert torch.isfinite(reference).all() and reference.abs().min() > 0
    for name, grad in grads.items():
        rel = (grad - reference).abs().max() / reference.abs().max()
        assert rel <= 1e-10, f"{name}: relative difference {rel.item():.3e} to unroll/unroll"


@pytest.mark.parametrize("name", list(EXACT_PAIRS))
def test_hypergradient_matches_finite_differences(pipeline, grads: dict[str, torch.Tensor], name: str) -> None:
    """Central differences of L3 (computed under no_grad) along the gradient and along a random direction.

    The error is relative to |dL3/dA|, the largest directional derivative. M2's argmax labels
    must be the same at A ± h·v: if one flipped, L3 would jump and the difference would mean nothing.
    """
    pl, grad, h = pipeline, grads[name], 1e-6
    directions = [grad, torch.randn(grad.shape, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        _, labels = sp.run(pl, pl.A, ng.Unroll(), ng.Unroll())
        assert all(y.unique().numel() > 1 for y in labels)  # the argmax labels are not degenerate
        for v in directions:
            v = v / v.norm()
            plus, labels_plus = sp.run(pl, pl.A + h * v, ng.Unroll(), ng.Unroll())
            minus, labels_minus = sp.run(pl, pl.A - h * v, ng.Unroll(), ng.Unroll())
            for y, y_plus, y_minus in zip(labels, labels_plus, labels_minus):
                assert torch.equal(y_plus, y) and torch.equal(y_minus, y)
            central = (plus - minus) / (2 * h)
            err = (central - v @ grad).abs() / grad.norm()
            assert err <= 1e-6, f"{name}: central difference {central.item():.10e} vs v·grad {(v @ grad).item():.10e}"


def test_forward_level1_on_bert(pipeline, grads: dict[str, torch.Tensor]) -> None:
    grad = sp.hypergradient(pipeline, ng.Forward(), ng.Unroll())
    rel = (grad - grads["unroll/unroll"]).abs().max() / grads["unroll/unroll"].abs().max()
    assert rel <= 1e-10


def test_forward_level2_is_refused(pipeline) -> None:
    with pytest.raises(ValueError, match="max_hparams"):
        sp.hypergradient(pipeline, ng.Unroll(), ng.Forward())


@pytest.mark.parametrize("eps", [1e-2, 1e-4])
def test_finite_diff_level2_is_the_one_step_truncation(pipeline, eps: float) -> None:
    """FiniteDiff(eps) at level 2 equals Unroll(truncate=1) there up to O(eps²) (measured: 2.7e-5 at 1e-2)."""
    truncated = sp.hypergradient(pipeline, ng.Unroll(), ng.Unroll(truncate=1))
    approx = sp.hypergradient(pipeline, ng.Unroll(), ng.FiniteDiff(eps=eps))
    rel = (approx - truncated).abs().max() / truncated.abs().max()
    assert rel <= 1e-3 * (eps / 1e-2) ** 2, f"eps={eps}: relative difference {rel.item():.3e}"


@pytest.mark.parametrize(
    "method2", [ng.Unroll, ng.Reverse, lambda: ng.Unroll(truncate=1), lambda: ng.FiniteDiff(eps=1e-3)]
)
def test_argmax_only_is_disconnected_for_exact_methods(pipeline, method2) -> None:
    """M1 reaches M2 only through argmax: nestgrad raises DisconnectedError (a RuntimeError), naming the argmax.

    Unroll raises it from the level-2 ng.train call, Reverse when the gradient is taken; either
    way there is no silent zero gradient.
    """
    with pytest.raises(ng.DisconnectedError, match=r"(?s)not have been used in the graph.*argmax.*m1_outputs"):
        sp.hypergradient(pipeline, ng.Unroll(), method2(), "argmax-only")
    assert issubclass(ng.DisconnectedError, RuntimeError)


def test_argmax_only_zeroth_order_gives_an_estimate(pipeline) -> None:
    """ZerothOrder at level 2 perturbs M1's weights, so the argmax labels flip: a finite, nonzero estimate."""
    grad = sp.hypergradient(pipeline, ng.Unroll(), ng.ZerothOrder(samples=8, sigma=5e-2, seed=0), "argmax-only")
    assert grad.shape == pipeline.A.shape
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_main_runs_and_lowers_L3(capsys: pytest.CaptureFixture[str]) -> None:
    """Four outer Adam steps lower L3 overall (here 4.42 -> 3.57), not monotonically: L3 jumps when labels flip."""
    history = sp.main(["--outer-steps", "4", "--lr", "0.05", "--float64"])
    assert len(history) == 5 and all(map(torch.isfinite, torch.tensor(history)))
    assert history[-1] < history[0], history
    out = capsys.readouterr().out
    assert "final    L3" in out


@pytest.mark.slow
def test_main_argmax_only_with_zeroth_order(capsys: pytest.CaptureFixture[str]) -> None:
    history = sp.main(["--outer-steps", "2", "--variant", "argmax-only", "--method2", "zeroth", "--float64"])
    assert len(history) == 3 and all(map(torch.isfinite, torch.tensor(history)))


def test_main_argmax_only_with_exact_method_exits_with_explanation() -> None:
    with pytest.raises(SystemExit, match="argmax"):
        sp.main(["--outer-steps", "1", "--variant", "argmax-only"])


PROBE_PAIRS = {
    "unroll/implicit-cg": (ng.Unroll, lambda: ng.Implicit(ng.CG(max_steps=100, tol=1e-12))),
    "reverse/implicit-fixed-point": (ng.Reverse, lambda: ng.Implicit(ng.FixedPoint(max_steps=2000, tol=1e-12))),
    "forward/implicit-cg": (ng.Forward, lambda: ng.Implicit(ng.CG(max_steps=100, tol=1e-12))),
    "unroll/reverse": (ng.Unroll, ng.Reverse),
}


@pytest.fixture(scope="module")
def probe_reference(pipeline) -> torch.Tensor:
    return sp.hypergradient(pipeline, ng.Unroll(), ng.Unroll(), "probe")


@pytest.mark.parametrize("name", list(PROBE_PAIRS))
def test_implicit_is_exact_where_the_level_converges(pipeline, probe_reference, name: str) -> None:
    """The "probe" variant: level 2 is a strongly convex head trained to convergence, so Implicit equals Unroll."""
    m1, m2 = PROBE_PAIRS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ng.ConvergenceWarning)  # the solve converges and the optimum is reached
        grad = sp.hypergradient(pipeline, m1(), m2(), "probe")
    assert probe_reference.abs().min() > 0
    rel = (grad - probe_reference).abs().max() / probe_reference.abs().max()
    assert rel <= 1e-9, f"{name}: relative difference {rel.item():.3e} to unroll/unroll"


def test_ng_check_passes_for_implicit_on_the_probe_variant(pipeline) -> None:
    m1, m2 = PROBE_PAIRS["unroll/implicit-cg"]
    result = ng.check(lambda a: sp.run(pipeline, a, m1(), m2(), "probe")[0], pipeline.A.detach().clone(), directions=2)
    assert result.verdict == "passed", str(result)
    assert result.max_error <= 1e-6


def test_implicit_on_an_unconverged_bert_level_warns_that_it_is_approximate(pipeline) -> None:
    """Level 1 takes 4 steps from random weights: Implicit runs, and says the IFT does not hold there."""
    with pytest.warns(ng.ConvergenceWarning, match=r"(?s)only at a true optimum.*train longer"):
        grad = sp.hypergradient(pipeline, ng.Implicit(ng.CG(max_steps=20)), ng.Unroll())
    assert torch.isfinite(grad).all()


def test_main_probe_variant_with_implicit_lowers_L3() -> None:
    history = sp.main(
        ["--outer-steps", "3", "--variant", "probe", "--method2", "implicit", "--float64", "--lr", "0.01"]
    )
    assert len(history) == 4 and history[-1] < history[0], history


@pytest.mark.parametrize("name", ["unroll/unroll", "reverse/reverse"])
def test_ng_check_passes_on_the_seed_pipeline(pipeline, name: str) -> None:
    """The built-in check (autograd vs central differences in random directions) agrees."""
    m1, m2 = EXACT_PAIRS[name]
    result = ng.check(lambda a: sp.run(pipeline, a, m1(), m2())[0], pipeline.A.detach().clone(), directions=2)
    assert result.verdict == "passed", str(result)
    assert result.max_error <= 1e-6


def test_main_forward_at_level2_exits_with_the_limit_and_the_probe_variant() -> None:
    with pytest.raises(SystemExit, match=r"(?s)max_hparams=4096.*--variant probe"):
        sp.main(["--outer-steps", "1", "--method2", "forward"])
