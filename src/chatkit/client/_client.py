"""The client's facade: :class:`ChatClient`, and the hooks it calls.

A :class:`ChatClient` is lifecycle and public API over three objects:

* a ``Session`` (``_session.py``): the connection (a ``Connection``,
  ``_connection.py``: stream, requests matched by ``ref``, reader,
  keepalive) and, with a :class:`~chatkit.Reconnect` policy, each next one
  (``_reconnect.py``), resumed (``_resume.py``) so that the application
  sees every message once, in order;
* a ``Delivery`` (``_delivery.py``): the events that are news, for
  ``async for event in client`` and the client hooks;
* the plugin manager of the client hooks, :class:`ClientSpec`.

Its moderation methods (``kick``, ``topic``, ``command``...) come from a
mixin, ``ModerationRequests`` (``_moderation.py``).

The client owns a nursery holding the session's task and, when plugins
implement client hooks, the hook task.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Final, Self

import trio

from .._events import (
    LOBBY,
    DirectMessage,
    Dm,
    Event,
    History,
    HistoryReply,
    Join,
    Leave,
    Message,
    Nick,
    Ping,
    Rooms,
    RoomsReply,
    Say,
    Welcome,
    Who,
    WhoReply,
)
from .._hooks import (
    CLIENT_ENTRY_POINT_GROUP,
    HookDispatcher,
    hook_names,
    hookspec,
    make_plugin_manager,
)
from ..protocol import DEFAULT_MAX_LINE_LENGTH
from ._connection import ConnectionOptions
from ._delivery import Delivery
from ._moderation import ModerationRequests
from ._reconnect import ClientItem, Reconnect
from ._session import Session

__all__ = ["DEFAULT_PORT", "ChatClient", "ClientSpec", "open_client"]

log = logging.getLogger("chatkit.client")

#: The port of the original chat program, and chatkit's CLI default.
DEFAULT_PORT: Final = 12345

# The longest line accepted from the server by default: far above what a
# server sends (its history replies are bounded, at a few MiB).
_MAX_SERVER_LINE_LENGTH: Final = 16 * 1024 * 1024


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


class ChatClient(ModerationRequests):
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
        stream: a connection to the server already open (from
            :func:`~chatkit.open_stream`), to log in on instead of opening
            one: a program can connect first and ask for the name after.
            Should the server have closed it meanwhile (its handshake
            timeout), entering opens a new one. The client owns it from here
            on: it is closed with the client.
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
        stream: trio.abc.Stream | None = None,
    ) -> None:
        if max_line_length < 1:
            raise ValueError("max_line_length must be at least 1")
        self.host = host
        self.port = port
        policy = Reconnect() if reconnect is True else reconnect or None
        self.reconnect: Reconnect | None = policy
        """The reconnect policy; ``None`` when the client does not reconnect."""
        self.plugin_manager = make_plugin_manager(
            ClientSpec,
            plugins,
            load_entry_points=load_entry_points,
            entry_point_group=CLIENT_ENTRY_POINT_GROUP,
        )
        hooks = HookDispatcher(
            self.plugin_manager,
            timeout=hook_timeout,
            logger=log,
            bound={"client": self},
        )
        implemented = any(hooks.has(name) for name in hook_names(ClientSpec))
        self._delivery = Delivery(
            event_buffer=event_buffer, hooks=hooks if implemented else None
        )
        options = ConnectionOptions(
            host=host,
            port=port,
            ssl_context=ssl_context,
            connect_timeout=connect_timeout,
            keepalive=keepalive,
            ping_timeout=None if policy is None else policy.ping_timeout,
            max_line_length=max_line_length,
            server_max_line_length=server_max_line_length,
        )
        self._session = Session(
            options, name=name, token=token, policy=policy, sink=self._delivery
        )
        self._first_stream = stream
        self._close_timeout = close_timeout
        self._entered = False
        self._stack = AsyncExitStack()
        # Background tasks get cancel scopes of their own: cancelling the
        # nursery's would also cancel the ``async with`` body running in it.
        self._task_scopes: list[trio.CancelScope] = []
        self._tasks_cancelled = False

    # --- lifecycle --------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("this ChatClient was already entered")
        self._entered = True
        stream, self._first_stream = self._first_stream, None
        welcome = await self._session.open(stream)
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._delivery.open()
        if self._delivery.has_hooks:
            nursery.start_soon(self._in_tasks_scope, self._delivery.run_hooks, welcome)
        nursery.start_soon(self._in_tasks_scope, self._session.run)
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
        if self._session.closing:
            return
        try:
            with trio.move_on_after(self._close_timeout):
                await self._session.close()
                await self._delivery.wait_hooks()
        finally:
            # First, and whatever happens to the wait above (the caller may be
            # cancelled mid-way): no background task may outlive aclose().
            self._tasks_cancelled = True
            for scope in self._task_scopes:
                scope.cancel()
            await self._session.abort()

    # --- state ------------------------------------------------------------

    @property
    def name(self) -> str:
        """Our current name (follows ``nick``)."""
        return self._session.name

    @property
    def joined_rooms(self) -> set[str]:
        """The rooms we are in (while reconnecting: the rooms we will be
        back in)."""
        return self._session.joined_rooms

    @property
    def server_name(self) -> str:
        """The ``server`` field of the server's ``welcome``."""
        return self._session.server_name

    @property
    def close_reason(self) -> str | None:
        """Why the client ended, once it has (or is about to)."""
        return self._session.close_reason

    @property
    def closed(self) -> bool:
        """True once the client has ended: its connection is gone and no
        reconnect will follow."""
        return self._session.done.is_set()

    @property
    def connected(self) -> bool:
        """True while a connection is up (False while reconnecting)."""
        return self._session.connected

    @property
    def reconnecting(self) -> bool:
        """True while the connection is lost and the client is getting it
        back (requests wait, see :attr:`Reconnect.request_timeout`)."""
        return self._entered and self._session.reconnecting

    # --- events -----------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ClientItem:
        """The next event; iteration ends when the client does.

        Server events (:class:`~chatkit.Event` subclasses) and, with a
        reconnect policy, the client's own :class:`~chatkit.ClientEvent`
        objects.
        """
        return await self._delivery.next()

    # --- requests ---------------------------------------------------------

    async def say(self, text: str, room: str = LOBBY) -> Message:
        """Say ``text`` in ``room``; returns the message as delivered (with
        its ``id``) once the server has accepted it.

        Raises:
            NotInRoom: we are not in ``room``.
            Rejected: a server plugin refused the message.
            TooLarge: ``text`` is longer than the server allows.
            ConnectionClosed: the connection ended.
        """
        result: Message = await self._session.request(Say(text=text, room=room))
        return result

    async def dm(self, to: str, text: str) -> DirectMessage:
        """Send ``text`` privately to ``to``; returns it as delivered.

        Raises:
            NoSuchUser: nobody is called ``to``.
            Rejected: a server plugin refused the message.
            TooLarge: ``text`` is longer than the server allows.
        """
        result: DirectMessage = await self._session.request(Dm(to=to, text=text))
        return result

    async def join(self, room: str) -> None:
        """Join ``room`` (created if needed).

        Raises:
            BadName: not a valid room name.
        """
        await self._session.request(Join(room=room))
        # Where the room's news starts, should we have to resume it.
        await self._session.mark(room)

    async def leave(self, room: str) -> None:
        """Leave ``room``.

        Raises:
            NotInRoom: we are not in it.
        """
        await self._session.request(Leave(room=room))

    async def nick(self, name: str) -> None:
        """Change our name to ``name``.

        Raises:
            BadName: not a valid name.
            NameTaken: someone else has it.
        """
        await self._session.request(Nick(name=name))

    async def who(self, room: str = LOBBY) -> tuple[str, ...]:
        """Names of the members of ``room`` (empty if it does not exist)."""
        reply: WhoReply = await self._session.request(Who(room=room))
        return reply.names

    async def rooms(self) -> dict[str, int]:
        """Every room on the server with its member count."""
        reply: RoomsReply = await self._session.request(Rooms())
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
        reply: HistoryReply = await self._session.request(
            History(room=room, limit=limit, before=before, after=after)
        )
        return reply.messages

    async def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        start = trio.current_time()
        await self._session.request(Ping())
        return trio.current_time() - start

    def __repr__(self) -> str:
        return f"<ChatClient {self.name!r} {self.host}:{self.port}>"


def open_client(
    host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, name: str, **kwargs: Any
) -> ChatClient:
    """Return a :class:`ChatClient` to use as ``async with open_client(...) as c``.

    Takes :class:`ChatClient`'s keyword arguments.
    """
    return ChatClient(host, port, name=name, **kwargs)
