"""chatkit.testing, the kit for plugin authors: open_chat, Chat's waits, the
pytest fixtures (in-process and in a pytest run of their own, as a plugin
author's project would use them), and docs/testing.md's example, run as
written."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

import chatkit
from chatkit.testing import Chat, ChatFactory, HookRecorder, open_chat
from tests.helpers import TIMEOUT, unref

ROOT = Path(__file__).resolve().parent.parent


def port_is_closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


class Watch:
    """A server plugin recording logins and leaves, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    @chatkit.hookimpl
    def chatkit_user_connected(self, user: chatkit.User) -> None:
        self.calls.append(("connected", user.name, ""))

    @chatkit.hookimpl
    def chatkit_user_disconnected(self, user: chatkit.User, reason: str) -> None:
        self.calls.append(("disconnected", user.name, reason))


class Welcome:
    """Posts a welcome in every room a user joins."""

    @chatkit.hookimpl
    async def chatkit_user_joined(
        self, server: chatkit.ChatServer, user: chatkit.User, room: str
    ) -> None:
        await server.post(room, f"welcome, {user.name}!")


# --- open_chat -----------------------------------------------------------------


async def test_open_chat_logs_clients_in_in_order_and_settles_them() -> None:
    watch = Watch()
    async with open_chat(plugins=[watch], clients=["alice", "bob", "carol"]) as chat:
        assert chat.host == "127.0.0.1"
        assert chat.port == chat.server.port != 0
        assert chat.server.host == "127.0.0.1"
        assert list(chat.clients) == ["alice", "bob", "carol"]
        assert [chat[name].name for name in chat.clients] == ["alice", "bob", "carol"]
        assert [user.name for user in chat.server.users] == ["alice", "bob", "carol"]
        assert chat.server.rooms == {"lobby": ("alice", "bob", "carol")}
        # The login notices were taken; nothing else arrived.
        for name in ("alice", "bob", "carol"):
            assert chat.pending(name) == ()
        assert chat.received("alice") == (
            chatkit.Joined(room="lobby", name="alice"),
            chatkit.Joined(room="lobby", name="bob"),
            chatkit.Joined(room="lobby", name="carol"),
        )
        assert chat.received("carol") == (chatkit.Joined(room="lobby", name="carol"),)
        assert watch.calls == [
            ("connected", "alice", ""),
            ("connected", "bob", ""),
            ("connected", "carol", ""),
        ]
        clients = list(chat.clients.values())
    # On exit the clients said goodbye, last first, then the server stopped.
    assert watch.calls[3:] == [
        ("disconnected", "carol", "bye"),
        ("disconnected", "bob", "bye"),
        ("disconnected", "alice", "bye"),
    ]
    assert all(client.closed for client in clients)
    assert port_is_closed(chat.port)


async def test_open_chat_without_clients_is_just_a_server() -> None:
    async with open_chat() as chat:
        assert chat.clients == {}
        assert chat.server.users == ()
        async with chatkit.open_client(chat.host, chat.port, name="zoe") as zoe:
            assert await zoe.who() == ("zoe",)


async def test_settling_leaves_what_plugins_post_on_join_pending() -> None:
    async with open_chat(plugins=[Welcome()], clients=["alice", "bob"]) as chat:
        welcome_alice = await chat.expect("alice", chatkit.Message)
        welcome_bob = await chat.expect("alice", chatkit.Message)
        assert (welcome_alice.text, welcome_bob.text) == (
            "welcome, alice!",
            "welcome, bob!",
        )
        assert await chat.expect("bob", chatkit.Message) == welcome_bob
        # Only the login notices were taken, in between.
        assert chat.received("alice") == (
            chatkit.Joined(room="lobby", name="alice"),
            welcome_alice,
            chatkit.Joined(room="lobby", name="bob"),
            welcome_bob,
        )
        assert chat.received("bob") == (
            chatkit.Joined(room="lobby", name="bob"),
            welcome_bob,
        )


async def test_an_exception_in_the_block_propagates_unchanged() -> None:
    error = KeyError("mine")
    with pytest.raises(KeyError) as info:
        async with open_chat(clients=["alice"]) as chat:
            raise error
    assert info.value is error
    assert chat["alice"].closed
    assert port_is_closed(chat.port)


async def test_cancellation_still_closes_everything() -> None:
    watch = Watch()
    with trio.CancelScope() as scope:
        async with open_chat(plugins=[watch], clients=["alice", "bob"]) as chat:
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    # Even cancelled, the clients left gracefully, in order.
    assert watch.calls[2:] == [
        ("disconnected", "bob", "bye"),
        ("disconnected", "alice", "bye"),
    ]
    assert port_is_closed(chat.port)


