"""The trio chat client.

A :class:`ChatClient` owns a nursery with a connection task (holding, for
each connection, a reader and a keepalive pinger) and, when plugins
implement client hooks, a hook task. The reader decodes server events and
routes each one:

* a reply to one of our requests (matched by ``ref``) wakes the caller, who
  gets the answer or a :class:`~chatkit.RequestError`;
* everything else, including the echoes of our own messages, joins and
  renames, goes to ``async for event in client`` and to the client hooks.

Both routes are bounded: when nobody consumes events, the reader stops
reading (backpressure, as in trio-websocket), and the server eventually
drops us as too slow. Pass ``event_buffer=None`` if you use only hooks.

With a :class:`~chatkit.Reconnect` policy the connection task outlives a
connection: it waits (jittered exponential backoff), logs in again with the
same name, re-joins the rooms and fetches each room's messages after the
last one delivered, holding back live messages of a room until its
catch-up is done, so that the application sees every message once, in
order.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, suppress
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self, TypeAlias

import msgspec
import trio

from .._events import (
    LOBBY,
    PROTOCOL_VERSION,
    Bye,
    ClientRequest,
    DirectMessage,
    Dm,
    ErrorReply,
    Event,
    Hello,
    History,
    HistoryReply,
    Join,
    Joined,
    Leave,
    Left,
    Message,
    Nick,
    Ping,
    Pong,
    Renamed,
    Rooms,
    RoomsReply,
    Say,
    ServerEvent,
    Shutdown,
    Welcome,
    Who,
    WhoReply,
)
from .._exceptions import (
    BadName,
    BadRequest,
    ConnectionClosed,
    ErrorCode,
    NameTaken,
    RateLimited,
    Rejected,
    RemoteProtocolError,
    RequestError,
    TooLarge,
    Unauthorized,
)
from .._hooks import (
    CLIENT_ENTRY_POINT_GROUP,
    HookDispatcher,
    hookspec,
    make_plugin_manager,
)
from ..protocol import DEFAULT_MAX_LINE_LENGTH, EOF, NEED_DATA, ClientConnection
from ._reconnect import (
    ClientEvent,
    Interrupted,
    Reconnect,
    Reconnected,
    Reconnecting,
)

__all__ = ["DEFAULT_PORT", "ChatClient", "ClientSpec", "open_client"]

log = logging.getLogger("chatkit.client")

#: The port of the original chat program, and chatkit's CLI default.
DEFAULT_PORT: Final = 12345

#: What ``async for event in client`` yields.
ClientItem: TypeAlias = ServerEvent | ClientEvent

# Errors the server closes the connection after (extensions to v1).
_CLOSING_CODES: Final = frozenset(
    {ErrorCode.TOO_SLOW, ErrorCode.KICKED, ErrorCode.TIMEOUT}
)
# The client hook of each ClientEvent; the event's fields are its arguments.
_CLIENT_EVENT_HOOKS: Final = MappingProxyType(
    {
        Interrupted: "chatkit_client_interrupted",
        Reconnecting: "chatkit_client_reconnecting",
        Reconnected: "chatkit_client_reconnected",
    }
)

_RECEIVE_SIZE: Final = 64 * 1024
# Events that only answer a request (no news for ``async for``).
_ANSWERS: Final = (ErrorReply, WhoReply, RoomsReply, HistoryReply, Pong)
# The longest line accepted from the server by default: far above what a
# server sends (its history replies are bounded, at a few MiB).
_MAX_SERVER_LINE_LENGTH: Final = 16 * 1024 * 1024
# Refusals a reconnect cannot get past by waiting: the client gives up.
_PERMANENT: Final = (Unauthorized, BadName, BadRequest, Rejected, TooLarge)


class _Pending:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: ServerEvent | RequestError | None = None


class _Resume:
    """A resume under way (``ChatClient._resume``): what the reader keeps
    back or drops until each room has caught up."""

    __slots__ = ("dropping", "holding", "max_held", "overflowed", "rejoining")

    def __init__(self, wanted: set[str], max_held: int) -> None:
        # Past this many held messages in a room, the newer ones are dropped
        # and fetched again from history afterwards (Reconnect.max_held).
        self.max_held = max_held
        # Live messages per room, held back until the room has caught up.
        self.holding = {room: collections.deque[Message]() for room in wanted}
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


class ClientSpec:
    """Hooks a :class:`chatkit.ChatClient` calls, in the order events arrive.

    They run in a task of their own, so an implementation may await the
    client (``await client.say(...)``, even ``await client.who()``).
    """

    @hookspec
    def chatkit_client_connected(self, client: ChatClient, welcome: Welcome) -> None:
        """The server accepted ``hello``; ``welcome.name`` is our name."""

    @hookspec
    def chatkit_client_event(self, client: ChatClient, event: Event) -> None:
        """Any event from the server (fires before the specific hooks)."""

    @hookspec
    def chatkit_client_message(self, client: ChatClient, message: Message) -> None:
        """A room message arrived (our own messages too: check
        ``message.sender == client.name``)."""

    @hookspec
    def chatkit_client_dm(self, client: ChatClient, message: DirectMessage) -> None:
        """A private message arrived (or the echo of one we sent)."""

    @hookspec
    def chatkit_client_joined(self, client: ChatClient, room: str, name: str) -> None:
        """``name`` (maybe us) joined ``room``."""

    @hookspec
    def chatkit_client_left(
        self, client: ChatClient, room: str, name: str, reason: str | None
    ) -> None:
        """``name`` (maybe us) left ``room``."""

    @hookspec
    def chatkit_client_disconnected(self, client: ChatClient, reason: str) -> None:
        """The client ended (its connection is gone and, with a reconnect
        policy, no reconnect will follow); ``reason`` says how. Fires once,
        last."""

    @hookspec
    def chatkit_client_interrupted(self, client: ChatClient, reason: str) -> None:
        """The connection ended and the client (connected with
        ``reconnect=``) is going to reconnect; ``reason`` says how it ended.

        Requests made from now on wait for the new connection (see
        :attr:`chatkit.Reconnect.request_timeout`).
        """

    @hookspec
    def chatkit_client_reconnecting(
        self, client: ChatClient, attempt: int, delay: float, error: str | None
    ) -> None:
        """Reconnect attempt number ``attempt`` starts in ``delay`` seconds;
        ``error`` says why the previous attempt failed (``None`` before the
        first)."""

    @hookspec
    def chatkit_client_reconnected(self, client: ChatClient, missed: int) -> None:
        """The client is back, under the same name and in the same rooms, and
        the ``missed`` messages said meanwhile went through the message hooks
        (and ``async for``) before this one. ``chatkit_client_connected``
        does not fire again."""


class ChatClient:
    """A connection to a chat server, as an async context manager::

        async with chatkit.open_client("127.0.0.1", 12345, name="alice") as client:
            await client.say("hi")
            async for event in client:
                print(event)

    Entering connects, sends ``hello`` and waits for ``welcome``; leaving
    sends ``bye`` and closes.

    Args:
        host: server address.
        port: server port.
        name: the name to log in with.
        token: sent in ``hello`` for servers that authenticate.
        plugins: objects or modules implementing :class:`~chatkit.hookspecs.ClientSpec`.
        load_entry_points: also load plugins of the ``chatkit.client``
            entry-point group, filtered by ``CHATKIT_LOAD_PLUGINS``.
        event_buffer: how many unconsumed events to hold for ``async for``
            before reading pauses; ``None`` to keep none (hooks only).
        connect_timeout: seconds to connect and complete the handshake.
        close_timeout: seconds to wait for the server after ``bye``.
        hook_timeout: seconds an awaited client hook may take.
        ssl_context: connect with TLS, verifying the server with this
            context (e.g. ``ssl.create_default_context(cafile=...)``).
        keepalive: send a ``ping`` after this many seconds without sending
            anything, so servers with an idle timeout keep us; ``None``
            never pings.
        reconnect: get the connection back when it is lost, following this
            :class:`~chatkit.Reconnect` policy (``True``: the default
            policy); ``None`` or ``False`` ends the client with the
            connection. Only a connection that was established is resumed:
            entering still raises if the first connect fails.
        max_line_length: the longest line accepted from the server, in
            bytes (16 MiB by default: history replies can be large). A
            longer line is dropped and logged; a request it answered gets
            no answer.
        server_max_line_length: the server's line limit, in bytes (its
            ``max_line_length``). A request whose line is longer raises
            :class:`~chatkit.TooLarge` without being sent: the server could
            not tell whose request it discarded, so it would go unanswered.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        name: str,
        token: str | None = None,
        plugins: Iterable[object] = (),
        load_entry_points: bool = False,
        event_buffer: int | None = 256,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        hook_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        keepalive: float | None = 30.0,
        reconnect: Reconnect | bool | None = None,
        max_line_length: int = _MAX_SERVER_LINE_LENGTH,
        server_max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    ) -> None:
        self.host = host
        self.port = port
        self.name = name
        """Our current name (follows ``nick``)."""
        self.joined_rooms: set[str] = set()
        """The rooms we are in (while reconnecting: the rooms we will be
        back in)."""
        self.server_name = ""
        """The ``server`` field of the server's ``welcome``."""
        self.close_reason: str | None = None
        """Why the client ended, once it has (or is about to)."""
        self.reconnect: Reconnect | None = (
            Reconnect() if reconnect is True else reconnect or None
        )
        """The reconnect policy; ``None`` when the client does not reconnect."""
        self._token = token
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._event_buffer = event_buffer
        self._ssl_context = ssl_context
        self._keepalive = keepalive
        if max_line_length < 1:
            raise ValueError("max_line_length must be at least 1")
        self._max_line_length = max_line_length
        self._server_max_line_length = server_max_line_length
        self._last_sent = 0.0
        self.plugin_manager = make_plugin_manager(
            ClientSpec,
            plugins,
            load_entry_points=load_entry_points,
            entry_point_group=CLIENT_ENTRY_POINT_GROUP,
        )
        self._hooks = HookDispatcher(
            self.plugin_manager, timeout=hook_timeout, logger=log
        )
        # The current connection.
        self._proto = ClientConnection(max_line_length=max_line_length)
        self._stream: trio.abc.Stream | None = None
        self._connected = False
        self._lost_reason: str | None = None
        self._lost_code: str | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._pending: dict[int, _Pending] = {}
        self._last_ref = 0
        # The client as a whole.
        self._entered = False
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._ready = trio.Event()  # set while requests may go out
        self._done = trio.Event()  # set once no connection will come
        self._hooks_done = trio.Event()
        self._closing = False
        self._reconnect_scope: trio.CancelScope | None = None
        # Background tasks get cancel scopes of their own: cancelling the
        # nursery's would also cancel the ``async with`` body running in it.
        self._task_scopes: list[trio.CancelScope] = []
        self._tasks_cancelled = False
        self._events_send: trio.MemorySendChannel[ClientItem] | None = None
        self._events_receive: trio.MemoryReceiveChannel[ClientItem] | None = None
        self._hook_send: trio.MemorySendChannel[ClientItem] | None = None
        # Resuming: the last message delivered in each room (or the room's
        # newest when we joined it, or None for an empty room), the highest
        # id seen anywhere, the rooms to be back in, and the resume under
        # way, if any.
        self._marks: dict[str, Message | None] = {}
        self._max_seen = 0
        self._wanted: set[str] = set()
        self._resuming: _Resume | None = None
        self._receiving_since: float | None = None
        # Events read before the reader started, for it to route first.
        self._backlog = collections.deque[ServerEvent]()

    # --- lifecycle --------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("this ChatClient was already entered")
        self._entered = True
        try:
            welcome = await self._open_connection()
            if self.reconnect is not None:
                # Where the lobby's news starts, should we have to resume it.
                await self._mark_lobby()
        except BaseException:
            self._connected = False
            if self._stream is not None:
                await trio.aclose_forcefully(self._stream)
            self._done.set()
            self._hooks_done.set()
            raise
        self._ready.set()
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        if self._event_buffer is not None:
            self._events_send, self._events_receive = trio.open_memory_channel(
                self._event_buffer
            )
        if self._has_client_hooks():
            hook_send, hook_receive = trio.open_memory_channel[ClientItem](
                self._event_buffer or 256
            )
            self._hook_send = hook_send
            hook_send.send_nowait(welcome)
            self._nursery.start_soon(
                self._in_tasks_scope, self._hook_loop, hook_receive
            )
        else:
            self._hooks_done.set()
        self._nursery.start_soon(self._in_tasks_scope, self._run)
        return self

    async def _in_tasks_scope(
        self, fn: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        with trio.CancelScope() as scope:
            self._task_scopes.append(scope)
            if self._tasks_cancelled:
                scope.cancel()  # started after aclose() stopped the others
            await fn(*args)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            with trio.CancelScope(shield=exc is not None):
                await self.aclose()
        finally:
            # The body's exception (if any) propagates on its own; the
            # nursery only has our own, already-cancelled tasks to reap.
            await self._stack.aclose()

    async def aclose(self) -> None:
        """Send ``bye``, wait (bounded) for the server to close, and close.

        Idempotent; never reconnects, and stops a reconnect under way.
        Pending requests fail with :class:`ConnectionClosed`.
        """
        if self._closing:
            return
        self._closing = True
        if self.close_reason is None and not self._done.is_set():
            self.close_reason = "closed by the client"
        if self._reconnect_scope is not None:
            self._reconnect_scope.cancel()
        try:
            with trio.move_on_after(self._close_timeout):
                with suppress(ConnectionClosed):
                    await self._send(Bye())
                await self._done.wait()
                await self._hooks_done.wait()
        finally:
            # First, and whatever happens to the wait above (the caller may be
            # cancelled mid-way): no background task may outlive aclose().
            self._tasks_cancelled = True
            for scope in self._task_scopes:
                scope.cancel()
            if self._stream is not None:
                await trio.aclose_forcefully(self._stream)

    @property
    def closed(self) -> bool:
        """True once the client has ended: its connection is gone and no
        reconnect will follow."""
        return self._done.is_set()

    @property
    def connected(self) -> bool:
        """True while a connection is up (False while reconnecting)."""
        return self._connected

    @property
    def reconnecting(self) -> bool:
        """True while the connection is lost and the client is getting it
        back (requests wait, see :attr:`Reconnect.request_timeout`)."""
        return (
            self._entered
            and not self._connected
            and not self._done.is_set()
            and self._will_reconnect()
        )

    async def _open_stream(self) -> trio.abc.Stream:
        if self._ssl_context is None:
            return await trio.open_tcp_stream(self.host, self.port)
        return await trio.open_ssl_over_tcp_stream(
            self.host, self.port, ssl_context=self._ssl_context
        )

    async def _open_connection(self, *, resuming: bool = False) -> Welcome:
        """Connect and log in; the new connection becomes the current one.
        ``resuming``: a reconnect, to be back in the rooms of ``_wanted``."""
        self._proto = ClientConnection(max_line_length=self._max_line_length)
        self._stream = None
        try:
            with trio.fail_after(self._connect_timeout):
                self._stream = await self._open_stream()
                welcome = await self._handshake(resuming=resuming)
        except BaseException:
            if self._stream is not None:
                await trio.aclose_forcefully(self._stream)
            raise
        self._lost_reason = self._lost_code = None
        self._connected = True
        return welcome

    async def _handshake(self, *, resuming: bool) -> Welcome:
        assert self._stream is not None
        self._last_ref += 1
        await self._stream.send_all(
            self._proto.send(
                Hello(
                    name=self.name,
                    protocol=PROTOCOL_VERSION,
                    token=self._token,
                    ref=self._last_ref,
                )
            )
        )
        while True:
            event = await self._next_event()
            if isinstance(event, Welcome):
                self.name = event.name
                self.server_name = event.server
                rooms = set(event.rooms)
                if resuming and LOBBY not in self._wanted:
                    # We had left the lobby and the resume leaves it again:
                    # it is not a room we will be back in, even should this
                    # connection end before the resume could leave it.
                    rooms.discard(LOBBY)
                self.joined_rooms.update(rooms)
                return event
            if isinstance(event, ErrorReply):
                raise RequestError.from_code(event.code, event.message)
            if isinstance(event, Shutdown):
                raise ConnectionClosed(f"server shutting down: {event.reason}")
            # Anything else before welcome is not for us; ignore it.

    async def _next_event(self) -> ServerEvent:
        """Next event from the stream (the handshake's and the reader's)."""
        assert self._stream is not None
        while True:
            try:
                event = self._proto.next_event()
            except RemoteProtocolError as exc:
                log.warning("bad line from server: %s", exc)
                self._fail_answered(exc)
                continue
            if event is EOF:
                raise ConnectionClosed("server closed the connection")
            if event is not NEED_DATA:
                return event
            self._receiving_since = trio.current_time()
            try:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionClosed(self._lost_reason or "connection lost") from None
            finally:
                self._receiving_since = None
            self._proto.receive_data(data)

    def _fail_answered(self, exc: RemoteProtocolError) -> None:
        """A bad line that carries the ref of a request answers it: with an
        error, rather than never."""
        message = f"bad answer from the server: {exc.message}"
        self._answer(exc.ref, RequestError.from_code(exc.code, message))

    def _answer(self, ref: object, result: Any) -> bool:
        """Hand ``result`` to the request of ``ref``; False if none waits."""
        pending = self._pending.pop(ref, None) if isinstance(ref, int) else None
        if pending is None:
            return False
        pending.result = result
        pending.done.set()
        return True

    # --- connections ------------------------------------------------------

    async def _run(self) -> None:
        """Serve the first connection, then (with a policy) each new one."""
        try:
            resume = False
            while True:
                await self._serve_connection(resume)
                if not self._will_reconnect() or not await self._reconnect():
                    break
                resume = True
        finally:
            self._finish()

    async def _serve_connection(self, resume: bool) -> None:
        if resume:
            # Before the reader starts: the lobby's notices may be buffered.
            assert self.reconnect is not None
            self._resuming = _Resume(self._wanted, self.reconnect.max_held)
        stream = self._stream
        ping_scope = trio.CancelScope()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, ping_scope)
                if self._keepalive is not None:
                    nursery.start_soon(self._ping_when_idle, ping_scope)
                if resume:
                    try:
                        await self._resume()
                    except ConnectionClosed:
                        pass  # lost again; the reader has seen it too
                    finally:
                        # Held messages of rooms not caught up are dropped:
                        # the next resume fetches them again, as the marks
                        # did not move past them.
                        self._resuming = None
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)

    def _finish(self) -> None:
        """No more connections: fail what waits, end the event streams."""
        if self._done.is_set():
            return
        self._connected = False
        if self.close_reason is None:
            self.close_reason = self._lost_reason or "connection lost"
        self._fail_pending(self.close_reason)
        self._done.set()
        self._ready.set()  # waiting requests wake up and find us closed
        if self._events_send is not None:
            self._events_send.close()
        if self._hook_send is not None:
            self._hook_send.close()

    def _fail_pending(self, reason: str) -> None:
        for pending in self._pending.values():
            pending.result = ConnectionClosed(reason)
            pending.done.set()
        self._pending.clear()

    def _lost(self, reason: str, code: str | None = None) -> None:
        """Record why the current connection is ending."""
        self._lost_reason, self._lost_code = reason, code
        # What the server said (shutdown, kicked...) beats our own "closed
        # by the client"; a bare end of the connection does not.
        if not self._will_reconnect() and (self.close_reason is None or code):
            self.close_reason = reason

    def _will_reconnect(self) -> bool:
        policy = self.reconnect
        if policy is None or self._closing or self._lost_code == ErrorCode.KICKED:
            return False
        return policy.after_shutdown or self._lost_code != "shutdown"

    async def _reconnect(self) -> bool:
        """Back off and connect again until it works (True) or we give up or
        are closed (False)."""
        policy = self.reconnect
        assert policy is not None
        lost = self._lost_reason or "connection lost"
        log.info("connection lost (%s); reconnecting", lost)
        self._wanted = set(self.joined_rooms)
        lost_at = trio.current_time()
        error: str | None = None
        failures = name_taken = 0
        with trio.CancelScope() as self._reconnect_scope:
            if self._closing:
                return False
            await self._deliver(Interrupted(reason=lost))
            while policy.max_attempts is None or failures < policy.max_attempts:
                delay = policy.delay(failures + 1)
                if (
                    policy.give_up_after is not None
                    and trio.current_time() + delay - lost_at > policy.give_up_after
                ):
                    break
                await self._deliver(
                    Reconnecting(attempt=failures + 1, delay=delay, error=error)
                )
                await trio.sleep(delay)
                try:
                    await self._open_connection(resuming=True)
                except NameTaken as exc:
                    # Perhaps our old connection, not yet reaped by the server.
                    failures, name_taken, error = failures + 1, name_taken + 1, str(exc)
                    if name_taken >= policy.max_name_taken:
                        break
                except _PERMANENT as exc:
                    failures, error = failures + 1, str(exc)
                    break
                except ConnectionClosed as exc:  # e.g. a shutdown under way
                    failures, name_taken, error = failures + 1, 0, exc.message
                except RequestError as exc:  # server_full, rate_limited...
                    failures, name_taken, error = failures + 1, 0, str(exc)
                except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                    failures, name_taken, error = failures + 1, 0, _describe(exc)
                else:
                    log.info("reconnected as %s", self.name)
                    return True
                log.info("reconnect attempt %d failed: %s", failures, error)
            self.close_reason = f"gave up reconnecting after {failures} attempts" + (
                f": {error}" if error else ""
            )
            log.warning("%s (connection lost: %s)", self.close_reason, lost)
        return False

    # --- resuming ---------------------------------------------------------

    async def _resume(self) -> None:
        """Re-join, then catch up each room; requests may go meanwhile."""
        resume = self._resuming
        assert resume is not None
        for room in sorted(resume.holding.keys() - {LOBBY}):
            if not await self._resume_step(f"re-join {room}", Join, room=room):
                del resume.holding[room]
                self._marks.pop(room, None)
                resume.rejoining.discard(room)
                self.joined_rooms.discard(room)
        if resume.dropping:
            await self._resume_step(f"leave {LOBBY} again", Leave, room=LOBBY)
            resume.dropping = set()
        # The connection may have ended since the last answer, the reader
        # having seen it first: ``_ready`` is then for the next connection
        # (set while connected, or once no connection will come).
        if self._connected:
            self._ready.set()
        missed = 0
        for room in sorted(resume.holding, key=lambda room: (room != LOBBY, room)):
            missed += await self._catch_up(resume, room)
        await self._deliver(Reconnected(missed=missed))

    async def _resume_step(
        self, what: str, request: Callable[..., ClientRequest], **fields: Any
    ) -> bool:
        """A request of the resume that the server may refuse (logged)."""
        try:
            await self._resume_request(request, **fields)
        except ConnectionClosed:
            raise
        except RequestError as exc:
            log.warning("could not %s: %s", what, exc)
            return False
        return True

    async def _resume_request(
        self, request: Callable[..., ClientRequest], **fields: Any
    ) -> Any:
        """A request of the resume, which asks many at once: a rate limit is
        waited out (pausing longer each time, so as never to flood)."""
        pause = 0.25
        while True:
            try:
                return await self._request(
                    request(**fields, ref=self._next_ref()), wait=False
                )
            except RateLimited:
                await trio.sleep(pause)
                pause = min(2 * pause, 5.0)

    async def _catch_up(self, resume: _Resume, room: str) -> int:
        """Deliver ``room``'s messages after its mark, then the live ones
        held meanwhile; returns how many came from history."""
        held = resume.holding[room]
        missed = 0
        try:
            missed = await self._read_room(resume, room)
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

    async def _read_room(self, resume: _Resume, room: str) -> int:
        held = resume.holding[room]
        known = self._marks.get(room)
        mark = self._mark_of(room) if room in self._marks else self._max_seen
        missed = 0
        if known is not None:
            # Ask from our last message on: if the server still has it, it
            # is the one we saw, or the server's ids started over (a restart
            # without persistent history) and the room must be read anew.
            asked = mark - 1
            page = await self._history_after(room, asked)
            if (page and page[0].id == mark and not _same(page[0], known)) or not page:
                asked, page = 0, await self._restart_room(room)
        else:
            asked = mark
            page = await self._history_after(room, asked)
        while True:
            while page:
                for message in page:
                    if message.id > self._mark_of(room):
                        await self._deliver(message)
                        missed += 1
                if page[-1].id <= asked:
                    break  # a server that does not page forward
                asked = page[-1].id
                page = await self._history_after(room, asked)
            await self._release_held(room, held)
            if room not in resume.overflowed:
                break
            # Some live messages did not fit: they are in history.
            resume.overflowed.discard(room)
            asked = self._mark_of(room)
            page = await self._history_after(room, asked)
        return missed

    async def _release_held(self, room: str, held: collections.deque[Message]) -> None:
        """Deliver the live messages held while ``room`` caught up, but
        those history delivered already."""
        while held:
            message = held.popleft()
            if message.id > self._mark_of(room):
                await self._deliver(message)

    async def _restart_room(self, room: str) -> Sequence[Message]:
        log.info("message ids of %s started over; reading it from the start", room)
        self._marks.pop(room, None)
        return await self._history_after(room, 0)

    async def _history_after(self, room: str, after: int) -> Sequence[Message]:
        reply: HistoryReply = await self._resume_request(
            History, room=room, after=after
        )
        return reply.messages

    async def _mark_room(self, room: str) -> None:
        """Note where ``room``'s news starts: its newest message now."""
        reply: HistoryReply = await self._request(
            History(room=room, limit=1, ref=self._next_ref()), wait=False
        )
        self._take_mark(room, reply)

    async def _mark_lobby(self) -> None:
        """:meth:`_mark_room` for the lobby, on the first connection before
        its reader starts: the events read meanwhile wait in ``_backlog``
        for the reader. (The reader would hand them to ``async for`` first,
        which nobody reads while ``__aenter__`` waits for the answer.)
        Without an answer within ``connect_timeout``, the lobby has no mark.
        """
        ref = self._next_ref()
        with suppress(RequestError), trio.move_on_after(self._connect_timeout):
            await self._send(History(room=LOBBY, limit=1, ref=ref))
            while True:
                event = await self._next_event()
                if getattr(event, "ref", None) != ref:
                    self._backlog.append(event)
                elif isinstance(event, HistoryReply):
                    self._take_mark(LOBBY, event)
                    return
                else:
                    return  # refused: no mark

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

    # --- receiving --------------------------------------------------------

    async def _reader(self, ping_scope: trio.CancelScope) -> None:
        try:
            while self._backlog:
                await self._route(self._backlog.popleft())
            while True:
                event = await self._next_event()
                await self._route(event)
        except ConnectionClosed as exc:
            if self._lost_reason is None:
                self._lost(exc.message)
        finally:
            self._connected = False
            if self._lost_reason is None:
                self._lost("connection lost")
            ping_scope.cancel()
            if not self._will_reconnect():
                self._finish()  # at once: no request may find us half-closed
            else:
                self._fail_pending(self._lost_reason or "connection lost")
                if self._ready.is_set():
                    self._ready = trio.Event()  # new requests wait for the next

    async def _route(self, event: ServerEvent) -> None:
        self._track(event)
        ref = getattr(event, "ref", None)
        if self._answer(
            ref,
            RequestError.from_code(event.code, event.message)
            if isinstance(event, ErrorReply)
            else event,
        ):
            if isinstance(event, _ANSWERS):
                return  # answered to the caller; not part of the event stream
        elif isinstance(event, _ANSWERS) and isinstance(ref, int):
            return  # the answer to a request whose caller gave up (cancelled)
        elif isinstance(event, Pong) and ref is None:
            return  # the answer to a keepalive ping
        resume = self._resuming
        if resume is not None and resume.absorb(event, self.name):
            return
        await self._deliver(event)

    async def _deliver(self, event: ClientItem) -> None:
        """Hand ``event`` to the hooks and to ``async for``."""
        # The streams end when the client does, perhaps while a resume is
        # still delivering (closed or kicked meanwhile): the rest is dropped.
        if self._done.is_set():
            return
        try:
            if self._hook_send is not None:
                await self._hook_send.send(event)
            if self._events_send is not None:
                await self._events_send.send(event)
        except trio.ClosedResourceError:
            return
        if isinstance(event, Message) and self.reconnect is not None:
            self._max_seen = max(self._max_seen, event.id)
            if event.id > self._mark_of(event.room):
                self._marks[event.room] = event

    def _track(self, event: ServerEvent) -> None:
        match event:
            case Joined(room=room, name=name) if name == self.name and not (
                self._resuming is not None and room in self._resuming.dropping
            ):
                # (Not the lobby the server joins us to while the resume
                # leaves it again: see _handshake.)
                self.joined_rooms.add(room)
            case Left(room=room, name=name) if name == self.name:
                self.joined_rooms.discard(room)
                self._marks.pop(room, None)
            case Renamed(old=old, new=new) if old == self.name:
                self.name = new
            case Shutdown(reason=reason):
                self._lost(f"server shutting down: {reason}", "shutdown")
            case ErrorReply(code=code, message=message) if code in _CLOSING_CODES:
                self._lost(f"{code}: {message}", code)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ClientItem:
        """The next event; iteration ends when the client does.

        Server events (:class:`~chatkit.Event` subclasses) and, with a
        reconnect policy, the client's own :class:`~chatkit.ClientEvent`
        objects.
        """
        if self._events_receive is None:
            raise RuntimeError(
                "this client keeps no events (event_buffer=None); use hooks"
            )
        try:
            return await self._events_receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _has_client_hooks(self) -> bool:
        return any(
            self._hooks.has(name)
            for name in dir(ClientSpec)
            if name.startswith("chatkit_client_")
        )

    async def _hook_loop(self, receive: trio.MemoryReceiveChannel[ClientItem]) -> None:
        hooks = self._hooks
        try:
            async for event in receive:
                match event:
                    case Welcome():
                        await hooks.notify(
                            "chatkit_client_connected", client=self, welcome=event
                        )
                        continue
                    case ClientEvent():
                        # Each one's fields are its hook's arguments.
                        await hooks.notify(
                            _CLIENT_EVENT_HOOKS[type(event)],
                            client=self,
                            **dataclasses.asdict(event),
                        )
                        continue
                await hooks.notify("chatkit_client_event", client=self, event=event)
                match event:
                    case Message():
                        await hooks.notify(
                            "chatkit_client_message", client=self, message=event
                        )
                    case DirectMessage():
                        await hooks.notify(
                            "chatkit_client_dm", client=self, message=event
                        )
                    case Joined(room=room, name=name):
                        await hooks.notify(
                            "chatkit_client_joined", client=self, room=room, name=name
                        )
                    case Left(room=room, name=name, reason=reason):
                        await hooks.notify(
                            "chatkit_client_left",
                            client=self,
                            room=room,
                            name=name,
                            reason=reason,
                        )
            await hooks.notify(
                "chatkit_client_disconnected",
                client=self,
                reason=self.close_reason or "closed",
            )
        finally:
            self._hooks_done.set()

    # --- sending ----------------------------------------------------------

    async def _ping_when_idle(self, scope: trio.CancelScope) -> None:
        assert self._keepalive is not None
        silence = None if self.reconnect is None else self.reconnect.ping_timeout
        with scope:
            self._last_sent = trio.current_time()
            while True:
                await trio.sleep_until(self._last_sent + self._keepalive)
                if trio.current_time() < self._last_sent + self._keepalive:
                    continue
                try:
                    await self._send(Ping())
                except ConnectionClosed:
                    return
                if silence is None:
                    continue
                sent = trio.current_time()
                await trio.sleep(silence)
                # Dead only if the reader waited for data all along: a reader
                # held up by a slow consumer reads nothing either.
                since = self._receiving_since
                if since is not None and since <= sent and self._connected:
                    self._lost(f"no answer from the server in {silence:g}s")
                    assert self._stream is not None
                    await trio.aclose_forcefully(self._stream)
                    return

    async def _send(self, request: ClientRequest) -> None:
        data = self._proto.send(request)
        # The server answers a line over its limit with a `too_large` that
        # has no ref (it cannot parse the line): refuse it here instead.
        if len(data) - 1 > self._server_max_line_length:
            raise TooLarge(
                f"line longer than {self._server_max_line_length} bytes"
                " (the server's limit)"
            )
        stream = self._stream
        if stream is None or not self._connected:
            raise ConnectionClosed(self._why("not connected"))
        try:
            async with self._send_lock:
                try:
                    await stream.send_all(data)
                except trio.Cancelled:
                    # Part of the line may be out: whatever we sent next
                    # would be glued to it. The connection is lost (and
                    # got back, with a reconnect policy).
                    if self._lost_reason is None:
                        self._lost("a request was cancelled while being sent")
                    await trio.aclose_forcefully(stream)
                    raise
                self._last_sent = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self._why("connection lost")) from None

    def _why(self, default: str) -> str:
        """Why requests cannot go: how the client ended, or the connection."""
        return self.close_reason or self._lost_reason or default

    def _next_ref(self) -> int:
        self._last_ref += 1
        return self._last_ref

    async def _wait_ready(self) -> None:
        """Return once requests may go; while reconnecting, wait (bounded)."""
        deadline: float | None = None
        while not (self._connected and self._ready.is_set()):
            policy = self.reconnect
            if policy is None or self._done.is_set() or not self._will_reconnect():
                raise ConnectionClosed(self._why("not connected"))
            if deadline is None:  # once: the whole wait is bounded
                timeout = policy.request_timeout
                deadline = trio.current_time() + (
                    math.inf if timeout is None else timeout
                )
            with trio.move_on_at(deadline):
                await self._ready.wait()
                continue
            raise ConnectionClosed(
                f"not connected (reconnecting; {self._lost_reason or 'lost'})"
            )

    async def _request(self, request: ClientRequest, *, wait: bool = True) -> Any:
        """Send ``request`` and return its answer. ``wait=False`` (our own
        requests while resuming) skips waiting for a lost connection."""
        ref = getattr(request, "ref", None)
        assert isinstance(ref, int)
        if wait:
            await self._wait_ready()
        pending = self._pending[ref] = _Pending()
        try:
            await self._send(request)
            await pending.done.wait()
        finally:
            self._pending.pop(ref, None)
        if isinstance(pending.result, RequestError):
            raise pending.result
        return pending.result

    async def say(self, text: str, room: str = LOBBY) -> Message:
        """Say ``text`` in ``room``; returns the message as delivered (with
        its ``id``) once the server has accepted it.

        Raises:
            NotInRoom: we are not in ``room``.
            Rejected: a server plugin refused the message.
            TooLarge: ``text`` is longer than the server allows.
            ConnectionClosed: the connection ended.
        """
        result: Message = await self._request(
            Say(text=text, room=room, ref=self._next_ref())
        )
        return result

    async def dm(self, to: str, text: str) -> DirectMessage:
        """Send ``text`` privately to ``to``; returns it as delivered.

        Raises:
            NoSuchUser: nobody is called ``to``.
            Rejected: a server plugin refused the message.
            TooLarge: ``text`` is longer than the server allows.
        """
        result: DirectMessage = await self._request(
            Dm(to=to, text=text, ref=self._next_ref())
        )
        return result

    async def join(self, room: str) -> None:
        """Join ``room`` (created if needed).

        Raises:
            BadName: not a valid room name.
        """
        await self._request(Join(room=room, ref=self._next_ref()))
        if self.reconnect is not None:
            # Where the room's news starts, should we have to resume it.
            with suppress(RequestError):
                await self._mark_room(room)

    async def leave(self, room: str) -> None:
        """Leave ``room``.

        Raises:
            NotInRoom: we are not in it.
        """
        await self._request(Leave(room=room, ref=self._next_ref()))

    async def nick(self, name: str) -> None:
        """Change our name to ``name``.

        Raises:
            BadName: not a valid name.
            NameTaken: someone else has it.
        """
        await self._request(Nick(name=name, ref=self._next_ref()))

    async def who(self, room: str = LOBBY) -> tuple[str, ...]:
        """Names of the members of ``room`` (empty if it does not exist)."""
        reply: WhoReply = await self._request(Who(room=room, ref=self._next_ref()))
        return reply.names

    async def rooms(self) -> dict[str, int]:
        """Every room on the server with its member count."""
        reply: RoomsReply = await self._request(Rooms(ref=self._next_ref()))
        return {info.name: info.members for info in reply.rooms}

    async def history(
        self,
        room: str,
        limit: int | None = None,
        *,
        before: int | None = None,
        after: int | None = None,
    ) -> tuple[Message, ...]:
        """Recent messages of ``room``, oldest first.

        Args:
            room: a room we are in.
            limit: at most this many (the newest of them).
            before: only messages with a smaller id.
            after: only messages with a larger id.

        Raises:
            NotInRoom: we are not in ``room``.
        """
        reply: HistoryReply = await self._request(
            History(
                room=room, limit=limit, before=before, after=after, ref=self._next_ref()
            )
        )
        return reply.messages

    async def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        start = trio.current_time()
        await self._request(Ping(ref=self._next_ref()))
        return trio.current_time() - start

    def __repr__(self) -> str:
        return f"<ChatClient {self.name!r} {self.host}:{self.port}>"


def _same(a: Message, b: Message) -> bool:
    """The same message (the sender's copy's ``ref`` aside)?"""
    return msgspec.structs.replace(a, ref=None) == msgspec.structs.replace(b, ref=None)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def open_client(
    host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, name: str, **kwargs: Any
) -> ChatClient:
    """Return a :class:`ChatClient` to use as ``async with open_client(...) as c``.

    Takes :class:`ChatClient`'s keyword arguments.
    """
    return ChatClient(host, port, name=name, **kwargs)
