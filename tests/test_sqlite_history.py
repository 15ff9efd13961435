"""History stores: the contract every store keeps (MemoryHistory and
SqliteHistory alike), and SqliteHistory's own promises: history across
restarts, one commit per flush, retention, and clear errors at start-up."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import chatkit
from chatkit import HistoryStore, HistoryStoreError, MemoryHistory, Message
from chatkit._sqlite_file import _INSERT, _SCHEMA
from chatkit.sqlite import SqliteHistory
from tests.helpers import TIMEOUT, RawClient, unref, wait_until
from tests.programs import child_environment


def message(
    id: int, room: str = "lobby", *, age: float = 0.0, text: str = ""
) -> Message:
    return Message(
        id=id, ts=time.time() - age, room=room, sender="alice", text=text or f"m{id}"
    )


def rows(
    path: Path, sql: str = "SELECT room, count(*) FROM messages GROUP BY room"
) -> list[Any]:
    """What ``sql`` finds in the database file (on a connection of its own)."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


class FullDisk:
    """A full disk as SQLite reports it to ``store``: its file may not grow
    until :meth:`free`. (The store must not be flushing: its writer
    connection is borrowed.)"""

    def __init__(self, store: SqliteHistory) -> None:
        file = store._file
        assert file is not None
        db = file._writer
        assert db is not None
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")
        self._db = db

    def free(self) -> None:
        self._db.execute("PRAGMA max_page_count = 1073741823")


# --- the contract -------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[HistoryStore]:
    """An open, empty store of each kind."""
    opened: HistoryStore = (
        MemoryHistory(1000)
        if request.param == "memory"
        else SqliteHistory(tmp_path / "history.sqlite3")
    )
    assert isinstance(opened, HistoryStore)
    async with opened.open() as last_id:
        assert last_id == 0
        yield opened


async def check_queries(store: HistoryStore, said: Sequence[Message]) -> None:
    """Every query, for every room, bound and limit, against a plain list."""
    for room in ("lobby", "dev", "empty"):
        mine = [m for m in said if m.room == room]
        for limit in (1, 2, 5, 1000):
            assert list(await store.recent(room, limit)) == mine[-limit:]
            for bound in range(len(said) + 2):
                older = [m for m in mine if m.id < bound]
                newer = [m for m in mine if m.id > bound]
                assert list(await store.before(room, bound, limit)) == older[-limit:]
                assert list(await store.after(room, bound, limit)) == newer[:limit]


async def test_queries_are_pages_oldest_first(store: HistoryStore) -> None:
    said = [message(n, "dev" if n % 3 == 0 else "lobby") for n in range(1, 16)]
    for m in said:
        store.append(m)
    await check_queries(store, said)
    await store.flush()
    await check_queries(store, said)  # (if SQLite) now from the database
    # More on top: (if SQLite) some written, some not yet.
    more = [message(n, "lobby") for n in range(16, 21)]
    for m in more:
        store.append(m)
    await check_queries(store, said + more)


# --- SqliteHistory -------------------------------------------------------------


async def test_queries_see_messages_not_written_yet(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path)
    async with store.open():
        said = [message(n) for n in range(1, 6)]
        for m in said:
            store.append(m)
        assert (store.pending, store.commits) == (5, 0)
        assert list(await store.recent("lobby", 3)) == said[-3:]
        assert list(await store.before("lobby", 3, 5)) == said[:2]
        assert list(await store.after("lobby", 3, 1)) == said[3:4]
        assert rows(path) == []
    # Closing writes everything, in one commit.
    assert (store.pending, store.commits, store.written) == (0, 1, 5)
    assert rows(path) == [("lobby", 5)]
    async with store.open() as last_id:
        assert last_id == 5
        assert list(await store.recent("lobby", 10)) == said


@asynccontextmanager
async def chat_on(path: Path, *names: str) -> AsyncIterator[list[chatkit.ChatClient]]:
    """A server keeping history in ``path``, and a client for each name."""
    async with (
        chatkit.open_server(history=SqliteHistory(path)) as server,
        AsyncExitStack() as stack,
    ):
        yield [
            await stack.enter_async_context(
                chatkit.open_client("127.0.0.1", server.port, name=name)
            )
            for name in names
        ]


