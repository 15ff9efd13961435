"""A client's session with a server: its connection, then (with a
reconnect policy) each next one.

:class:`Session` keeps what outlives a connection: our name, the rooms we
are in, why the client ended. It serves each :class:`Connection` (a reader
and a keepalive pinger), tracks our own joins, leaves and renames, and
passes the rest of the news on to its :class:`Sink`. When a connection is
lost and the policy allows, it gets one back (:func:`reconnect`) and resumes
(:class:`Resumer`); requests made meanwhile wait for it, bounded by the
policy's ``request_timeout``.
"""

from __future__ import annotations

import itertools
import logging
import math
from contextlib import suppress
from typing import Any, Protocol

import trio

from .._events import (
    LOBBY,
    Bye,
    ClientRequest,
    Joined,
    Left,
    Message,
    Moderated,
    Renamed,
    ServerEvent,
    Welcome,
)
from .._exceptions import ConnectionClosed, ErrorCode, RequestError, TimedOut
from ._connection import Connection, ConnectionOptions
from ._reconnect import ClientItem, Reconnect, reconnect
from ._resume import Resumer

__all__ = ["Session", "Sink"]

log = logging.getLogger("chatkit.client")

# The server ended the connection for good: no reconnect. (``replaced``: we
# logged in again elsewhere; coming back would take that session over.
# ``banned``: from the server; coming back would be refused.)
_FINAL_CODES = frozenset({ErrorCode.KICKED, ErrorCode.REPLACED, ErrorCode.BANNED})


class Sink(Protocol):
    """Where a session's events go: the application."""

    async def deliver(self, event: ClientItem) -> bool:
        """Hand ``event`` on; False if it was dropped (the sink is closed)."""
        ...

    def close(self, reason: str) -> None:
        """No more events will come: the session ended, for ``reason``."""
        ...


