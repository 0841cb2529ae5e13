"""First use in a fresh process: nothing computed at import time depends on the caller's grad mode,
inference mode or default dtype (issue: the first ``ng.train`` under ``torch.no_grad()`` crashed).

Earlier tests import everything first, so these run ``tests/first_use.py`` in a new interpreter that
imports nestgrad *inside* each context, then uses every public name (each use checked against a
hand-written reference) inside the context, or after leaving it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("first_use.py")


@pytest.mark.parametrize("phase", ["inside", pytest.param("after", marks=pytest.mark.slow)])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "float64"])
def test_first_use_in_a_fresh_process(context: str, phase: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), context, phase], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"the script crashed under {context} ({phase}):\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {name: outcome for name, outcome in results.items() if outcome != "ok"}
    assert not failed, f"under {context} ({phase}):\n" + "\n".join(f"{k}: {v}" for k, v in failed.items())
    # every method, the optimizers, call, check, explain, higher and the names were used
    assert {"train", "Unroll", "Reverse", "Forward", "Implicit", "FiniteDiff", "ZerothOrder", "optim", "check",
            "explain", "call", "higher", "names", "Tasks", "NonFiniteError"} <= set(results)  # fmt: skip


_FACTORIES = {"zeros", "ones", "tensor", "empty", "randn", "rand", "randint", "arange", "full", "linspace", "eye",
              "as_tensor", "zeros_like", "ones_like", "get_default_dtype", "get_default_device", "is_grad_enabled",
              "is_inference_mode_enabled", "get_num_threads"}  # fmt: skip


def _import_time_torch_calls(tree: ast.Module) -> list[tuple[int, str]]:
    """Calls ``torch.<factory or context query>(...)`` made when the module is imported."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return  # runs on use, not at import
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.startswith("torch.") and name.rsplit(".", 1)[-1] in _FACTORIES:
                found.append((node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_tensor_is_made_or_context_read_at_import_time() -> None:
    """Static guard for the same rule: no module creates a tensor or reads torch's global context at import
    (a default device or dtype would be baked in); make such values on first use instead."""
    root = Path(__file__).resolve().parents[1] / "src" / "nestgrad"
    found = [
        f"{path.relative_to(root)}:{line}: {name}"
        for path in sorted(root.rglob("*.py"))
        for line, name in _import_time_torch_calls(ast.parse(path.read_text()))
    ]
    assert not found, "tensors or context read at import time:\n" + "\n".join(found)
