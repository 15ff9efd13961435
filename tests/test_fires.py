"""The ``fires`` marker and the hook coverage check (tests/fires.py) can fail.

A test marked to fire a hook fails when it does not fire it, and a hook no
collected test is marked to fire counts as untested, even where a method
named after it exists (which was all the old check asked for).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.fires import ROOT, check_fired_by_a_test, firing_tests

PYPROJECT = """
[tool.pytest.ini_options]
trio_mode = true
addopts = ["--strict-markers"]
markers = ["fires(*hooks): the hooks a test fires"]
"""

MARKED = """
import pytest

import chatkit
from chatkit.testing import open_chat


@pytest.mark.fires("chatkit_message", "chatkit_client_message")
async def test_fires_what_it_says(hooks):
    async with open_chat(plugins=[hooks.server]) as chat:
        alice = await chat.connect("alice", plugins=[hooks.client])
        await alice.say("hi")
        await hooks.wait("chatkit_client_message")


async def test_unmarked_need_not_fire_anything(hooks):
    async with open_chat(clients=["alice"]):
        pass


@pytest.mark.fires("chatkit_dm")
async def test_says_but_sends_no_dm(hooks):
    async with open_chat(plugins=[hooks.server], clients=["alice"]) as chat:
        await chat["alice"].say("hi")
        await chat.expect("alice", chatkit.Message)


@pytest.mark.fires("chatkit_client_interrupted")
async def test_is_never_interrupted(hooks):
    async with open_chat() as chat:
        await chat.connect("alice", plugins=[hooks.client])


@pytest.mark.fires("chatkit_message")
async def test_fires_it_where_no_recorder_sees(hooks):
    async with open_chat(clients=["alice"]) as chat:
        await chat["alice"].say("hi")


@pytest.mark.fires("chatkit_message")
async def test_has_no_recorder():
    async with open_chat(clients=["alice"]) as chat:
        await chat["alice"].say("hi")


@pytest.mark.fires("chatkit_mesage")
async def test_names_no_hook(hooks):
    pass


@pytest.mark.fires("chatkit_message")
async def test_fails_of_its_own_first(hooks):
    assert "its own" == "failure"
"""


def test_a_marked_test_fails_unless_it_fires_its_hooks(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # for tests.fires
    pytester.makefile(".toml", pyproject=PYPROJECT)
    pytester.makeconftest('pytest_plugins = ["tests.fires"]')
    pytester.makepyfile(test_marked=MARKED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=2, failed=6)
    result.stdout.fnmatch_lines_random(
        [
            "*test_says_but_sends_no_dm*",
            "marked fires('chatkit_dm'), but chatkit_dm never fired;"
            " fired: chatkit_server_started, chatkit_authenticate, *chatkit_message,*",
            "marked fires('chatkit_client_interrupted'), but"
            " chatkit_client_interrupted never fired;"
            " fired: chatkit_client_connected,*",
            "marked fires('chatkit_message'), but chatkit_message never fired;"
            " fired: nothing",
            "a test marked fires() must use the hooks fixture *",
            "fires() takes hook names, not ['chatkit_mesage']",
            "*AssertionError: assert 'its own' == 'failure'",
        ]
    )


COVERAGE = """
import pytest

import chatkit


class Plugin:
    # The old check passed on this: a method named after the hook.
    @chatkit.hookimpl
    def chatkit_dm(self, text):
        return text


@pytest.mark.fires("chatkit_message")
def test_plain():
    pass


@pytest.mark.parametrize(
    "n", [1, pytest.param(2, marks=pytest.mark.fires("chatkit_user_joined"))]
)
def test_parametrized(n):
    pass


class TestGroup:
    @pytest.mark.fires("chatkit_nick")
    def test_in_a_class(self):
        pass


@pytest.mark.fires("chatkit_user_left")
def helper_that_pytest_does_not_collect():
    pass
"""


def test_a_hook_no_collected_test_is_marked_to_fire_is_untested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(PYPROJECT)
    module = project / "test_some_hooks.py"
    module.write_text(textwrap.dedent(COVERAGE))
    # What the outer run selects does not matter: the module is collected
    # in a run of its own.
    monkeypatch.setenv("PYTEST_ADDOPTS", "-k test_plain")
    firing = firing_tests(module, tmp_path)
    assert firing == {
        "chatkit_message": ["test_some_hooks.py::test_plain"],
        "chatkit_user_joined": ["test_some_hooks.py::test_parametrized[2]"],
        "chatkit_nick": ["test_some_hooks.py::TestGroup::test_in_a_class"],
    }
    for hook in firing:
        check_fired_by_a_test(hook, firing)
    assert "def chatkit_dm(" in module.read_text()
    for untested in ("chatkit_dm", "chatkit_user_left"):
        with pytest.raises(AssertionError, match=rf"fires\('{untested}'\)"):
            check_fired_by_a_test(untested, firing)


def test_a_module_that_does_not_collect_fails_the_check(tmp_path: Path) -> None:
    module = tmp_path / "test_broken.py"
    module.write_text("import no_such_module\n")
    with pytest.raises(AssertionError, match="no_such_module"):
        firing_tests(module, tmp_path)
