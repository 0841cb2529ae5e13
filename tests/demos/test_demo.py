"""``nestgrad demo``: data hyper-cleaning on digits (``--levels 2``) and teacher->student (``--levels 3``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import nestgrad as ng
from nestgrad.demos import _cli, _demo, _demo3


def test_load_data_split_and_exactly_half_the_labels_flipped():
    data = _demo.load_data(seed=0)
    assert len(data.y_train) == len(data.y_train_clean) == len(data.flipped) == 1000
    assert len(data.y_val) == 300
    assert len(data.y_test) == 1797 - 1300
    assert data.x_train.shape == (1000, 64) and data.x_val.shape == (300, 64) and data.x_test.shape == (497, 64)

    assert int(data.flipped.sum()) == 500
    # A flipped label is always a different class; the others are untouched.
    assert torch.equal(data.y_train != data.y_train_clean, data.flipped)
    assert data.y_train.min() >= 0 and data.y_train.max() <= 9

    # Standardized with training statistics: the training features have mean 0.
    assert data.x_train.mean(dim=0).abs().max() < 1e-4
    assert torch.isfinite(data.x_test).all() and data.x_test.abs().max() < 100

    again, other = _demo.load_data(seed=0), _demo.load_data(seed=1)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_train, data.y_train)
    assert not torch.equal(other.y_train_clean, data.y_train_clean)


def test_detection_scores_by_hand():
    weights = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.05])
    flipped = torch.tensor([True, False, False, True, True])
    scores = _demo.detection_scores(weights, flipped)  # flags examples 0, 2 and 4
    assert scores["flagged"] == 3
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)


def test_learn_weights_hypergradient_is_nonzero_and_separates_flipped_labels():
    data = _demo.load_data(seed=1)
    cleaning = _demo.learn_weights(data, steps=3, progress=False)
    weights = cleaning.weights
    assert weights.shape == (1000,)
    assert not torch.allclose(weights, torch.full_like(weights, _demo.INIT_WEIGHT))
    assert weights[data.flipped].mean() < weights[~data.flipped].mean()
    assert len(cleaning.val_loss) == len(cleaning.test_accuracy) == 3


def test_online_weights_are_learned_through_warm_started_segments():
    data = _demo.load_data(0)
    cleaning = _demo.learn_weights_online(data, steps=30, progress=False)
    weights = cleaning.weights
    assert weights.shape == (1000,)
    assert weights[data.flipped].mean() < 0.45 < 0.55 < weights[~data.flipped].mean()
    assert len(cleaning.val_loss) == len(cleaning.test_accuracy) == 30
    assert cleaning.val_loss[-1] < 0.5 * cleaning.val_loss[0]
    # The classifier is warm-started, not retrained: its test accuracy climbs over the outer steps.
    assert cleaning.test_accuracy[-1] > cleaning.test_accuracy[0] + 0.3


def test_online_hypergradient_is_the_gradient_through_the_last_k_steps():
    """One outer step of the online mode equals a hand-written k-step unroll from the same warm start."""
    data = _demo.load_data(0)
    recipe = _demo.DEFAULT_RECIPE
    model = recipe.model(0)
    n = 1000
    x, y, _ = _demo.inner_data(data, torch.ones(n))
    logits = torch.randn(n, dtype=torch.float64, requires_grad=True)
    model = model.double()
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    inner = ng.optim.SGD(lr=recipe.lr, momentum=recipe.momentum)
    state = inner.init(params)
    idx = [torch.arange(i * 50, i * 50 + 50) for i in range(3)]
    x64 = x.double()

    def loss_fn(p, batch, w):
        xb, yb, i = batch
        return (w[i] * F.cross_entropy(ng.call(model, p, xb), yb, reduction="none")).sum() / len(i)

    # Warm start: 4 steps first, then the 3-step segment the hypergradient goes through.
    weights = torch.cat([torch.sigmoid(logits), torch.ones(300, dtype=torch.float64)])
    warm = [(x64[i + 600], y[i + 600], i + 600) for i in idx] + [(x64[idx[0]], y[idx[0]], idx[0])]
    params, state = ng.train(
        loss_fn, params, inner, warm, steps=4, hparams=weights.detach(), state=state, return_state=True
    )
    segment = [(x64[i], y[i], i) for i in idx]
    trained = ng.train(loss_fn, params, inner, segment, steps=3, hparams=weights, state=state)
    val = F.cross_entropy(ng.call(model, trained, data.x_val.double()), data.y_val)
    (got,) = torch.autograd.grad(val, logits)

    # By hand: momentum SGD, buffers from the warm-started state, unrolled with autograd.
    weights = torch.cat([torch.sigmoid(logits), torch.ones(300, dtype=torch.float64)])
    w = {k: v.clone().requires_grad_() for k, v in params.items()}
    buf = {k: state.slots["momentum_buffer"][k].clone() for k in params}
    p = dict(w)
    for xb, yb, i in segment:
        g = torch.autograd.grad(loss_fn(p, (xb, yb, i), weights), list(p.values()), create_graph=True)
        for (k, v), gk in zip(list(p.items()), g):
            buf[k] = recipe.momentum * buf[k] + gk
            p[k] = v - recipe.lr * buf[k]
    val_ref = F.cross_entropy(ng.call(model, p, data.x_val.double()), data.y_val)
    (want,) = torch.autograd.grad(val_ref, logits)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert got.abs().max() > 0


def test_run_few_steps(tmp_path: Path):
    results = _demo.run(steps=8, seed=0, out=tmp_path / "out", progress=False, mode="full")

    weights, flipped = results["weights"], results["flipped"]
    assert int(flipped.sum()) == 500
    # After a few outer steps the flipped examples already weigh less than the clean ones.
    assert weights[flipped].mean() < weights[~flipped].mean() - 0.2
    # The outer loop lowers the validation loss.
    assert len(results["val_loss"]) == 8
    assert results["val_loss"][-1] < results["val_loss"][0]

    acc = results["accuracy"]
    assert set(acc) == {"noisy", "val_only", "oracle", "nestgrad"}
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert acc["oracle"] > acc["noisy"]
    assert 0.0 <= results["detection"]["f1"] <= 1.0

    figure = results["figure"]
    assert figure == tmp_path / "out" / _demo.FIGURE_NAME
    assert figure.stat().st_size > 10_000
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = _demo.format_table(results)
    for row in ("noisy", "val_only", "oracle", "nestgrad", "F1", "Wall time"):
        assert row in table


def test_online_run_few_steps(tmp_path: Path):
    results = _demo.run(steps=40, seed=1, out=tmp_path, progress=False)
    assert results["mode"] == "online" and len(results["val_loss"]) == 40
    assert results["detection"]["f1"] > 0.8
    assert "online" in _demo.format_table(results)
    assert results["figure"].stat().st_size > 10_000


def test_run_rejects_zero_steps_and_unknown_modes(tmp_path: Path):
    with pytest.raises(ValueError, match="steps"):
        _demo.run(steps=0, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="mode must be one of 'online', 'full'; got 'fast'"):
        _demo.run(steps=1, out=tmp_path, progress=False, mode="fast")


def test_cli_help_and_arguments(capsys: pytest.CaptureFixture[str]):
    for argv in (["--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            _cli.main(argv)
        assert exit_info.value.code == 0
    assert "--steps" in capsys.readouterr().out

    args = _cli.build_parser().parse_args(["demo", "--steps", "7", "--seed", "3", "--out", "somewhere"])
    assert (args.command, args.steps, args.seed, args.out) == ("demo", 7, 3, "somewhere")
    defaults = _cli.build_parser().parse_args(["demo"])
    assert (defaults.steps, defaults.seed, defaults.out) == (_demo.DEFAULT_STEPS, 0, _demo.DEFAULT_OUT)

    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2


def test_cli_demo_runs_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert _cli.main(["demo", "--steps", "2", "--seed", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nestgrad" in out and "val_only" in out and "F1" in out
    assert (tmp_path / _demo.FIGURE_NAME).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_demo_meets_its_targets(tmp_path: Path, seed: int):
    """The issue's target for the default mode: test accuracy >= 95% and F1 >= 0.95 on seeds 0, 1 and 2."""
    results = _demo.run(seed=seed, out=tmp_path, progress=False)
    acc = results["accuracy"]
    assert acc["nestgrad"] >= 0.95, _demo.format_table(results)
    assert results["detection"]["f1"] >= 0.95, _demo.format_table(results)
    assert acc["nestgrad"] > acc["val_only"] and acc["nestgrad"] > acc["noisy"] + 0.05, _demo.format_table(results)


