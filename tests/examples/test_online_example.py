"""examples/online_reweighting.py: online (warm-start) reweighting learns, and survives SIGKILL + resume bit for bit."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "online_reweighting.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("online_reweighting_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example()


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [out.get("PYTHONPATH")])])
    out["OMP_NUM_THREADS"] = "1"
    return out


def command(*args: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--no-progress", "--out", "", *args]


def test_online_reweighting_learns(example: ModuleType, tmp_path: Path) -> None:
    figure = tmp_path / "fig.png"
    with torch.random.fork_rng(devices=[]):
        result = example.main(["--outer-steps", "20", "--no-progress", "--out", str(figure)])
    assert result["clean_mean"] > result["flipped_mean"] + 0.2, (result["clean_mean"], result["flipped_mean"])
    # Trivial baselines: 10% (chance); training on the noisy labels with uniform weights reaches ~50%.
    assert result["test_acc"] > 0.7, result["test_acc"]
    assert result["f1"] > 0.8, result["f1"]
    assert len(result["history"]["val_loss"]) == 20
    assert result["history"]["val_loss"][-1] < result["history"]["val_loss"][0]
    assert figure.stat().st_size > 0


def test_checkpoint_loads_weights_only_and_resumes_in_process(example: ModuleType, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    small = ["--no-progress", "--out", "", "--hidden", "16", "--checkpoint", str(ckpt), "--save-every", "2"]
    with torch.random.fork_rng(devices=[]):
        straight = example.main(["--outer-steps", "4", *small[:-4]])
        example.main(["--outer-steps", "2", *small])
    path = ckpt / example.CHECKPOINT_NAME
    saved = torch.load(path, weights_only=True)
    assert saved["outer_step"] == 2
    keys = {"weights", "state", "inner_opt", "A", "outer_opt", "torch_rng", "data", "history"}
    assert keys <= set(saved)
    assert set(saved["data"]) == {"gen", "perm", "pos"}
    assert saved["outer_opt"]["state"][0]["exp_avg"].shape == saved["A"].shape
    assert [p.name for p in ckpt.iterdir()] == [example.CHECKPOINT_NAME]  # no temporary file left behind
    with torch.random.fork_rng(devices=[]):
        resumed = example.main(["--outer-steps", "4", "--resume", *small])
    assert torch.equal(resumed["A"], straight["A"])
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    assert resumed["history"] == straight["history"]


def test_sigkill_and_resume_is_bit_for_bit(tmp_path: Path) -> None:
    steps, ckpt = 12, tmp_path / "ckpt"
    common = ["--outer-steps", str(steps), "--hidden", "16"]
    reference = subprocess.run(
        command(*common, "--final", str(tmp_path / "reference.pt")), env=env(), capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr

    path = ckpt / "checkpoint.pt"
    args = [*common, "--checkpoint", str(ckpt), "--save-every", "1", "--final", str(tmp_path / "resumed.pt")]
    victim = subprocess.Popen(
        command(*args, "--delay", "0.3"), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        saved_step = 0
        while saved_step < 3:
            assert victim.poll() is None, victim.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
            if path.exists():
                saved_step = torch.load(path, weights_only=True)["outer_step"]
        time.sleep(0.45)  # a few more outer steps start (and maybe save) after the one we saw
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)  # reaps it and closes its pipes
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed.pt").exists()  # it really died before the end
    killed_at = torch.load(path, weights_only=True)["outer_step"]
    assert 3 <= killed_at < steps

    resumed = subprocess.Popen(command(*args, "--resume"), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = resumed.communicate(timeout=120)
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.wait()
    assert resumed.returncode == 0, err.decode()
    match = re.search(r"resumed from checkpoint at outer step (\d+)", out.decode())
    assert match is not None, out.decode()
    assert int(match.group(1)) == killed_at

    want = torch.load(tmp_path / "reference.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert torch.equal(got["A"], want["A"])
    assert set(got["weights"]) == set(want["weights"])
    for name, value in want["weights"].items():
        assert torch.equal(got["weights"][name], value), name
