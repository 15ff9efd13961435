"""Resuming after a reconnect, so that the application sees every message
once, in order.

A reconnecting client notes in each room the last message it delivered (the
room's *mark*; on joining a room, the room's newest message). After a
reconnect, :class:`Resumer` re-joins the rooms and, room by room, delivers
the messages after the mark from history. Meanwhile the reader hands it the
live messages of rooms not caught up yet, to hold back until their room is
(up to ``Reconnect.max_held`` per room: past that they are dropped and read
again from history).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any, TypeAlias

import msgspec
import trio

from .._events import (
    LOBBY,
    ClientRequest,
    History,
    HistoryReply,
    Join,
    Joined,
    Leave,
    Left,
    Message,
    ServerEvent,
)
from .._exceptions import ConnectionClosed, RateLimited, RequestError
from ._connection import Connection
from ._reconnect import ClientItem, Reconnected

__all__ = ["Resumer"]

log = logging.getLogger("chatkit.client")

#: Hands an event to the application (``async for`` and the hooks).
Deliver: TypeAlias = Callable[[ClientItem], Awaitable[None]]


class _Resume:
    """A resume under way: what the reader keeps back or drops until each
    room has caught up."""

    __slots__ = ("dropping", "holding", "max_held", "overflowed", "rejoining")

    def __init__(self, wanted: set[str], max_held: int) -> None:
        # Live messages per room, held back until the room has caught up;
        # past max_held in a room, the newer ones are dropped.
        self.holding = {room: collections.deque[Message]() for room in wanted}
        self.max_held = max_held
        # Rooms whose held messages overflowed: the rest are in history.
        self.overflowed: set[str] = set()
        # Our own joins are not news: as far as the app knows, we never left.
        self.rejoining = wanted | {LOBBY}
        # The server joins everyone to the lobby; if we had left it, we
        # leave it again and drop what it says meanwhile.
        self.dropping = set() if LOBBY in wanted else {LOBBY}

    def absorb(self, event: ServerEvent, name: str) -> bool:
        """Keep ``event`` back or drop it if it is the resume's business
        (True); False: the reader delivers it."""
        match event:
            case Joined(room=room, name=joined) if (
                joined == name and room in self.rejoining
            ):
                self.rejoining.discard(room)
                return True  # our re-join
            case Message(room=room) | Joined(room=room) | Left(room=room) if (
                room in self.dropping
            ):
                return True  # the lobby, which we had left and leave again
            case Message(room=room) if room in self.holding:
                held = self.holding[room]
                # Once one is dropped, so are all that follow until the room
                # is read again from history: a newer one held meanwhile
                # would move the mark past those dropped.
                if room not in self.overflowed and len(held) < self.max_held:
                    held.append(event)
                else:
                    self.overflowed.add(room)
                return True
        return False


class Resumer:
    """Marks while connected, and the resume after each reconnect (see the
    module docs).

    Args:
        deliver: hands an event to the application; the owner calls
            :meth:`delivered` for each message that got there.
        max_held: live messages held back per room while it catches up.
    """

    def __init__(self, deliver: Deliver, *, max_held: int) -> None:
        self._deliver = deliver
        self._max_held = max_held
        # The last message delivered in each room (or the room's newest when
        # we joined it, or None for an empty room), and the highest id seen
        # anywhere.
        self._marks: dict[str, Message | None] = {}
        self._max_seen = 0
        self._resume: _Resume | None = None

    # --- marks, while connected ----------------------------------------------

    def delivered(self, message: Message) -> None:
        """``message`` reached the application: it is its room's mark now."""
        self._max_seen = max(self._max_seen, message.id)
        if message.id > self._mark_of(message.room):
            self._marks[message.room] = message

    def forget(self, room: str) -> None:
        """We left ``room``: no resume will read it."""
        self._marks.pop(room, None)

    async def mark(self, connection: Connection, room: str) -> None:
        """Note where ``room``'s news starts: its newest message now."""
        reply: HistoryReply = await connection.request(History(room=room, limit=1))
        self._take_mark(room, reply)

    async def mark_lobby(self, connection: Connection) -> None:
        """:meth:`mark` for the lobby, on the first connection before its
        reader starts. (The reader would hand the events read meanwhile to
        ``async for`` first, which nobody reads while the client is being
        entered.) A refusal leaves the lobby without a mark."""
        with suppress(RequestError):
            reply = await connection.request_before_reading(
                History(room=LOBBY, limit=1)
            )
            if isinstance(reply, HistoryReply):
                self._take_mark(LOBBY, reply)

    def _take_mark(self, room: str, reply: HistoryReply) -> None:
        """Note the newest message of ``reply`` (a ``limit=1`` history) as
        ``room``'s mark, unless we delivered a newer one."""
        newest = reply.messages[-1] if reply.messages else None
        if newest is None:
            self._marks.setdefault(room, None)
        elif newest.id > self._mark_of(room):
            self._marks[room] = newest

    def _mark_of(self, room: str) -> int:
        """The id of the last message of ``room`` delivered (0: none)."""
        mark = self._marks.get(room)
        return 0 if mark is None else mark.id

    # --- a resume --------------------------------------------------------------

    def begin(self, rooms: set[str]) -> None:
        """A resume, to be back in ``rooms``, starts (before the new
        connection's reader: the lobby's notices may be buffered)."""
        self._resume = _Resume(rooms, self._max_held)

    def end(self) -> None:
        """The resume is over, or cut short. Held messages of rooms not
        caught up are dropped: the next resume fetches them again, as the
        marks did not move past them."""
        self._resume = None

    def leaves(self, room: str) -> bool:
        """The resume leaves ``room`` again: the lobby the server joined us
        to, which we had left."""
        return self._resume is not None and room in self._resume.dropping

    def absorb(self, event: ServerEvent, name: str) -> bool:
        """For the reader: True if ``event`` is the resume's (held back or
        dropped), False if it is to be delivered. ``name`` is ours."""
        return self._resume is not None and self._resume.absorb(event, name)

    async def rejoin(
        self, connection: Connection, refused: Callable[[str], None]
    ) -> None:
        """Re-join the rooms, and leave the lobby again if we had left it.
        A room the server refuses is given up: ``refused(room)`` is told.

        Raises:
            ConnectionClosed: the connection ended.
        """
        resume = self._resume
        assert resume is not None
        for room in sorted(resume.holding.keys() - {LOBBY}):
            if not await self._step(connection, f"re-join {room}", Join(room=room)):
                del resume.holding[room]
                self._marks.pop(room, None)
                resume.rejoining.discard(room)
                refused(room)
        if resume.dropping:
            await self._step(connection, f"leave {LOBBY} again", Leave(room=LOBBY))
            resume.dropping = set()

    async def catch_up(self, connection: Connection) -> None:
        """Deliver each room's messages after its mark, the lobby first,
        then :class:`~chatkit.Reconnected`.

        Raises:
            ConnectionClosed: the connection ended.
        """
        resume = self._resume
        assert resume is not None
        missed = 0
        for room in sorted(resume.holding, key=lambda room: (room != LOBBY, room)):
            missed += await self._catch_up(connection, resume, room)
        await self._deliver(Reconnected(missed=missed))

    async def _step(
        self, connection: Connection, what: str, request: ClientRequest
    ) -> bool:
        """A request of the resume that the server may refuse (logged)."""
        try:
            await self._request(connection, request)
        except ConnectionClosed:
            raise
        except RequestError as exc:
            log.warning("could not %s: %s", what, exc)
            return False
        return True

    async def _request(self, connection: Connection, request: ClientRequest) -> Any:
        """A request of the resume, which asks many at once: a rate limit is
        waited out (pausing longer each time, so as never to flood)."""
        pause = 0.25
        while True:
            try:
                return await connection.request(request)
            except RateLimited:
                await trio.sleep(pause)
                pause = min(2 * pause, 5.0)

    async def _catch_up(
        self, connection: Connection, resume: _Resume, room: str
    ) -> int:
        """Deliver ``room``'s messages after its mark, then the live ones
        held meanwhile; returns how many came from history."""
        held = resume.holding[room]
        missed = 0
        try:
            missed = await self._read_room(connection, resume, room)
        except ConnectionClosed:
            raise
        except RequestError as exc:
            # Perhaps the program left the room meanwhile. What was held
            # arrived while we were in it: it goes out all the same.
            log.info("stopped catching up %s: %s", room, exc)
            await self._release_held(room, held)
        # No checkpoint since ``held`` was found empty: from here the reader
        # delivers this room's messages itself, after all of the above.
        del resume.holding[room]
        return missed

    async def _read_room(
        self, connection: Connection, resume: _Resume, room: str
    ) -> int:
        held = resume.holding[room]
        known = self._marks.get(room)
        mark = self._mark_of(room) if room in self._marks else self._max_seen
        missed = 0
        if known is not None:
            # Ask from our last message on: if the server still has it, it
            # is the one we saw, or the server's ids started over (a restart
            # without persistent history) and the room must be read anew.
            asked = mark - 1
            page = await self._history_after(connection, room, asked)
            if (page and page[0].id == mark and not _same(page[0], known)) or not page:
                log.info(
                    "message ids of %s started over; reading it from the start", room
                )
                self._marks.pop(room, None)
                asked, page = 0, await self._history_after(connection, room, 0)
        else:
            asked = mark
            page = await self._history_after(connection, room, asked)
        while True:
            while page:
                for message in page:
                    if message.id > self._mark_of(room):
                        await self._deliver(message)
                        missed += 1
                if page[-1].id <= asked:
                    break  # a server that does not page forward
                asked = page[-1].id
                page = await self._history_after(connection, room, asked)
            await self._release_held(room, held)
            if room not in resume.overflowed:
                break
            # Some live messages did not fit: they are in history.
            resume.overflowed.discard(room)
            asked = self._mark_of(room)
            page = await self._history_after(connection, room, asked)
        return missed

    async def _release_held(self, room: str, held: collections.deque[Message]) -> None:
        """Deliver the live messages held while ``room`` caught up, but
        those history delivered already."""
        while held:
            message = held.popleft()
            if message.id > self._mark_of(room):
                await self._deliver(message)

    async def _history_after(
        self, connection: Connection, room: str, after: int
    ) -> Sequence[Message]:
        reply: HistoryReply = await self._request(
            connection, History(room=room, after=after)
        )
        return reply.messages


def _same(a: Message, b: Message) -> bool:
    """The same message (the sender's copy's ``ref`` aside)?"""
    return msgspec.structs.replace(a, ref=None) == msgspec.structs.replace(b, ref=None)