@pytest.mark.slow
def test_full_demo_meets_its_targets(tmp_path: Path):
    results = _demo.run(out=tmp_path, progress=False, mode="full")
    acc = results["accuracy"]
    assert acc["nestgrad"] >= 0.94, _demo.format_table(results)
    assert results["detection"]["f1"] >= 0.95, _demo.format_table(results)
    assert acc["nestgrad"] > acc["val_only"], _demo.format_table(results)


# ------------------------------------------------------------------ --levels 3
def test_three_level_hypergradient_matches_finite_differences_through_both_training_runs():
    data = _demo.load_data(seed=1)
    pipe = _demo3.Pipeline(_demo3.TEACHER, _demo3.STUDENT, seed=1)

    def student_val_loss(logits: torch.Tensor) -> torch.Tensor:
        x, y, w = _demo.inner_data(data, torch.sigmoid(logits))
        trained = pipe.student_of(data, x, y, w, normalize=False)
        return F.cross_entropy(ng.call(pipe.student, trained, data.x_val), data.y_val)

    logits = torch.full((1000,), math.log(0.3 / 0.7), requires_grad=True)
    (grad,) = torch.autograd.grad(student_val_loss(logits), logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Raising the weight of a flipped example makes the teacher's labels, hence the student, worse.
    assert grad[data.flipped].mean() > 0 > grad[~data.flipped].mean()
    eps = 0.05
    with torch.no_grad():
        for direction in (data.flipped.float(), (~data.flipped).float()):
            numeric = (student_val_loss(logits + eps * direction) - student_val_loss(logits - eps * direction)) / (
                2 * eps
            )
            assert (grad * direction).sum().item() == pytest.approx(numeric.item(), rel=0.05)


def test_three_level_run_few_steps(tmp_path: Path):
    results = _demo3.run(steps=4, seed=0, out=tmp_path / "out", progress=False)

    weights, flipped = results["weights"], results["flipped"]
    assert weights.shape == (1000,) and int(flipped.sum()) == 500
    # After a few outer steps the flipped examples already weigh less than the clean ones.
    assert weights[flipped].mean() < weights[~flipped].mean() - 0.2
    # The hypergradient of the student's validation loss w.r.t. the weight logits is finite and nonzero.
    grad = results["first_grad"]
    assert grad.shape == (1000,) and torch.isfinite(grad).all() and grad.abs().max() > 0
    # The outer loop lowers the student's validation loss.
    assert len(results["val_loss"]) == len(results["test_accuracy"]) == 4
    assert results["val_loss"][-1] < results["val_loss"][0]

    acc = results["accuracy"]
    assert set(acc) == {"noisy", "val_only", "oracle", "nestgrad"}
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert acc["oracle"] > acc["noisy"]

    figure = results["figure"]
    assert figure == tmp_path / "out" / _demo3.FIGURE_NAME
    assert figure.stat().st_size > 10_000
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = _demo3.format_table(results)
    for row in ("noisy", "val_only", "oracle", "nestgrad", "F1", "Wall time", "teacher", "student"):
        assert row in table


def test_three_level_run_rejects_zero_steps(tmp_path: Path):
    with pytest.raises(ValueError, match="steps"):
        _demo3.run(steps=0, out=tmp_path, progress=False)


def test_cli_levels_picks_the_demo_and_its_default_steps(monkeypatch: pytest.MonkeyPatch, capsys):
    parser = _cli.build_parser()
    assert parser.parse_args(["demo"]).levels == 2
    assert parser.parse_args(["demo", "--levels", "3"]).levels == 3
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["demo", "--levels", "4"])
    assert exit_info.value.code == 2

    calls = []
    for module in (_demo, _demo3):
        monkeypatch.setattr(module, "run", lambda module=module, **kw: calls.append((module, kw["steps"])) or {})
        monkeypatch.setattr(module, "format_table", lambda results: "table")
    for argv in (
        ["demo"],
        ["demo", "--levels", "3"],
        ["demo", "--levels", "3", "--steps", "7"],
        ["demo", "--steps", "7"],
        ["demo", "--mode", "full"],
        ["demo", "--mode", "full", "--steps", "3"],
    ):
        assert _cli.main(argv) == 0
    assert calls == [
        (_demo, _demo.DEFAULT_STEPS),
        (_demo3, _demo3.DEFAULT_STEPS),
        (_demo3, 7),
        (_demo, 7),
        (_demo, _demo.FULL_STEPS),
        (_demo, 3),
    ]
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["demo", "--levels", "3", "--mode", "online"])
    assert exit_info.value.code == 2
    assert "--mode applies to --levels 2 only" in capsys.readouterr().err