class Gatekeeper:
    @chatkit.hookimpl
    def chatkit_authenticate(self, name: str, token: str | None) -> None:
        if token != "open sesame":
            raise chatkit.Veto(f"{name} is not a member")


async def test_a_refused_login_raises_the_servers_answer_and_closes_the_chat() -> None:
    with pytest.raises(chatkit.Unauthorized) as info:
        async with open_chat(plugins=[Gatekeeper()], clients=["mallory"]):
            pytest.fail("let in")  # pragma: no cover
    assert (info.value.code, info.value.message) == (
        "unauthorized",
        "mallory is not a member",
    )


async def test_connect_takes_client_options_and_raises_refusals() -> None:
    async with open_chat(plugins=[Gatekeeper()]) as chat:
        alice = await chat.connect("alice", token="open sesame")
        assert chat["alice"] is alice
        assert chat.received("alice") == (chatkit.Joined(room="lobby", name="alice"),)
        with pytest.raises(chatkit.Unauthorized):
            await chat.connect("mallory", token="guess")
        assert list(chat.clients) == ["alice"]
        assert [user.name for user in chat.server.users] == ["alice"]


async def test_connect_without_settling_leaves_the_join_notices() -> None:
    async with open_chat(clients=["alice"]) as chat:
        await chat.connect("bob", settle=False)
        assert await chat.next_event("bob") == chatkit.Joined(room="lobby", name="bob")
        assert await chat.next_event("alice") == chatkit.Joined(
            room="lobby", name="bob"
        )


async def test_settling_skips_clients_outside_the_lobby() -> None:
    async with open_chat(clients=["alice"]) as chat:
        await chat["alice"].join("dev")
        await chat["alice"].leave("lobby")
        with trio.fail_after(TIMEOUT):
            await chat.connect("bob")
        # Nothing about bob reached alice, and nothing of hers was taken.
        assert chat.pending("alice") == (
            chatkit.Joined(room="dev", name="alice", ref=2),
            chatkit.Left(room="lobby", name="alice", reason="leave", ref=3),
        )


async def test_misuse_is_refused_at_once() -> None:
    with pytest.raises(TypeError, match=r"127\.0\.0\.1"):
        async with open_chat(host="0.0.0.0"):
            pytest.fail("listened elsewhere")  # pragma: no cover
    with pytest.raises(TypeError, match="port 0"):
        async with open_chat(port=12345):
            pytest.fail("listened elsewhere")  # pragma: no cover
    async with open_chat(clients=["alice"]) as chat:
        with pytest.raises(ValueError, match="already has a client called 'alice'"):
            await chat.connect("alice")
        with pytest.raises(TypeError, match="sets host itself"):
            await chat.connect("bob", host="example.com")
        with pytest.raises(KeyError, match="no client called 'zoe'"):
            chat["zoe"]
        with pytest.raises(KeyError):
            await chat.expect("zoe", chatkit.Message)
    with pytest.raises(RuntimeError, match="closing"):
        await chat.connect("late")


# --- waiting for events ----------------------------------------------------------


async def test_expect_takes_the_first_match_and_leaves_the_rest_in_order() -> None:
    async with open_chat(clients=["alice", "bob"]) as chat:
        alice = chat["alice"]
        one = await alice.say("one")
        await alice.join("dev")
        two = await alice.say("two", room="dev")
        three = await alice.say("three")
        # Out of order, by field:
        assert await chat.expect("alice", chatkit.Message, text="three") == three
        assert await chat.expect("alice", chatkit.Message, room="dev") == two
        # What was skipped is still there, in order.
        joined_dev = chatkit.Joined(room="dev", name="alice", ref=3)
        assert chat.pending("alice") == (one, joined_dev)
        assert await chat.next_event("alice") == one
        assert await chat.expect("alice", chatkit.Joined) == joined_dev
        assert chat.pending("alice") == ()
        # bob, not in dev, got copies without refs.
        assert await chat.expect("bob", chatkit.Message, sender="alice") == unref(one)
        assert await chat.next_event(chat["bob"]) == unref(three)
        assert len(chat.received("alice")) == 6


