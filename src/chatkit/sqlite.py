"""Room history in a SQLite database file: :class:`SqliteHistory`.

History kept this way survives restarts, and message ids keep increasing
across them. It is the server CLI's default store (``--db``); embed it with
``ChatServer(history=SqliteHistory("chat.sqlite3"))``.

How it works: :meth:`SqliteHistory.append` only queues the message in
memory; :meth:`SqliteHistory.flush`, which the server awaits before anyone
sees the messages of a read round, writes everything queued in one
transaction (one commit): a small one on the event loop's thread (an append
to the WAL file, never a sync of the disk), a large one in a trio worker
thread. Checkpoints (which sync the disk) and retention run in worker
threads, in the background. Queries read from the database in a worker thread
too, and add the queued messages not yet committed, so that they see
everything appended. The database is in WAL mode with
``synchronous=NORMAL``: a commit is in the operating system's hands before
any client sees its messages, which survives a crash (``kill -9``) of the
server but not of the machine (a power cut may lose the last commits).

This is the one module of chatkit that uses threads (``sqlite3`` has no
non-blocking interface): each connection is used by one thread at a time,
and every thread is run and awaited by ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from itertools import chain
from typing import Any

import trio

from ._events import Message
from .history import HistoryStoreError

__all__ = ["SqliteHistory"]

log = logging.getLogger("chatkit.sqlite")

# Seconds between two checkpoints of the WAL (when something was committed).
_CHECKPOINT_INTERVAL = 1.0
# Most messages retention deletes in one transaction.
_PRUNE_CHUNK = 1000

SCHEMA_VERSION = 1
"""The ``PRAGMA user_version`` of a database this module writes."""

_SCHEMA = (
    """
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        room TEXT NOT NULL,
        ts REAL NOT NULL,
        sender TEXT NOT NULL,
        text TEXT NOT NULL
    )
    """,
    "CREATE INDEX messages_room_id ON messages (room, id)",
    # The highest id ever written, kept apart from the messages: retention
    # may delete every message, and ids must still not start again at 1.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "INSERT INTO meta (key, value) VALUES ('last_id', 0)",
)
_INSERT = "INSERT INTO messages (id, room, ts, sender, text) VALUES (?, ?, ?, ?, ?)"
_SET_LAST_ID = "UPDATE meta SET value = max(value, ?) WHERE key = 'last_id'"
_SET_LAST_ID_FROM_MESSAGES = """
    UPDATE meta SET value = max(value, coalesce((SELECT max(id) FROM messages), 0))
    WHERE key = 'last_id'
"""
# The oldest messages of a room past the newest ?2, at most ?3 of them (-1:
# all), and likewise those older than a time.
_PRUNE_ROOM = """
    DELETE FROM messages WHERE id IN (
        SELECT id FROM messages WHERE room = ?1 AND id <= (
            SELECT id FROM messages WHERE room = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2
        ) ORDER BY id LIMIT ?3
    )
"""
_PRUNE_AGE = """
    DELETE FROM messages WHERE id IN (
        SELECT id FROM messages WHERE +ts < ?1 ORDER BY id LIMIT ?2
    )