async def test_restarted_server_keeps_history_and_ids_keep_increasing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chat.sqlite3"
    async with chat_on(path, "alice") as (alice,):
        await alice.join("dev")
        said = [
            unref(await alice.say(f"before the restart {n}", "dev")) for n in (1, 2)
        ]

    async with chat_on(path, "bob") as (bob,):
        await bob.join("dev")
        assert await bob.history("dev") == tuple(said)
        after = unref(await bob.say("after the restart", "dev"))
        assert after.id > said[-1].id
        assert await bob.history("dev", after=said[0].id) == (said[1], after)


async def test_direct_message_ids_are_not_reused_after_a_restart(
    tmp_path: Path,
) -> None:
    # Direct messages are not stored, but their ids come from the same
    # counter: the store keeps the highest one (SqliteHistory.note_id).
    path = tmp_path / "chat.sqlite3"
    async with chat_on(path, "alice", "bob") as (alice, _):
        said = await alice.say("hello")
        dms = [await alice.dm("bob", f"psst {n}") for n in range(3)]
    assert [dm.id for dm in dms] == [said.id + 1, said.id + 2, said.id + 3]
    async with chat_on(path, "alice") as (alice,):
        assert (await alice.say("after the restart")).id == dms[-1].id + 1


async def test_a_noted_id_is_written_by_the_next_flush(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path)
    last_id = "SELECT value FROM meta WHERE key = 'last_id'"
    async with store.open():
        store.note_id(42)  # no message to store: only the id is written
        assert rows(path, last_id) == [(0,)]
        await store.flush()
        assert rows(path, last_id) == [(42,)]
        assert (store.commits, store.written) == (1, 0)
        await store.flush()  # nothing new: no transaction
        assert store.commits == 1


async def test_a_flush_is_one_commit_of_everything_appended(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path)
    async with store.open():
        for n in range(1, 101):
            store.append(message(n, "dev" if n % 2 else "lobby"))
        assert rows(path) == []
        await store.flush()
        assert (store.commits, store.written, store.pending) == (1, 100, 0)
        assert sorted(rows(path)) == [("dev", 50), ("lobby", 50)]


CRASH = """
import os, sys, time, trio
from chatkit import Message
from chatkit.sqlite import SqliteHistory

def message(id, text):
    return Message(id=id, ts=time.time(), room="lobby", sender="a", text=text)

async def main():
    store = SqliteHistory(sys.argv[1])
    async with store.open():
        store.append(message(1, "kept"))
        store.note_id(2)  # a direct message's
        await store.flush()
        store.append(message(3, "never flushed, so never seen"))
        os._exit(1)  # a crash

trio.run(main)
"""


async def test_after_a_crash_ids_go_on_from_what_was_flushed(tmp_path: Path) -> None:
    # Only flushed messages were ever seen (the server flushes before it
    # shows one), so after a crash the ids go on from the last flushed id:
    # no id anyone saw is given again, and none is skipped for nothing.
    path = tmp_path / "history.sqlite3"
    crash = await trio.run_process(
        [sys.executable, "-c", CRASH, str(path)],
        env=child_environment(),
        capture_stderr=True,
        check=False,
    )
    assert crash.returncode == 1, crash.stderr
    assert rows(path, "SELECT id, text FROM messages") == [(1, "kept")]
    store = SqliteHistory(path)
    async with store.open() as last_id:
        assert last_id == 2


