"""Transports: how connections arrive, and what the core writes to.

A transport listens and turns each accepted connection into a :class:`Link`:
a trio stream (``receive_some``, ``send_all``, ``aclose``) with what the
core needs besides: the peer's address, the wire format its client speaks,
and, on a plain socket, writes that never block (``try_send``) and the
socket itself for the room fast path. The server core (sessions, outboxes,
fan-out) sees only links. TCP, with or without TLS, is
:class:`TcpTransport`; another transport is one more module with a class
like it, registered in :class:`~chatkit.ChatServer`.

A plain TCP link is a small :class:`trio.abc.Stream` over a non-blocking
standard-library socket, waiting with :func:`trio.lowlevel.wait_readable`
and :func:`trio.lowlevel.wait_writable`: an idle connection then costs the
socket, this object and its task, not trio's ``SocketStream`` with its trio
socket and conflict detectors (docs/performance.md: memory per idle
connection).
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from itertools import repeat
from typing import Any, Final, Protocol

import trio

from ..protocol import Mode, WireFormat, wire_format

__all__ = ["Link", "TcpLink", "TcpTransport", "TlsLink", "Transport"]

log = logging.getLogger("chatkit.server")

_RECEIVE_SIZE: Final = 64 * 1024
# Every direct write: send(2), not write(2), which goes through the VFS layer
# (a measurable share of the server's CPU at light load, docs/performance.md).
SEND: Final = socket.socket.send
# accept() failures that concern one connection, not the listener (as trio's
# SocketListener has them).
_IGNORABLE_ACCEPT_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        *("EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT"),
        *("EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH"),
    )
    if hasattr(errno, name)
)
# accept() failures that pass once connections close (as trio.serve_listeners
# has them): wait this long, and accept again.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
)
_ACCEPT_RETRY_DELAY: Final = 0.1
# One name for every connection's task (trio would make a string for each).
_CONNECTION_TASK: Final = "chatkit connection"


class Link(trio.abc.Stream):
    """One accepted connection, as the server core sees it: a trio stream
    (``receive_some``, ``send_all``, ``aclose``, raising
    :exc:`trio.BrokenResourceError` or :exc:`trio.ClosedResourceError` as
    trio streams do), and what the core needs besides."""

    __slots__ = ()

    peer: tuple[str, int]
    """The peer's address, as the socket gives it (for the log)."""
    address: str
    """The peer's ``host:port``."""
    sock: socket.socket | None
    """The plain socket to write to without blocking (from the event loop,
    as the room fast path does), or None (TLS, or closed)."""
    mode: Mode = Mode.UNKNOWN
    """The mode the client speaks from the start; ``UNKNOWN``: its first
    line chooses."""

    def wire(self, mode: Mode) -> WireFormat:
        """The format output takes once the client chose ``mode``: the
        protocol's own (:func:`chatkit.protocol.wire_format`), unless the
        transport frames output otherwise."""
        return wire_format(mode)

    def attach(self, write: Callable[[bytes], None]) -> None:
        """Where the link writes frames of its own (a WebSocket's pongs),
        once the connection has an outbox: ``write`` puts them after the
        whole frames already sent, never inside one. Nothing by default."""

    @abstractmethod
    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket takes now, without blocking; how much
        (``0`` also when it failed: :meth:`send_all` reports that)."""

    @abstractmethod
    async def abort(self) -> None:
        """Close at once, without waiting for the peer; idempotent."""

    @abstractmethod
    def close_now(self) -> None:
        """Close the connection now, from any task: a read or write under
        way wakes up to a closed link. Idempotent."""


class Transport(Protocol):
    """A way connections arrive: listeners and the links they make."""

    def bound(self) -> AbstractAsyncContextManager[None]:
        """Bind the listening sockets for the duration of an ``async with``
        block, in which :meth:`serve` accepts on them (connections that come
        before wait in the listen backlog). A server binds before it opens
        anything else, so that an address it cannot listen on is an error
        before any file is made.

        Raises:
            OSError: the address cannot be listened on.
        """
        ...

    async def serve(
        self,
        handler: Callable[[Link], Awaitable[None]],
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept (on :meth:`bound`'s sockets), and run
        ``handler(link)`` in ``handler_nursery`` for each connection, until
        cancelled; ``task_status.started()`` once accepting. The handler
        owns the link: it closes it (:meth:`Link.aclose` or
        :meth:`Link.abort`) before it returns."""
        ...


