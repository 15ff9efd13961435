"""The database file under :class:`chatkit.SqliteHistory`: :class:`HistoryFile`.

Plain synchronous code, no trio: every method blocks on the disk, and the
store decides where each runs (a trio worker thread, or a small commit on
the event loop's thread) and that no two run at once on one connection.
This module knows the schema, the SQL and the ``PATH.lock`` file; the
store knows what is queued, when to write and what the counters say.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from ._events import Message
from .history import HistoryStoreError

__all__ = ["SCHEMA_VERSION", "HistoryFile", "Opened"]

log = logging.getLogger("chatkit.sqlite")

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
# The oldest messages older than a time, at most ?2 of them (-1: all).
_PRUNE_AGE = """
    DELETE FROM messages WHERE id IN (
        SELECT id FROM messages WHERE +ts < ?1 ORDER BY id LIMIT ?2
    ) RETURNING room
"""
# The oldest ?2 messages of room ?1 (a commit's own retention, see insert).
_TRIM_ROOM = """
    DELETE FROM messages WHERE id IN (
        SELECT id FROM messages WHERE room = ? ORDER BY id LIMIT ?
    )
"""
# Seconds a write waits for another connection's write lock (sqlite3's
# default busy timeout).
_BUSY_TIMEOUT = 5.0
_COUNT_ROOMS = "SELECT room, count(*) FROM messages GROUP BY room"
# A commit deletes at most twice as many of a room's messages as it adds,
# plus this many. The counts being exact, it deletes just what it adds past
# the limit (opening applies a lowered limit at once): the bound only keeps
# every commit short whatever happens.
_TRIM_SLACK = 16
# The unary plus keeps SQLite off the ts index here: (room, id) is the one.
_COLUMNS = "SELECT id, ts, sender, text FROM messages WHERE room = ? AND +ts >= ?"


class Busy(Exception):
    """Another connection (another process: an ``sqlite3`` shell, say)
    holds the file's write lock, and the caller would not wait."""


class Opened(NamedTuple):
    """What :meth:`HistoryFile.open` found."""

    last_id: int
    """The highest message id ever stored (``0`` for a new file)."""
    pruned: int
    """Messages retention deleted while opening."""


