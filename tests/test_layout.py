"""The package's layout: no import cycle between its modules, and ``import nestgrad`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(nodes: list[ast.stmt], package: str, modules: set[str], deps: set[str]) -> None:
    """Add to ``deps`` the modules that ``nodes`` import when the module is imported."""
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue  # imports inside functions run later, on use
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                _imports(inner, package, modules, deps)
        for handler in getattr(node, "handlers", []):
            _imports(handler.body, package, modules, deps)


def import_graph() -> dict[str, set[str]]:
    """Module -> the nestgrad modules it imports at import time (not inside functions, not for type checkers)."""
    paths = {module_name(p): p for p in (ROOT / "nestgrad").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        _imports(ast.parse(path.read_text()).body, package, set(paths), deps)
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def dfs(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if not state.get(dep) and (cycle := dfs(dep, stack)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := dfs(node, [])):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "nestgrad.methods._reverse" in graph
    assert "nestgrad._problem" in graph["nestgrad.methods._base"]  # the walk sees relative imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_import_nestgrad_and_the_cli_help_do_not_load_torch():
    code = "import sys, nestgrad; from nestgrad.demos import _cli; _cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_dir_lists_the_public_api_only() -> None:
    import nestgrad

    private = [n for n in dir(nestgrad) if not n.startswith("__") and n not in nestgrad.__all__]
    assert not private, f"dir(nestgrad) lists names outside the public API: {private}"
    assert {"train", "Unroll", "optim", "higher"} <= set(dir(nestgrad))
