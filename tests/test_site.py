"""The documentation site, as a reader sees it: built with ``mkdocs build --strict``, then its API pages
are checked for three defects that ``--strict`` does not catch:

* a ``>>>`` example outside a code block (an ``Example:`` section renders as nested blockquotes);
* a Python built-in type's docstring on a nestgrad page (an attribute such as ``Reverse.differentiates_state``
  inspected as ``bool``);
* an unformatted signature (one long line that scrolls sideways), which mkdocstrings leaves when it finds
  neither Black nor Ruff.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE_LENGTH = 70  # mkdocs.yml's line_length for signatures
BUILTIN_DOCS = [  # the first line of each built-in type's docstring, as inspection would show it
    "bool(x) -> bool", "int([x]) -> integer", "str(object='') -> str", "float(x=0, /)", "dict() -> new empty",
    "list(iterable=(), /)", "tuple(iterable=(), /)", "Built-in immutable sequence.",
    "The base class of the class hierarchy", "Alias for field number",
]  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    return out, proc.stderr


def api_pages(site: tuple[Path, str]) -> dict[str, str]:
    api = site[0] / "api"
    pages = {str(p.parent.relative_to(api)): p.read_text() for p in sorted(api.rglob("index.html"))}
    assert len(pages) >= 7, f"expected the 7 API pages, found {sorted(pages)}"
    return pages


def outside_code(page: str) -> str:
    """The page's HTML without its <pre> and <code> blocks."""
    return re.sub(r"<pre\b.*?</pre>|<code\b.*?</code>", "", page, flags=re.S)


def text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_examples_render_as_code(site: tuple[Path, str]) -> None:
    bad = {}
    for name, page in api_pages(site).items():
        rest = outside_code(page)
        if "&gt;&gt;&gt;" in rest or re.search(r"<blockquote>\s*<blockquote>", rest):
            m = re.search(r"<blockquote>\s*<blockquote>.*?</blockquote>|&gt;&gt;&gt;.{0,80}", rest, re.S)
            bad[name] = text(m.group(0))[:200] if m else "?"
    assert not bad, f"'>>>' examples rendered outside code blocks (write 'Examples:', not 'Example:'): {bad}"
    examples = sum(page.count('<span class="gp">&gt;&gt;&gt; </span>') for page in api_pages(site).values())
    assert examples >= 30, f"expected the API pages' >>> examples inside code blocks, found {examples} lines"


def test_no_builtin_docstrings(site: tuple[Path, str]) -> None:
    found = [
        (name, doc) for name, page in api_pages(site).items() for doc in BUILTIN_DOCS if doc in text(outside_code(page))
    ]
    assert not found, f"built-in types' docstrings on nestgrad's API pages: {found}"


def test_signatures_are_formatted(site: tuple[Path, str]) -> None:
    assert "Formatting signatures requires" not in site[1], "mkdocstrings found neither Black nor Ruff"
    long = []
    signatures = 0
    for name, page in api_pages(site).items():
        for m in re.finditer(r'<div class="doc-signature highlight"><pre>.*?</pre>', page, re.S):
            signatures += 1
            long += [(name, line[:60]) for line in text(m.group(0)).splitlines() if len(line) > LINE_LENGTH + 4]
    assert signatures >= 20, f"expected the API pages' signatures, found {signatures}"
    assert not long, f"signature lines longer than {LINE_LENGTH} characters: {long[:5]}"