def test_cli_three_level_demo_runs_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert _cli.main(["demo", "--levels", "3", "--steps", "2", "--seed", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "student" in out and "val_only" in out and "F1" in out
    assert (tmp_path / _demo3.FIGURE_NAME).stat().st_size > 0


@pytest.mark.slow
def test_full_three_level_demo_beats_the_student_of_the_unweighted_teacher(tmp_path: Path):
    results = _demo3.run(out=tmp_path, progress=False)
    acc = results["accuracy"]
    assert acc["nestgrad"] > acc["noisy"], _demo3.format_table(results)
    assert results["detection"]["f1"] >= 0.9, _demo3.format_table(results)


def test_the_figure_caption_says_where_the_running_curve_peaked_and_what_reached_the_table() -> None:
    text = _demo.caption([0.90, 0.945, 0.93], 0.954, "running classifier (warm start)")
    assert "peaks at 94.5% at outer step 2 and ends at 93.0%" in text
    assert "95.4%, is a fresh model retrained on the final weights" in text


@pytest.mark.parametrize("cosine", [None, 20], ids=["constant", "cosine"])
def test_outer_adam_equals_torch_optim_adam_with_cosine_annealing(cosine) -> None:
    """The demo's outer Adam (nestgrad's pure update, no torch._dynamo import) takes torch.optim's steps."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(20)]
    a = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    ours = _demo.OuterAdam(a, 0.3, cosine_steps=cosine)
    ref = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=0.3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cosine) if cosine else None
    for grad in grads:
        ours.step(grad)
        ref.grad = grad.clone()
        opt.step()
        if schedule is not None:
            schedule.step()
    assert ref.detach().abs().max() > 0.1
    torch.testing.assert_close(a.detach(), ref.detach(), rtol=1e-12, atol=1e-14)
