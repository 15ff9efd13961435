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
and every thread is run and awaited by ``trio.to_thread.run_sync``. What
runs in them, the file, its connections, schema and SQL, is
``chatkit._sqlite_file``'s :class:`~chatkit._sqlite_file.HistoryFile`,
plain synchronous code; this module is the store around it.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from itertools import chain

import trio

from ._events import Message
from ._sqlite_file import SCHEMA_VERSION as SCHEMA_VERSION
from ._sqlite_file import Busy, HistoryFile
from .history import HistoryStoreError

__all__ = ["SqliteHistory"]

log = logging.getLogger("chatkit.sqlite")

# Seconds between two checkpoints of the WAL (when something was committed).
_CHECKPOINT_INTERVAL = 1.0
# Most messages retention deletes in one transaction.
_PRUNE_CHUNK = 1000


class SqliteHistory:
    """Every room's history in a SQLite database file, kept across restarts.

    Appending is cheap and never waits for the disk: messages are queued,
    and :meth:`flush` commits everything queued in one transaction. The
    server flushes before anyone sees a message (its sender included), so a
    message that was acknowledged is on disk: a crash of the server process
    loses none of them. A graceful stop writes anything left.

    Retention is applied when the store opens, then as messages come:
    each commit deletes the oldest messages of the rooms it writes past
    ``max_messages_per_room`` (in the same transaction: a cost in
    proportion to what it adds, never a long pass after a burst), and every
    ``prune_interval`` seconds a pass deletes those older than ``max_age``
    (such messages are never returned, deleted or not yet).

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
        prune_interval: seconds between two passes deleting messages older
            than ``max_age``; ``0``: after every commit.
        inline_commit: a flush of at most this many messages commits on the
            event loop's thread (12-100 µs for one message, about 2 µs more
            per message: the writer appends to the WAL file and never syncs
            the disk, checkpoints being made in a worker thread); a larger
            one, in a worker thread. Everyone's output waits for the commit
            either way, and the hand-off costs more than it frees: with
            commits of more than 64 messages in a thread the fan-out's
            throughput was 0.87x of the default's (docs/performance.md).
            ``0``: always in a worker thread.

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
        inline_commit: int = 1024,
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
        # The database, while open (from a successful open to the start of
        # closing). Its checkpoints are made in the background (see
        # _checkpoint_loop): its writer never makes one (a checkpoint syncs
        # the disk, and the server waits for the writer's commits before it
        # shows a message).
        self._file: HistoryFile | None = None
        self._checkpointed_at = 0  # commits then
        # The reader is shared by every query; one thread at a time uses it.
        # The writer is used by one flush or retention pass at a time.
        self._read_limiter = trio.CapacityLimiter(1)
        self._write_lock = trio.Lock()
        self._open = False

    @property
    def pending(self) -> int:
        """Messages appended but not committed yet."""
        return len(self._pending) + len(self._writing)

    @property
    def _unrecorded(self) -> bool:
        """An id was handed out above the ``last_id`` written."""
        return self._recorded < self._highest

    def _opened(self) -> HistoryFile:
        if self._file is None:
            raise RuntimeError(f"{self.path} is not open")
        return self._file

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
        file = HistoryFile(
            self.path,
            max_messages_per_room=self.max_messages_per_room,
            max_age=self.max_age,
        )
        self._open = True
        try:
            last_id, pruned = await trio.to_thread.run_sync(file.open)
        except BaseException:
            self._open = False
            raise
        self._file = file
        self.pruned += pruned
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
            await self._prune_expired()

    async def _commit(self, upto: int, highest: int) -> None:
        # Under the write lock: the queued messages among the first ``upto``
        # ever appended (an earlier flush may have taken some), and
        # ``highest``.
        count = upto - self._taken
        if count <= 0 and self._recorded >= highest:
            return
        file = self._file
        if file is None:
            raise HistoryStoreError(f"history database {self.path} is not open")
        pending = self._pending
        batch = self._writing = tuple(pending.popleft() for _ in range(max(0, count)))
        self._taken += len(batch)
        try:
            if len(batch) <= self.inline_commit:
                try:
                    trimmed = file.insert(batch, highest, wait=False)
                except Busy:
                    # Another process is writing the file (an sqlite3
                    # shell?): wait for it in a worker thread, not here,
                    # where the whole server would wait.
                    log.warning("history database %s is busy; waiting", self.path)
                    trimmed = await trio.to_thread.run_sync(file.insert, batch, highest)
            else:
                # Not cancellable once the thread runs: the commit's outcome
                # is always known here.
                trimmed = await trio.to_thread.run_sync(file.insert, batch, highest)
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
        self.pruned += trimmed

    async def load_moderation(self) -> bytes | None:
        """The moderation state saved last (see docs/moderation.md), kept in
        the same file as the history."""
        value = self._opened().get_meta("moderation")
        return None if value is None else bytes(value)

    async def save_moderation(self, document: bytes) -> None:
        """Keep the moderation state, committed before returning (in a
        worker thread, under the write lock: it is rare, and not on any
        message's way)."""
        file = self._opened()
        async with self._write_lock:
            try:
                await trio.to_thread.run_sync(file.set_meta, "moderation", document)
            except (sqlite3.Error, OSError) as exc:
                log.exception("history database %s: cannot save moderation", self.path)
                raise HistoryStoreError(
                    f"history database {self.path}: cannot write: {exc}"
                ) from exc

    async def recent(self, room: str, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room``, oldest first."""
        found = await self._query(
            room,
            lambda file, since: file.recent(room, since, limit),
            lambda message: True,
        )
        return found[max(0, len(found) - limit) :]

    async def before(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room`` with an id below ``id``."""
        found = await self._query(
            room,
            lambda file, since: file.before(room, since, id, limit),
            lambda message: message.id < id,
        )
        return found[max(0, len(found) - limit) :]

    async def after(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The oldest ``limit`` messages of ``room`` with an id above ``id``."""
        found = await self._query(
            room,
            lambda file, since: file.after(room, since, id, limit),
            lambda message: message.id > id,
        )
        return found[:limit]

    # --- queries ------------------------------------------------------------

    async def _query(
        self,
        room: str,
        read: Callable[[HistoryFile, float], list[Message]],
        keep: Callable[[Message], bool],
    ) -> list[Message]:
        """Messages of ``room`` that ``read`` finds in the file (given the
        age cutoff) and, among those not committed yet, that ``keep``
        keeps: all sorted by id; the caller takes its slice."""
        file = self._opened()
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
            stored = await trio.to_thread.run_sync(
                read, file, cutoff, limiter=self._read_limiter
            )
        except sqlite3.Error:
            log.exception("history database %s: a read failed", self.path)
            stored = []
        for message in stored:
            found.setdefault(message.id, message)
        return sorted(found.values(), key=lambda message: message.id)

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
        file = self._file
        if file is None:
            return
        try:
            await trio.to_thread.run_sync(file.checkpoint)
        except sqlite3.Error:
            log.exception("history database %s: checkpoint failed", self.path)

    async def _retention_loop(self) -> None:
        while self.prune_interval:
            await trio.sleep(self.prune_interval)
            await self._prune_expired()

    async def _prune_expired(self) -> None:
        """Delete the messages older than ``max_age``, in transactions of at
        most ``_PRUNE_CHUNK`` deletions: a flush waits for one of them at
        most, never for a whole pass. (``max_messages_per_room`` needs no
        pass: each commit applies it to the rooms it writes.)"""
        if self.max_age is None:
            return
        try:
            while True:
                async with self._write_lock:
                    deleted = await trio.to_thread.run_sync(
                        self._opened().prune_expired, _PRUNE_CHUNK
                    )
                self.pruned += deleted
                if deleted < _PRUNE_CHUNK:
                    return
        except sqlite3.Error:
            log.exception("history database %s: retention failed", self.path)

    # --- closing ------------------------------------------------------------

    async def _close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            # After any query still running on the reader.
            await trio.to_thread.run_sync(file.close, limiter=self._read_limiter)