"""
# The unary plus keeps SQLite off the ts index here: (room, id) is the one.
_COLUMNS = "SELECT id, ts, sender, text FROM messages WHERE room = ? AND +ts >= ?"


class SqliteHistory:
    """Every room's history in a SQLite database file, kept across restarts.

    Appending is cheap and never waits for the disk: messages are queued,
    and :meth:`flush` commits everything queued in one transaction. The
    server flushes before anyone sees a message (its sender included), so a
    message that was acknowledged is on disk: a crash of the server process
    loses none of them. A graceful stop writes anything left.

    Retention is applied when the store opens and every ``prune_interval``
    seconds (to the rooms written since), so a room may briefly hold a few
    more than ``max_messages_per_room``; messages older than ``max_age`` are
    never returned, deleted or not yet.

    Errors:

    - The database cannot be opened or is not a chatkit history database
      (a directory, a missing directory, a corrupt or read-only file): the
      server does not start; :meth:`open` raises
      :class:`~chatkit.HistoryStoreError`, naming the path.
    - A write fails while serving (disk full, I/O error): :meth:`flush`
      logs it and raises :class:`~chatkit.HistoryStoreError`; the messages
      of that commit are let go (the server shows them to nobody and tells
      their senders ``error unavailable``), and the next flush tries with
      the next messages. Memory stays bounded, chat carries on, and nothing
      anyone saw is missing from the file.
    - A read fails: the error is logged and the query answers with the
      messages not yet written only.

    One server per database file: two servers writing one file would give
    out the same ids, so the store locks ``PATH.lock`` (``flock``) while
    open and a second one fails to open (``HistoryStoreError``).

    Args:
        path: the database file; created (with its schema) if missing. Its
            directory must exist. SQLite adds ``-wal`` and ``-shm`` files
            next to it while it is open.
        max_messages_per_room: messages kept per room; ``None``: no limit.
        max_age: seconds a message is kept; ``None``: no limit.
        prune_interval: seconds between two retention passes; ``0``: after
            every commit.
        inline_commit: a flush of at most this many messages commits on the
            event loop's thread (about 20 µs: the writer appends to the WAL
            file and never syncs the disk, checkpoints being made in a
            worker thread); a larger one, in a worker thread (whose
            hand-off alone costs more: docs/performance.md). ``0``: always
            in a worker thread.

    Raises:
        ValueError: an argument is out of range, or ``path`` is
            ``":memory:"`` (use :class:`~chatkit.MemoryHistory`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_messages_per_room: int | None = 10_000,
        max_age: float | None = None,
        prune_interval: float = 10.0,
        inline_commit: int = 64,
    ) -> None:
        self.path = os.fspath(path)
        """The database file."""
        if self.path in ("", ":memory:"):
            raise ValueError("SqliteHistory needs a file; use MemoryHistory instead")
        if max_messages_per_room is not None and max_messages_per_room < 1:
            raise ValueError("max_messages_per_room must be at least 1 (or None)")
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be positive (or None)")
        if prune_interval < 0:
            raise ValueError("prune_interval cannot be negative")
        if inline_commit < 0:
            raise ValueError("inline_commit cannot be negative")
        self.inline_commit = inline_commit
        self.max_messages_per_room = max_messages_per_room
        self.max_age = max_age
        self.prune_interval = prune_interval
        self.commits = 0
        """Transactions committed since this object was made (one a flush)."""
        self.written = 0
        """Messages committed since this object was made."""
        self.failed = 0
        """Messages a flush could not write (and let go)."""
        self.pruned = 0
        """Messages deleted by retention since this object was made."""
        # Queued messages, oldest first, and the batch being written: both
        # are seen by queries until committed.
        self._pending: collections.deque[Message] = collections.deque()
        self._writing: tuple[Message, ...] = ()
        # Messages ever appended, and ever taken from _pending by a commit.
        self._appended = self._taken = 0
        # The highest id handed out (messages, and ids noted by note_id),
        # and the highest one recorded as last_id: no id is given again
        # after a restart.
        self._highest = 0
        self._recorded = 0
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # Checkpoints the WAL into the database file in the background: the
        # writer never does (a checkpoint syncs the disk, and the server
        # waits for the writer's commits before it shows a message).
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointed_at = 0  # commits then
        self._lock_fd = -1  # PATH.lock, locked while open (see _lock)
        # The reader is shared by every query; one thread at a time uses it.
        # The writer is used by one flush or retention pass at a time.
        self._read_limiter = trio.CapacityLimiter(1)
        self._write_lock = trio.Lock()
        self._touched: set[str] = set()  # rooms written since the last prune
        self._open = False

    @property
    def pending(self) -> int:
        """Messages appended but not committed yet."""
        return len(self._pending) + len(self._writing)

    @property
    def _unrecorded(self) -> bool:
        """An id was handed out above the ``last_id`` written."""
        return self._recorded < self._highest

    @asynccontextmanager
    async def open(self) -> AsyncIterator[int]:
        """Open the database for the duration of an ``async with`` block.

        Creates the file and its schema if needed, applies retention and
        yields the highest message id ever stored (``0`` for a new file).
        Applies retention in a task of its own until the block ends, then
        writes every queued message (even when cancelled) and closes the
        database.

        Raises:
            HistoryStoreError: the database cannot be opened or used, or is
                not a chatkit history database; the message names the path.
            RuntimeError: the store is already open.
        """
        if self._open:
            raise RuntimeError(f"{self.path} is already open")
        self._open = True
        try:
            last_id = await trio.to_thread.run_sync(self._connect)
        except BaseException:
            self._open = False
            raise
        self._highest = self._recorded = last_id
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._retention_loop)
                nursery.start_soon(self._checkpoint_loop)
                try:
                    yield last_id
                except BaseException as exc:
                    # Re-raised below, outside the nursery, so it is not
                    # wrapped in an ExceptionGroup (an OSError from the
                    # server's listen must stay an OSError).
                    body_error = exc
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    with suppress(HistoryStoreError):
                        await self.flush()
                finally:
                    await self._close()
                    self._open = False
        if body_error is not None:
            raise body_error

    def append(self, message: Message) -> None:
        """Queue ``message`` for the next :meth:`flush`; never blocks."""
        if message.id > self._highest:
            self._highest = message.id
        self._pending.append(message)
        self._appended += 1

    def note_id(self, id: int) -> None:
        """Record that ``id`` was handed out without a message to store (a
        direct message's): written with the next :meth:`flush`, so that it
        is not given again after a restart."""
        if id > self._highest:
            self._highest = id

    async def flush(self) -> None:
        """Commit everything queued (and the highest id handed out) in one
        transaction (see ``inline_commit``).

        Raises:
            HistoryStoreError: the write failed (logged); those messages are
                let go.
        """
        if not self._pending and not self._unrecorded:
            return
        # What this flush answers for: the messages appended before it was
        # called. Later ones (appended while it waits) are their own
        # flush's: if this one fails, they must not fail with it unseen.
        upto = self._appended
        highest = self._highest
        lock = self._write_lock
        try:
            # Not a checkpoint when the lock is free: the server awaits a
            # flush before every message is shown, and a trip through the
            # scheduler costs more than a small commit.
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()  # a retention pass holds the writer
        try:
            await self._commit(upto, highest)
        finally:
            lock.release()
        if self.prune_interval == 0:
            await self._prune_touched()

    async def _commit(self, upto: int, highest: int) -> None:
        # Under the write lock: the queued messages among the first ``upto``
        # ever appended (an earlier flush may have taken some), and
        # ``highest``.
        count = upto - self._taken
        if count <= 0 and self._recorded >= highest:
            return
        if self._writer is None:
            raise HistoryStoreError(f"history database {self.path} is not open")
        pending = self._pending
        batch = self._writing = tuple(pending.popleft() for _ in range(max(0, count)))
        self._taken += len(batch)
        try:
            if len(batch) <= self.inline_commit:
                rooms = self._insert(batch, highest)
            else:
                # Not cancellable once the thread runs: the commit's outcome
                # is always known here.
                rooms = await trio.to_thread.run_sync(self._insert, batch, highest)
        except (sqlite3.Error, OSError) as exc:
            self.failed += len(batch)
            log.exception(
                "history database %s: cannot write %d messages", self.path, len(batch)
            )
            raise HistoryStoreError(
                f"history database {self.path}: cannot write: {exc}"
            ) from exc
        finally:
            self._writing = ()
        self._recorded = max(self._recorded, highest)
        self.commits += 1
        self.written += len(batch)
        self._touched |= rooms

    async def recent(self, room: str, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room``, oldest first."""
        found = await self._query(
            room,
            "ORDER BY id DESC LIMIT ?",
            (limit,),
            lambda message: True,
        )
        return found[max(0, len(found) - limit) :]

    async def before(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room`` with an id below ``id``."""
        found = await self._query(
            room,
            "AND id < ? ORDER BY id DESC LIMIT ?",
            (id, limit),
            lambda message: message.id < id,
        )
        return found[max(0, len(found) - limit) :]

    async def after(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The oldest ``limit`` messages of ``room`` with an id above ``id``."""
        found = await self._query(
            room,
            "AND id > ? ORDER BY id LIMIT ?",
            (id, limit),
            lambda message: message.id > id,
        )
        return found[:limit]

    # --- queries ------------------------------------------------------------

    async def _query(
        self,
        room: str,
        where: str,
        params: tuple[int, ...],
        keep: Callable[[Message], bool],
    ) -> list[Message]:
        """Messages of ``room`` matching the SQL ``where`` (after the room
        and age conditions) and, among those not committed yet, ``keep``:
        all sorted by id; the caller takes its slice."""
        if self._reader is None:
            raise RuntimeError(f"{self.path} is not open")
        cutoff = -float("inf") if self.max_age is None else time.time() - self.max_age
        # The queued messages are taken before the database is read: one
        # committed in between is then found twice (merged by id), never
        # missed.
        found = {
            m.id: m
            for m in chain(self._writing, self._pending)
            if m.room == room and m.ts >= cutoff and keep(m)
        }
        try:
            rows = await trio.to_thread.run_sync(
                self._select,
                f"{_COLUMNS} {where}",
                (room, cutoff, *params),
                limiter=self._read_limiter,
            )
        except sqlite3.Error:
            log.exception("history database %s: a read failed", self.path)
            rows = []
        for row_id, ts, sender, text in rows:
            if row_id not in found:
                found[row_id] = Message(
                    id=row_id, ts=ts, room=room, sender=sender, text=text
                )
        return sorted(found.values(), key=lambda message: message.id)

    def _select(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        # In a worker thread, under the read limiter.
        reader = self._reader
        if reader is None:  # closed while this call waited for the limiter
            return []
        return reader.execute(sql, params).fetchall()

    # --- writing ------------------------------------------------------------

    def _insert(self, batch: Sequence[Message], highest: int) -> set[str]:
        # Under the write lock, in a worker thread or (a small batch) not.
        # ``highest``: the highest id handed out, recorded with the batch.
        writer = self._connection()
        writer.execute("BEGIN IMMEDIATE")
        try:
            writer.executemany(
                _INSERT, [(m.id, m.room, m.ts, m.sender, m.text) for m in batch]
            )
            # The messages keep the highest id themselves (see _prune); the
            # meta row (a page more to write) only for a higher one handed
            # out without a message (a direct message's).
            if not batch or highest > max(m.id for m in batch):
                writer.execute(_SET_LAST_ID, (highest,))
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.rollback()
            raise
        return {m.room for m in batch}

    # --- retention ----------------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(_CHECKPOINT_INTERVAL)
            if self.commits != self._checkpointed_at:
                self._checkpointed_at = self.commits
                await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database file, waiting for nobody (PASSIVE:
        commits go on meanwhile), in a worker thread."""
        connection = self._checkpointer
        if connection is None:
            return
        try:
            await trio.to_thread.run_sync(
                connection.execute, "PRAGMA wal_checkpoint(PASSIVE)"
            )
        except sqlite3.Error:
            log.exception("history database %s: checkpoint failed", self.path)

    async def _retention_loop(self) -> None:
        while self.prune_interval:
            await trio.sleep(self.prune_interval)
            await self._prune_touched()

    async def _prune_touched(self) -> None:
        """Apply retention to the rooms written since the last pass, in
        transactions of at most ``_PRUNE_CHUNK`` deletions: a flush waits
        for one of them at most, never for a whole pass."""
        rooms, self._touched = self._touched, set()
        if not rooms and self.max_age is None:
            return
        try:
            while True:
                async with self._write_lock:
                    deleted = await trio.to_thread.run_sync(
                        self._prune, rooms, _PRUNE_CHUNK
                    )
                self.pruned += deleted
                if deleted < _PRUNE_CHUNK:
                    return
        except sqlite3.Error:
            log.exception("history database %s: retention failed", self.path)
            self._touched |= rooms  # for the next pass

    def _prune(self, rooms: Iterable[str] | None, most: int = -1) -> int:
        """Delete what retention does not keep, in ``rooms`` (``None``: all
        of them), at most ``most`` messages (``-1``: all); in a transaction
        of its own unless one is open."""
        writer = self._connection()
        own = not writer.in_transaction
        if own:
            writer.execute("BEGIN IMMEDIATE")
        try:
            # The newest message may go: its id stays, in the meta row.
            writer.execute(_SET_LAST_ID_FROM_MESSAGES)
            deleted = 0
            if self.max_age is not None:
                cutoff = time.time() - self.max_age
                cursor = writer.execute(_PRUNE_AGE, (cutoff, most))
                deleted += cursor.rowcount
            if self.max_messages_per_room is not None:
                if rooms is None:
                    found = writer.execute("SELECT DISTINCT room FROM messages")
                    rooms = [room for (room,) in found.fetchall()]
                for room in rooms:
                    if most >= 0 and deleted >= most:
                        break
                    cursor = writer.execute(
                        _PRUNE_ROOM,
                        (
                            room,
                            self.max_messages_per_room,
                            most - deleted if most >= 0 else -1,
                        ),
                    )
                    deleted += cursor.rowcount
            if own:
                writer.execute("COMMIT")
        except BaseException:
            if own and writer.in_transaction:
                writer.rollback()
            raise
        return deleted

    # --- opening and closing -----------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._writer is None:
            raise RuntimeError(f"{self.path} is not open")
        return self._writer

    def _connect(self) -> int:
        """Open both connections (in a worker thread); the highest id."""
        path = self.path
        if os.path.isdir(path):
            raise HistoryStoreError(
                f"cannot open history database {path}: it is a directory"
            )
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise HistoryStoreError(
                f"cannot open history database {path}: no such directory {folder}"
            )
        self._lock()
        try:
            self._writer = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            last_id = self._prepare()
            self._reader = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            self._reader.execute("PRAGMA query_only = ON")
            self._checkpointer = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
        except (sqlite3.Error, OSError) as exc:
            self._close_connections()
            reason = str(exc)
            if getattr(exc, "sqlite_errorname", None) == "SQLITE_CANTOPEN":
                # Typically a directory where the -wal file cannot be made.
                reason += f" (SQLite must be able to create files in {folder})"
            raise HistoryStoreError(
                f"cannot open history database {path}: {reason}"
            ) from exc
        except BaseException:
            self._close_connections()
            raise
        log.debug("history database %s opened (last message id %d)", path, last_id)
        return last_id

    def _prepare(self) -> int:
        """Check or create the schema, apply retention; the highest id."""
        writer = self._connection()
        (mode,) = writer.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise HistoryStoreError(
                f"cannot open history database {self.path}: cannot use WAL mode "
                f"(journal mode {mode})"
            )
        writer.execute("PRAGMA synchronous = NORMAL")
        writer.execute("PRAGMA wal_autocheckpoint = 0")  # see _checkpoint_loop
        # A damaged file is refused now rather than failing mid-chat; this
        # reads the whole file (about 0.1 s per 100 MB when cached).
        (check,) = writer.execute("PRAGMA quick_check(1)").fetchone()
        if check != "ok":
            raise HistoryStoreError(
                f"cannot open history database {self.path}: it is damaged "
                f"({' '.join(check.split())})"
            )
        writer.execute("BEGIN IMMEDIATE")
        try:
            (version,) = writer.execute("PRAGMA user_version").fetchone()
            if version == 0:
                (tables,) = writer.execute(
                    "SELECT count(*) FROM sqlite_master"
                ).fetchone()
                if tables:
                    raise HistoryStoreError(
                        f"cannot open history database {self.path}: it is a SQLite "
                        "database, but not a chatkit history"
                    )
                for statement in _SCHEMA:
                    writer.execute(statement)
                writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise HistoryStoreError(
                    f"cannot open history database {self.path}: schema version "
                    f"{version} is newer than this chatkit's ({SCHEMA_VERSION})"
                )
            (last_id,) = writer.execute(
                "SELECT max(coalesce((SELECT max(id) FROM messages), 0), value) "
                "FROM meta WHERE key = 'last_id'"
            ).fetchone()
            # Also a write now, so that a read-only file fails here, not
            # mid-chat. ('running' was 0.1's crash marker, and no query uses
            # 0.1's index on ts: it only cost a page per commit.)
            writer.execute("DELETE FROM meta WHERE key = 'running'")
            writer.execute("DROP INDEX IF EXISTS messages_ts")
            writer.execute(_SET_LAST_ID, (last_id,))
            self.pruned += self._prune(None)
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.rollback()
            raise
        return int(last_id)

    async def _close(self) -> None:
        reader, writer, checkpointer = self._reader, self._writer, self._checkpointer
        self._reader = self._writer = self._checkpointer = None
        # The reader after any query still running on it; the writer last
        # (closing the last connection checkpoints the WAL).
        for connection, limiter in (
            (reader, self._read_limiter),
            (checkpointer, None),
            (writer, None),
        ):
            if connection is None:
                continue
            try:
                await trio.to_thread.run_sync(connection.close, limiter=limiter)
            except sqlite3.Error:
                log.exception("history database %s: error while closing", self.path)
        self._unlock()

    def _close_connections(self) -> None:
        # In a worker thread, after a failed open.
        for connection in (self._reader, self._checkpointer, self._writer):
            if connection is not None:
                connection.close()
        self._reader = self._writer = self._checkpointer = None
        self._unlock()

    def _lock(self) -> None:
        """Take ``PATH.lock``: two servers on one database would hand out
        the same message ids. Released when the store closes (or the
        process ends)."""
        if sys.platform == "win32":  # pragma: no cover - no flock there
            return
        import fcntl

        lock_path = f"{self.path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise HistoryStoreError(
                f"cannot open history database {self.path}: cannot create "
                f"{lock_path}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise HistoryStoreError(
                f"cannot open history database {self.path}: another server is using it"
            ) from exc
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)  # releases the flock
