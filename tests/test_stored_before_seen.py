"""A message acknowledged by a server with a SQLite history is on disk: a
crash of the server process right after the acknowledgement does not lose
it.

Issue: "``kill -9`` of the CLI server right after a ``say`` was
acknowledged loses that message: the ack goes out before SQLite has it
(``batch_delay`` 0.05 s)." An acknowledged message (the sender's own copy,
with its ``ref``) is one the sender may forget about; so it, and what the
other members see, must come only once the store has committed it.

The first test is the issue's reproduction with the CLI server as a
subprocess; the second the same with an embedded server (``open_server``
and ``chatkit.open_client``) in a child process that ends with ``os._exit``;
the last two check, in process, that the database file holds a message by
the time a client sees it (read from the file on a connection of the
test's own, as ``tests/test_sqlite_history.py`` does).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import trio

import chatkit
from tests.conftest import OpenRaw, crowd, login
from tests.helpers import RawClient
from tests.programs import Launch, child_environment, start_server

N = 50
"""Messages said before the crash: they all fit in one ``batch_delay``, so
without the fix the kill comes before any of them was committed."""


async def say_and_wait_for_acks(client: RawClient, texts: list[str]) -> None:
    """Say each of ``texts`` in turn, waiting for its acknowledgement (the
    sender's own copy, with the ref) before the next."""
    for ref, text in enumerate(texts):
        await client.send_json(type="say", room="lobby", text=text, ref=ref)
        ack = await client.receive_json()
        assert (ack["type"], ack.get("text"), ack.get("ref")) == (
            "message",
            text,
            ref,
        ), ack


async def test_acknowledged_messages_survive_kill_9_of_the_cli_server(
    launch: Launch, open_raw: OpenRaw, tmp_path: Path
) -> None:
    """``python -m chatkit.server --db chat.sqlite3``; alice says 50
    messages, each acknowledged before the next; the server is killed with
    SIGKILL at once after the last acknowledgement and started again on
    the same database.

    What the user sees: ``history`` on the restarted server holds all 50
    messages, in order (before the fix, the last ``batch_delay``'s worth
    of them, here all 50, were gone). The ``launch`` fixture kills any
    server still running at teardown, whatever happened.
    """
    db = str(tmp_path / "chat.sqlite3")
    args = ("--db", db, "--no-interactive", "--rate-limit", "0")
    server, port = await start_server(launch, *args)
    alice = await login(open_raw, port, "alice")
    texts = [f"message {n}" for n in range(N)]
    await say_and_wait_for_acks(alice, texts)
    server.process.kill()  # SIGKILL: no graceful stop, no flush
    assert await server.wait() == -9

    _restarted, port = await start_server(launch, *args)
    bob = await login(open_raw, port, "bob")
    await bob.send_json(type="history", room="lobby", limit=100, ref="h")
    reply = await bob.receive_json()
    assert (reply["type"], reply.get("ref")) == ("history", "h"), reply
    found = [m["text"] for m in reply["messages"]]
    assert found == texts, f"{N - len(found)} acknowledged messages lost"


CRASH = """
import os, sys, trio, chatkit

async def main():
    store = chatkit.SqliteHistory(sys.argv[1])
    limits = chatkit.Limits(rate_limit=None)
    async with chatkit.open_server(history=store, limits=limits) as server:
        async with chatkit.open_client(port=server.port, name="alice") as alice:
            for n in range(int(sys.argv[2])):
                await alice.say(f"message {n}")  # returns once acknowledged
            os._exit(3)  # a crash, right after the last acknowledgement

trio.run(main)
"""


async def test_acknowledged_messages_survive_a_crash_of_an_embedded_server(
    tmp_path: Path,
) -> None:
    """An embedded server (``open_server`` with a ``SqliteHistory``) and a
    ``ChatClient`` in a child process: ``say`` returns 50 times, then the
    process ends at once (``os._exit``).

    What the user sees: the database, opened again, holds all 50 messages
    (before the fix, none of them, or only the first few).
    """
    path = tmp_path / "chat.sqlite3"
    crash = await trio.run_process(
        [sys.executable, "-c", CRASH, str(path), str(N)],
        env=child_environment(),
        capture_stderr=True,
        check=False,
    )
    assert crash.returncode == 3, crash.stderr.decode()
    store = chatkit.SqliteHistory(path)
    async with store.open():
        found = [m.text for m in await store.recent("lobby", 100)]
    assert found == [f"message {n}" for n in range(N)], (
        f"{N - len(found)} acknowledged messages lost"
    )


def stored_text(path: Path, id: int) -> str | None:
    """The text of message ``id`` in the database file, read on a connection
    of our own (so only what was committed), or None."""
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT text FROM messages WHERE id = ?", (id,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


async def test_the_sender_sees_its_message_only_once_it_is_on_disk(
    open_raw: OpenRaw, tmp_path: Path
) -> None:
    """alice says ten messages with a ``SqliteHistory`` server (default
    ``batch_delay``).

    What the user sees: when alice gets a message back (its
    acknowledgement), the database file already holds it (before the fix,
    the commit came up to ``batch_delay`` later).
    """
    path = tmp_path / "chat.sqlite3"
    async with chatkit.open_server(history=chatkit.SqliteHistory(path)) as server:
        (alice,) = await crowd(open_raw, server.port, "alice")
        for n in range(10):
            text = f"message {n}"
            await alice.send_json(type="say", room="lobby", text=text, ref=n)
            ack = await alice.receive_json()
            assert (ack["type"], ack.get("ref")) == ("message", n), ack
            assert stored_text(path, ack["id"]) == text, f"{text!r} not on disk yet"


async def test_other_members_see_a_message_only_once_it_is_on_disk(
    open_raw: OpenRaw, tmp_path: Path
) -> None:
    """alice says ten messages with a ``SqliteHistory`` server; bob reads
    them.

    What the user sees: when bob gets a message, the database file already
    holds it, so that no one has seen a message a crash could still lose
    (before the fix, bob got it before it was committed).
    """
    path = tmp_path / "chat.sqlite3"
    async with chatkit.open_server(history=chatkit.SqliteHistory(path)) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        for n in range(10):
            text = f"message {n}"
            await alice.send_json(type="say", room="lobby", text=text, ref=n)
            event = await bob.receive_json()
            assert (event["type"], event.get("text")) == ("message", text), event
            assert stored_text(path, event["id"]) == text, f"{text!r} not on disk yet"
            assert (await alice.receive_json()).get("ref") == n
