"""Transports: how connections arrive, and what the core writes to.

A transport listens and turns each accepted connection into a :class:`Link`:
bytes in (``receive_some``), bytes out without blocking (``try_send``) or
blocking (``send_all``), close, and the wire format its client speaks. The
server core (sessions, outboxes, fan-out) sees only links. TCP, with or
without TLS, is :class:`TcpTransport`; another transport is one more module
with a class like it, registered in :class:`~chatkit.ChatServer`.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final, Protocol

import trio

from ..protocol import JSON_LINES, TEXT_LINES, Mode, WireFormat

__all__ = ["Link", "TcpLink", "TcpTransport", "Transport"]

log = logging.getLogger("chatkit.server")

_RECEIVE_SIZE: Final = 64 * 1024
# Every direct write: send(2), not write(2), which goes through the VFS layer
# (a measurable share of the server's CPU at light load, docs/performance.md).
SEND: Final = socket.socket.send


class Link(Protocol):
    """One accepted connection, as the server core sees it."""

    peer: tuple[str, int]
    """The peer's address, as the socket gives it (for the log)."""
    address: str
    """The peer's ``host:port``."""
    sock: socket.socket | None
    """The plain socket to write to without blocking (from the event loop,
    as the room fast path does), or None (TLS, or not a socket)."""

    def wire(self, mode: Mode) -> WireFormat:
        """The format output takes once the client chose ``mode``."""
        ...

    async def receive_some(self) -> bytes | bytearray:
        """The next bytes received; ``b""`` once the peer closed or broke."""
        ...

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket takes now, without blocking; how much
        (``0`` also when it failed: :meth:`send_all` reports that)."""
        ...

    async def send_all(self, data: bytes | bytearray) -> None:
        """Write all of ``data``.

        Raises:
            trio.BrokenResourceError: the peer is gone.
            trio.ClosedResourceError: the link was closed.
        """
        ...

    async def aclose(self) -> None:
        """Close gracefully (the caller bounds the time)."""
        ...

    async def abort(self) -> None:
        """Close at once, without waiting for the peer."""
        ...


class Transport(Protocol):
    """A way connections arrive: a listener and the links it makes."""

    async def serve(
        self,
        handler: Callable[[Link], Awaitable[None]],
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen, and run ``handler(link)`` in ``handler_nursery`` for each
        connection, until cancelled; ``task_status.started()`` once
        listening.

        Raises:
            OSError: the address cannot be listened on.
        """
        ...


class TcpTransport:
    """TCP, JSON or line mode by the client's first line; TLS with an
    ``ssl_context``.

    Args:
        host: the address to listen on.
        port: the port; ``0`` picks a free one (read :attr:`port` once
            serving).
        ssl_context: serve TLS with this context.
    """

    def __init__(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        self.port = port
        """The port; once serving, the bound one."""
        self.ssl_context = ssl_context

    async def serve(
        self,
        handler: Callable[[Link], Awaitable[None]],
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """See :meth:`Transport.serve`."""
        tcp_listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = tcp_listeners[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners)
        if self.ssl_context is not None:
            listeners = [
                trio.SSLListener(listener, self.ssl_context)
                for listener in tcp_listeners
            ]
        await trio.serve_listeners(
            partial(_accept, handler),
            listeners,
            handler_nursery=handler_nursery,
            task_status=task_status,
        )


async def _accept(
    handler: Callable[[Link], Awaitable[None]], stream: trio.abc.Stream
) -> None:
    await handler(TcpLink(stream))


class TcpLink:
    """A :class:`Link` over a TCP stream (TLS or not)."""

    __slots__ = ("address", "peer", "sock", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.sock: socket.socket | None = None
        try:
            tcp = _socket_of(stream)
            host, port = tcp.getpeername()[:2]
        except (OSError, TypeError):
            self.peer = ("?", 0)
            self.address = "?:0"
            return
        self.peer = (host, port)
        self.address = f"{host}:{port}"
        _enable_keepalive(tcp)
        if type(stream) is trio.SocketStream:
            self.sock = _plain_socket(tcp)

    def wire(self, mode: Mode) -> WireFormat:
        """JSON lines, or plain text lines in line mode."""
        return TEXT_LINES if mode is Mode.LINE else JSON_LINES

    async def receive_some(self) -> bytes | bytearray:
        """See :meth:`Link.receive_some`."""
        try:
            return await self.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """See :meth:`Link.try_send`."""
        sock = self.sock
        if sock is None:
            return 0
        try:
            return SEND(sock, data)
        except OSError:
            # BlockingIOError: the kernel buffer is full. Anything else (a
            # reset peer) the writer's send_all reports.
            return 0

    async def send_all(self, data: bytes | bytearray) -> None:
        """See :meth:`Link.send_all`."""
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        """See :meth:`Link.aclose`."""
        self.sock = None  # no direct write once trio closes the socket
        await self.stream.aclose()

    async def abort(self) -> None:
        """See :meth:`Link.abort`."""
        self.sock = None
        await trio.aclose_forcefully(self.stream)


def _plain_socket(sock: trio.socket.SocketType) -> socket.socket | None:
    """The standard-library socket a trio socket wraps, or None.

    trio keeps it in a private attribute (``_sock``, there since trio's
    first releases); if a trio release renames it, the room fast path is
    simply not taken (rooms fall back to the buffered path), nothing breaks.
    """
    inner = getattr(sock, "_sock", None)
    return inner if isinstance(inner, socket.socket) else None


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType:
    """The TCP socket under a plain or TLS stream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        raise TypeError(f"not a socket stream: {stream!r}")
    return stream.socket


def _enable_keepalive(sock: trio.socket.SocketType) -> None:
    # The kernel probes an idle peer and resets the connection if it is gone,
    # so half-open connections (a vanished laptop) are reaped in ~90 s even
    # with no idle_timeout.
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