async def test_a_burst_of_10000_messages_is_written_in_a_few_commits(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chat.sqlite3"
    store = SqliteHistory(path)
    count = 10_000
    async with chatkit.open_server(
        history=store,
        limits=chatkit.Limits(rate_limit=None),
    ) as server:
        alice = await RawClient.open(server.port)
        try:
            await alice.hello("alice")
            await alice.receive_json()  # joined lobby
            start = trio.current_time()
            # One packet of 10,000 requests: the server reads them as one burst.
            await alice.send_bytes(
                b"".join(
                    b'{"type":"say","room":"lobby","text":"m%d"}\n' % n
                    for n in range(count)
                )
            )
            echoed = 0
            with trio.fail_after(TIMEOUT * 4):
                while echoed < count:
                    data = await alice.stream.receive_some(1 << 20)
                    assert data
                    echoed += data.count(b"\n")
            elapsed = trio.current_time() - start
            # Every acknowledgement came after its message was committed.
            assert store.written == count
        finally:
            await alice.aclose()
    assert store.commits < count / 10, store.commits
    # Printed with -s: the figures docs/deployment.md quotes.
    print(f"\n{count} messages: {store.commits} commits, {elapsed:.2f} s to disk")
    assert rows(path) == [("lobby", count)]
    assert rows(path, "SELECT min(id), max(id) FROM messages") == [(1, count)]


async def test_retention_by_count(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path, max_messages_per_room=3, prune_interval=0)
    async with store.open():
        for n in range(1, 11):
            store.append(message(n, "busy"))
        store.append(message(11, "quiet"))
        store.append(message(12, "quiet"))
        await store.flush()  # prune_interval=0: retention after each commit
        assert store.pruned == 7
        assert sorted(rows(path)) == [("busy", 3), ("quiet", 2)]
        assert [m.id for m in await store.recent("busy", 10)] == [8, 9, 10]
    # A smaller limit applies at start-up, and ids still continue.
    smaller = SqliteHistory(path, max_messages_per_room=1)
    async with smaller.open() as last_id:
        assert last_id == 12
        assert smaller.pruned == 3
    assert sorted(rows(path)) == [("busy", 1), ("quiet", 1)]


async def test_retention_by_age(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path, max_age=60, prune_interval=0)
    async with store.open():
        old = [message(n, age=3600) for n in range(1, 4)]
        new = [message(n, age=30) for n in range(4, 6)]
        for m in old + new:
            store.append(m)
        # Too old is never returned, deleted yet or not.
        assert list(await store.recent("lobby", 10)) == new
        await store.flush()
        assert store.pruned == 3
        assert rows(path) == [("lobby", 2)]
        assert list(await store.after("lobby", 0, 10)) == new
        store.append(message(6, age=3600))
    # Once everything has expired, the ids still go on from the highest.
    async with SqliteHistory(path, max_age=10).open() as last_id:
        assert last_id == 6
    assert rows(path) == []


async def test_retention_by_count_is_applied_by_each_commit(tmp_path: Path) -> None:
    # No pass needed (the interval is an hour): the commit that makes a room
    # too long deletes its oldest messages, burst or not.
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path, max_messages_per_room=10, prune_interval=3600)
    async with store.open():
        for n in range(1, 5011):
            store.append(message(n, "busy" if n % 2 else "quiet"))
        await store.flush()
        assert store.pruned == 4990
        assert sorted(rows(path)) == [("busy", 10), ("quiet", 10)]
        store.append(message(5011, "busy"))
        await store.flush()
        assert store.pruned == 4991
        assert [m.id for m in await store.recent("busy", 100)][-3:] == [
            5007,
            5009,
            5011,
        ]
    assert sorted(rows(path)) == [("busy", 10), ("quiet", 10)]
    async with store.open() as last_id:
        assert last_id == 5011


async def test_retention_by_count_counts_what_age_deleted(tmp_path: Path) -> None:
    # Messages deleted for their age no longer count towards a room's
    # limit: the next commits delete none of the newer ones.
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path, max_messages_per_room=3, max_age=60, prune_interval=0)
    async with store.open():
        for n in range(1, 4):
            store.append(message(n, age=3600))
        await store.flush()  # committed, then expired at once
        assert rows(path) == []
        for n in range(4, 7):
            store.append(message(n))
        await store.flush()
        assert [m.id for m in await store.recent("lobby", 10)] == [4, 5, 6]
        store.append(message(7))
        await store.flush()
        assert [m.id for m in await store.recent("lobby", 10)] == [5, 6, 7]
    assert rows(path) == [("lobby", 3)]


async def test_retention_by_age_runs_every_prune_interval(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path, max_age=60, prune_interval=0.05)
    async with store.open():
        for n in range(1, 6):
            store.append(message(n, age=3600 if n <= 3 else 0))
        await store.flush()
        assert rows(path) == [("lobby", 5)]  # not at the commit
        await wait_until(lambda: store.pruned == 3)
        assert rows(path) == [("lobby", 2)]


