"""The ``fires`` marker (tests/fires.py) can fail: a test marked to fire a
hook fails when it does not fire it."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

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
