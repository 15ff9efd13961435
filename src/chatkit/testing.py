"""Tools for testing chatkit plugins and programs (like :mod:`trio.testing`).

A whole chat, a :class:`~chatkit.ChatServer` on ``127.0.0.1`` with your
plugins and named clients already logged in, in one line::

    import chatkit
    import chatkit.testing


    async def test_shout() -> None:
        async with chatkit.testing.open_chat(
            plugins=[Shout()], clients=["alice", "bob"]
        ) as chat:
            await chat["alice"].say("hi!")
            message = await chat.expect("bob", chatkit.Message, sender="alice")
            assert message.text == "HI!"

Everything the kit waits for is bounded by a timeout (a hang fails the test
with an :class:`AssertionError` saying what was awaited and what arrived
instead), everything it opens is closed when the block ends, and it only
ever listens and connects on the loopback interface.

With pytest (and pytest-trio), add ``pytest_plugins = ["chatkit.testing"]``
to your ``conftest.py`` for the fixtures ``chat`` (configured by the
fixtures ``chat_plugins``, ``chat_clients`` and ``chat_options``, which you
override) and ``chat_factory``. pytest itself is imported only then:
``import chatkit.testing`` works without it.

PYTEST_DONT_REWRITE: this module raises its own assertion errors, so pytest
need not rewrite it, and importing it before ``pytest_plugins`` names it is
harmless.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from types import MappingProxyType
from typing import Any, Final, Protocol, TypeVar

import trio

from ._events import LOBBY, Event, Joined
from ._hooks import hook_names, hookimpl
from .client import ChatClient
from .hookspecs import ClientSpec, ServerSpec
from .server import ChatServer

__all__ = [
    "DEFAULT_TIMEOUT",
    "LOOPBACK",
    "Chat",
    "ChatFactory",
    "HookRecorder",
    "open_chat",
]

#: Seconds the kit waits for anything (connecting, an expected event,
#: closing) unless told otherwise.
DEFAULT_TIMEOUT: Final = 5.0
#: The only address the kit listens and connects on.
LOOPBACK: Final = "127.0.0.1"

# For pytest: ``pytest_plugins = ["chatkit.testing"]`` loads this module as a
# plugin, and pytest then loads the fixtures from the module named here. They
# live apart so that importing this module never imports pytest.
pytest_plugins: Final = ("chatkit._pytest_plugin",)

_E = TypeVar("_E", bound=Event)

# Recorded events shown in a failure message, at most.
_SHOWN: Final = 20


class _Inbox:
    """Everything one client received, and what no ``expect`` took yet."""

    __slots__ = ("ended", "lot", "pending", "reason", "received")

    def __init__(self) -> None:
        self.received: list[Event] = []
        self.pending: list[Event] = []
        self.ended = False
        self.reason = ""
        self.lot = trio.lowlevel.ParkingLot()

    def add(self, event: Event) -> None:
        self.received.append(event)
        self.pending.append(event)
        self.lot.unpark_all()

    def end(self, reason: str) -> None:
        self.ended = True
        self.reason = reason
        self.lot.unpark_all()


def _describe(event_type: type[Event], fields: Mapping[str, Any]) -> str:
    if event_type is Event and not fields:
        return "event"
    arguments = ", ".join(f"{key}={value!r}" for key, value in fields.items())
    return f"{event_type.__name__}({arguments})"


def _show(events: list[Event]) -> str:
    # For a failure message: " nothing", or one event per indented line.
    if not events:
        return " nothing"
    more = len(events) - _SHOWN
    head = f" ({more} earlier ones not shown)" if more > 0 else ""
    return head + "".join(f"\n  {event!r}" for event in events[-_SHOWN:])


class Chat:
    """A running server and its test clients; made by :func:`open_chat`.

    Each client :meth:`connect` opens is recorded: a task of the chat reads
    its events as they arrive, so clients never stall, and tests take them
    with :meth:`expect` and :meth:`next_event`. Do not iterate over a
    recorded client yourself (``async for event in chat["alice"]``): the
    recorder already does. A client connected with ``event_buffer=None`` (a
    bot that only has hooks) is not recorded, nor are the
    :class:`~chatkit.ClientEvent` objects of a client connected with
    ``reconnect=``.

    Every method may be called from any task, and from plugin hooks.

    Attributes:
        server: the running :class:`~chatkit.ChatServer`.
        wait_timeout: the default timeout, in seconds, of every wait.
    """

    def __init__(
        self, server: ChatServer, nursery: trio.Nursery, wait_timeout: float
    ) -> None:
        self.server = server
        self.wait_timeout = wait_timeout
        self._nursery = nursery
        self._clients: dict[str, ChatClient] = {}
        self._inboxes: dict[ChatClient, _Inbox] = {}
        self._task_scopes: list[trio.CancelScope] = []
        self._closing = False
        self._closed = trio.Event()

    def __repr__(self) -> str:
        return f"<Chat {LOOPBACK}:{self.port} clients={list(self._clients)}>"

    @property
    def host(self) -> str:
        """The server's address: always ``127.0.0.1``."""
        return LOOPBACK

    @property
    def port(self) -> int:
        """The server's port (a free one, picked when it started)."""
        return self.server.port

    @property
    def clients(self) -> Mapping[str, ChatClient]:
        """The connected clients by the name they were connected with, in
        connection order (a read-only view; closed clients stay in it)."""
        return MappingProxyType(self._clients)

    def __getitem__(self, name: str) -> ChatClient:
        """The client connected as ``name``.

        Raises:
            KeyError: no client was connected with that name.
        """
        try:
            return self._clients[name]
        except KeyError:
            raise KeyError(
                f"no client called {name!r} in this chat; it has {list(self._clients)}"
            ) from None

    # --- connecting ---------------------------------------------------------

    async def connect(
        self, name: str, *, settle: bool = True, **client_options: Any
    ) -> ChatClient:
        """Connect one more client, logged in as ``name``; closed with the chat.

        Args:
            name: the name to log in with, and the client's key in
                :attr:`clients`.
            settle: wait until every recorded client in the lobby, this
                one included, has seen ``name`` join, and take those
                ``Joined`` events, so each client's pending events start
                after the login. Other events (a welcome a plugin posts, say)
                stay pending.
            **client_options: :class:`~chatkit.ChatClient`'s keyword
                arguments (``token``, ``plugins``, ``event_buffer``, ...).
                ``connect_timeout`` defaults to :attr:`wait_timeout`.

        Returns:
            The connected client.

        Raises:
            ValueError: a client of this chat is already called ``name``.
            TypeError: ``client_options`` has ``host``, ``port`` or ``name``.
            RuntimeError: the chat is closing.
            RequestError: the server refused the login (for example
                :class:`~chatkit.Unauthorized` from a plugin, or
                :class:`~chatkit.NameTaken`).
            trio.TooSlowError: connecting took longer than ``connect_timeout``.
        """
        if self._closing:
            raise RuntimeError("this chat is closing; it takes no new clients")
        if name in self._clients:
            raise ValueError(f"this chat already has a client called {name!r}")
        for option in ("host", "port", "name"):
            if option in client_options:
                raise TypeError(f"connect() sets {option} itself")
        client_options.setdefault("connect_timeout", self.wait_timeout)
        client = ChatClient(LOOPBACK, self.port, name=name, **client_options)
        inbox = None if client_options.get("event_buffer", 1) is None else _Inbox()
        # Bounded by the client's connect_timeout (the task is shielded).
        await self._start(partial(self._run_client, client, inbox))
        self._clients[name] = client
        if inbox is not None:
            self._inboxes[client] = inbox
        if settle:
            await self._settle(client)
        return client

    async def _run_client(
        self,
        client: ChatClient,
        inbox: _Inbox | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Each client lives in a task of the chat's nursery, not in the task
        # that asked for it: a client (and its nursery) must be closed by the
        # task that opened it, and connect() may be called from any task.
        # When the chat closes, _close() ends the task.
        async with client:
            task_status.started()
            if inbox is None:
                await self._closed.wait()
                return
            try:
                async for event in client:
                    # A reconnecting client's own events (Interrupted...)
                    # are not recorded: expect() deals in protocol events.
                    if isinstance(event, Event):
                        inbox.add(event)
            finally:
                inbox.end(client.close_reason or "closed")

    async def _settle(self, new: ChatClient) -> None:
        # The server told the lobby's members about ``new`` in the same step
        # as it queued ``new``'s welcome, so right after connecting, this
        # snapshot is the set of clients that were told.
        members = set(self.server.rooms.get(LOBBY, ()))
        for client, inbox in list(self._inboxes.items()):
            if client.name in members and not inbox.ended:
                await self._take(
                    client,
                    Joined,
                    {"room": LOBBY, "name": new.name},
                    self.wait_timeout,
                )

    # --- events -------------------------------------------------------------

    def _inbox(self, client: str | ChatClient) -> tuple[str, _Inbox]:
        target = self[client] if isinstance(client, str) else client
        inbox = self._inboxes.get(target)
        if inbox is None:
            if target not in self._clients.values():
                raise ValueError(f"{target!r} is not a client of this chat")
            raise ValueError(
                f"{target!r} keeps no events (event_buffer=None); it is not recorded"
            )
        return target.name, inbox

    async def expect(
        self,
        client: str | ChatClient,
        event_type: type[_E],
        /,
        *,
        within: float | None = None,
        **fields: Any,
    ) -> _E:
        """Wait for the first pending event of ``client`` that is an
        ``event_type`` whose attributes equal ``fields``, and take it.

        Only that event is taken: events before it that do not match stay
        pending, in order, for later calls (look at them with
        :meth:`pending`). Fields are attribute names, so a message's sender
        is ``sender=``, not ``from=``. To check an exact sequence, use
        :meth:`next_event`.

        Args:
            client: a client's name, or the client.
            event_type: ``chatkit.Message``, ``chatkit.Joined``, ...
            within: seconds to wait; :attr:`wait_timeout` by default.
            **fields: attribute values the event must have.

        Returns:
            The event.

        Raises:
            AssertionError: no such event arrived ``within`` seconds, or the
                client's connection ended first; the message lists what
                did arrive.
            TypeError: ``event_type`` has no field named in ``fields``.
            KeyError: no client of this chat has that name.
            ValueError: ``client`` is not a recorded client of this chat.
        """
        known = set(getattr(event_type, "__struct_fields__", ()))
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(
                f"{event_type.__name__} has no field {', '.join(unknown)}"
                f" (its fields: {', '.join(sorted(known)) or 'none'})"
            )
        event = await self._take(client, event_type, fields, within)
        assert isinstance(event, event_type)
        return event

    async def next_event(
        self, client: str | ChatClient, *, within: float | None = None
    ) -> Event:
        """Wait for the next pending event of ``client``, whatever it is, and
        take it.

        Args:
            client: a client's name, or the client.
            within: seconds to wait; :attr:`wait_timeout` by default.

        Raises:
            AssertionError: nothing arrived ``within`` seconds, or the
                client's connection ended first.
            KeyError: no client of this chat has that name.
            ValueError: ``client`` is not a recorded client of this chat.
        """
        return await self._take(client, Event, {}, within)

    def pending(self, client: str | ChatClient) -> tuple[Event, ...]:
        """The events ``client`` received that no :meth:`expect`,
        :meth:`next_event` or settling took yet, oldest first."""
        return tuple(self._inbox(client)[1].pending)

    def received(self, client: str | ChatClient) -> tuple[Event, ...]:
        """Every event ``client`` received so far, taken or not, oldest
        first (the login's ``Joined`` events included)."""
        return tuple(self._inbox(client)[1].received)

    async def _take(
        self,
        client: str | ChatClient,
        event_type: type[Event],
        fields: Mapping[str, Any],
        within: float | None,
    ) -> Event:
        name, inbox = self._inbox(client)
        wanted = _describe(event_type, fields)

        def matches(event: Event) -> bool:
            return isinstance(event, event_type) and all(
                getattr(event, key) == value for key, value in fields.items()
            )

        seconds = self.wait_timeout if within is None else within
        try:
            with trio.fail_after(seconds):
                while True:
                    for index, event in enumerate(inbox.pending):
                        if matches(event):
                            del inbox.pending[index]
                            return event
                    if inbox.ended:
                        raise AssertionError(
                            f"{name} was waiting for {wanted}, but its connection"
                            f" ended ({inbox.reason}); pending:"
                            f"{_show(inbox.pending)}"
                        )
                    await inbox.lot.park()
        except trio.TooSlowError:
            raise AssertionError(
                f"{name} received no {wanted} within {seconds}s; pending:"
                f"{_show(inbox.pending)}"
            ) from None

    # --- tasks and closing ---------------------------------------------------

    async def _start(self, fn: Callable[..., Awaitable[object]]) -> Any:
        """Run ``fn(task_status=...)`` in the chat's nursery, shielded."""
        return await self._nursery.start(self._shielded, fn)

    async def _shielded(
        self,
        fn: Callable[..., Awaitable[object]],
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # The server and the clients run shielded: when the ``async with``
        # block is cancelled, they must still be there for the graceful close
        # in open_chat's ``finally``, which then cancels these scopes itself.
        with trio.CancelScope(shield=True) as scope:
            self._task_scopes.append(scope)
            await fn(task_status=task_status)

    def _cancel_tasks(self) -> None:
        for scope in self._task_scopes:
            scope.cancel()

    async def _close(self) -> None:
        # Clients leave one by one, the last connected first (as nested
        # ``async with`` blocks would), so the server's hooks see a
        # deterministic order. Each close waits for the server to have
        # handled the goodbye, hooks included.
        self._closing = True
        try:
            for client in reversed(self._clients.values()):
                await client.aclose()
        finally:
            self._closed.set()


class ChatFactory(Protocol):
    """The type of the ``chat_factory`` fixture: :func:`open_chat`'s
    arguments in, a running :class:`Chat` out, closed after the test."""

    async def __call__(
        self,
        *,
        clients: Iterable[str] = (),
        plugins: Iterable[object] = (),
        wait_timeout: float = DEFAULT_TIMEOUT,
        **server_options: Any,
    ) -> Chat:
        """Open a chat, as :func:`open_chat` does, for the rest of the test."""
        ...


@asynccontextmanager
async def open_chat(
    *,
    clients: Iterable[str] = (),
    plugins: Iterable[object] = (),
    wait_timeout: float = DEFAULT_TIMEOUT,
    **server_options: Any,
) -> AsyncIterator[Chat]:
    """Run a :class:`~chatkit.ChatServer` on ``127.0.0.1`` (a free port) with
    ``plugins``, and connect ``clients``, for an ``async with`` block, which
    gets the :class:`Chat`.

    The clients connect one after the other, in order, each settled (see
    :meth:`Chat.connect`) before the next: on entry everyone is in the
    lobby, ``server.users`` is in ``clients`` order, and no client has a
    pending login ``Joined`` event. On exit, normal, by an exception or by
    cancellation, the clients say goodbye, last first, then the server shuts
    down gracefully, all within ``wait_timeout`` plus the server's
    ``close_timeout``; anything still open after that is closed by force. An
    exception from the block propagates unchanged (not wrapped in an
    exception group).

    Args:
        clients: names of the clients to connect.
        plugins: the server's plugins, in order.
        wait_timeout: seconds every wait of the kit may take by default
            (connecting, :meth:`Chat.expect`, closing the clients).
        **server_options: other :class:`~chatkit.ChatServer` keyword
            arguments (``history_size``, ``hook_timeout``, ...), but not
            ``host`` or ``port``.

    Raises:
        TypeError: ``host`` or ``port`` was given.
        RequestError: a client's login was refused (the chat is closed again).
    """
    for option in ("host", "port"):
        if option in server_options:
            raise TypeError(f"open_chat() always listens on {LOOPBACK}, port 0")
    server = ChatServer(LOOPBACK, 0, plugins=plugins, **server_options)
    # The nursery is entered through an exit stack and exited without the
    # block's exception, so that exception propagates as it is instead of
    # inside an ExceptionGroup (as ChatClient does).
    stack = AsyncExitStack()
    nursery = await stack.enter_async_context(trio.open_nursery())
    chat = Chat(server, nursery, wait_timeout)
    try:
        await chat._start(server.serve)
        for name in clients:
            await chat.connect(name)
        yield chat
    finally:
        # Graceful even when the block was cancelled, and bounded: the
        # clients get wait_timeout, the server its close_timeout (plus a
        # second); whatever is left after that is cancelled.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(wait_timeout):
                await chat._close()
            await server.aclose()
            chat._cancel_tasks()
        await stack.aclose()


class HookRecorder:
    """Records which hooks a server and its clients call, by name, in order.

    Give :attr:`server` to a server among its plugins and :attr:`client`
    to clients among theirs; both record here::

        hooks = HookRecorder()
        async with open_chat(plugins=[Greeter(), hooks.server]) as chat:
            await chat["alice"].say("hi")
            await hooks.wait("chatkit_message_delivered")

    The recorder implements every hook, takes no argument and returns
    ``None``: it changes nothing. Plugins run in the order given, so
    listed last, it records a call once every plugin before it has run;
    listed first, it also sees the calls a later plugin vetoes.
    """

    def __init__(self) -> None:
        self._calls: list[str] = []
        self._lot = trio.lowlevel.ParkingLot()
        server_hooks, client_hooks = hook_names(ServerSpec), hook_names(ClientSpec)
        self._hooks = server_hooks | client_hooks
        self.server: object = _recording_plugin("server", server_hooks, self._record)
        """The plugin to give a server."""
        self.client: object = _recording_plugin("client", client_hooks, self._record)
        """The plugin to give a client."""

    def _record(self, hook: str) -> None:
        self._calls.append(hook)
        self._lot.unpark_all()

    def _check_hook(self, hook: str) -> None:
        if hook not in self._hooks:
            raise ValueError(f"there is no hook called {hook!r}")

    @property
    def calls(self) -> tuple[str, ...]:
        """The name of each hook called so far, in order."""
        return tuple(self._calls)

    def count(self, hook: str) -> int:
        """How many times ``hook`` was called so far.

        Raises:
            ValueError: there is no hook of that name.
        """
        self._check_hook(hook)
        return self._calls.count(hook)

    async def wait(
        self, hook: str, count: int = 1, *, within: float = DEFAULT_TIMEOUT
    ) -> None:
        """Wait until ``hook`` has been called ``count`` times in all.

        Raises:
            AssertionError: it was not, ``within`` seconds; the message
                lists the calls so far.
            ValueError: there is no hook of that name.
        """
        self._check_hook(hook)
        with trio.move_on_after(within):
            while self._calls.count(hook) < count:
                await self._lot.park()
            return
        raise AssertionError(
            f"{hook} was called {self._calls.count(hook)} times within {within}s,"
            f" not {count}; calls: {', '.join(self._calls) or 'none'}"
        )


def _recording_plugin(
    side: str, hooks: Iterable[str], record: Callable[[str], None]
) -> object:
    # A plugin object implementing each of ``hooks``, each a function
    # of no arguments (pluggy passes an implementation only the arguments
    # it names) that records the hook's name.
    def recorder(hook: str) -> Callable[[], None]:
        def implementation() -> None:
            record(hook)

        return hookimpl(implementation)

    plugin = _RecordingPlugin(f"HookRecorder.{side}")
    for hook in hooks:
        setattr(plugin, hook, recorder(hook))
    return plugin


class _RecordingPlugin:
    def __init__(self, name: str) -> None:
        self.__name__ = name  # its name in the server's or client's logs
