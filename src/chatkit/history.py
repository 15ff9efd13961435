"""Where a :class:`~chatkit.ChatServer` keeps room history: the storage seam.

A server records every room message with :meth:`HistoryStore.append`, and
awaits :meth:`HistoryStore.flush` before anyone sees it: **stored before
seen**. A message its sender got back (its acknowledgement) is in the store,
so a crash right after loses nothing. ``history`` requests are answered from
:meth:`HistoryStore.recent`, :meth:`HistoryStore.before` and
:meth:`HistoryStore.after`. :class:`MemoryHistory` (a ring buffer per room,
lost on restart) is the library's default; :class:`chatkit.SqliteHistory`
keeps history across restarts and is the server CLI's default.

Writing a store::

    class MyStore:
        @asynccontextmanager
        async def open(self) -> AsyncIterator[int]:
            ...                      # connect; start tasks in a nursery here
            yield highest_stored_id  # 0 if empty: new ids continue after it
            ...                      # write what is left and close

        def append(self, message: Message) -> None: ...   # queue it; no I/O
        def note_id(self, id: int) -> None: ...           # likewise
        async def flush(self) -> None: ...    # make everything queued durable
        async def recent(self, room, limit): ...
        async def before(self, room, id, limit): ...
        async def after(self, room, id, limit): ...

The server appends the messages of a whole read round, then awaits one
``flush`` for all of them (group commit), so a store should write what is
queued in one transaction. Every query returns messages oldest first, and
must see every message appended before it was called, flushed yet or not.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from itertools import islice
from typing import Protocol, runtime_checkable

from ._events import Message
from ._exceptions import StartupError

__all__ = ["HistoryStore", "HistoryStoreError", "MemoryHistory"]


class HistoryStoreError(StartupError):
    """A history store cannot be opened or used (bad path, corrupt file...)."""


@runtime_checkable
class HistoryStore(Protocol):
    """The interface a server's history goes through."""

    def open(self) -> AbstractAsyncContextManager[int]:
        """Make the store ready for the duration of an ``async with`` block.

        The server enters it once it has bound its address, before it
        accepts a connection, and leaves it after its last connection
        closed; the value is the highest message id already stored (``0``
        if none), so that new ids keep increasing across restarts.

        Raises:
            HistoryStoreError: the store cannot be used.
        """
        ...

    def append(self, message: Message) -> None:
        """Record ``message``; synchronous and fast (it is on the hot path):
        a store that writes elsewhere queues it for :meth:`flush`.

        Raising refuses the message: its sender gets ``error unavailable``
        and nobody sees it.
        """
        ...

    def note_id(self, id: int) -> None:
        """Remember that ``id`` was handed out without a message to append
        (a direct message's), so that the value :meth:`open` yields next time
        is above it; synchronous, durable at the next :meth:`flush`. A store
        that does not keep ids across restarts does nothing."""
        ...

    async def flush(self) -> None:
        """Return once everything appended (and noted) before the call is
        stored as durably as this store stores anything.

        The server awaits it before anyone sees those messages. It is called
        by one task at a time.

        Raises:
            HistoryStoreError: they could not be stored; the store has let
                them go (the next call is about later ones only). The server
                then shows them to nobody, and their senders get ``error
                unavailable``.
        """
        ...

    async def recent(self, room: str, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room``, oldest first."""
        ...

    async def before(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room`` with an id below ``id``."""
        ...

    async def after(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The oldest ``limit`` messages of ``room`` with an id above ``id``."""
        ...


class MemoryHistory:
    """Each room's newest ``size`` messages, in memory (lost on restart).

    Args:
        size: messages kept per room.
        max_rooms: rooms kept; past it the room that was created first is
            forgotten, so that rooms come and gone cannot grow memory
            without bound.
    """

    def __init__(self, size: int = 100, *, max_rooms: int = 10_000) -> None:
        if size < 1 or max_rooms < 1:
            raise ValueError("size and max_rooms must be at least 1")
        self.size = size
        self.max_rooms = max_rooms
        self._rooms: dict[str, collections.deque[Message]] = {}
        self._moderation: bytes | None = None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[int]:
        """Nothing to open: yields the highest id held (0 when new)."""
        yield max((q[-1].id for q in self._rooms.values() if q), default=0)

    async def load_moderation(self) -> bytes | None:
        """The moderation state saved last (in memory: gone with the
        process)."""
        return self._moderation

    async def save_moderation(self, document: bytes) -> None:
        """Keep the moderation state (in memory)."""
        self._moderation = document

    def note_id(self, id: int) -> None:
        """Nothing to do: ids are not kept across restarts."""

    async def flush(self) -> None:
        """Nothing to do: an appended message is already kept (in memory)."""

    def append(self, message: Message) -> None:
        """Keep ``message``, dropping its room's oldest past ``size``."""
        queue = self._rooms.get(message.room)
        if queue is None:
            if len(self._rooms) >= self.max_rooms:
                del self._rooms[next(iter(self._rooms))]
            queue = self._rooms[message.room] = collections.deque(maxlen=self.size)
        queue.append(message)

    async def recent(self, room: str, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room``, oldest first."""
        queue = self._rooms.get(room, ())
        return list(islice(queue, max(0, len(queue) - limit), None))

    async def before(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room`` with an id below ``id``."""
        older = [m for m in self._rooms.get(room, ()) if m.id < id]
        return older[max(0, len(older) - limit) :]

    async def after(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The oldest ``limit`` messages of ``room`` with an id above ``id``."""
        return [m for m in self._rooms.get(room, ()) if m.id > id][:limit]