class TcpTransport:
    """TCP, JSON or line mode by the client's first line; TLS with an
    ``ssl_context``.

    Args:
        host: the address to listen on.
        port: the port; ``0`` picks a free one (read :attr:`port` once
            serving).
        ssl_context: serve TLS with this context.
        user_timeout: ``TCP_USER_TIMEOUT`` of each accepted socket, in
            seconds: how long sent data may stay unacknowledged before the
            kernel drops the connection (``None``: the kernel's default).

    Raises:
        ValueError: ``port`` is not from 0 to 65535.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        *,
        user_timeout: float | None = None,
    ) -> None:
        # getaddrinfo would take 65616 for port 80 (it wraps), without a word.
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be from 0 to 65535, not {port}")
        self.host = host
        self.port = port
        """The port; once serving, the bound one."""
        self.ssl_context = ssl_context
        self.user_timeout = user_timeout
        self._bound: list[_TcpListener] | None = None  # see bound()

    @asynccontextmanager
    async def bound(self) -> AsyncIterator[None]:
        """See :meth:`Transport.bound`; :attr:`port` is the bound one from
        here on. The sockets are closed when the block ends."""
        # trio makes the listening sockets (addresses, options, backlog);
        # they are then ours, to accept on without trio's stream objects.
        listeners = [
            _TcpListener(socket.socket(fileno=listener.socket.detach()), self)
            for listener in await trio.open_tcp_listeners(self.port, host=self.host)
        ]
        self.port = listeners[0].sock.getsockname()[1]
        self._bound = listeners
        try:
            yield
        finally:
            self._bound = None
            for listener in listeners:
                listener.sock.close()  # serve closed it already, if it ran

    async def serve(
        self,
        handler: Callable[[Link], Awaitable[None]],
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """See :meth:`Transport.serve`; outside :meth:`bound`, it binds for
        as long as it serves."""
        listeners = self._bound
        if listeners is None:
            async with self.bound():
                await self.serve(handler, handler_nursery, task_status=task_status)
            return
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_each, listener, handler, handler_nursery)
            task_status.started(listeners)

    def link(self, sock: socket.socket) -> Link:
        """The link for a connection just accepted on ``sock``."""
        plain = TcpLink(sock, user_timeout=self.user_timeout)
        if self.ssl_context is None:
            return plain
        return TlsLink(plain, self.ssl_context)


async def _accept_each(
    listener: trio.abc.Listener[Link],
    handler: Callable[[Link], Awaitable[None]],
    handler_nursery: trio.Nursery,
) -> None:
    """Accept connections on ``listener`` until cancelled, starting
    ``handler(link)`` as a task for each (as :func:`trio.serve_listeners`
    does, less its wrapper task per connection: the handler closes its link).
    Out of file descriptors or memory, wait and try again."""
    async with listener:
        while True:
            try:
                link = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error(
                    "accept failed: %s; retrying in %s s",
                    errno.errorcode[exc.errno],
                    _ACCEPT_RETRY_DELAY,
                )
                await trio.sleep(_ACCEPT_RETRY_DELAY)
            else:
                handler_nursery.start_soon(handler, link, name=_CONNECTION_TASK)


class _TcpListener(trio.abc.Listener[Link]):
    """Accepts on a listening socket, handing out links."""

    def __init__(self, sock: socket.socket, transport: TcpTransport) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._transport = transport

    async def accept(self) -> Link:
        """The next connection (see :class:`trio.abc.Listener`)."""
        sock = self.sock
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError from None
                if exc.errno not in _IGNORABLE_ACCEPT_ERRNOS:
                    raise  # EMFILE and the like: _accept_each waits
            else:
                return self._transport.link(conn)

    async def aclose(self) -> None:
        """Stop listening."""
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        await trio.lowlevel.checkpoint()


class TcpLink(Link):
    """A :class:`Link` over a plain TCP socket; ``user_timeout`` as
    :class:`TcpTransport` has it."""

    __slots__ = ("address", "peer", "sock")

    def __init__(
        self, sock: socket.socket, *, user_timeout: float | None = None
    ) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        try:
            host, port = sock.getpeername()[:2]
            # As trio's SocketStream has it: no Nagle delay, and at most
            # 16 KiB not yet sent in the kernel, so that what a slow client
            # does not take backs up in its outbox, where it counts towards
            # the outbox's bounds (the kernel would take megabytes).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(socket, "TCP_NOTSENT_LOWAT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 2**14)
        except OSError:  # already reset by the peer: the first read says so
            host, port = "?", 0
        self.peer = (host, port)
        self.address = f"{host}:{port}"
        _watch_peer(sock, user_timeout)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """See :meth:`trio.abc.ReceiveStream.receive_some`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            sock = self.sock
            if sock is None:
                raise trio.ClosedResourceError("the link was closed")
            try:
                data = sock.recv(max_bytes or _RECEIVE_SIZE)
            except BlockingIOError:
                data = None  # waited for below, not here: the exception and
                # its traceback would stay alive through the wait (600 bytes
                # for every idle connection)
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            if data is None:
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            if not waited:
                # Every await is a checkpoint, data waiting or not.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """See :meth:`Link.try_send`."""
        sock = self.sock
        if sock is None:
            return 0
        try:
            return SEND(sock, data)
        except OSError:
            # BlockingIOError: the kernel buffer is full. Anything else (a
            # reset peer) send_all reports.
            return 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """See :meth:`trio.abc.SendStream.send_all`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                sock = self.sock
                if sock is None:
                    raise trio.ClosedResourceError("the link was closed")
                try:
                    sent += SEND(sock, view[sent:])
                    continue
                except BlockingIOError:
                    pass  # waited for outside the handler (see receive_some)
                except OSError as exc:
                    raise trio.BrokenResourceError(exc) from exc
                await trio.lowlevel.wait_writable(sock)
                waited = True
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        """See :meth:`trio.abc.SendStream.wait_send_all_might_not_block`."""
        sock = self.sock
        if sock is None:
            raise trio.ClosedResourceError("the link was closed")
        await trio.lowlevel.wait_writable(sock)

    async def aclose(self) -> None:
        """Close the socket (at once: TCP has nothing to say goodbye with)."""
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """See :meth:`Link.close_now`."""
        sock, self.sock = self.sock, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def abort(self) -> None:
        """See :meth:`Link.abort`."""
        await self.aclose()


class TlsLink(Link):
    """A :class:`Link` over TLS on a :class:`TcpLink` (no direct writes:
    every byte goes through the TLS stream)."""

    __slots__ = ("_plain", "_tls", "address", "peer", "sock")

    def __init__(self, plain: TcpLink, context: ssl.SSLContext) -> None:
        self._plain = plain
        self.peer = plain.peer
        self.address = plain.address
        self.sock: socket.socket | None = None
        self._tls = trio.SSLStream(plain, context, server_side=True)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """See :meth:`trio.abc.ReceiveStream.receive_some`."""
        return await self._tls.receive_some(max_bytes or _RECEIVE_SIZE)

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Nothing: TLS writes go through :meth:`send_all`."""
        return 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """See :meth:`trio.abc.SendStream.send_all`."""
        await self._tls.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """See :meth:`trio.abc.SendStream.wait_send_all_might_not_block`."""
        await self._tls.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Say goodbye in TLS, then close (the caller bounds the time)."""
        await self._tls.aclose()

    async def abort(self) -> None:
        """See :meth:`Link.abort`."""
        await trio.aclose_forcefully(self._tls)

    def close_now(self) -> None:
        """See :meth:`Link.close_now` (no TLS goodbye)."""
        self._plain.close_now()


def _watch_peer(sock: socket.socket, user_timeout: float | None) -> None:
    # Keepalive: the kernel probes an idle peer and resets the connection if
    # it is gone, so half-open connections (a vanished laptop) are reaped in
    # ~90 s even with no idle_timeout. It never probes while sent data waits
    # for its acknowledgement, though: then only TCP_USER_TIMEOUT ends the
    # connection before the retransmissions run out (~15 minutes on Linux).
    # It also caps keepalive: the connection ends at the first probe that
    # finds the peer silent for longer than the user timeout.
    if user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        milliseconds = min(max(1, round(user_timeout * 1000)), 2**31 - 1)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)
        except OSError:
            log.debug("could not set TCP_USER_TIMEOUT", exc_info=True)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", 60),
            ("TCP_KEEPINTVL", 10),
            ("TCP_KEEPCNT", 3),
        ):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:
        log.debug("could not enable TCP keepalive", exc_info=True)


def send_each(sockets: Sequence[socket.socket], payload: bytes) -> list[int | None]:
    """``send(payload)`` on each of ``sockets``, as one C-level loop: what
    each socket took, or None where the send raised (its buffer was full, or
    it failed: its writer, handed the rest, reports that)."""
    # list.extend keeps what map produced before an exception, and map has
    # taken the socket that raised from the iterator: the next round goes on
    # after it.
    sent: list[int | None] = []
    rest = iter(sockets)
    while True:
        try:
            sent.extend(map(SEND, rest, repeat(payload)))
            return sent
        except OSError:  # BlockingIOError: its buffer is full
            sent.append(None)
