"""One connection of a :class:`~chatkit.ChatClient` to a server.

A :class:`Connection` holds a stream and the sans-IO
:class:`~chatkit.protocol.ClientConnection` over it. It logs in, sends
requests (one writer at a time, and never half a line followed by another),
matches each answer to its request by ``ref``, pings when the connection is
idle, and reads the server's events, handing on those that are news. It
knows nothing of rooms, reconnecting or the application: the session that
owns it learns why it ends (``on_lost``) and decides what follows.
"""

from __future__ import annotations

import collections
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Self, TypeAlias

import msgspec
import trio

from .._events import (
    PROTOCOL_VERSION,
    BansReply,
    ClientRequest,
    CommandReply,
    ErrorReply,
    Hello,
    HistoryReply,
    Modes,
    Ping,
    Pong,
    RoomsReply,
    ServerEvent,
    Shutdown,
    Topic,
    Welcome,
    WhoReply,
)
from .._exceptions import (
    ConnectionClosed,
    ErrorCode,
    RemoteProtocolError,
    RequestError,
    TooLarge,
)
from ..protocol import EOF, NEED_DATA, ClientConnection

__all__ = ["Connection", "ConnectionOptions", "OnLost", "OnNews", "describe_error"]

log = logging.getLogger("chatkit.client")

#: Told why a connection is ending, with the server's error code if it said
#: one (``shutdown``, ``kicked``...).
OnLost: TypeAlias = Callable[[str, str | None], None]
#: Given each event that is news: not only the answer to a request.
OnNews: TypeAlias = Callable[[ServerEvent], Awaitable[None]]

_RECEIVE_SIZE: Final = 64 * 1024
# Events that only answer a request (no news for ``async for``).
_ANSWERS: Final = (
    ErrorReply,
    WhoReply,
    RoomsReply,
    HistoryReply,
    BansReply,
    CommandReply,
    Pong,
)
# Errors the server closes the connection after (extensions to v1).
_CLOSING_CODES: Final = frozenset(
    {ErrorCode.TOO_SLOW, ErrorCode.KICKED, ErrorCode.TIMEOUT, ErrorCode.REPLACED}
)


