"""The documentation site's structure: every page is in the mkdocs nav, every
nav entry has a page, the API reference covers the public API, and the
examples on the site run. ``nox -s docs`` does the real (strict) build; these
tests need neither mkdocs nor the network."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import chatkit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def nav_pages() -> list[str]:
    """The Markdown files named in mkdocs.yml's ``nav:``, in order.

    A small reader for the one block we need (no YAML dependency): the
    ``nav:`` line, then its indented lines, each naming at most one page.
    """
    pages: list[str] = []
    in_nav = False
    for line in (ROOT / "mkdocs.yml").read_text().splitlines():
        if re.match(r"nav:\s*$", line):
            in_nav = True
            continue
        if in_nav:
            if line.strip() and not line[0].isspace():
                break  # the next top-level key
            match = re.search(r"([\w./-]+\.md)\s*$", line)
            if match:
                pages.append(match[1])
    return pages


def doc_pages() -> list[str]:
    return sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md"))


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_nav_is_read() -> None:
    pages = nav_pages()
    assert pages[0] == "index.md"
    assert len(pages) == len(set(pages)), "a page is listed twice in the nav"


@pytest.mark.parametrize("page", doc_pages())
def test_every_page_is_in_the_nav(page: str) -> None:
    assert page in nav_pages(), f"docs/{page} is missing from mkdocs.yml's nav"


@pytest.mark.parametrize("page", nav_pages())
def test_every_nav_entry_has_a_page(page: str) -> None:
    assert (DOCS / page).is_file(), f"mkdocs.yml's nav names docs/{page}: no such file"


def test_api_reference_covers_the_public_api() -> None:
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: chatkit\.(\w+)\s*$", api, flags=re.M))
    # hookimpl and hookspec are documented with the chatkit.hookspecs module.
    assert "hookspecs" in documented
    missing = set(chatkit.__all__) - documented - {"hookimpl", "hookspec"}
    assert not missing, f"docs/api.md has no '::: chatkit.NAME' for {sorted(missing)}"


@pytest.mark.parametrize("page", doc_pages())
def test_python_blocks_compile(page: str) -> None:
    for block in python_blocks(DOCS / page):
        compile(block, f"docs/{page}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_home_page_example_runs() -> None:
    example = next(b for b in python_blocks(DOCS / "index.md") if "trio.run" in b)
    result = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout == "alice: hi bob\n"


@pytest.mark.parametrize("program", ["chatkit.server", "chatkit.client"])
def test_cli_reference_shows_the_real_help(program: str) -> None:
    """docs/cli.md quotes each program's ``--help`` (as printed 80 columns
    wide); only line wrapping may differ between Python versions."""
    page = (DOCS / "cli.md").read_text()
    section = page.split(f"## `python -m {program}`", 1)[1]
    quoted = re.search(r"```\n(usage: .*?)```", section, flags=re.DOTALL)
    assert quoted, f"docs/cli.md has no --help block for {program}"
    result = subprocess.run(
        [sys.executable, "-m", program, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert quoted[1].split() == result.stdout.split()


def test_quickstart_has_the_readme_commands() -> None:
    def commands(path: Path) -> str:
        block = re.search(r"```sh\n(.*?)```", path.read_text(), flags=re.DOTALL)
        assert block, f"{path.name} has no sh block"
        return block[1]

    assert commands(DOCS / "quickstart.md") == commands(ROOT / "README.md")