async def test_expect_matches_the_type_and_every_field() -> None:
    async with open_chat(clients=["alice", "bob"]) as chat:
        await chat["alice"].say("hi", room="lobby")
        await chat["bob"].say("hi")
        message = await chat.expect(
            "alice", chatkit.Message, sender="bob", text="hi", room="lobby"
        )
        assert (message.sender, message.text) == ("bob", "hi")
        # Any event at all is an Event.
        event = await chat.expect("alice", chatkit.Event)
        assert isinstance(event, chatkit.Message)
        assert (event.sender, event.text) == ("alice", "hi")


async def test_expect_fails_with_what_arrived_instead() -> None:
    async with open_chat(clients=["alice", "bob"]) as chat:
        said = await chat["alice"].say("hello")
        await chat.expect("alice", chatkit.Message)
        with pytest.raises(AssertionError) as info:
            await chat.expect("bob", chatkit.Message, text="bye", within=0.1)
        assert str(info.value) == (
            "bob received no Message(text='bye') within 0.1s; pending:\n"
            f"  {unref(said)!r}"
        )
        # Nothing was taken.
        assert chat.pending("bob") == (unref(said),)
        with pytest.raises(AssertionError) as info:
            await chat.next_event("alice", within=0.05)
        assert str(info.value) == (
            "alice received no event within 0.05s; pending: nothing"
        )


async def test_expect_fails_at_once_when_the_connection_ends() -> None:
    async with open_chat(clients=["alice"]) as chat:
        chat.server.kick("alice", "spam")
        with trio.fail_after(TIMEOUT / 2), pytest.raises(AssertionError) as info:
            await chat.expect("alice", chatkit.Message, within=TIMEOUT)
        assert str(info.value) == (
            "alice was waiting for Message(), but its connection ended"
            " (kicked: spam); pending:\n"
            "  ErrorReply(code='kicked', message='spam', ref=None)"
        )


async def test_expect_refuses_fields_the_type_does_not_have() -> None:
    async with open_chat(clients=["alice"]) as chat:
        with pytest.raises(TypeError, match="Message has no field from"):
            wire_name: dict[str, Any] = {"from": "bob"}
            await chat.expect("alice", chatkit.Message, **wire_name)
        with pytest.raises(
            TypeError, match=r"Event has no field text \(its fields: none\)"
        ):
            await chat.expect("alice", chatkit.Event, text="hi")


async def test_a_failure_message_shows_the_last_events_only() -> None:
    async with open_chat(clients=["alice"], history=chatkit.MemoryHistory(100)) as chat:
        said = [await chat["alice"].say(f"m{n}") for n in range(25)]
        with pytest.raises(AssertionError) as info:
            await chat.expect("alice", chatkit.Left, within=0.05)
        lines = str(info.value).splitlines()
        assert lines[0] == (
            "alice received no Left() within 0.05s; pending: (5 earlier ones not shown)"
        )
        assert lines[1:] == [f"  {message!r}" for message in said[5:]]


class Echo:
    @chatkit.hookimpl
    async def chatkit_client_message(
        self, client: chatkit.ChatClient, message: chatkit.Message
    ) -> None:
        if message.sender not in (client.name, chatkit.SERVER_SENDER):
            await client.say(f"{message.sender} said: {message.text}")


async def test_a_bot_without_an_event_buffer_is_connected_but_not_recorded() -> None:
    async with open_chat(clients=["alice"]) as chat:
        bot = await chat.connect("echo", plugins=[Echo()], event_buffer=None)
        assert chat["echo"] is bot
        # alice's notice of the bot was taken all the same.
        assert chat.pending("alice") == ()
        await chat["alice"].say("ping")
        reply = await chat.expect("alice", chatkit.Message, sender="echo")
        assert reply.text == "alice said: ping"
        with pytest.raises(ValueError, match="keeps no events"):
            chat.pending("echo")
        with pytest.raises(ValueError, match="not a client of this chat"):
            async with chatkit.open_client(chat.host, chat.port, name="zoe") as zoe:
                chat.pending(zoe)
    assert bot.closed


async def test_the_chat_may_be_used_from_other_tasks_and_from_hooks() -> None:
    class Summoner:
        """A bot that, when asked, brings a new client into the chat."""

        def __init__(self, chat: Chat) -> None:
            self.chat = chat

        @chatkit.hookimpl
        async def chatkit_client_message(
            self, client: chatkit.ChatClient, message: chatkit.Message
        ) -> None:
            if message.text == "!summon":
                await self.chat.connect("summoned")
                await client.say("done")

    async with open_chat(clients=["alice"]) as chat:
        await chat.connect("summoner", plugins=[Summoner(chat)], event_buffer=None)
        await chat["alice"].say("!summon")
        await chat.expect("alice", chatkit.Message, text="done")
        assert list(chat.clients) == ["alice", "summoner", "summoned"]
        # The hook's connect() settled the new client, here too.
        assert [
            event
            for event in chat.pending("alice")
            if isinstance(event, chatkit.Joined)
        ] == []

        async def say_later() -> None:
            await chat["summoned"].say("here")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(say_later)
            message = await chat.expect("alice", chatkit.Message, sender="summoned")
        assert message.text == "here"


