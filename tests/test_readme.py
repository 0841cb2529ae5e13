"""The README's quick start runs as written and moves A by hypergradients."""

from __future__ import annotations

import pathlib
import re

import torch


def test_readme_quick_start_runs_and_moves_A():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Quick start.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    A, L3 = namespace["A"], namespace["L3"]
    assert A.abs().max() > 1e-3, "the outer loop did not move A"
    assert torch.isfinite(L3)


def test_readme_state_snippet_runs(tmp_path, monkeypatch):
    """The "Continuing runs" block, with a small problem defined before it."""
    import nestgrad as ng

    monkeypatch.chdir(tmp_path)  # it saves ckpt.pt
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Continuing runs.*?```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16)

    def loss_fn(p, batch, A):
        return (torch.sigmoid(A) * (x @ p["w"] + p["b"] - y) ** 2).mean()

    params = {"w": torch.zeros(3, requires_grad=True), "b": torch.zeros((), requires_grad=True)}
    namespace = {"torch": torch, "ng": ng, "loss_fn": loss_fn, "params": params, "data": [None],
                 "opt": ng.optim.Adam(lr=0.1), "A": torch.zeros(16, requires_grad=True)}  # fmt: skip
    exec(compile(code, "README.md", "exec"), namespace)
    assert set(namespace["state"].step.values()) == {20}
    assert torch.load("ckpt.pt", weights_only=True)["state"]["step"] == {"w": 20, "b": 20}


def test_readme_tasks_snippet_runs_and_reaches_the_meta_parameters(capsys):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Many tasks at once.*?```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["fast"]["0.weight"].shape == (25, 40, 1)
    assert namespace["model"][0].weight.grad.abs().max() > 0
    assert "meta-loss" in capsys.readouterr().out
