"""``nestgrad demo``: data hyper-cleaning on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from nestgrad import _cli, _demo


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


def test_run_few_steps(tmp_path: Path):
    results = _demo.run(steps=8, seed=0, out=tmp_path / "out", progress=False)

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


def test_run_rejects_zero_steps(tmp_path: Path):
    with pytest.raises(ValueError, match="steps"):
        _demo.run(steps=0, out=tmp_path, progress=False)


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
def test_full_demo_meets_its_targets(tmp_path: Path):
    results = _demo.run(out=tmp_path, progress=False)
    acc = results["accuracy"]
    assert acc["nestgrad"] >= 0.94, _demo.format_table(results)
    assert results["detection"]["f1"] >= 0.95, _demo.format_table(results)
    assert acc["nestgrad"] > acc["val_only"], _demo.format_table(results)