@dataclass(frozen=True, kw_only=True)
class ConnectionOptions:
    """Where the server is and how to talk to it (the client's arguments)."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    keepalive: float | None
    ping_timeout: float | None
    max_line_length: int
    server_max_line_length: int


class _Pending:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: ServerEvent | RequestError | None = None


class Connection:
    """One logged-in connection (see the module docs); made by :meth:`open`.

    Its owner runs :meth:`read` in a task until the connection ends, and
    :meth:`keep_alive` in another; requests may go from any task meanwhile.

    Args:
        stream: connected to the server.
        options: the client's options.
        refs: the ``ref`` of each request (shared by a client's
            connections, so that refs never repeat).
        on_lost: told why the connection is ending, as soon as that is
            known.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        options: ConnectionOptions,
        *,
        refs: Iterator[int],
        on_lost: OnLost,
    ) -> None:
        self.connected = True
        """False once the connection has ended (or was closed)."""
        self.lost_reason: str | None = None
        """Why the connection ended, or is about to; None while it is fine."""
        self.lost_code: str | None = None
        """The server's error code for the end (``shutdown``...), if any."""
        self._stream = stream
        self._options = options
        self._proto = ClientConnection(max_line_length=options.max_line_length)
        self._refs = refs
        # The refs of our asks (a `topic` or `mode` request without a
        # change): their answer is no news, though the same event telling
        # of a change is.
        self._asks: set[int] = set()
        self._on_lost = on_lost
        self._send_lock = trio.StrictFIFOLock()
        self._pending: dict[int, _Pending] = {}
        self._last_sent = 0.0
        self._receiving_since: float | None = None
        self._keepalive_scope = trio.CancelScope()
        # Events read before the reader started, for it to route first.
        self._backlog = collections.deque[ServerEvent]()

    @classmethod
    async def open(
        cls,
        options: ConnectionOptions,
        *,
        name: str,
        token: str | None,
        resume: str | None = None,
        refs: Iterator[int],
        on_lost: OnLost,
        stream: trio.abc.Stream | None = None,
    ) -> tuple[Self, Welcome]:
        """Connect and log in as ``name``, within ``options.connect_timeout``;
        ``resume``: the previous connection's ``welcome.resume``, to take
        over that session if the server still holds it; ``stream``: a
        connection already open (from :func:`open_stream`) to log in on.

        Raises:
            RequestError: the server refused ``hello`` (the subclass of its
                error code), or shut down (:class:`ConnectionClosed`).
            ConnectionClosed: the server closed the connection first.
            OSError: the connection failed.
            trio.BrokenResourceError: the TLS handshake failed, or the
                server hung up while we sent ``hello``.
            trio.TooSlowError: no ``welcome`` in time.
        """
        try:
            with trio.fail_after(options.connect_timeout):
                if stream is None:
                    stream = await _open_stream(
                        options.host, options.port, options.ssl_context
                    )
                connection = cls(stream, options, refs=refs, on_lost=on_lost)
                welcome = await connection._handshake(name, token, resume)
        except BaseException:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise
        return connection, welcome

    async def _handshake(
        self, name: str, token: str | None, resume: str | None
    ) -> Welcome:
        hello = Hello(
            name=name,
            protocol=PROTOCOL_VERSION,
            token=token,
            resume=resume,
            ref=next(self._refs),
        )
        await self._stream.send_all(self._proto.send(hello))
        while True:
            event = await self._next_event()
            if isinstance(event, Welcome):
                return event
            if isinstance(event, ErrorReply):
                raise RequestError.from_code(event.code, event.message)
            if isinstance(event, Shutdown):
                raise ConnectionClosed(f"server shutting down: {event.reason}")
            # Anything else before welcome is not for us; ignore it.

    # --- requests ----------------------------------------------------------

    async def request(self, request: ClientRequest) -> Any:
        """Send ``request`` under a new ``ref`` and return its answer.

        Raises:
            RequestError: the server's ``error`` answer (the subclass of its
                code); :class:`ConnectionClosed` if the connection ended
                first; :class:`TooLarge` (unsent) over the server's limit.
        """
        ref = next(self._refs)
        pending = self._pending[ref] = _Pending()
        if _is_ask(request):
            self._asks.add(ref)
        try:
            await self.send(msgspec.structs.replace(request, ref=ref))
            await pending.done.wait()
        finally:
            self._pending.pop(ref, None)
        if isinstance(pending.result, RequestError):
            raise pending.result
        return pending.result

    async def request_before_reading(self, request: ClientRequest) -> ServerEvent:
        """Send ``request`` and read until its answer, before :meth:`read`
        runs (which then routes the events read meanwhile first).

        Returns:
            The answer: the expected reply or an :class:`ErrorReply`.
        """
        ref = next(self._refs)
        await self.send(msgspec.structs.replace(request, ref=ref))
        while True:
            event = await self._next_event()
            if getattr(event, "ref", None) == ref:
                return event
            self._backlog.append(event)

    async def send(self, request: ClientRequest) -> None:
        """Send ``request`` as it is, without waiting for an answer.

        Raises:
            TooLarge: its line is over the server's limit (nothing sent).
            ConnectionClosed: the connection has ended.
        """
        data = self._proto.send(request)
        # The server answers a line over its limit with a `too_large` that
        # has no ref (it cannot parse the line): refuse it here instead.
        limit = self._options.server_max_line_length
        if len(data) - 1 > limit:
            raise TooLarge(f"line longer than {limit} bytes (the server's limit)")
        if not self.connected:
            raise ConnectionClosed(self.lost_reason or "not connected")
        try:
            async with self._send_lock:
                try:
                    await self._stream.send_all(data)
                except trio.Cancelled:
                    # Part of the line may be out: whatever we sent next
                    # would be glued to it. The connection is lost.
                    if self.lost_reason is None:
                        self._lose("a request was cancelled while being sent")
                    await trio.aclose_forcefully(self._stream)
                    raise
                self._last_sent = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self.lost_reason or "connection lost") from None

    def fail_pending(self, reason: str) -> None:
        """Requests awaiting an answer raise ``ConnectionClosed(reason)``."""
        for pending in self._pending.values():
            pending.result = ConnectionClosed(reason)
            pending.done.set()
        self._pending.clear()

    # --- reading -----------------------------------------------------------

    async def read(self, on_news: OnNews) -> None:
        """Read events until the connection ends: each answer goes to its
        request, everything else to ``on_news``. Returns once the connection
        has ended (:attr:`connected` false, :attr:`lost_reason` set), having
        stopped :meth:`keep_alive`."""
        try:
            while self._backlog:
                await self._route(self._backlog.popleft(), on_news)
            while True:
                await self._route(await self._next_event(), on_news)
        except ConnectionClosed as exc:
            if self.lost_reason is None:
                self._lose(exc.message)
        finally:
            self.connected = False
            if self.lost_reason is None:
                self._lose("connection lost")
            self._keepalive_scope.cancel()

    async def _route(self, event: ServerEvent, on_news: OnNews) -> None:
        match event:
            case Shutdown(reason=reason):
                self._lose(f"server shutting down: {reason}", "shutdown")
            case ErrorReply(code=code, message=message) if code in _CLOSING_CODES:
                self._lose(f"{code}: {message}", code)
            case ErrorReply(code=ErrorCode.BANNED, message=message, ref=None):
                # Banned from the server (a refused join carries its ref).
                self._lose(f"banned: {message}", ErrorCode.BANNED)
        ref = getattr(event, "ref", None)
        answer_only = isinstance(event, _ANSWERS)
        if isinstance(ref, int) and ref in self._asks:
            self._asks.discard(ref)
            answer_only = True
        if self._answer(
            ref,
            RequestError.from_code(event.code, event.message)
            if isinstance(event, ErrorReply)
            else event,
        ):
            if answer_only:
                return  # answered to the caller; not part of the event stream
        elif answer_only and isinstance(ref, int):
            return  # the answer to a request whose caller gave up (cancelled)
        elif isinstance(event, Pong) and ref is None:
            return  # the answer to a keepalive ping
        await on_news(event)

    def _answer(self, ref: object, result: ServerEvent | RequestError) -> bool:
        """Hand ``result`` to the request of ``ref``; False if none waits."""
        pending = self._pending.pop(ref, None) if isinstance(ref, int) else None
        if pending is None:
            return False
        pending.result = result
        pending.done.set()
        return True

    async def _next_event(self) -> ServerEvent:
        """The next event from the stream (the handshake's and the reader's)."""
        while True:
            try:
                event = self._proto.next_event()
            except RemoteProtocolError as exc:
                log.warning("bad line from server: %s", exc)
                # A bad line that carries the ref of a request answers it:
                # with an error, rather than never.
                message = f"bad answer from the server: {exc.message}"
                self._answer(exc.ref, RequestError.from_code(exc.code, message))
                continue
            if event is EOF:
                raise ConnectionClosed("server closed the connection")
            if event is not NEED_DATA:
                return event
            self._receiving_since = trio.current_time()
            try:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionClosed(self.lost_reason or "connection lost") from None
            finally:
                self._receiving_since = None
            self._proto.receive_data(data)

    # --- keepalive and closing ---------------------------------------------

    async def keep_alive(self) -> None:
        """Send a ``ping`` after ``options.keepalive`` seconds without
        sending anything; with a ``ping_timeout``, a connection that then
        answers nothing for that long is lost (and closed). Returns at once
        without a keepalive; runs until the connection ends otherwise."""
        keepalive, silence = self._options.keepalive, self._options.ping_timeout
        if keepalive is None:
            return
        with self._keepalive_scope:
            self._last_sent = trio.current_time()
            while True:
                await trio.sleep_until(self._last_sent + keepalive)
                if trio.current_time() < self._last_sent + keepalive:
                    continue
                try:
                    await self.send(Ping())
                except ConnectionClosed:
                    return
                if silence is None:
                    continue
                sent = trio.current_time()
                await trio.sleep(silence)
                # Dead only if the reader waited for data all along: a reader
                # held up by a slow consumer reads nothing either.
                since = self._receiving_since
                if since is not None and since <= sent and self.connected:
                    self._lose(f"no answer from the server in {silence:g}s")
                    await trio.aclose_forcefully(self._stream)
                    return

    async def aclose(self) -> None:
        """Close at once, without ``bye``; the reader ends."""
        self.connected = False
        await trio.aclose_forcefully(self._stream)

    def _lose(self, reason: str, code: str | None = None) -> None:
        """Record why the connection is ending, and tell the owner."""
        self.lost_reason, self.lost_code = reason, code
        self._on_lost(reason, code)