async def test_a_large_expired_backlog_is_pruned_in_small_transactions(
    tmp_path: Path,
) -> None:
    # 4,990 messages expired (a burst, then a quiet spell): every one goes,
    # the others kept, and flushes go on meanwhile.
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path, max_age=60, prune_interval=0.05)
    async with store.open():
        for n in range(1, 5011):
            store.append(message(n, "busy" if n % 2 else "quiet", age=3600))
        await store.flush()
        commits = store.commits
        await wait_until(lambda: store.pruned >= 1000)
        store.append(message(5011, "busy"))
        await store.flush()
        assert store.commits == commits + 1
        await wait_until(lambda: store.pruned == 5010)
        assert [m.id for m in await store.recent("busy", 100)] == [5011]
    assert rows(path) == [("busy", 1)]
    async with store.open() as last_id:
        assert last_id == 5011


async def test_the_last_id_survives_retention_of_every_message(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path, max_age=60, prune_interval=0)
    async with store.open():
        store.append(message(7, age=3600))
        await store.flush()  # written, then pruned at once
        assert store.pruned == 1
    assert rows(path) == []
    async with store.open() as last_id:
        assert last_id == 7


async def test_a_full_disk_refuses_that_flush_and_the_next_one_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path)
    async with store.open():
        store.append(message(1))
        await store.flush()
        disk = FullDisk(store)
        refused = [message(n, text="x" * 200) for n in range(2, 502)]
        for m in refused:
            store.append(m)
        with pytest.raises(HistoryStoreError, match="full"):
            await store.flush()
        assert "cannot write 500 messages" in caplog.text
        # Let go: not queued any more, not in the answers, not on disk.
        assert (store.commits, store.pending, store.failed) == (1, 0, 500)
        assert list(await store.after("lobby", 1, 1000)) == []
        disk.free()
        store.append(message(502))
        await store.flush()
        assert [m.id for m in await store.recent("lobby", 10)] == [1, 502]
    assert store.commits == 2
    assert rows(path, "SELECT id FROM messages") == [(1,), (502,)]
    async with store.open() as last_id:
        assert last_id == 502


async def test_a_failed_flush_does_not_take_messages_appended_while_it_waited(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # A flush commits what was appended before it was called. This one waits
    # for another connection's write transaction (in a worker thread: the
    # file is busy) while three more messages are appended; its commit
    # fails (full disk). The three are not let go with it: the next flush
    # writes them.
    #
    # Deterministic, no timing: the clock only moves when the test jumps it
    # (it never does: the store's loops stay asleep), and the test holds the
    # write transaction on a connection of its own until it rolls back; the
    # flush waits for it (busy timeout 5 s, far more than the few scheduler
    # rounds the test needs).
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path, prune_interval=10)
    async with store.open():
        store.append(message(1))
        await store.flush()
        disk = FullDisk(store)
        before = [message(n, text="x" * 200) for n in range(2, 502)]
        later = [message(n) for n in range(502, 505)]
        refused: list[HistoryStoreError] = []

        async def first_flush() -> None:
            try:
                await store.flush()
            except HistoryStoreError as exc:
                refused.append(exc)

        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            for m in before:
                store.append(m)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_flush)
                await trio.testing.wait_all_tasks_blocked()
                assert (refused, store.commits, store.pending) == ([], 1, 500)
                for m in later:
                    store.append(m)  # while the first flush waits
                blocker.execute("ROLLBACK")  # the pass goes on, then the flush
        finally:
            blocker.close()
        assert len(refused) == 1
        assert "full" in str(refused[0])
        assert (store.commits, store.failed, store.pending) == (1, 500, 3)
        assert list(await store.after("lobby", 1, 1000)) == later
        disk.free()
        await store.flush()
        assert (store.commits, store.written, store.pending) == (2, 4, 0)
    assert rows(path, "SELECT id FROM messages") == [(1,), (502,), (503,), (504,)]


