"""The trio chat client.

A :class:`ChatClient` owns a nursery with a reader task (and, when plugins
implement client hooks, a hook task). The reader decodes server events and
routes each one:

* a reply to one of our requests (matched by ``ref``) wakes the caller, who
  gets the answer or a :class:`~chatkit.ChatError`;
* everything else, including the echoes of our own messages, joins and
  renames, goes to ``async for event in client`` and to the client hooks.

Both routes are bounded: when nobody consumes events, the reader stops
reading (backpressure, as in trio-websocket), and the server eventually
drops us as too slow. Pass ``event_buffer=None`` if you use only hooks.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, suppress
from types import TracebackType
from typing import Any, Final, Self

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
    Rooms,
    RoomsReply,
    Say,
    ServerEvent,
    Shutdown,
    Welcome,
    Who,
    WhoReply,
)
from ._exceptions import ChatError, ConnectionClosed, RemoteProtocolError
from ._hooks import CLIENT_ENTRY_POINT_GROUP, HookDispatcher, make_plugin_manager
from ._protocol import CLOSED, NEED_DATA, ClientConnection
from .hookspecs import ClientSpec

__all__ = ["DEFAULT_PORT", "ChatClient", "connect"]

log = logging.getLogger("chatkit.client")

#: The port of the original chat program, and chatkit's CLI default.
DEFAULT_PORT: Final = 12345

_RECEIVE_SIZE: Final = 64 * 1024


class _Pending:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: ServerEvent | ChatError | None = None


class ChatClient:
    """A connection to a chat server, as an async context manager::

        async with chatkit.connect("127.0.0.1", 12345, name="alice") as client:
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
    ) -> None:
        self.host = host
        self.port = port
        self.name = name
        """Our current name (follows ``nick``)."""
        self.joined_rooms: set[str] = set()
        """The rooms we are in."""
        self.server_name = ""
        """The ``server`` field of the server's ``welcome``."""
        self.close_reason: str | None = None
        """Why the connection ended, once it has."""
        self._token = token
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._event_buffer = event_buffer
        self._ssl_context = ssl_context
        self._keepalive = keepalive
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
        self._proto = ClientConnection()
        self._stream: trio.abc.Stream | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._pending: dict[int, _Pending] = {}
        self._last_ref = 0
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._reader_done = trio.Event()
        self._hooks_done = trio.Event()
        self._closing = False
        # Background tasks get cancel scopes of their own: cancelling the
        # nursery's would also cancel the ``async with`` body running in it.
        self._task_scopes: list[trio.CancelScope] = []
        self._tasks_cancelled = False
        self._events_send: trio.MemorySendChannel[ServerEvent] | None = None
        self._events_receive: trio.MemoryReceiveChannel[ServerEvent] | None = None
        self._hook_send: trio.MemorySendChannel[ServerEvent | Welcome] | None = None

    # --- lifecycle --------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stream is not None:
            raise RuntimeError("this ChatClient was already entered")
        try:
            with trio.fail_after(self._connect_timeout):
                if self._ssl_context is None:
                    self._stream = await trio.open_tcp_stream(self.host, self.port)
                else:
                    self._stream = await trio.open_ssl_over_tcp_stream(
                        self.host, self.port, ssl_context=self._ssl_context
                    )
                welcome = await self._handshake()
        except BaseException:
            if self._stream is not None:
                await trio.aclose_forcefully(self._stream)
            self._reader_done.set()
            self._hooks_done.set()
            raise
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        if self._event_buffer is not None:
            self._events_send, self._events_receive = trio.open_memory_channel(
                self._event_buffer
            )
        if self._has_client_hooks():
            hook_send, hook_receive = trio.open_memory_channel[ServerEvent | Welcome](
                self._event_buffer or 256
            )
            self._hook_send = hook_send
            hook_send.send_nowait(welcome)
            self._nursery.start_soon(
                self._in_tasks_scope, self._hook_loop, hook_receive
            )
        else:
            self._hooks_done.set()
        self._nursery.start_soon(self._in_tasks_scope, self._reader)
        if self._keepalive is not None:
            self._nursery.start_soon(self._in_tasks_scope, self._ping_when_idle)
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

        Idempotent. Pending requests fail with :class:`ConnectionClosed`.
        """
        if self._closing:
            return
        self._closing = True
        if self.close_reason is None and not self._reader_done.is_set():
            self.close_reason = "closed by the client"
        try:
            with trio.move_on_after(self._close_timeout):
                with suppress(ConnectionClosed):
                    await self._send(Bye())
                await self._reader_done.wait()
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
        """True once the connection has ended."""
        return self._reader_done.is_set()

    async def _handshake(self) -> Welcome:
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
                self.joined_rooms.update(event.rooms)
                return event
            if isinstance(event, Error):
                raise ChatError.from_code(event.code, event.message)
            if isinstance(event, Shutdown):
                raise ConnectionClosed(f"server shutting down: {event.reason}")
            # Anything else before welcome is not for us; ignore it.

    async def _next_event(self) -> ServerEvent:
        """Next event from the stream (handshake only; the reader has its own
        loop)."""
        assert self._stream is not None
        while True:
            try:
                event = self._proto.next_event()
            except RemoteProtocolError as exc:
                log.warning("bad line from server: %s", exc)
                continue
            if event is CLOSED:
                raise ConnectionClosed("server closed the connection")
            if event is not NEED_DATA:
                return event
            try:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionClosed("connection lost") from None
            self._proto.receive_data(data)

    # --- receiving --------------------------------------------------------

    async def _reader(self) -> None:
        reason = "server closed the connection"
        try:
            while True:
                event = await self._next_event()
                await self._route(event)
        except ConnectionClosed as exc:
            reason = self.close_reason or exc.message
        finally:
            self.close_reason = reason
            for pending in self._pending.values():
                pending.result = ConnectionClosed(reason)
                pending.done.set()
            self._pending.clear()
            if self._events_send is not None:
                self._events_send.close()
            if self._hook_send is not None:
                self._hook_send.close()
            self._reader_done.set()

    async def _route(self, event: ServerEvent) -> None:
        self._track(event)
        ref = getattr(event, "ref", None)
        if isinstance(ref, int) and ref in self._pending:
            pending = self._pending.pop(ref)
            pending.result = (
                ChatError.from_code(event.code, event.message)
                if isinstance(event, Error)
                else event
            )
            pending.done.set()
            if isinstance(event, Error | WhoReply | RoomsReply | HistoryReply | Pong):
                return  # answered to the caller; not part of the event stream
        elif isinstance(event, Pong) and ref is None:
            return  # the answer to a keepalive ping
        if self._hook_send is not None:
            await self._hook_send.send(event)
        if self._events_send is not None:
            await self._events_send.send(event)

    def _track(self, event: ServerEvent) -> None:
        match event:
            case Joined(room=room, name=name) if name == self.name:
                self.joined_rooms.add(room)
            case Left(room=room, name=name) if name == self.name:
                self.joined_rooms.discard(room)
            case Renamed(old=old, new=new) if old == self.name:
                self.name = new
            case Shutdown(reason=reason):
                self.close_reason = f"server shutting down: {reason}"
            case Error(code=code, message=message) if code in ("too_slow", "kicked"):
                self.close_reason = f"{code}: {message}"

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ServerEvent:
        """The next event; iteration ends when the connection does."""
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

    async def _hook_loop(
        self, receive: trio.MemoryReceiveChannel[ServerEvent | Welcome]
    ) -> None:
        hooks = self._hooks
        try:
            async for event in receive:
                if isinstance(event, Welcome):
                    await hooks.notify(
                        "chatkit_client_connected", client=self, welcome=event
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

    async def _ping_when_idle(self) -> None:
        assert self._keepalive is not None
        self._last_sent = trio.current_time()
        while True:
            await trio.sleep_until(self._last_sent + self._keepalive)
            if trio.current_time() >= self._last_sent + self._keepalive:
                try:
                    await self._send(Ping())
                except ConnectionClosed:
                    return

    async def _send(self, request: ClientRequest) -> None:
        if self._stream is None or self._reader_done.is_set():
            raise ConnectionClosed(self.close_reason or "not connected")
        data = self._proto.send(request)
        try:
            async with self._send_lock:
                await self._stream.send_all(data)
                self._last_sent = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self.close_reason or "connection lost") from None

    def _next_ref(self) -> int:
        self._last_ref += 1
        return self._last_ref

    async def _request(self, request: ClientRequest) -> Any:
        ref = getattr(request, "ref", None)
        assert isinstance(ref, int)
        pending = self._pending[ref] = _Pending()
        try:
            await self._send(request)
            await pending.done.wait()
        finally:
            self._pending.pop(ref, None)
        if isinstance(pending.result, ChatError):
            raise pending.result
        return pending.result

    async def say(self, text: str, room: str = "lobby") -> Message:
        """Say ``text`` in ``room``; returns the message as delivered (with
        its ``id``) once the server has accepted it.

        Raises:
            NotInRoom: we are not in ``room``.
            Rejected: a server plugin refused the message.
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

    async def who(self, room: str = "lobby") -> tuple[str, ...]:
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


def connect(
    host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, name: str, **kwargs: Any
) -> ChatClient:
    """Return a :class:`ChatClient` to use as ``async with connect(...) as c``.

    Takes :class:`ChatClient`'s keyword arguments.
    """
    return ChatClient(host, port, name=name, **kwargs)