# --- HookRecorder ----------------------------------------------------------------


class Archive:
    """Archives what is said, in an ``async def`` hook that takes a while."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    @chatkit.hookimpl
    async def chatkit_message_delivered(self, message: chatkit.Message) -> None:
        for _ in range(10):
            await trio.lowlevel.checkpoint()
        self.texts.append(message.text)


async def test_a_hook_recorder_listed_last_has_seen_a_call_after_the_others() -> None:
    # docs/testing.md's example.
    archive, hooks = Archive(), HookRecorder()
    async with open_chat(plugins=[archive, hooks.server], clients=["alice"]) as chat:
        await chat["alice"].say("hi")
        await hooks.wait("chatkit_message_delivered")
        assert archive.texts == ["hi"]


async def test_a_hook_recorder_records_server_and_client_hooks_in_order() -> None:
    hooks = HookRecorder()
    assert hooks.calls == ()
    async with open_chat(plugins=[hooks.server]) as chat:
        assert hooks.calls == ("chatkit_server_started",)
        alice = await chat.connect("alice", plugins=[hooks.client])
        await alice.say("hi")
        await hooks.wait("chatkit_client_message")
        await hooks.wait("chatkit_message_delivered")
        # Each side's in order; how the two interleave is the network's.
        client = [hook for hook in hooks.calls if hook.startswith("chatkit_client_")]
        assert [hook for hook in hooks.calls if hook not in client] == [
            "chatkit_server_started",
            "chatkit_authenticate",
            "chatkit_user_connected",
            "chatkit_user_joined",
            "chatkit_message",
            "chatkit_message_delivered",
        ]
        assert client == [
            "chatkit_client_connected",
            "chatkit_client_event",  # alice's own join
            "chatkit_client_joined",
            "chatkit_client_event",
            "chatkit_client_message",
        ]
        names = [name for name, _ in chat.server.plugin_manager.list_name_plugin()]
        assert names == ["HookRecorder.server"]
        assert alice.plugin_manager.get_name(hooks.client) == "HookRecorder.client"
    assert hooks.count("chatkit_server_stopping") == 1
    assert hooks.count("chatkit_dm") == 0


class NoShouting:
    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> None:
        if text.isupper():
            raise chatkit.Veto("no shouting")


async def test_a_hook_recorder_changes_nothing_and_sees_calls_vetoed_later() -> None:
    hooks = HookRecorder()
    async with open_chat(plugins=[Shout(), hooks.server], clients=["alice"]) as chat:
        assert (await chat["alice"].say("hi")).text == "HI"
    hooks = HookRecorder()
    async with open_chat(
        plugins=[hooks.server, NoShouting()], clients=["alice"]
    ) as chat:
        with pytest.raises(chatkit.Rejected, match="no shouting"):
            await chat["alice"].say("HI")
        await chat["alice"].say("hi")
        await hooks.wait("chatkit_message_delivered")
        assert hooks.count("chatkit_message") == 2


async def test_a_hook_recorder_says_what_was_called_when_a_wait_fails() -> None:
    hooks = HookRecorder()
    async with open_chat(plugins=[hooks.server]):
        with pytest.raises(
            AssertionError,
            match=r"^chatkit_dm was called 0 times within 0.05s, not 1;"
            r" calls: chatkit_server_started$",
        ):
            await hooks.wait("chatkit_dm", within=0.05)
    with pytest.raises(ValueError, match="no hook called 'chatkit_mesage'"):
        hooks.count("chatkit_mesage")
    with pytest.raises(ValueError, match="no hook called 'chatkit_mesage'"):
        await hooks.wait("chatkit_mesage")


# --- the fixtures, in this session ---------------------------------------------


async def test_the_chat_fixture_has_alice_and_bob(chat: Chat) -> None:
    assert list(chat.clients) == ["alice", "bob"]
    assert chat.server.rooms == {"lobby": ("alice", "bob")}
    assert chat.pending("alice") == chat.pending("bob") == ()
    assert chat.server.plugin_manager.get_plugins() == set()


class Shout:
    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> str:
        return text.upper()


class TestOverridingTheChatFixtures:
    @pytest.fixture
    def chat_plugins(self) -> list[object]:
        return [Shout()]

    @pytest.fixture
    def chat_clients(self) -> list[str]:
        return ["carol"]

    @pytest.fixture
    def chat_options(self) -> dict[str, Any]:
        return {"server_name": "test-server", "wait_timeout": 2.0}

    async def test_they_configure_the_chat(self, chat: Chat) -> None:
        assert list(chat.clients) == ["carol"]
        assert chat["carol"].server_name == "test-server"
        assert chat.wait_timeout == 2.0
        said = await chat["carol"].say("quiet please")
        assert said.text == "QUIET PLEASE"


async def test_chat_factory_opens_chats_for_the_whole_test(
    chat_factory: ChatFactory,
) -> None:
    first = await chat_factory(plugins=[Shout()], clients=["alice"])
    second = await chat_factory(clients=["alice", "bob"])
    assert first.port != second.port
    assert (await first["alice"].say("hi")).text == "HI"
    assert (await second["alice"].say("hi")).text == "hi"
    with pytest.raises(chatkit.NameTaken):
        await chat_factory(clients=["bob", "BOB"])


# --- the fixtures, in a plugin author's project --------------------------------

PYPROJECT = """
[tool.pytest.ini_options]
trio_mode = true
filterwarnings = ["error"]
"""


def run_pytest(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # A pytest run of its own, as in a plugin author's project: its own
    # config, the installed chatkit, nothing from chatkit's tests.
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=60)


def test_pytest_plugins_chatkit_testing_works_in_a_project(
    pytester: pytest.Pytester,
) -> None:
    pytester.makefile(".toml", pyproject=PYPROJECT)
    pytester.makeconftest(
        """
        # Imported before pytest loads it as a plugin: harmless.
        from chatkit.testing import Chat

        pytest_plugins = ["chatkit.testing"]
        """
    )
    pytester.makepyfile(
        test_it="""
        import pytest
        import chatkit


        async def test_chat(chat):
            await chat["alice"].say("hi")
            message = await chat.expect("bob", chatkit.Message)
            assert message.text == "hi"


        async def test_factory(chat_factory):
            chat = await chat_factory(clients=["zoe"])
            assert list(chat.clients) == ["zoe"]


        async def test_a_failing_expectation_fails_the_test(chat):
            await chat.expect("bob", chatkit.Message, within=0.05)
        """
    )
    result = run_pytest(pytester)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*AssertionError: bob received no Message() within 0.05s; pending: nothing"]
    )


BLOCKED_PYTEST = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pytest", "_pytest", "pytest_trio"):
                raise ImportError(f"pytest is not installed ({name})")
            return None

    sys.meta_path.insert(0, Blocker())

    import trio
    import chatkit
    from chatkit.testing import open_chat

    async def main():
        async with open_chat(clients=["alice", "bob"]) as chat:
            await chat["alice"].say("hi")
            message = await chat.expect("bob", chatkit.Message)
            print(message.sender, message.text)

    trio.run(main)
    assert "pytest" not in sys.modules
    """
)


