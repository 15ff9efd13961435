"""Every example runs: the programs as subprocesses (on 127.0.0.1 only, always
killed at the end), the plugins against a real server through
chatkit.testing, and through ``python -m chatkit.server --plugin``."""

from __future__ import annotations

import importlib
import json
import logging
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from examples import audit_log, dice, logging_plugin, profanity_filter

import chatkit
from chatkit.testing import Chat, open_chat
from tests.conftest import OpenRaw
from tests.helpers import TIMEOUT, next_event, unref, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


class Program:
    """A running Python program whose output is read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = bytearray()

    async def readline(self) -> str:
        """The next line of standard output, without its newline."""
        assert self.process.stdout is not None
        with trio.fail_after(TIMEOUT):
            while b"\n" not in self._buffer:
                data = await self.process.stdout.receive_some()
                if not data:
                    raise AssertionError(f"EOF; pending {bytes(self._buffer)!r}")
                self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode()

    async def finish(self) -> tuple[int, list[str], str]:
        """Wait for the program to exit: its status, the rest of its output
        (as lines) and its standard error."""
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        stderr = bytearray()

        async def drain(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
            while data := await stream.receive_some():
                into += data

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, self.process.stdout, self._buffer)
                nursery.start_soon(drain, self.process.stderr, stderr)
            status = await self.process.wait()
        return status, self._buffer.decode().splitlines(), stderr.decode()


@asynccontextmanager
async def run(*args: str) -> AsyncIterator[Program]:
    """Run ``python -u ARGS`` from the repository root; killed on exit if it
    is still running."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-u", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        yield Program(process)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(TIMEOUT):
            await process.wait()
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()


def refused_port() -> socket.socket:
    """A bound, non-listening loopback socket: connecting to its port is
    refused, and nobody else can take the port while it is open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


# --- profanity_filter.py -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("darn it", "d**n it"),
        ("Darn! HECK, frak.", "D**n! H**K, f**k."),
        ("darnell and heckle", "darnell and heckle"),
        ("gosh-darn smeg", "g**h-d**n s**g"),
        ("all clean", "all clean"),
        ("", ""),
    ],
)
def test_profanity_filter_masks_whole_words(text: str, cleaned: str) -> None:
    assert profanity_filter.ProfanityFilter().clean(text) == cleaned


def test_profanity_filter_takes_its_own_words() -> None:
    custom = profanity_filter.ProfanityFilter(["Bother", "ab", "abc"])
    assert custom.words == frozenset({"bother", "ab", "abc"})
    assert custom.clean("oh BOTHER, darn: ab abc") == "oh B****R, darn: ** a*c"
    assert profanity_filter.ProfanityFilter([]).clean("darn") == "darn"


async def test_profanity_filter_rewrites_messages_for_everyone() -> None:
    async with open_chat(
        plugins=[profanity_filter.ProfanityFilter()], clients=["alice", "bob"]
    ) as chat:
        said = await chat["alice"].say("darn it, bob")
        assert said.text == "d**n it, bob"
        assert await chat.next_event("bob") == unref(said)
        clean = await chat["alice"].say("sorry")
        assert clean.text == "sorry"
        assert await chat.next_event("bob") == unref(clean)
        assert await chat["bob"].history("lobby") == (unref(said), unref(clean))
        sent = await chat["alice"].dm("bob", "what the heck")
        assert sent.text == "what the h**k"
        assert await chat.next_event("bob") == unref(sent)


def test_profanity_filter_loads_as_the_cli_names_it() -> None:
    module, _, attr = "examples.profanity_filter:ProfanityFilter".partition(":")
    plugin = getattr(importlib.import_module(module), attr)()
    assert plugin.clean("darn") == "d**n"


# --- logging_plugin.py ----------------------------------------------------------

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 "


async def exercise(chat: Chat) -> dict[str, str]:
    """Do one of everything the plugin logs; returns the users' addresses."""
    addresses = {user.name: user.address for user in chat.server.users}
    alice = chat["alice"]
    await alice.say("hello")
    await alice.dm("bob", "a secret")
    await alice.join("dev")
    await alice.leave("dev")
    await alice.nick("alicia")
    return addresses


def expected_log(port: int, addresses: dict[str, str]) -> list[str]:
    return [
        f"server started on 127.0.0.1:{port}",
        f"alice connected from {addresses['alice']}",
        "alice joined lobby",
        f"bob connected from {addresses['bob']}",
        "bob joined lobby",
        "[lobby] alice: hello",
        "alice sent a private message to bob",
        "alice joined dev",
        "alice left dev (leave)",
        "alice is now alicia",
        # On closing, the chat's clients leave last first.
        "bob left lobby (bye)",
        "bob disconnected (bye)",
        "alicia left lobby (bye)",
        "alicia disconnected (bye)",
        "server stopping",
    ]


