"""The :class:`ChatServer`: a chat server's lifecycle and public API.

Shape of a running server::

    serve()                           (the caller's nursery owns it)
      transport (bound)               the listening sockets, bound first
      history store (open)            its tasks, if any
      core nursery
        Fanout.run                    releases output, oldest batch first
        backplane (attached)          its tasks, if any
        connections nursery
          Session.run                 one task per connection: its reader
          Outbox._write_loop          a connection's writer, only while needed
        accept nursery
          transport.serve             TCP (and TLS): hands links to _handle
          web transport.serve         HTTP + WebSocket (web_port): the same

A request travels ``Session`` (read, rate limit) -> ``ChatRules`` (the chat
rules, hooks, the store) -> ``Fanout`` (batches, stored before seen) ->
each connection's ``Outbox``; docs/architecture.md draws it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Iterable, Mapping
from contextlib import AsyncExitStack, suppress
from typing import Any

import trio

from .._events import DirectMessage, ErrorReply, Message, Moderated, Shutdown
from .._exceptions import ErrorCode
from .._hooks import HookDispatcher, hookspec, make_plugin_manager
from ..backplane import Backplane
from ..history import HistoryStore, HistoryStoreError, MemoryHistory
from ._fanout import Fanout
from ._limits import Limits
from ._moderation_api import ModerationAPI
from ._outbox import Stats
from ._rooms import Rooms
from ._rules import ChatRules
from ._session import SERVER_SENDER, LeaveReason, Login, RemoteUser, Session, User
from ._transport import Link, TcpTransport, Transport
from ._web import WebTransport

__all__ = ["ChatServer", "ServerSpec"]

log = logging.getLogger("chatkit.server")


class ChatServer(ModerationAPI):
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
        history: where room messages are kept, and ``history`` answered from
            (see :mod:`chatkit.history`); by default a
            :class:`~chatkit.MemoryHistory` of 100 messages per room (the
            cluster's shared history with a ``backplane``).
        limits: what each client may do, and the timeouts
            (:class:`~chatkit.Limits`; its defaults if not given).
        server_name: the ``server`` field of ``welcome``.
        ssl_context: serve TLS with this context (see :mod:`ssl`), on the
            web port too (``https://`` and ``wss://``).
        backplane: join a cluster of servers through it (see
            :mod:`chatkit.backplane` and :mod:`chatkit.cluster`).
        web_port: also serve browsers on this port of ``host``: the chat
            page at ``/`` and the WebSocket at ``/ws`` (``0`` picks a free
            one; read it from :attr:`web_port`). ``None`` (the default): no
            web port. See docs/browsers.md.
        web_origins: the origins whose pages may open a WebSocket, besides
            the chat page's own (``"*"``: any), such as
            ``"https://example.com"``.
        operators: the names of the server operators, who may kick, ban
            and mute anywhere (docs/moderation.md).

    Raises:
        pluggy.PluginValidationError: a plugin implements an unknown hook.
        ValueError: ``port`` or ``web_port`` is not from 0 to 65535, or an
            origin is not one.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        plugins: Iterable[object] = (),
        load_entry_points: bool = False,
        history: HistoryStore | None = None,
        limits: Limits | None = None,
        server_name: str = "chatkit",
        ssl_context: ssl.SSLContext | None = None,
        backplane: Backplane | None = None,
        web_port: int | None = None,
        web_origins: Iterable[str] = (),
        operators: Iterable[str] = (),
    ) -> None:
        self.host = host
        """The address the server listens on."""
        self.limits = Limits() if limits is None else limits
        """The server's limits and timeouts."""
        self.backplane = backplane
        """The cluster backplane, if this server is one node of several."""
        if history is None:
            history = backplane.history if backplane is not None else MemoryHistory()
        self.history: HistoryStore = history
        """The server's history store."""
        self.stats = Stats()
        """Counters of the server's output (writes, batches, flushes)."""
        self.plugin_manager = make_plugin_manager(
            ServerSpec, plugins, load_entry_points=load_entry_points
        )
        self._hooks = HookDispatcher(
            self.plugin_manager,
            timeout=self.limits.hook_timeout,
            logger=log,
            bound={"server": self},
        )
        self._fanout = Fanout(history, self.limits, self.stats)
        self._rules = ChatRules(
            self._fanout,
            Rooms(self.limits.presence_limit, self._fanout.owes),
            history,
            self._hooks,
            self.limits,
            server_name,
            backplane,
            operators,
        )
        limits = self.limits
        self._transport = TcpTransport(
            host, port, ssl_context, user_timeout=limits.tcp_user_timeout
        )
        self._web: WebTransport | None = None
        if web_port is not None:
            self._web = WebTransport(
                host,
                web_port,
                ssl_context,
                user_timeout=limits.tcp_user_timeout,
                origins=web_origins,
                handshake_timeout=limits.handshake_timeout,
                ping_interval=limits.ws_ping_interval,
                max_opening=limits.max_unauthenticated,
            )
        elif web_origins:
            raise ValueError("web_origins needs a web_port")
        self._transports: list[Transport] = [
            transport for transport in (self._transport, self._web) if transport
        ]
        self._nursery: trio.Nursery | None = None  # the connections'
        self._started = False
        self._closing = False
        self._accept_scope = trio.CancelScope()
        self._connections_scope = trio.CancelScope()
        self._stopped = trio.Event()

    # --- public API -------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; once :meth:`serve` has started, the bound one."""
        return self._transport.port

    @property
    def web_port(self) -> int | None:
        """The web port (browsers); once :meth:`serve` has started, the
        bound one. ``None`` without one."""
        return None if self._web is None else self._web.port

    @property
    def web_url(self) -> str | None:
        """The chat page's address (``http://host:port/``, ``https`` with
        TLS), or ``None`` without a web port."""
        web = self._web
        if web is None:
            return None
        scheme = "http" if web.ssl_context is None else "https"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{web.port}/"

    @property
    def connections(self) -> int:
        """Connections open now, logged in or not."""
        return len(self._rules.directory.connections)

    @property
    def users(self) -> tuple[User, ...]:
        """Logged-in users, in login order."""
        return tuple(session.user for session in self._rules.directory.users)

    @property
    def rooms(self) -> Mapping[str, tuple[str, ...]]:
        """Each room's members' names."""
        return {
            room.name: tuple(member.name for member in room.members)
            for room in self._rules.rooms
        }

    def get_user(self, name: str) -> User | None:
        """The logged-in user called ``name`` (case-insensitively), if any."""
        session = self._rules.get(name)
        return None if session is None else session.user

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
            chatkit.StartupError: the history store cannot be opened
                (:class:`~chatkit.HistoryStoreError`), or the backplane
                cannot reach its cluster.
        """
        # A server closed before it started would otherwise serve with no
        # way to stop it gracefully (aclose would return at once).
        if self._started or self._closing:
            raise RuntimeError("this ChatServer was already started or closed")
        self._started = True
        try:
            # The address first: a server that cannot listen opens nothing
            # (its history database is not even created).
            async with AsyncExitStack() as bound:
                for transport in self._transports:
                    await bound.enter_async_context(transport.bound())
                last_id = await bound.enter_async_context(self.history.open())
                # Ids keep increasing across restarts.
                self._rules.messages.see_id(last_id)
                await self._rules.moderation.open()
                await _in_nursery_of(self._fanout.run, self._serve, task_status)
        finally:
            self._closing = True
            self._stopped.set()

    async def _serve(self, task_status: trio.TaskStatus[int]) -> None:
        if self.backplane is None:
            await self._listen(task_status)
            return
        async with self.backplane.attach(self._rules.port):
            await self._listen(task_status)

    async def _listen(self, task_status: trio.TaskStatus[int]) -> None:
        moderator = self._rules.moderator
        with self._connections_scope:
            try:
                async with trio.open_nursery() as connections:
                    self._nursery = connections
                    # The hook of a kick() (which cannot await) runs here.
                    moderator.spawn = connections.start_soon
                    with self._accept_scope:
                        async with trio.open_nursery() as accept:
                            for transport in self._transports:
                                await accept.start(
                                    transport.serve, self._handle, connections
                                )
                            await self._hooks.notify("chatkit_server_started")
                            task_status.started(self.port)
            finally:
                moderator.spawn = None  # the nursery is closed
        # Connections wind down in the connections nursery (aclose told
        # them to; its deadline bounds them).

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
        # From now on a new connection is closed at once, and nobody's
        # leaving is announced while everyone goes.
        self._rules.closing = True
        await self._hooks.notify("chatkit_server_stopping")
        self._accept_scope.cancel()
        shutdown = Shutdown(reason=reason)
        for session in list(self._rules.directory.connections):
            session.close(LeaveReason.SHUTDOWN, shutdown)
        close_timeout = self.limits.close_timeout
        deadline = trio.current_time() + close_timeout + 1
        self._connections_scope.deadline = self._rules.gone_by = deadline
        await self._stopped.wait()

    async def post(
        self, room: str, text: str, *, sender: str = SERVER_SENDER
    ) -> Message:
        """Say ``text`` in ``room`` on the server's own behalf; returns once
        it was stored and handed to every member.

        Delivered like a user's message (history, ids, the
        ``chatkit_message_delivered`` hook) but not passed through
        ``chatkit_message``: the program is trusted.

        Raises:
            KeyError: no such room.
            chatkit.HistoryStoreError: the history store refused it.
        """
        if self._rules.rooms.get(room) is None:
            raise KeyError(room)
        message = await self._rules.messages.post(room, text, sender)
        if message is None:
            raise HistoryStoreError(f"the history store refused a message to {room}")
        return message

    # --- connections ------------------------------------------------------

    def _handle(self, link: Link) -> Awaitable[None]:
        # The transport awaits what this returns: the connection's task is
        # Session.run itself (a frame less per idle connection).
        # Counted here, not when its task starts: a burst accepted in one
        # go is counted before any of its sessions runs.
        limits = self.limits
        admission = self._rules.admission
        refusal = admission.refusal(link.peer[0])
        if refusal is not None:
            return _refuse(link, ErrorCode.SERVER_FULL, refusal, limits)
        assert self._nursery is not None
        session = Session(link, self._fanout, limits, self.stats, self._nursery)
        admission.opened(session)
        return session.run(self._rules)


async def _refuse(link: Link, code: ErrorCode, text: str, limits: Limits) -> None:
    """Tell a connection we will not serve it, then close it (bounded)."""
    log.warning("refused a connection from %s: %s", link.address, text)
    with trio.move_on_after(limits.close_timeout):
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            wire = link.wire(link.mode)
            await link.send_all(wire.encode(ErrorReply(code=code, message=text)))
    await link.abort()


async def _in_nursery_of(
    background: Any, body: Any, task_status: trio.TaskStatus[int]
) -> None:
    """Run ``body(task_status)`` with ``background`` running beside it in a
    nursery (started first, cancelled once ``body`` returns). An exception
    from ``body`` propagates unchanged, not grouped (an OSError from the
    listen must stay an OSError)."""
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(background)
        try:
            await body(task_status)
        except BaseException as exc:
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


class ServerSpec:
    """Hooks a :class:`chatkit.ChatServer` calls."""

    @hookspec
    def chatkit_server_started(self, server: ChatServer) -> None:
        """The server is listening; ``server.port`` is the bound port.

        Fires once, before ``nursery.start(server.serve)`` returns.
        """

    @hookspec
    def chatkit_server_stopping(self, server: ChatServer) -> None:
        """Graceful shutdown began (``server.aclose()``).

        Fires once, before clients are sent ``shutdown``: a plugin can still
        post a last message with ``server.post(...)``.
        """

    @hookspec
    def chatkit_authenticate(
        self, server: ChatServer, name: str, token: str | None, address: str
    ) -> Login | bool | None:
        """A client asks to log in as ``name`` (valid; perhaps in use).

        Can veto: raise :class:`chatkit.Veto` with a reason to refuse; the
        client gets ``error unauthorized`` with that reason and is
        disconnected. ``token`` is the ``hello`` message's token (``None`` in
        line mode). Returning normally lets the user in unless another
        plugin refuses. Fails closed: an implementation that raises anything
        else, or times out, refuses the user too.

        Return ``True`` (or ``Login(identified=True)``) only if ``token``
        proves that the client *is* ``name`` (a password of that name, not
        a secret shared by many users): a session still logged in as
        ``name`` (a reconnect before the server noticed the old connection
        was gone) is then taken over by this login, rather than it getting
        ``name_taken``. Return ``Login(operator=True)`` to make this login a
        server operator's (:attr:`chatkit.User.operator`): the role is the
        session's, and ends with it. Each field of the :class:`chatkit.Login`
        holds if any implementation said so; returning ``None`` (or
        ``False``) says nothing.
        """

    @hookspec
    def chatkit_user_connected(self, server: ChatServer, user: User) -> None:
        """``user`` completed the handshake (and has joined ``lobby``)."""

    @hookspec
    def chatkit_user_disconnected(
        self, server: ChatServer, user: User, reason: LeaveReason
    ) -> None:
        """``user`` is gone; ``reason`` says why (``bye``, ``exit``,
        ``disconnect``, ``kicked``, ``shutdown``, ``too_slow``, ``flood``,
        ``timeout``, ``replaced``)."""

    @hookspec
    def chatkit_user_joined(self, server: ChatServer, user: User, room: str) -> None:
        """``user`` joined ``room`` (``lobby`` included, right after login)."""

    @hookspec
    def chatkit_join(self, server: ChatServer, user: User, room: str) -> None:
        """``user`` asks to join ``room`` (a ``join`` request; not the
        ``lobby`` a login puts it in: refuse logins with
        :meth:`chatkit_authenticate`); runs before the join, once the
        room's name, the user's room count and the room's bans allow it.

        Can veto: raise :class:`chatkit.Veto`; the user alone gets ``error
        rejected`` with the reason, and nobody else sees anything. Fails
        open: an implementation that raises anything else, or times out,
        is logged and skipped.
        """

    @hookspec
    def chatkit_user_left(
        self, server: ChatServer, user: User, room: str, reason: LeaveReason
    ) -> None:
        """``user`` left ``room``; ``reason`` is ``leave`` for a ``leave``
        request, or why the user left the server."""

    @hookspec
    def chatkit_nick(self, server: ChatServer, user: User, new: str) -> None:
        """``user`` asks to be renamed to ``new`` (valid and free); runs
        before the rename.

        Can veto: raise :class:`chatkit.Veto`; the user gets ``error
        rejected`` with the reason and keeps the old name. Fails closed: an
        implementation that raises anything else, or times out, refuses too.
        """

    @hookspec
    def chatkit_user_renamed(
        self, server: ChatServer, user: User, old: str, new: str
    ) -> None:
        """``user`` changed name from ``old`` to ``new`` (``user.name == new``)."""

    @hookspec
    def chatkit_message(
        self, server: ChatServer, user: User, room: str, text: str
    ) -> str | None:
        """``user`` says ``text`` in ``room``; runs before delivery.

        Can rewrite: return a new ``str`` and later plugins and the room see
        that instead; return ``None`` to leave it unchanged. Can veto: raise
        :class:`chatkit.Veto`; the sender alone gets ``error rejected``
        and nobody sees the message.
        """

    @hookspec
    def chatkit_dm(
        self, server: ChatServer, user: User, recipient: User | RemoteUser, text: str
    ) -> str | None:
        """``user`` sends ``text`` privately to ``recipient``; runs before
        delivery. Rewrite and veto work as in :meth:`chatkit_message`.
        In a cluster, a recipient on another node is a
        :class:`~chatkit.RemoteUser` (a name only)."""

    @hookspec
    def chatkit_message_delivered(self, server: ChatServer, message: Message) -> None:
        """``message`` (final text, with ``id`` and ``ts``) was handed to every
        member of its room. Also fires for :meth:`ChatServer.post`."""

    @hookspec
    def chatkit_dm_delivered(self, server: ChatServer, message: DirectMessage) -> None:
        """A private ``message`` was handed to its recipient."""

    @hookspec(firstresult=True)
    def chatkit_command(
        self, server: ChatServer, user: User, name: str, args: str, room: str | None
    ) -> str | None:
        """``user`` runs the command ``name`` (``/roll 2d6``: ``name`` is
        ``roll``, ``args`` is ``2d6``), about ``room`` if its request named
        one (the user is in it), else ``None``.

        Return the answer's text and later plugins are not called; the user
        alone gets it (a ``command`` reply). Return ``None`` if the command
        is not yours: when no plugin answers, the user gets ``error
        bad_request`` (``no command /name``). Can veto: raise
        :class:`chatkit.Veto` and the user gets ``error rejected`` with the
        reason. An implementation that raises anything else, or times out,
        is logged and skipped; if none answers after that, the user gets
        ``error rejected``.
        """

    @hookspec
    def chatkit_moderated(self, server: ChatServer, event: Moderated) -> None:
        """A moderation action was done and told: ``event`` is the
        :class:`chatkit.Moderated` those concerned were sent (without a
        ``ref``): a kick, ban, unban, mute, unmute, op or deop, by an
        operator's request or the server's Python API (``by`` is
        ``*server*``). Fires once per action; observe only."""
