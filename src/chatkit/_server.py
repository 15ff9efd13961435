"""The trio chat server.

Shape of a running server::

    serve()                                   (the caller's nursery owns it)
      connections nursery                     one task per connection
        _handle_connection(stream)
          connection nursery
            reader (the handler task itself)  bytes -> protocol -> requests
            _write_loop                       one writer per connection
      accept nursery
        trio.serve_listeners(...)             spawns handlers into the above

Fan-out never awaits per recipient: a message is encoded once per wire mode
and its bytes are appended to each member's bounded outgoing buffer
(:meth:`User._enqueue`, synchronous); each connection's writer wakes and sends
everything pending in one ``send_all``, so writes coalesce under load. A
member whose buffer would overflow is dropped (``error too_slow``), never
waited for.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any, Final

import msgspec
import trio

from ._events import (
    PROTOCOL_VERSION,
    Bye,
    ClientRequest,
    DirectMessage,
    Dm,
    Error,
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
    RoomInfo,
    Rooms,
    RoomsReply,
    Say,
    ServerEvent,
    Shutdown,
    Welcome,
    Who,
    WhoReply,
)
from ._exceptions import ErrorCode, Reject, RemoteProtocolError
from ._hooks import HookDispatcher, make_plugin_manager
from ._protocol import (
    CLOSED,
    DEFAULT_MAX_LINE_LENGTH,
    NEED_DATA,
    Mode,
    ServerConnection,
    encode_json,
    encode_line,
    is_valid_name,
    is_valid_room,
)
from .hookspecs import ServerSpec

__all__ = ["LOBBY", "SERVER_SENDER", "ChatServer", "LeaveReason", "User", "open_server"]

log = logging.getLogger("chatkit.server")

#: The room every user joins on login.
LOBBY: Final = "lobby"
#: Default ``from`` of messages the server itself posts; ``*`` is not allowed
#: in user names, so it cannot be impersonated.
SERVER_SENDER: Final = "*server*"

_RECEIVE_SIZE: Final = 64 * 1024


class LeaveReason(enum.StrEnum):
    """Why a user left a room or the server (the ``reason`` of ``left``)."""

    LEAVE = "leave"
    """A ``leave`` request (one room)."""
    BYE = "bye"
    """A JSON-mode ``bye``."""
    EXIT = "exit"
    """A line-mode ``exit``."""
    DISCONNECT = "disconnect"
    """The connection closed or broke without a goodbye."""
    KICKED = "kicked"
    """:meth:`ChatServer.kick`."""
    SHUTDOWN = "shutdown"
    """The server shut down."""
    TOO_SLOW = "too_slow"
    """The client's outgoing buffer overflowed."""
    FLOOD = "flood"
    """The client kept sending past its rate limit."""
    TIMEOUT = "timeout"
    """No handshake, or no traffic, within the server's timeout."""