class HistoryFile:
    """A chatkit history database and its three connections.

    - the writer: :meth:`open`, :meth:`insert`, :meth:`prune`, one call at a
      time. It never checkpoints (a checkpoint syncs the disk, and the
      server waits for the writer's commits before it shows a message).
    - the reader (read-only): :meth:`recent`, :meth:`before`,
      :meth:`after`, one call at a time.
    - the checkpointer: :meth:`checkpoint`, copying the WAL into the
      database file.

    Each connection may be used from any thread, by one at a time; keeping
    it so is the caller's part, and :meth:`close` must not run while one is
    in use. A query that comes after :meth:`close` answers ``[]``.

    Args:
        path: the database file; created (with its schema) if missing.
        max_messages_per_room: what :meth:`prune` keeps per room (``None``:
            no limit).
        max_age: seconds a message is kept by :meth:`prune` (``None``: no
            limit). Queries do not apply it: their ``since`` does.
    """

    def __init__(
        self,
        path: str,
        *,
        max_messages_per_room: int | None,
        max_age: float | None,
    ) -> None:
        self.path = path
        self.max_messages_per_room = max_messages_per_room
        self.max_age = max_age
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        # Messages per room, as committed (with max_messages_per_room).
        self._counts: dict[str, int] = {}
        self._lock_fd = -1  # PATH.lock, locked while open (see _lock)

    # --- opening and closing -----------------------------------------------

    def open(self) -> Opened:
        """Lock the file, open the three connections, check or create the
        schema and apply retention to every room.

        Raises:
            HistoryStoreError: the database cannot be opened or used, is not
                a chatkit history database, or another server has it open;
                the message names the path. Nothing is left open.
        """
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
            opened = self._prepare()
            # From now on the writer waits for no one unless asked (_begin).
            self._writer.execute("PRAGMA busy_timeout = 0")
            self._reader = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            self._reader.execute("PRAGMA query_only = ON")
            self._checkpointer = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
        except (sqlite3.Error, OSError) as exc:
            self.close()
            reason = str(exc)
            if getattr(exc, "sqlite_errorname", None) == "SQLITE_CANTOPEN":
                # Typically a directory where the -wal file cannot be made.
                reason += f" (SQLite must be able to create files in {folder})"
            raise HistoryStoreError(
                f"cannot open history database {path}: {reason}"
            ) from exc
        except BaseException:
            self.close()
            raise
        log.debug(
            "history database %s opened (last message id %d)", path, opened.last_id
        )
        return opened

    def _prepare(self) -> Opened:
        """Check or create the schema, apply retention."""
        writer = self._connection()
        (mode,) = writer.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise HistoryStoreError(
                f"cannot open history database {self.path}: cannot use WAL mode "
                f"(journal mode {mode})"
            )
        writer.execute("PRAGMA synchronous = NORMAL")
        writer.execute("PRAGMA wal_autocheckpoint = 0")  # see checkpoint
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
            pruned = self._apply_retention(writer)
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.rollback()
            raise
        return Opened(last_id=int(last_id), pruned=pruned)

    def _apply_retention(self, writer: sqlite3.Connection) -> int:
        """At open, in its transaction: both limits over the whole file,
        and the rooms' counts (see :meth:`insert`). The number deleted."""
        pruned = 0
        if self.max_age is not None:
            pruned += sum(self._delete_expired(writer, -1).values())
        cap = self.max_messages_per_room
        if cap is None:
            return pruned
        self._counts = dict(writer.execute(_COUNT_ROOMS).fetchall())
        for room, count in self._counts.items():
            if count > cap:
                pruned += writer.execute(_TRIM_ROOM, (room, count - cap)).rowcount
                self._counts[room] = cap
        return pruned

    def close(self) -> None:
        """Close the connections and release ``PATH.lock``; errors are
        logged, and the rest is closed all the same."""
        reader, writer, checkpointer = self._reader, self._writer, self._checkpointer
        self._reader = self._writer = self._checkpointer = None
        # The writer last: closing the last connection checkpoints the WAL.
        for connection in (reader, checkpointer, writer):
            if connection is None:
                continue
            try:
                connection.close()
            except sqlite3.Error:
                log.exception("history database %s: error while closing", self.path)
        self._unlock()

    def _begin(self, writer: sqlite3.Connection, wait: bool) -> None:
        """Begin a write transaction (``BEGIN IMMEDIATE``); see
        :meth:`insert` for ``wait``."""
        if not wait:
            try:
                writer.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                    raise Busy(str(exc)) from exc
                raise
            return
        writer.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT * 1000:.0f}")
        try:
            writer.execute("BEGIN IMMEDIATE")
        finally:
            writer.execute("PRAGMA busy_timeout = 0")

    def _connection(self) -> sqlite3.Connection:
        if self._writer is None:
            raise RuntimeError(f"{self.path} is not open")
        return self._writer

    def _lock(self) -> None:
        """Take ``PATH.lock``: two servers on one database would hand out
        the same message ids. Released when the file closes (or the
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

    # --- writing --------------------------------------------------------------

    def insert(
        self, batch: Sequence[Message], highest: int, *, wait: bool = True
    ) -> int:
        """Write ``batch`` and record ``highest`` (the highest id handed
        out) as the last id, in one transaction; the number of messages
        retention deleted. If another connection is writing the file, wait
        for it (up to ``_BUSY_TIMEOUT`` seconds), or with ``wait=False``
        raise :exc:`Busy` at once.

        The same transaction applies ``max_messages_per_room`` to those
        rooms (deleting their oldest messages), so that retention costs
        each commit a little, in proportion to what it adds, instead of a
        pass that holds the writer for long after a burst.

        Raises:
            Busy: see ``wait``; nothing was written.
            sqlite3.Error, OSError: the write failed; nothing was written.
            RuntimeError: the file is not open.
        """
        writer = self._connection()
        self._begin(writer, wait)
        try:
            writer.executemany(
                _INSERT, [(m.id, m.room, m.ts, m.sender, m.text) for m in batch]
            )
            # The messages keep the highest id themselves (see prune); the
            # meta row (a page more to write) only for a higher one handed
            # out without a message (a direct message's).
            if not batch or highest > max(m.id for m in batch):
                writer.execute(_SET_LAST_ID, (highest,))
            counts = self._trim(writer, batch)
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.rollback()
            raise
        trimmed = 0
        for room, (count, deleted) in counts.items():
            self._counts[room] = count
            trimmed += deleted
        return trimmed

    def get_meta(self, key: str) -> Any:
        """The value of ``key`` in the ``meta`` table, or None."""
        row = (
            self._connection()
            .execute("SELECT value FROM meta WHERE key = ?", (key,))
            .fetchone()
        )
        return None if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        """Set ``key`` in the ``meta`` table, in a transaction of its own
        (waiting for another writer as :meth:`insert` does)."""
        writer = self._connection()
        self._begin(writer, True)
        try:
            writer.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.rollback()
            raise

    def _trim(
        self, writer: sqlite3.Connection, batch: Sequence[Message]
    ) -> dict[str, tuple[int, int]]:
        """Delete the oldest messages of ``batch``'s rooms past
        ``max_messages_per_room`` (at most ``2 * added + _TRIM_SLACK`` per
        room); each room's count once committed, and how many went."""
        cap = self.max_messages_per_room
        if cap is None:
            return {}
        added: dict[str, int] = {}
        for message in batch:
            added[message.room] = added.get(message.room, 0) + 1
        counts = self._counts
        after = {}
        for room, count in added.items():
            total = counts.get(room, 0) + count
            deleted = 0
            if total > cap:
                most = min(total - cap, 2 * count + _TRIM_SLACK)
                deleted = writer.execute(_TRIM_ROOM, (room, most)).rowcount
            after[room] = (total - deleted, deleted)
        return after

    def prune_expired(self, most: int = -1) -> int:
        """Delete the messages older than ``max_age``, at most ``most``
        (``-1``: all); in a transaction of its own. The number deleted.

        Raises:
            sqlite3.Error: it failed; nothing was deleted.
            RuntimeError: the file is not open.
        """
        if self.max_age is None:
            return 0
        writer = self._connection()
        self._begin(writer, wait=True)
        try:
            gone = self._delete_expired(writer, most)
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.rollback()
            raise
        counts = self._counts
        for room, count in gone.items():
            if room in counts:
                counts[room] -= count
        return sum(gone.values())

    def _delete_expired(self, writer: sqlite3.Connection, most: int) -> dict[str, int]:
        """Delete up to ``most`` messages older than ``max_age``; how many
        went from each room."""
        assert self.max_age is not None
        # The newest message may go: its id stays, in the meta row.
        writer.execute(_SET_LAST_ID_FROM_MESSAGES)
        cutoff = time.time() - self.max_age
        gone: dict[str, int] = {}
        for (room,) in writer.execute(_PRUNE_AGE, (cutoff, most)).fetchall():
            gone[room] = gone.get(room, 0) + 1
        return gone

    def checkpoint(self) -> None:
        """Copy the WAL into the database file, waiting for nobody
        (PASSIVE: commits go on meanwhile). Nothing once closed.

        Raises:
            sqlite3.Error: it failed.
        """
        connection = self._checkpointer
        if connection is not None:
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # --- reading --------------------------------------------------------------

    def recent(self, room: str, since: float, limit: int) -> list[Message]:
        """The newest ``limit`` messages of ``room`` said at ``since`` or
        later, newest first."""
        return self._select(room, since, "ORDER BY id DESC LIMIT ?", (limit,))

    def before(self, room: str, since: float, id: int, limit: int) -> list[Message]:
        """Likewise, with an id below ``id``."""
        return self._select(
            room, since, "AND id < ? ORDER BY id DESC LIMIT ?", (id, limit)
        )

    def after(self, room: str, since: float, id: int, limit: int) -> list[Message]:
        """The oldest ``limit`` messages of ``room`` said at ``since`` or
        later with an id above ``id``, oldest first."""
        return self._select(room, since, "AND id > ? ORDER BY id LIMIT ?", (id, limit))

    def _select(
        self, room: str, since: float, where: str, params: tuple[Any, ...]
    ) -> list[Message]:
        reader = self._reader
        if reader is None:  # closed while the caller waited for its turn
            return []
        rows = reader.execute(f"{_COLUMNS} {where}", (room, since, *params))
        return [
            Message(id=row_id, ts=ts, room=room, sender=sender, text=text)
            for row_id, ts, sender, text in rows.fetchall()
        ]