async def test_another_writer_on_the_file_does_not_stop_the_event_loop(
    tmp_path: Path,
) -> None:
    # An sqlite3 shell holding a write transaction on the file: a flush
    # waits for it (the server's output with it), but the event loop runs
    # on meanwhile (other connections read, time out, get answers), and the
    # flush commits once the shell lets go.
    path = tmp_path / "history.sqlite3"
    store = SqliteHistory(path)
    async with store.open():
        shell = sqlite3.connect(path, isolation_level=None)
        try:
            shell.execute("BEGIN IMMEDIATE")
            store.append(message(1))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.flush)
                started = time.monotonic()
                await trio.sleep(0.2)  # the loop is not held by the flush
                assert time.monotonic() - started < 1.0
                assert store.commits == 0
                shell.execute("ROLLBACK")
        finally:
            shell.close()
        assert (store.commits, store.written) == (1, 1)
    assert rows(path) == [("lobby", 1)]


# --- errors at start-up --------------------------------------------------------


def garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a database, " * 200)
    return path


def damaged(path: Path) -> Path:
    """A real history database with a page in its middle overwritten."""
    db = sqlite3.connect(path)
    db.executescript(";".join(_SCHEMA) + ";PRAGMA user_version = 1")
    db.executemany(
        _INSERT,
        [(n, "lobby", 0.0, "alice", "x" * 100) for n in range(1, 2001)],
    )
    db.commit()
    db.close()
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.seek(size // 2 // 4096 * 4096)
        file.write(b"\xff" * 4096)
    return path


def foreign(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE accounts (name TEXT)")
    db.commit()
    db.close()
    return path


def newer(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (garbage, "file is not a database"),
        (damaged, r"it is damaged \(.+\)$"),
        (foreign, "it is a SQLite database, but not a chatkit history"),
        (newer, r"schema version 99 is newer than this chatkit's \(1\)"),
        (lambda path: path.parent, "it is a directory"),
        (lambda path: path / "no" / "db", "no such directory .*/no$"),
    ],
    ids=["garbage", "damaged", "foreign", "newer", "directory", "no-directory"],
)
async def test_a_bad_database_stops_the_server_before_it_listens(
    tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    path = make(tmp_path / "history.sqlite3")
    server = chatkit.ChatServer(history=SqliteHistory(path))
    with pytest.raises(HistoryStoreError) as caught:
        await server.serve()
    assert caught.match(f"^cannot open history database {path}: {reason}")
    # It bound its port first (see the next test), and closed it unserved.
    assert server.port != 0
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", server.port)


async def test_a_server_that_cannot_listen_creates_no_database(
    tmp_path: Path,
) -> None:
    # The address is taken before the store opens: a port in use leaves no
    # history.sqlite3 (nor its -wal, -shm or .lock) behind.
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = chatkit.ChatServer(
            port=port, history=SqliteHistory(tmp_path / "history.sqlite3")
        )
        with pytest.raises(OSError):
            await server.serve()
    assert os.listdir(tmp_path) == []


async def test_a_read_only_database_stops_the_server(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    async with SqliteHistory(path).open():
        pass
    path.chmod(0o444)
    # Root writes read-only files anyway (and CI runs as root): there, make
    # the file immutable instead, so that the check runs everywhere.
    immutable = os.geteuid() == 0
    if immutable:
        await trio.run_process(["chattr", "+i", str(path)])
    try:
        with pytest.raises(HistoryStoreError, match="readonly database"):
            async with SqliteHistory(path).open():
                pass
    finally:
        if immutable:
            await trio.run_process(["chattr", "-i", str(path)])


def test_arguments_are_checked() -> None:
    for bad in (
        {"max_messages_per_room": 0},
        {"max_age": 0},
        {"prune_interval": -1},
    ):
        with pytest.raises(ValueError):
            SqliteHistory("history.sqlite3", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MemoryHistory"):
        SqliteHistory(":memory:")


async def test_two_servers_cannot_share_a_database(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    async with SqliteHistory(path).open():
        with pytest.raises(HistoryStoreError, match="another server is using it"):
            async with SqliteHistory(path).open():
                pass
    async with SqliteHistory(path).open():  # free again once closed
        pass


async def test_a_store_opens_once_at_a_time(tmp_path: Path) -> None:
    store = SqliteHistory(tmp_path / "history.sqlite3")
    async with store.open():
        with pytest.raises(RuntimeError, match="already open"):
            async with store.open():
                pass
    with pytest.raises(RuntimeError, match="not open"):
        await store.recent("lobby", 1)