def test_chatkit_testing_works_without_pytest() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_PYTEST],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "alice hi\n"


# --- docs/testing.md ------------------------------------------------------------


def doc_files() -> dict[str, str]:
    """docs/testing.md's code blocks that start with ``# NAME.py`` (and its
    TOML block, as pyproject.toml), by file name."""
    text = (ROOT / "docs/testing.md").read_text()
    files = {
        match["name"]: match["code"]
        for match in re.finditer(
            r"```python\n# (?P<name>\w+\.py)\n(?P<code>.*?)```", text, flags=re.DOTALL
        )
    }
    (toml,) = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    files["pyproject.toml"] = toml + 'filterwarnings = ["error"]\n'
    return files


def test_the_docs_example_is_a_complete_project() -> None:
    assert sorted(doc_files()) == [
        "conftest.py",
        "greeter.py",
        "pyproject.toml",
        "test_echo_bot.py",
        "test_greeter.py",
    ]


def test_the_docs_example_passes(pytester: pytest.Pytester) -> None:
    files = doc_files()
    for name, code in files.items():
        (pytester.path / name).write_text(code)
    tests = sum(code.count("\nasync def test_") for code in files.values())
    assert tests == 5
    result = run_pytest(pytester, "-v")
    result.assert_outcomes(passed=tests)