async def _open_stream(
    host: str, port: int, ssl_context: ssl.SSLContext | None
) -> trio.abc.Stream:
    if ssl_context is None:
        return await trio.open_tcp_stream(host, port)
    return await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)


async def open_stream(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> trio.abc.Stream:
    """Open a connection to a chat server without logging in (the TLS
    handshake included), for :class:`~chatkit.ChatClient`'s ``stream``: a
    program can tell a person at once that the server is unreachable, and
    ask for a name only then.

    Raises:
        OSError: the connection failed (:func:`describe_error` says why).
        trio.BrokenResourceError: the TLS handshake failed.
    """
    stream = await _open_stream(host, port, ssl_context)
    if isinstance(stream, trio.SSLStream):
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream


def describe_error(exc: BaseException) -> str:
    """A few words on why connecting failed (``exc`` from :meth:`open` or
    :func:`open_stream`), for a person to read."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if _refused(exc):
        return "connection refused: is the server running?"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _is_ask(request: ClientRequest) -> bool:
    """Whether ``request`` asks for a room's topic or modes (no change)."""
    if isinstance(request, Topic):
        return request.text is None
    return isinstance(request, Modes) and request == Modes(
        room=request.room, ref=request.ref
    )


def _refused(exc: BaseException) -> bool:
    """Whether every attempt to connect was refused (trio's ``OSError``
    for several addresses carries them as an exception group)."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return all(_refused(inner) for inner in cause.exceptions)
    return False
