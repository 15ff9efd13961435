"""The documentation is executable: README snippets and examples run, and
every hook has a section in docs/plugins.md and a test that fires it (as
datasette does)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import chatkit
from tests.fires import check_fired_by_a_test, firing_tests, hook_names

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_doc_section(hook: str) -> None:
    assert re.search(rf"^### {hook}\(", (ROOT / "docs/plugins.md").read_text(), re.M)


@pytest.fixture(scope="module")
def firing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The tests of tests/test_hooks.py marked to fire each hook."""
    return firing_tests(ROOT / "tests/test_hooks.py", tmp_path_factory.mktemp("fires"))


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_tested(hook: str, firing: dict[str, list[str]]) -> None:
    # A test marked @pytest.mark.fires(hook) fails unless it fired the hook
    # (tests/fires.py), so this asks for a test that fires each hook.
    check_fired_by_a_test(hook, firing)


def test_readme_embedding_example_runs() -> None:
    embedding = next(b for b in python_blocks(ROOT / "README.md") if "trio.run" in b)
    result = subprocess.run(
        [sys.executable, "-c", embedding],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout == "alice: hi bob\n"


async def test_readme_plugin_example_works() -> None:
    block = next(b for b in python_blocks(ROOT / "README.md") if "NoShouting" in b)
    namespace: dict[str, object] = {}
    exec(block, namespace)
    plugin_class = namespace["NoShouting"]
    assert isinstance(plugin_class, type)
    async with (
        chatkit.open_server(plugins=[plugin_class()]) as server,
        chatkit.open_client("127.0.0.1", server.port, name="alice") as alice,
    ):
        with pytest.raises(chatkit.Rejected, match="please don't shout"):
            await alice.say("HELLO")
        message = await alice.say("darn it")
        assert message.text == "d**n it"


def test_quickstart_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/quickstart.py")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Server started on 127.0.0.1:")
    assert lines[1:] == [
        "in the lobby: alice, bob",
        "alice: hello, bob",
        "bob: HI ALICE, WELCOME!",
        "Server has shut down.",
    ]


def test_plugin_doc_examples_compile() -> None:
    for block in python_blocks(ROOT / "docs/plugins.md"):
        compile(block, "docs/plugins.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("program", ["server", "client"])
def test_the_cli_reference_shows_each_programs_help(program: str) -> None:
    """docs/cli.md's usage blocks are ``--help`` as printed (80 columns);
    CHATKIT_WRITE_DOCS=1 writes them there."""
    result = subprocess.run(
        [sys.executable, "-m", f"chatkit.{program}", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "COLUMNS": "80"},
    )
    path = ROOT / "docs" / "cli.md"
    text = path.read_text()
    heading = f"## `python -m chatkit.{program}`\n\n```\n"
    start = text.index(heading) + len(heading)
    end = text.index("```\n", start)
    if os.environ.get("CHATKIT_WRITE_DOCS"):
        path.write_text(text[:start] + result.stdout + text[end:])
    else:
        assert text[start:end] == result.stdout, (
            "docs/cli.md is out of date: "
            "CHATKIT_WRITE_DOCS=1 pytest tests/test_docs.py -k cli_reference"
        )


@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md"])
def test_the_test_command_is_described_with_what_it_installs(page: str) -> None:
    # The Debian packages scripts/install-test-deps.sh lists, and pyte (a
    # pip dev dependency, for the pty tests): a reader of the README or the
    # quickstart learns what "the test command" puts on their machine.
    script = (ROOT / "scripts/install-test-deps.sh").read_text()
    listed = re.search(r"PACKAGES=\((.*?)\n\)", script, flags=re.DOTALL)
    assert listed, "no PACKAGES=(...) in scripts/install-test-deps.sh"
    packages = [line.split()[0] for line in listed[1].splitlines() if line.strip()]
    assert len(packages) >= 3, packages
    text = (ROOT / page).read_text()
    for package in [*packages, "pyte"]:
        assert f"`{package}`" in text, f"{page} does not name {package}"