class User:
    """One connection to a :class:`ChatServer`, as the server and its plugins
    see it. Plugins get these in hook arguments; treat them as read-only.

    Attributes:
        address: the peer's ``host:port``.
    """

    def __init__(self, server: ChatServer, stream: trio.abc.Stream) -> None:
        self._server = server
        self._stream = stream
        try:
            peer = _socket_of(stream).getpeername()
        except OSError:
            peer = ("?", 0)
        self._peer: Any = peer
        self.address: str = f"{peer[0]}:{peer[1]}"
        self._proto = ServerConnection(max_line_length=server.max_line_length)
        self._name: str | None = None
        self._rooms: dict[str, None] = {}  # ordered set of room names
        # Outgoing buffer: appended to by anyone (synchronously), drained by
        # _write_loop only. _queued counts frames in _out.
        self._out = bytearray()
        self._queued = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._output_ended = False
        self._reason: LeaveReason | None = None
        self._detached = False
        self._left_rooms: list[str] = []
        self._reader_scope = trio.CancelScope()
        self._scope = trio.CancelScope()
        # Token bucket (see ChatServer._admit).
        self._tokens = float(server.rate_burst)
        self._refilled_at = trio.current_time()
        self._violations = 0

    @property
    def name(self) -> str:
        """The user's current name (``""`` before the handshake completes)."""
        return self._name or ""

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms the user is in."""
        return frozenset(self._rooms)

    @property
    def mode(self) -> str:
        """``"json"`` or ``"line"`` (``"unknown"`` before the first line)."""
        return self._proto.mode.value

    def __repr__(self) -> str:
        return f"<User {self._name!r} {self.address}>"

    # --- outgoing ---------------------------------------------------------

    def _enqueue(self, data: bytes) -> None:
        # The per-recipient hot path: no await, no encoding, one append.
        if self._output_ended:
            return
        out = self._out
        if (
            len(out) + len(data) > self._server.max_queued_bytes
            or self._queued >= self._server.max_queued_messages
        ):
            self._overflow()
            return
        out += data
        self._queued += 1
        if self._lot:
            self._lot.unpark()

    def _send(self, event: ServerEvent) -> None:
        data = self._proto.send(event)
        if data:
            self._enqueue(data)

    def _overflow(self) -> None:
        log.warning("%s is not reading fast enough; disconnecting", self)
        error = Error(
            code=ErrorCode.TOO_SLOW,
            message="you are not reading fast enough; disconnecting",
        )
        self._close(LeaveReason.TOO_SLOW, self._proto.send(error), discard=True)

    def _close(
        self, reason: LeaveReason, farewell: bytes = b"", *, discard: bool = False
    ) -> None:
        """Begin closing: stop reading, send what is pending (unless
        ``discard``) and then ``farewell``, then end, within close_timeout.

        Synchronous and safe to call from inside a broadcast loop: rooms are
        left later, by the connection's own task.
        """
        if self._output_ended:
            return
        self._reason = reason
        if discard:
            self._out = bytearray()
        self._out += farewell
        self._output_ended = True
        self._lot.unpark_all()
        self._reader_scope.cancel()
        self._scope.deadline = min(
            self._scope.deadline, trio.current_time() + self._server.close_timeout
        )

    async def _write_loop(self) -> None:
        stream = self._stream
        try:
            while True:
                if not self._out:
                    if self._output_ended:
                        return
                    await self._lot.park()
                    continue
                data, self._out, self._queued = self._out, bytearray(), 0
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The peer went away: stop the reader too.
            self._out = bytearray()
            self._close(LeaveReason.DISCONNECT)


class _Room:
    __slots__ = ("history", "members", "name")

    def __init__(self, name: str, history_size: int) -> None:
        self.name = name
        self.members: dict[User, None] = {}  # ordered set, join order
        self.history: collections.deque[Message] = collections.deque(
            maxlen=history_size
        )


class ChatServer:
    """A chat server speaking chatkit protocol v1 (JSON and line mode).

    Run it in a nursery you own; stop it with :meth:`aclose`::

        server = ChatServer(port=0, plugins=[MyPlugin()])
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print("listening on", server.port)
            ...
            await server.aclose()

    Args:
        host: address to listen on.
        port: TCP port; ``0`` picks a free one (read it from :attr:`port`).
        plugins: plugin objects or modules, called in this order.
        load_entry_points: also load plugins from the ``chatkit`` entry-point
            group, filtered by ``CHATKIT_LOAD_PLUGINS``.
        history_size: messages kept per room for ``history``.
        max_line_length: longest accepted line, in bytes.
        max_queued_bytes: bound of each connection's outgoing buffer.
        max_queued_messages: bound, in frames, of the same buffer.
        hook_timeout: seconds an awaited hook implementation may take.
        close_timeout: seconds a closing connection gets to flush.
        server_name: the ``server`` field of ``welcome``.
        max_connections: connections beyond this get ``error server_full``.
        max_rooms_per_user: a ``join`` beyond this gets ``error
            too_many_rooms``.
        max_message_length: longest ``say``/``dm`` text, in characters
            (``error too_large``).
        rate_limit: requests per second each connection may make on average
            (a token bucket); excess requests get ``error rate_limited``.
            ``None`` turns rate limiting off.
        rate_burst: the bucket's size: how many requests may come at once.
        flood_limit: after this many rate-limited requests in a row the
            connection is closed (``left`` reason ``flood``).
        handshake_timeout: seconds a new connection has to be accepted
            (``hello`` or a line-mode name) before ``error timeout`` and close.
        idle_timeout: if set, a connection that sends nothing for this long
            is closed with ``error timeout`` (:class:`ChatClient` pings to
            stay alive). Half-open TCP connections are also reaped by TCP
            keepalive, which is always on.
        ssl_context: serve TLS with this context (see :mod:`ssl`).

    Raises:
        ValueError: a limit is out of range.
        pluggy.PluginValidationError: a plugin implements an unknown hook.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        plugins: Iterable[object] = (),
        load_entry_points: bool = False,
        history_size: int = 100,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_queued_bytes: int = 1024 * 1024,
        max_queued_messages: int = 10_000,
        hook_timeout: float = 5.0,
        close_timeout: float = 2.0,
        server_name: str = "chatkit",
        max_connections: int = 10_000,
        max_rooms_per_user: int = 50,
        max_message_length: int = 4096,
        rate_limit: float | None = 20.0,
        rate_burst: int = 40,
        flood_limit: int = 20,
        handshake_timeout: float = 10.0,
        idle_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        for label, value in (
            ("history_size", history_size),
            ("max_line_length", max_line_length),
            ("max_queued_bytes", max_queued_bytes),
            ("max_queued_messages", max_queued_messages),
            ("max_connections", max_connections),
            ("max_rooms_per_user", max_rooms_per_user),
            ("max_message_length", max_message_length),
            ("rate_burst", rate_burst),
            ("flood_limit", flood_limit),
        ):
            if value < 1:
                raise ValueError(f"{label} must be at least 1, not {value}")
        for label, timeout in (
            ("hook_timeout", hook_timeout),
            ("close_timeout", close_timeout),
            ("handshake_timeout", handshake_timeout),
            ("idle_timeout", idle_timeout),
            ("rate_limit", rate_limit),
        ):
            if timeout is not None and timeout <= 0:
                raise ValueError(f"{label} must be positive, not {timeout}")
        self.host = host
        """The address the server listens on."""
        self.port = port
        """The TCP port; once :meth:`serve` has started, the bound one."""
        self.history_size = history_size
        self.max_line_length = max_line_length
        self.max_queued_bytes = max_queued_bytes
        self.max_queued_messages = max_queued_messages
        self.close_timeout = close_timeout
        self.server_name = server_name
        self.max_connections = max_connections
        self.max_rooms_per_user = max_rooms_per_user
        self.max_message_length = max_message_length
        self.rate_limit = rate_limit
        self.rate_burst = rate_burst
        self.flood_limit = flood_limit
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.ssl_context = ssl_context
        self.plugin_manager = make_plugin_manager(
            ServerSpec, plugins, load_entry_points=load_entry_points
        )
        self._hooks = HookDispatcher(
            self.plugin_manager, timeout=hook_timeout, logger=log
        )
        self._names: dict[str, User] = {}  # casefolded name -> user
        self._users: dict[User, None] = {}  # logged-in users, login order
        self._rooms: dict[str, _Room] = {LOBBY: _Room(LOBBY, history_size)}
        self._connections: set[User] = set()
        self._last_id = 0
        self._started = False
        self._closing = False
        self._accept_scope = trio.CancelScope()
        self._connections_scope = trio.CancelScope()
        self._stopped = trio.Event()

    # --- public API -------------------------------------------------------

    @property
    def users(self) -> tuple[User, ...]:
        """Logged-in users, in login order."""
        return tuple(self._users)

    @property
    def rooms(self) -> Mapping[str, tuple[str, ...]]:
        """Each room's members' names."""
        return {
            name: tuple(u.name for u in room.members)
            for name, room in self._rooms.items()
        }

    def get_user(self, name: str) -> User | None:
        """The logged-in user called ``name`` (case-insensitively), if any."""
        return self._names.get(name.casefold())

    async def serve(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until :meth:`aclose` (or cancellation).

        Use as ``await nursery.start(server.serve)``, which returns the bound
        port once the server listens. Returns after a graceful shutdown,
        when every connection task has ended. Cancelling it instead stops
        everything at once (connections are closed without ``shutdown``).

        Raises:
            RuntimeError: the server was already started, or closed.
            OSError: the address could not be bound.
        """
        # A server closed before it started would otherwise serve with no
        # way to stop it gracefully (aclose would return at once).
        if self._started or self._closing:
            raise RuntimeError("this ChatServer was already started or closed")
        self._started = True
        try:
            tcp_listeners = await trio.open_tcp_listeners(self.port, host=self.host)
            self.port = tcp_listeners[0].socket.getsockname()[1]
            listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners)
            if self.ssl_context is not None:
                listeners = [
                    trio.SSLListener(listener, self.ssl_context)
                    for listener in tcp_listeners
                ]
            with self._connections_scope:
                async with trio.open_nursery() as connections:
                    with self._accept_scope:
                        async with trio.open_nursery() as accept:
                            await accept.start(
                                partial(
                                    trio.serve_listeners,
                                    self._handle_connection,
                                    listeners,
                                    handler_nursery=connections,
                                )
                            )
                            await self._hooks.notify(
                                "chatkit_server_started", server=self
                            )
                            task_status.started(self.port)
            # Connections wind down in the connections nursery (aclose told
            # them to; its deadline bounds them).
        finally:
            self._closing = True
            self._stopped.set()

    async def aclose(self, reason: str = "server shutting down") -> None:
        """Shut down gracefully; idempotent.

        Stops accepting, fires ``chatkit_server_stopping``, sends every
        client what is pending and then ``shutdown``, and waits (at most
        ``close_timeout`` plus a second) for every connection task to end
        and :meth:`serve` to return.
        """
        if not self._started:
            self._closing = True
            self._stopped.set()
            return
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        await self._hooks.notify("chatkit_server_stopping", server=self)
        self._accept_scope.cancel()
        shutdown = Shutdown(reason=reason)
        json_bytes, line_bytes = encode_json(shutdown), encode_line(shutdown)
        for user in list(self._connections):
            farewell = line_bytes if user._proto.mode is Mode.LINE else json_bytes
            user._close(LeaveReason.SHUTDOWN, farewell)
        self._connections_scope.deadline = trio.current_time() + self.close_timeout + 1
        await self._stopped.wait()

    async def post(
        self, room: str, text: str, *, sender: str = SERVER_SENDER
    ) -> Message:
        """Say ``text`` in ``room`` on the server's own behalf.

        Delivered like a user's message (history, ids, the
        ``chatkit_message_delivered`` hook) but not passed through
        ``chatkit_message``: the program is trusted.

        Raises:
            KeyError: no such room.
        """
        target = self._rooms[room]
        message = self._make_message(target, sender, text)
        self._broadcast(target, message)
        await self._delivered(message)
        return message

    async def _delivered(self, message: Message) -> None:
        if self._hooks.has("chatkit_message_delivered"):
            await self._hooks.notify(
                "chatkit_message_delivered", server=self, message=message
            )

    def kick(self, name: str, reason: str = "kicked") -> bool:
        """Disconnect user ``name`` with ``error kicked``; True if found."""
        user = self.get_user(name)
        if user is None:
            return False
        error = Error(code=ErrorCode.KICKED, message=reason)
        user._close(LeaveReason.KICKED, user._proto.send(error))
        return True

    # --- connections ------------------------------------------------------

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        _enable_keepalive(stream)
        if len(self._connections) >= self.max_connections:
            await self._refuse(stream, ErrorCode.SERVER_FULL, "the server is full")
            return
        user = User(self, stream)
        log.info("New connection from %s", user._peer)
        self._connections.add(user)
        try:
            with user._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(user._write_loop)
                    if self._closing:
                        user._close(LeaveReason.SHUTDOWN)
                    # The reader's deadline is the handshake timeout, then
                    # the idle timeout (pushed forward on every read).
                    user._reader_scope.deadline = (
                        trio.current_time() + self.handshake_timeout
                    )
                    with user._reader_scope:
                        reason = await self._read_loop(user)
                        user._close(reason)
                    if user._reader_scope.cancelled_caught and not user._output_ended:
                        self._time_out(user)
                    self._detach(user)
        except Exception:
            # A bug while serving one connection must not take the server
            # (and everyone else) down with it.
            log.exception("internal error on connection %s", user)
        finally:
            self._connections.discard(user)
            self._detach(user)
            with trio.CancelScope(shield=True):
                await self._after_detach(user)
                with trio.move_on_after(self.close_timeout):
                    await stream.aclose()
                await trio.aclose_forcefully(stream)

    async def _refuse(
        self, stream: trio.abc.Stream, code: ErrorCode, text: str
    ) -> None:
        """Tell a connection we will not serve it, then close it (bounded)."""
        log.warning("refused a connection: %s", text)
        with trio.move_on_after(self.close_timeout):
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode_json(Error(code=code, message=text)))
        await trio.aclose_forcefully(stream)

    def _time_out(self, user: User) -> None:
        if user._name is None:
            text = f"no hello within {self.handshake_timeout}s"
        else:
            text = f"nothing received for {self.idle_timeout}s"
        log.info("%s timed out: %s", user, text)
        error = Error(code=ErrorCode.TIMEOUT, message=text)
        user._close(LeaveReason.TIMEOUT, user._proto.send(error))

    def _admit(self, user: User) -> bool:
        """Take a token from ``user``'s bucket; False if it is empty."""
        rate = self.rate_limit
        if rate is None:
            return True
        now = trio.current_time()
        user._tokens = min(
            self.rate_burst, user._tokens + (now - user._refilled_at) * rate
        )
        user._refilled_at = now
        if user._tokens >= 1:
            user._tokens -= 1
            user._violations = 0
            return True
        user._violations += 1
        return False

    async def _read_loop(self, user: User) -> LeaveReason:
        proto = user._proto
        stream = user._stream
        scope = user._reader_scope
        while True:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if user._name is not None:
                scope.deadline = (
                    trio.current_time() + self.idle_timeout
                    if self.idle_timeout is not None
                    else math.inf
                )
            proto.receive_data(data)
            # Every request decoded from one read is handled before the next
            # read, so the writers see one batch per read and coalesce it.
            while True:
                try:
                    request = proto.next_event()
                except RemoteProtocolError as exc:
                    user._send(Error(code=exc.code, message=exc.message, ref=exc.ref))
                    continue
                if request is NEED_DATA:
                    break
                if request is CLOSED:
                    return LeaveReason.DISCONNECT
                if not self._admit(user):
                    if user._violations >= self.flood_limit:
                        self._error(
                            user,
                            ErrorCode.RATE_LIMITED,
                            "too many requests; disconnecting",
                            request.ref,
                        )
                        return LeaveReason.FLOOD
                    self._error(user, ErrorCode.RATE_LIMITED, "slow down", request.ref)
                    continue
                reason = await self._handle_request(user, request)
                if reason is not None:
                    return reason

    async def _handle_request(
        self, user: User, request: ClientRequest
    ) -> LeaveReason | None:
        """Act on one request; return a reason when the connection must end."""
        match request:
            case Say():
                await self._on_say(user, request)
            case Hello():
                return await self._on_hello(user, request)
            case Dm():
                await self._on_dm(user, request)
            case Join():
                await self._on_join(user, request)
            case Leave():
                await self._on_leave(user, request)
            case Nick():
                await self._on_nick(user, request)
            case Who():
                room = self._rooms.get(request.room)
                names = tuple(u.name for u in room.members) if room else ()
                user._send(WhoReply(room=request.room, names=names, ref=request.ref))
            case Rooms():
                infos = tuple(
                    RoomInfo(name=r.name, members=len(r.members))
                    for r in sorted(self._rooms.values(), key=lambda r: r.name)
                )
                user._send(RoomsReply(rooms=infos, ref=request.ref))
            case History():
                self._on_history(user, request)
            case Ping():
                user._send(Pong(ref=request.ref))
            case Bye():
                return (
                    LeaveReason.EXIT
                    if user._proto.mode is Mode.LINE
                    else LeaveReason.BYE
                )
        return None

    def _error(
        self, user: User, code: ErrorCode, message: str, ref: str | int | None
    ) -> None:
        user._send(Error(code=code, message=message, ref=ref))

    async def _on_hello(self, user: User, hello: Hello) -> LeaveReason | None:
        name = hello.name
        if not is_valid_name(name):
            self._error(
                user,
                ErrorCode.BAD_NAME,
                "names are 1-32 letters, digits, '_', '-' or '.'",
                hello.ref,
            )
            return None
        if name.casefold() in self._names:
            self._error(user, ErrorCode.NAME_TAKEN, f"{name} is taken", hello.ref)
            return None
        try:
            await self._hooks.veto(
                "chatkit_authenticate",
                server=self,
                name=name,
                token=hello.token,
                address=user.address,
            )
        except Reject as exc:
            log.info("refused %s from %s: %s", name, user.address, exc.reason)
            self._error(user, ErrorCode.UNAUTHORIZED, exc.reason, hello.ref)
            return LeaveReason.DISCONNECT
        # The hooks may have awaited: check the name again.
        if name.casefold() in self._names:
            self._error(user, ErrorCode.NAME_TAKEN, f"{name} is taken", hello.ref)
            return None
        user._name = name
        self._names[name.casefold()] = user
        self._users[user] = None
        # Handshake done: from now on only the idle timeout applies.
        user._reader_scope.deadline = (
            trio.current_time() + self.idle_timeout
            if self.idle_timeout is not None
            else math.inf
        )
        user._send(
            Welcome(
                name=name,
                protocol=PROTOCOL_VERSION,
                server=self.server_name,
                rooms=(LOBBY,),
                ref=hello.ref,
            )
        )
        self._add_member(user, self._rooms[LOBBY], ref=None)
        log.info("%s has joined the chat.", name)
        await self._hooks.notify("chatkit_user_connected", server=self, user=user)
        await self._hooks.notify(
            "chatkit_user_joined", server=self, user=user, room=LOBBY
        )
        return None

    def _member_room(
        self, user: User, room: str, ref: str | int | None
    ) -> _Room | None:
        target = self._rooms.get(room)
        if target is None or user not in target.members:
            self._error(user, ErrorCode.NOT_IN_ROOM, f"you are not in {room}", ref)
            return None
        return target

    def _too_long(self, user: User, text: str, ref: str | int | None) -> bool:
        if len(text) <= self.max_message_length:
            return False
        self._error(
            user,
            ErrorCode.TOO_LARGE,
            f"messages are at most {self.max_message_length} characters",
            ref,
        )
        return True

    async def _on_say(self, user: User, say: Say) -> None:
        room = self._member_room(user, say.room, say.ref)
        if room is None or self._too_long(user, say.text, say.ref):
            return
        text = say.text
        if self._hooks.has("chatkit_message"):
            try:
                text = await self._hooks.rewrite(
                    "chatkit_message",
                    "text",
                    server=self,
                    user=user,
                    room=room.name,
                    text=text,
                )
            except Reject as exc:
                self._error(user, ErrorCode.REJECTED, exc.reason, say.ref)
                return
            # The user may have left the room while the hooks ran.
            if user not in room.members or self._rooms.get(room.name) is not room:
                self._error(
                    user, ErrorCode.NOT_IN_ROOM, f"you left {room.name}", say.ref
                )
                return
        message = self._make_message(room, user.name, text)
        self._broadcast(room, message, origin=user, ref=say.ref)
        await self._delivered(message)

    def _make_message(self, room: _Room, sender: str, text: str) -> Message:
        self._last_id += 1
        message = Message(
            id=self._last_id, ts=time.time(), room=room.name, sender=sender, text=text
        )
        room.history.append(message)
        return message

    def _broadcast(
        self,
        room: _Room,
        event: Message | Joined | Left,
        *,
        origin: User | None = None,
        ref: str | int | None = None,
    ) -> None:
        """Deliver ``event`` to every member of ``room``: encoded once per
        mode, appended to each buffer. A line-mode ``origin`` gets no copy
        (as in the original program); a JSON one gets its ``ref`` back."""
        data = encode_json(event)
        line: bytes | None = None
        for member in room.members:
            if member is origin:
                if member._proto.mode is Mode.LINE:
                    continue
                if ref is not None:
                    member._enqueue(
                        encode_json(msgspec.structs.replace(event, ref=ref))
                    )
                    continue
            if member._proto.mode is Mode.LINE:
                if line is None:
                    line = encode_line(event)
                member._enqueue(line)
            else:
                member._enqueue(data)

    async def _on_dm(self, user: User, dm: Dm) -> None:
        if self._too_long(user, dm.text, dm.ref):
            return
        recipient = self.get_user(dm.to)
        if recipient is None:
            self._error(
                user, ErrorCode.NO_SUCH_USER, f"nobody is called {dm.to}", dm.ref
            )
            return
        text = dm.text
        if self._hooks.has("chatkit_dm"):
            try:
                text = await self._hooks.rewrite(
                    "chatkit_dm",
                    "text",
                    server=self,
                    user=user,
                    recipient=recipient,
                    text=text,
                )
            except Reject as exc:
                self._error(user, ErrorCode.REJECTED, exc.reason, dm.ref)
                return
            if recipient._detached:
                self._error(user, ErrorCode.NO_SUCH_USER, f"{dm.to} left", dm.ref)
                return
        self._last_id += 1
        message = DirectMessage(
            id=self._last_id,
            ts=time.time(),
            sender=user.name,
            to=recipient.name,
            text=text,
        )
        if recipient is not user:
            recipient._send(message)
        user._send(msgspec.structs.replace(message, ref=dm.ref))
        await self._hooks.notify("chatkit_dm_delivered", server=self, message=message)

    async def _on_join(self, user: User, join: Join) -> None:
        if not is_valid_room(join.room):
            self._error(
                user,
                ErrorCode.BAD_NAME,
                "room names are 1-64 letters, digits, '_', '-' or '.'",
                join.ref,
            )
            return
        room = self._rooms.get(join.room)
        if room is not None and user in room.members:
            user._send(Joined(room=room.name, name=user.name, ref=join.ref))
            return
        if len(user._rooms) >= self.max_rooms_per_user:
            self._error(
                user,
                ErrorCode.TOO_MANY_ROOMS,
                f"you are in {len(user._rooms)} rooms, the most allowed",
                join.ref,
            )
            return
        if room is None:
            room = self._rooms[join.room] = _Room(join.room, self.history_size)
        self._add_member(user, room, ref=join.ref)
        await self._hooks.notify(
            "chatkit_user_joined", server=self, user=user, room=room.name
        )

    def _add_member(self, user: User, room: _Room, ref: str | int | None) -> None:
        room.members[user] = None
        user._rooms[room.name] = None
        self._broadcast(
            room, Joined(room=room.name, name=user.name), origin=user, ref=ref
        )

    async def _on_leave(self, user: User, leave: Leave) -> None:
        room = self._member_room(user, leave.room, leave.ref)
        if room is None:
            return
        self._remove_member(user, room, LeaveReason.LEAVE)
        user._send(
            Left(
                room=room.name, name=user.name, reason=LeaveReason.LEAVE, ref=leave.ref
            )
        )
        await self._hooks.notify(
            "chatkit_user_left",
            server=self,
            user=user,
            room=room.name,
            reason=LeaveReason.LEAVE,
        )

    def _remove_member(
        self, user: User, room: _Room, reason: LeaveReason, *, notify: bool = True
    ) -> None:
        del room.members[user]
        del user._rooms[room.name]
        if notify:
            self._broadcast(room, Left(room=room.name, name=user.name, reason=reason))
        if not room.members and room.name != LOBBY:
            del self._rooms[room.name]

    async def _on_nick(self, user: User, nick: Nick) -> None:
        new = nick.name
        if not is_valid_name(new):
            self._error(
                user,
                ErrorCode.BAD_NAME,
                "names are 1-32 letters, digits, '_', '-' or '.'",
                nick.ref,
            )
            return
        holder = self._names.get(new.casefold())
        if holder is not None and holder is not user:
            self._error(user, ErrorCode.NAME_TAKEN, f"{new} is taken", nick.ref)
            return
        if self._hooks.has("chatkit_nick"):
            try:
                await self._hooks.veto("chatkit_nick", server=self, user=user, new=new)
            except Reject as exc:
                self._error(user, ErrorCode.REJECTED, exc.reason, nick.ref)
                return
            # The hooks may have awaited: check the name again.
            holder = self._names.get(new.casefold())
            if (holder is not None and holder is not user) or user._detached:
                self._error(user, ErrorCode.NAME_TAKEN, f"{new} is taken", nick.ref)
                return
        old = user.name
        del self._names[old.casefold()]
        self._names[new.casefold()] = user
        user._name = new
        event = Renamed(old=old, new=new)
        json_bytes = encode_json(event)
        line_bytes: bytes | None = None
        for other in self._neighbours(user):
            if other._proto.mode is Mode.LINE:
                line_bytes = line_bytes or encode_line(event)
                other._enqueue(line_bytes)
            else:
                other._enqueue(json_bytes)
        user._send(msgspec.structs.replace(event, ref=nick.ref))
        log.info("%s is now known as %s.", old, new)
        await self._hooks.notify(
            "chatkit_user_renamed", server=self, user=user, old=old, new=new
        )

    def _neighbours(self, user: User) -> Iterator[User]:
        """Everyone sharing a room with ``user``, once each, not ``user``."""
        seen = {user}
        for name in user._rooms:
            for member in self._rooms[name].members:
                if member not in seen:
                    seen.add(member)
                    yield member

    def _on_history(self, user: User, request: History) -> None:
        room = self._member_room(user, request.room, request.ref)
        if room is None:
            return
        messages: list[Message] = list(room.history)
        if request.after is not None:
            messages = [m for m in messages if m.id > request.after]
        if request.before is not None:
            messages = [m for m in messages if m.id < request.before]
        if request.limit is not None:
            # The newest ``limit`` of them (``[-0:]`` would be all of them).
            messages = messages[-request.limit :] if request.limit else []
        user._send(
            HistoryReply(room=room.name, messages=tuple(messages), ref=request.ref)
        )

    # --- leaving ----------------------------------------------------------

    def _detach(self, user: User) -> None:
        """Free the user's name and leave its rooms (once). Synchronous."""
        if user._detached:
            return
        user._detached = True
        if user._name is None:
            return
        reason = user._reason or LeaveReason.DISCONNECT
        # No per-user notices while the whole server shuts down.
        notify = not self._closing
        for name in list(user._rooms):
            user._left_rooms.append(name)
            self._remove_member(user, self._rooms[name], reason, notify=notify)
        del self._names[user._name.casefold()]
        del self._users[user]
        log.info("%s has left the chat.", user._name)

    async def _after_detach(self, user: User) -> None:
        if user._name is None:
            return
        reason = user._reason or LeaveReason.DISCONNECT
        for room in user._left_rooms:
            await self._hooks.notify(
                "chatkit_user_left", server=self, user=user, room=room, reason=reason
            )
        await self._hooks.notify(
            "chatkit_user_disconnected", server=self, user=user, reason=reason
        )


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType:
    """The TCP socket under a plain or TLS stream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        raise TypeError(f"not a socket stream: {stream!r}")
    return stream.socket


def _enable_keepalive(stream: trio.abc.Stream) -> None:
    # The kernel probes an idle peer and resets the connection if it is gone,
    # so half-open connections (a vanished laptop) are reaped in ~90 s even
    # with no idle_timeout.
    try:
        sock = _socket_of(stream)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", 60),
            ("TCP_KEEPINTVL", 10),
            ("TCP_KEEPCNT", 3),
        ):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except (OSError, TypeError):
        log.debug("could not enable TCP keepalive", exc_info=True)


@asynccontextmanager
async def open_server(
    host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> AsyncIterator[ChatServer]:
    """Run a :class:`ChatServer` for the duration of an ``async with`` block.

    Takes :class:`ChatServer`'s arguments; the server is listening on entry
    (read ``server.port``) and shut down gracefully on exit. An exception
    raised in the block propagates unchanged (not wrapped in an
    ``ExceptionGroup`` by the server's nursery).
    """
    server = ChatServer(host, port, **kwargs)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        except BaseException as exc:
            # Re-raised below, outside the nursery, so it is not grouped.
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await server.aclose()
    if body_error is not None:
        raise body_error