def read_log(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    for line in lines:
        assert re.match(STAMP, line), line
    return [re.sub(STAMP, "", line, count=1) for line in lines]


async def test_logging_plugin_writes_every_event_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "chat.log"
    async with open_chat(
        plugins=[logging_plugin.ChatLog(path)], clients=["alice", "bob"]
    ) as chat:
        addresses = await exercise(chat)
    assert read_log(path) == expected_log(chat.port, addresses)


async def test_logging_plugin_uses_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "from-env.log"
    monkeypatch.setenv("CHATKIT_CHATLOG", str(path))
    plugin = logging_plugin.ChatLog()
    assert plugin.path == path
    async with open_chat(plugins=[plugin], clients=["alice", "bob"]) as chat:
        addresses = await exercise(chat)
    assert read_log(path) == expected_log(chat.port, addresses)


async def test_logging_plugin_logs_to_a_logger_without_a_file(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHATKIT_CHATLOG", raising=False)
    caplog.set_level(logging.INFO, logger="chatlog")
    plugin = logging_plugin.ChatLog()
    assert plugin.path is None
    async with open_chat(plugins=[plugin], clients=["alice", "bob"]) as chat:
        addresses = await exercise(chat)
    records = [r for r in caplog.records if r.name == "chatlog"]
    assert {r.levelno for r in records} == {logging.INFO}
    assert [r.getMessage() for r in records] == expected_log(chat.port, addresses)


async def test_logging_plugin_changes_nothing() -> None:
    async with open_chat(
        plugins=[logging_plugin.ChatLog(logger="chatlog.test")],
        clients=["alice", "bob"],
    ) as chat:
        said = await chat["alice"].say("unchanged")
        assert said.text == "unchanged"
        assert await chat.next_event("bob") == unref(said)


# --- dice.py ----------------------------------------------------------------------


class Loaded(random.Random):
    """Dice that roll 3, 5, 3, 5, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.next = 3

    def randint(self, a: int, b: int) -> int:
        value, self.next = self.next, 8 - self.next
        return min(max(value, a), b)


@pytest.mark.parametrize(
    ("args", "answer"),
    [
        ("2d6", "alice rolled 2d6: 3 + 5 = 8"),
        ("", "alice rolled 1d6: 3"),
        ("d20", "alice rolled 1d20: 3"),
        (" 3D6 + 2 ", "alice rolled 3d6+2: 3 + 5 + 3 + 2 = 13"),
        ("2d6-1", "alice rolled 2d6-1: 3 + 5 - 1 = 7"),
    ],
)
def test_dice_rolls_what_it_is_asked(args: str, answer: str) -> None:
    assert dice.Dice(Loaded()).roll("alice", args) == answer


@pytest.mark.parametrize(
    ("args", "start"),
    [
        ("lots", "alice, I can't read 'lots': try /roll 2d6"),
        ("2d", "alice, I can't read '2d': try /roll 2d6"),
        ("21d6", "alice, that is too many dice or sides: try /roll 2d6"),
        ("0d6", "alice, that is too many dice or sides"),
        ("1d1", "alice, that is too many dice or sides"),
        ("1d1001", "alice, that is too many dice or sides"),
        ("99999999999999999999d6", "alice, that is too many dice or sides"),
    ],
)
def test_dice_answers_bad_input_kindly(args: str, start: str) -> None:
    assert dice.Dice(Loaded()).roll("alice", args).startswith(start)


def test_dice_rolls_fair_dice_within_their_bounds() -> None:
    plugin = dice.Dice(random.Random(21))
    for _ in range(200):
        answer = plugin.roll("bob", f"{dice.MAX_DICE}d{dice.MAX_SIDES}")
        parts, total = answer.split(": ")[1].split(" = ")
        rolls = [int(part) for part in parts.split(" + ")]
        assert len(rolls) == dice.MAX_DICE
        assert all(1 <= roll <= dice.MAX_SIDES for roll in rolls)
        assert sum(rolls) == int(total)


async def test_dice_answers_roll_and_leaves_other_commands(open_raw: OpenRaw) -> None:
    async with chatkit.open_server(plugins=[dice.Dice(Loaded())]) as server:
        alice = await open_raw(server.port)
        await alice.hello("alice")
        await alice.send_json(type="command", name="roll", args="2d6", ref=1)
        assert await alice.expect("command", ref=1) == {
            "type": "command",
            "name": "roll",
            "text": "alice rolled 2d6: 3 + 5 = 8",
            "ref": 1,
        }
        await alice.send_json(type="command", name="roll", args="many", ref=2)
        reply = await alice.expect("command", ref=2)
        assert reply["text"].startswith("alice, I can't read 'many'")
        await alice.send_json(type="command", name="flip", ref=3)
        error = await alice.expect("error", ref=3)
        assert error["message"] == "no command /flip"


# --- audit_log.py ------------------------------------------------------------------


def read_audit(path: Path) -> list[dict[str, object]]:
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    for entry in entries:
        time = entry.pop("time")
        assert isinstance(time, str) and re.fullmatch(STAMP.strip(), time), time
    return entries


async def test_audit_log_writes_one_json_line_per_action(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with open_chat(
        plugins=[audit_log.AuditLog(path)],
        clients=["alice", "bob"],
        operators=["alice"],
    ) as chat:
        await chat["alice"].join("dev")
        await chat["bob"].join("dev")
        await chat.server.mute("bob", room="dev", reason="shh", duration=60)
        await chat.server.unmute("bob", room="dev")
        await chat.server.op("dev", "bob")
        await chat.server.deop("dev", "bob")
        await chat.server.ban(address="203.0.113.0/24", reason="spam")
        await chat.server.unban(address="203.0.113.0/24")
        assert chat.server.kick("bob", "off topic", room="dev")
        # kick() cannot await: its hook runs in a task, soon after.
        await wait_until(lambda: len(path.read_text().splitlines()) == 7)
        await chat.server.ban("bob", reason="enough")
        await wait_until(lambda: len(path.read_text().splitlines()) == 8)
    entries = read_audit(path)
    until = entries[0].pop("until")
    assert isinstance(until, float)
    by = {"by": "*server*"}
    assert entries == [
        {"action": "mute", **by, "name": "bob", "room": "dev", "reason": "shh"},
        {"action": "unmute", **by, "name": "bob", "room": "dev"},
        {"action": "op", **by, "name": "bob", "room": "dev"},
        {"action": "deop", **by, "name": "bob", "room": "dev"},
        {"action": "ban", **by, "address": "203.0.113.0/24", "reason": "spam"},
        {"action": "unban", **by, "address": "203.0.113.0/24"},
        {"action": "kick", **by, "name": "bob", "room": "dev", "reason": "off topic"},
        {"action": "ban", **by, "name": "bob", "reason": "enough"},
    ]


async def test_audit_log_records_operators_requests_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_raw: OpenRaw
) -> None:
    path = tmp_path / "from-env.jsonl"
    monkeypatch.setenv("CHATKIT_AUDIT_LOG", str(path))
    plugin = audit_log.AuditLog()
    assert plugin.path == path
    async with chatkit.open_server(plugins=[plugin], operators=["alice"]) as server:
        alice = await open_raw(server.port)
        await alice.hello("alice")
        await alice.send_json(type="ban", name="eve", reason="spam", ref=1)
        await alice.expect("moderated", ref=1)
    assert read_audit(path) == [
        {"action": "ban", "by": "alice", "name": "eve", "reason": "spam"}
    ]


def test_audit_log_needs_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATKIT_AUDIT_LOG", raising=False)
    with pytest.raises(ValueError, match="CHATKIT_AUDIT_LOG"):
        audit_log.AuditLog()


# --- both plugins under python -m chatkit.server --------------------------------

# What ChatLog logs about alice, in this order, among the server's own log.
LOGGED = (
    "alice connected from",
    "alice joined lobby",
    "[lobby] alice: d**n it",
    "alice left lobby (bye)",
    "alice disconnected (bye)",
)


async def test_the_server_cli_loads_both_plugins(tmp_path: Path) -> None:
    async with run(
        "-m",
        "chatkit.server",
        "--port",
        "0",
        "--db",
        str(tmp_path / "history.sqlite3"),
        "--plugin",
        "examples.profanity_filter:ProfanityFilter",
        "--plugin",
        "examples.logging_plugin:ChatLog",
    ) as server:
        # The CLI announces the port; ChatLog's own lines may come first.
        while not (
            match := re.fullmatch(
                r"Server started on 127\.0\.0\.1:(\d+)", await server.readline()
            )
        ):
            pass
        port = int(match[1])
        async with (
            chatkit.open_client("127.0.0.1", port, name="alice") as alice,
            chatkit.open_client("127.0.0.1", port, name="bob") as bob,
        ):
            said = await alice.say("darn it")
            assert said.text == "d**n it"
            assert await next_event(bob, chatkit.Message) == unref(said)
        server.process.send_signal(signal.SIGTERM)
        status, lines, stderr = await server.finish()
    assert status == 0, stderr
    # ChatLog's lines are in the server's log (whatever its format), as
    # delivered: after ProfanityFilter's rewrite.
    remaining = iter(lines)
    assert all(any(text in line for line in remaining) for text in LOGGED), lines
    assert lines[-1] == "Server has shut down."


# --- echo_bot.py -----------------------------------------------------------------


async def test_echo_bot_echoes_others_until_the_server_shuts_down() -> None:
    async with open_chat(clients=["alice"]) as chat:
        args = ["--host", "127.0.0.1", "--port", str(chat.port), "--name", "echo"]
        async with run(str(EXAMPLES / "echo_bot.py"), *args) as bot:
            assert await bot.readline() == f"echo is listening on 127.0.0.1:{chat.port}"
            await chat.expect("alice", chatkit.Joined, name="echo")
            await chat["alice"].say("hello")
            reply = await chat.expect("alice", chatkit.Message, sender="echo")
            assert reply.text == "alice said: hello"
            # An echo is not echoed: the bot's next reply is to "again".
            await chat["alice"].say("bob said: hi")
            await chat["alice"].say("again")
            reply = await chat.expect("alice", chatkit.Message, sender="echo")
            assert reply.text == "alice said: again"
            await chat.server.aclose("closing time")
            status, lines, stderr = await bot.finish()
    assert status == 0, stderr
    assert lines == [
        "echoed in lobby: alice said: hello",
        "echoed in lobby: alice said: again",
        "stopped: server shutting down: closing time",
    ]
    assert stderr == ""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_echo_bot_leaves_cleanly_on_a_signal(signum: signal.Signals) -> None:
    async with open_chat(clients=["alice"]) as chat:
        args = ["--port", str(chat.port), "--name", "echo"]
        async with run(str(EXAMPLES / "echo_bot.py"), *args) as bot:
            assert await bot.readline() == f"echo is listening on 127.0.0.1:{chat.port}"
            await chat.expect("alice", chatkit.Joined, name="echo")
            bot.process.send_signal(signum)
            left = await chat.expect("alice", chatkit.Left, name="echo")
            assert left == chatkit.Left(room="lobby", name="echo", reason="bye")
            status, lines, stderr = await bot.finish()
    assert status == 0, stderr
    assert lines == [f"stopped: {signum.name} received"]


async def test_echo_bot_reports_a_refused_connection() -> None:
    with refused_port() as sock:
        port = sock.getsockname()[1]
        async with run(str(EXAMPLES / "echo_bot.py"), "--port", str(port)) as bot:
            status, lines, stderr = await bot.finish()
    assert status == 1
    assert lines == []
    assert stderr.startswith("echo bot: ")


# --- embed_in_app.py ---------------------------------------------------------------

TICK = re.compile(r"tick (\d+): (\d+) users? online, (\d+) messages? so far")


async def test_embed_in_app_finishes_after_its_time() -> None:
    args = ["--port", "0", "--seconds", "0.5", "--interval", "10"]
    async with run(str(EXAMPLES / "embed_in_app.py"), *args) as app:
        first = await app.readline()
        status, lines, stderr = await app.finish()
    assert status == 0, stderr
    assert re.fullmatch(r"Server started on 127\.0\.0\.1:\d+", first)
    assert lines == [
        "tick 1: 0 users online, 0 messages so far",
        "Server has shut down.",
    ]
    assert stderr == ""


async def next_server_post(client: chatkit.ChatClient) -> str:
    post = await next_event(client, chatkit.Message, sender=chatkit.SERVER_SENDER)
    return post.text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_embed_in_app_serves_posts_and_stops_on_a_signal(
    signum: signal.Signals,
) -> None:
    args = ["--port", "0", "--seconds", "60", "--interval", "0.05"]
    async with run(str(EXAMPLES / "embed_in_app.py"), *args) as app:
        first = await app.readline()
        match = re.fullmatch(r"Server started on 127\.0\.0\.1:(\d+)", first)
        assert match, first
        async with chatkit.open_client(
            "127.0.0.1", int(match[1]), name="alice"
        ) as alice:
            # The app's heartbeat reaches the lobby, and sees alice...
            while not (await next_server_post(alice)).endswith(
                ": 1 user online, 0 messages so far"
            ):
                pass
            # ...and counts what she says.
            await alice.say("hello")
            while not (await next_server_post(alice)).endswith(
                ": 1 user online, 1 message so far"
            ):
                pass
            app.process.send_signal(signum)
            # A last heartbeat or two may come before the app sees the signal.
            while TICK.fullmatch(post := await next_server_post(alice)):
                pass
            assert post == "the app is shutting down, bye!"
            await next_event(alice, chatkit.Shutdown)
            assert alice.close_reason == "server shutting down: server shutting down"
        status, lines, stderr = await app.finish()
    assert status == 0, stderr
    assert lines[-2:] == [f"{signum.name} received", "Server has shut down."]
    ticks = [TICK.fullmatch(line) for line in lines[:-2]]
    assert all(ticks), lines
    assert [int(tick[1]) for tick in ticks if tick] == list(range(1, len(ticks) + 1))
    assert stderr == ""