class Session:
    """See the module docs. :meth:`open` connects; then :meth:`run` serves
    the connections in a task of its own, :meth:`request` and :meth:`mark`
    work meanwhile, and :meth:`close` ends it all.

    Args:
        options: how to reach the server.
        name: the name to log in with.
        token: sent in ``hello``.
        policy: how to reconnect; ``None`` ends the session with its first
            connection.
        sink: where events go.
    """

    def __init__(
        self,
        options: ConnectionOptions,
        *,
        name: str,
        token: str | None,
        policy: Reconnect | None,
        sink: Sink,
    ) -> None:
        self.name = name
        """Our current name (follows ``nick``)."""
        self.joined_rooms: set[str] = set()
        """The rooms we are in (while reconnecting: we will be back in)."""
        self.server_name = ""
        """The ``server`` field of the server's ``welcome``."""
        self.close_reason: str | None = None
        """Why the session ended, once it has (or is about to)."""
        self.closing = False
        """True once :meth:`close` was called."""
        self.done = trio.Event()
        """Set once no connection will come."""
        self._options = options
        self._token = token
        self._policy = policy
        self._sink = sink
        self._refs = itertools.count(1)
        self._resumer = (
            None if policy is None else Resumer(self._deliver, max_held=policy.max_held)
        )
        self._connection: Connection | None = None
        # The last welcome's secret: a reconnect presents it, to take over
        # our old session should the server not have noticed it is gone.
        self._resume_secret: str | None = None
        self._ready = trio.Event()  # set while requests may go out
        self._reconnect_scope: trio.CancelScope | None = None

    @property
    def connected(self) -> bool:
        """True while a connection is up."""
        return self._connection is not None and self._connection.connected

    @property
    def reconnecting(self) -> bool:
        """True while the connection is lost and another will come."""
        return not self.connected and not self.done.is_set() and self._will_reconnect()

    @property
    def _lost_reason(self) -> str | None:
        """Why the current connection ended (``None``: it has not, or there
        is none)."""
        return None if self._connection is None else self._connection.lost_reason

    # --- connecting -----------------------------------------------------------

    async def open(self, stream: trio.abc.Stream | None = None) -> Welcome:
        """Connect and log in, the first time (and, with a reconnect policy,
        note where the lobby's news starts). ``stream``: a connection
        already open to log in on; should the server have closed it
        meanwhile (its handshake timeout passed), a new one is opened.

        Raises:
            as :meth:`Connection.open`.
        """
        try:
            try:
                welcome = await self._connect(stream=stream)
            except (ConnectionClosed, TimedOut, trio.BrokenResourceError, OSError):
                if stream is None:
                    raise
                welcome = await self._connect()
            if self._resumer is not None:
                assert self._connection is not None
                # Without an answer in time, the lobby has no mark.
                with trio.move_on_after(self._options.connect_timeout):
                    await self._resumer.mark_lobby(self._connection)
        except BaseException:
            if self._connection is not None:
                await self._connection.aclose()
            self.done.set()
            raise
        self._ready.set()
        return welcome

    async def _connect(
        self, rooms: set[str] | None = None, stream: trio.abc.Stream | None = None
    ) -> Welcome:
        """Connect and log in; the new connection becomes the current one.
        ``rooms``: resuming, the rooms to be back in; ``stream``: a
        connection already open."""
        connection, welcome = await Connection.open(
            self._options,
            name=self.name,
            token=self._token,
            resume=self._resume_secret,
            refs=self._refs,
            on_lost=self._lost,
            stream=stream,
        )
        self._connection = connection
        self._resume_secret = welcome.resume
        self.name = welcome.name
        self.server_name = welcome.server
        joined = set(welcome.rooms)
        if rooms is not None and LOBBY not in rooms:
            # We had left the lobby and the resume leaves it again: it is not
            # a room we will be back in, even should this connection end
            # before the resume could leave it.
            joined.discard(LOBBY)
        self.joined_rooms.update(joined)
        return welcome

    # --- serving the connections ---------------------------------------------

    async def run(self) -> None:
        """Serve the first connection, then (with a policy) each new one."""
        try:
            rooms: set[str] | None = None  # resuming: the rooms to be back in
            while True:
                assert self._connection is not None
                await self._serve(self._connection, rooms)
                if not self._will_reconnect():
                    break
                rooms = set(self.joined_rooms)
                if not await self._reconnect(rooms):
                    break
        finally:
            self._finish()

    async def _serve(self, connection: Connection, rooms: set[str] | None) -> None:
        """Serve ``connection`` until it ends; ``rooms``: resuming, the rooms
        to be back in."""
        resumer = None
        if rooms is not None:
            resumer = self._resumer
            assert resumer is not None  # only a session with a policy resumes
            resumer.begin(rooms)  # before the reader: notices may be buffered
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, connection)
                nursery.start_soon(connection.keep_alive)
                if resumer is not None:
                    try:
                        await self._resume(resumer, connection)
                    except ConnectionClosed:
                        pass  # lost again; the reader has seen it too
                    finally:
                        resumer.end()
        finally:
            await connection.aclose()

    async def _read(self, connection: Connection) -> None:
        try:
            await connection.read(self._on_news)
        finally:
            if not self._will_reconnect():
                self._finish()  # at once: no request may find us half-closed
            else:
                connection.fail_pending(connection.lost_reason or "connection lost")
                if self._ready.is_set():
                    self._ready = trio.Event()  # requests wait for the next

    async def _on_news(self, event: ServerEvent) -> None:
        resumer = self._resumer
        match event:
            case Joined(room=room, name=name) if name == self.name and not (
                resumer is not None and resumer.leaves(room)
            ):
                # (Not the lobby the server joins us to while the resume
                # leaves it again: see _connect.)
                self.joined_rooms.add(room)
            case (
                Left(room=room, name=name)
                | Moderated(action="kick" | "ban", room=str(room), name=name)
            ) if name == self.name:
                # (Kicked or banned from a room, we are told by `moderated`
                # alone: the others get `left`.)
                self.joined_rooms.discard(room)
                if resumer is not None:
                    resumer.forget(room)
            case Renamed(old=old, new=new) if old == self.name:
                self.name = new
        if resumer is not None and resumer.absorb(event, self.name):
            return
        await self._deliver(event)

    async def _deliver(self, event: ClientItem) -> None:
        delivered = await self._sink.deliver(event)
        if delivered and isinstance(event, Message) and self._resumer is not None:
            self._resumer.delivered(event)

    def _lost(self, reason: str, code: str | None) -> None:
        """The current connection is ending (its on_lost)."""
        # What the server said (shutdown, kicked...) beats our own "closed
        # by the client"; a bare end of the connection does not.
        if not self._will_reconnect() and (self.close_reason is None or code):
            self.close_reason = reason

    def _will_reconnect(self) -> bool:
        policy = self._policy
        code = None if self._connection is None else self._connection.lost_code
        if policy is None or self.closing or code in _FINAL_CODES:
            return False
        return policy.after_shutdown or code != "shutdown"

    def _finish(self) -> None:
        """No more connections: fail what waits, end the event streams."""
        if self.done.is_set():
            return
        if self.close_reason is None:
            self.close_reason = self._lost_reason or "connection lost"
        if self._connection is not None:
            self._connection.fail_pending(self.close_reason)
        self.done.set()
        self._ready.set()  # waiting requests wake up and find us closed
        self._sink.close(self.close_reason)

    # --- reconnecting ---------------------------------------------------------

    async def _reconnect(self, rooms: set[str]) -> bool:
        """Get a connection back (True) unless the policy gives up or we
        are closed (False)."""
        policy = self._policy
        assert policy is not None and self._connection is not None
        lost = self._connection.lost_reason or "connection lost"
        with trio.CancelScope() as self._reconnect_scope:
            if self.closing:
                return False
            gave_up = await reconnect(
                policy, lost, lambda: self._connect(rooms), self._deliver
            )
            if gave_up is None:
                log.info("reconnected as %s", self.name)
                return True
            self.close_reason = gave_up
        return False

    async def _resume(self, resumer: Resumer, connection: Connection) -> None:
        """Re-join, then catch up each room; requests may go meanwhile."""
        await resumer.rejoin(connection, refused=self.joined_rooms.discard)
        # The connection may have ended since the last answer, the reader
        # having seen it first: ``_ready`` is then for the next connection
        # (set while connected, or once no connection will come).
        if connection.connected:
            self._ready.set()
        await resumer.catch_up(connection)

    # --- requests ---------------------------------------------------------------

    async def request(self, request: ClientRequest) -> Any:
        """Send ``request`` and return its answer; while reconnecting, wait
        for the connection first (bounded by the policy's
        ``request_timeout``).

        Raises:
            RequestError: the server's answer; :class:`ConnectionClosed`
                when there is no connection, or it ended first.
        """
        connection = await self._wait_ready()
        try:
            return await connection.request(request)
        except ConnectionClosed:
            if self.close_reason is None:
                raise
            raise ConnectionClosed(self.close_reason) from None

    async def _wait_ready(self) -> Connection:
        """The connection to send on; while reconnecting, wait (bounded)."""
        deadline: float | None = None
        while True:
            connection = self._connection
            if connection is not None and connection.connected and self._ready.is_set():
                return connection
            policy = self._policy
            if policy is None or self.done.is_set() or not self._will_reconnect():
                raise ConnectionClosed(self._why("not connected"))
            if deadline is None:  # once: the whole wait is bounded
                timeout = policy.request_timeout
                deadline = trio.current_time() + (
                    math.inf if timeout is None else timeout
                )
            with trio.move_on_at(deadline):
                await self._ready.wait()
                continue
            lost = None if connection is None else connection.lost_reason
            raise ConnectionClosed(f"not connected (reconnecting; {lost or 'lost'})")

    def _why(self, default: str) -> str:
        """Why requests cannot go: how the session ended, or the connection."""
        return self.close_reason or self._lost_reason or default

    async def mark(self, room: str) -> None:
        """With a reconnect policy: note where ``room``'s news starts (we
        just joined it), should we have to resume it."""
        if self._resumer is not None and self._connection is not None:
            with suppress(RequestError):
                await self._resumer.mark(self._connection, room)

    # --- closing ----------------------------------------------------------------

    async def close(self) -> None:
        """Send ``bye`` and return once the session has ended. Never
        reconnects from here on, and stops a reconnect under way."""
        self.closing = True
        if self.close_reason is None and not self.done.is_set():
            self.close_reason = "closed by the client"
        if self._reconnect_scope is not None:
            self._reconnect_scope.cancel()
        if self._connection is not None:
            with suppress(ConnectionClosed):
                await self._connection.send(Bye())
        await self.done.wait()

    async def abort(self) -> None:
        """Close the current connection at once."""
        if self._connection is not None:
            await self._connection.aclose()
