"""Every ```python block of README.md and docs/**/*.md runs, so no snippet can rot.

Each page's blocks run in order in one namespace (a block may continue an earlier one on the
same page), in a fresh temporary directory, with one torch thread and torch's global state
restored afterwards. A block that cannot run here (it needs torchrun, or a long run) carries
``<!-- skip: reason -->`` on the line before its fence; the reasons are checked below.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")
MAX_SKIPPED = 4  # skipping is for what cannot run here, not for what is slow to fix


def blocks(page: pathlib.Path) -> list[tuple[int, str, str | None]]:
    """The page's python blocks: (line, code, skip reason or None)."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group("lang").strip() != "python":
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        indent = len(m.group("indent"))
        code = "\n".join(x[indent:] for x in m.group("body").splitlines())
        out.append((line, code, skip.group("reason") if skip else None))
    return out


def _name(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [p for p in PAGES if any(reason is None for _, _, reason in blocks(p))]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A temporary working directory; torch's thread count, default dtype and RNG restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads, dtype, rng = torch.get_num_threads(), torch.get_default_dtype(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        yield tmp_path
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_rng_state(rng)


@pytest.mark.parametrize("page", RUNNABLE, ids=_name)
def test_page_code_runs(page, sandbox):
    namespace: dict = {"__name__": "__docs__"}
    printed = io.StringIO()
    for line, code, reason in blocks(page):
        if reason is not None:
            continue
        with contextlib.redirect_stdout(printed):
            try:
                exec(compile(code, f"{_name(page)}:{line}", "exec"), namespace)
            except Exception as e:  # name the block, not only the line inside it
                raise AssertionError(f"the python block at {_name(page)}:{line} failed: {e!r}") from e
    # Each page's code shows the reader something to judge.
    assert printed.getvalue().strip(), f"{_name(page)}: its python blocks print nothing"


def test_skipped_blocks_are_few_and_say_why():
    skipped = [(_name(p), line, reason) for p in PAGES for line, _, reason in blocks(p) if reason is not None]
    for page, line, reason in skipped:
        assert len(reason.split()) >= 3, f"{page}:{line}: a skip marker needs a reason, got {reason!r}"
    assert len(skipped) <= MAX_SKIPPED, f"too many skipped blocks: {skipped}"


def test_every_python_block_is_found():
    """A python fence the extractor misses would silently go untested: count them another way."""
    for page in PAGES:
        fences = len(re.findall(r"^ *```python\s*$", page.read_text(), re.M))
        assert fences == len(blocks(page)), _name(page)


def test_markers_sit_on_python_blocks():
    """A skip marker not directly above a python fence is a typo that would skip nothing."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, text in enumerate(lines):
            if SKIP.search(text):
                assert i + 1 < len(lines) and lines[i + 1].strip() == "```python", f"{_name(page)}:{i + 1}"


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    head = "\n".join(text.splitlines()[:20])
    assert 'pip install torch==2.13.0 && pip install -e ".[demo]" && nestgrad demo' in head
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q' in head
    assert 'pip install -e ".[docs]" && mkdocs serve' in text


def test_readme_quick_start_moves_A_and_lowers_L3(sandbox):
    """The quick start's printed story is true: L3 falls and A moves."""
    code = re.search(r"## Quick start.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "README.md", "exec"), namespace)
    losses = namespace["history"]
    assert losses[-1] < losses[0], losses
    assert namespace["A"].abs().max() > 1e-3, "the outer loop did not move A"


def test_readme_links_exist():
    """Relative links of the README (GitHub renders them) point at files that exist."""
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), target
