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
