"""Test helpers: a raw socket client that speaks the wire protocol by hand,
and small helpers shared by the test modules.

The bundled ChatClient is itself under test, so protocol-level server tests
use RawClient instead: it sends exact bytes and reads exact lines.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
import trio

import chatkit

T = TypeVar("T")

TIMEOUT = 5.0


class RawClient:
    """A TCP connection to a server that reads and writes whole lines."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = bytearray()

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        with trio.fail_after(TIMEOUT):
            return cls(await trio.open_tcp_stream(host, port))

    @classmethod
    async def open_tls(cls, port: int, context: ssl.SSLContext) -> RawClient:
        """A TLS connection to 127.0.0.1 (the handshake happens on first
        use)."""
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=context
            )
        return cls(stream)  # type: ignore[arg-type]

    async def send_bytes(self, data: bytes) -> None:
        with trio.fail_after(TIMEOUT):
            await self.stream.send_all(data)

    async def send_line(self, text: str) -> None:
        await self.send_bytes(text.encode() + b"\n")

    async def send_json(self, **fields: Any) -> None:
        await self.send_bytes(json.dumps(fields).encode() + b"\n")

    async def receive_line(self, within: float = TIMEOUT) -> str:
        """The next line, without its newline. Fails on EOF or timeout."""
        with trio.fail_after(within):
            while b"\n" not in self._buf:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"connection closed; pending {bytes(self._buf)!r}")
                self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode()

    async def receive_json(self, within: float = TIMEOUT) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(await self.receive_line(within))
        return result

    async def expect(
        self, type: str, within: float = TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """Read events until one of ``type`` whose ``fields`` match.

        Other events before it are skipped (join notices and the like); use
        :meth:`receive_json` to check an exact sequence. Fails after
        ``within`` seconds, listing what was skipped.
        """
        skipped: list[dict[str, Any]] = []
        try:
            with trio.fail_after(within):
                while True:
                    event = await self.receive_json()
                    if event["type"] == type and all(
                        event.get(k) == v for k, v in fields.items()
                    ):
                        return event
                    skipped.append(event)
        except trio.TooSlowError:
            raise AssertionError(
                f"no {type} event with {fields}; got {skipped}"
            ) from None

    async def hello(self, name: str, **fields: Any) -> dict[str, Any]:
        """Log in in JSON mode; returns the welcome."""
        await self.send_json(type="hello", name=name, protocol=1, **fields)
        return await self.expect("welcome", name=name)

    async def assert_silent(self, duration: float = 0.1) -> None:
        """Nothing arrives for ``duration`` seconds."""
        with trio.move_on_after(duration):
            data = await self.stream.receive_some(65536)
            raise AssertionError(f"unexpected data: {bytes(self._buf) + data!r}")

    async def assert_closed(self, within: float = TIMEOUT) -> list[str]:
        """Read until EOF; returns the lines received before it."""
        lines = []
        with trio.fail_after(within):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                self._buf += data
        for raw in bytes(self._buf).split(b"\n"):
            if raw:
                lines.append(raw.decode())
        self._buf = bytearray()
        return lines

    async def aclose(self) -> None:
        await self.stream.aclose()


def connect(server: chatkit.ChatServer, name: str, **kwargs: Any) -> chatkit.ChatClient:
    """A ChatClient named ``name`` for ``server`` on loopback (``async with``
    it to connect)."""
    return chatkit.open_client("127.0.0.1", server.port, name=name, **kwargs)


def unref(event: Any) -> Any:
    """``event`` without the ``ref`` only the requester's copy carries."""
    if "ref" not in event.__struct_fields__:
        return event
    return msgspec.structs.replace(event, ref=None)


async def wait_until(condition: Callable[[], bool], within: float = TIMEOUT) -> None:
    """Poll ``condition`` until it holds: for state that has no event to wait
    on (a connection task ending, a background writer, another process)."""
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110 (nothing to wait on but time)
            await trio.sleep(0.005)


async def next_event(
    client: chatkit.ChatClient, kind: type[T], within: float = TIMEOUT, **fields: Any
) -> T:
    """The next event of ``kind`` (with ``fields``) ``client`` receives;
    fails if none comes in time or the client's events end first."""
    with trio.fail_after(within):
        async for event in client:
            if isinstance(event, kind) and all(
                getattr(event, key) == value for key, value in fields.items()
            ):
                return event
    raise AssertionError(f"{client} ended before a {kind.__name__} with {fields}")


async def ended(client: chatkit.ChatClient, within: float = TIMEOUT) -> str:
    """Wait for ``client``'s events to end (its connection closed for good);
    why they did."""
    with trio.fail_after(within):
        async for _ in client:
            pass
    return client.close_reason or ""


class HoldLogin:
    """A server plugin holding the login of ``name`` until ``opened`` is set,
    so that a test decides when that client gets in."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.opened = trio.Event()

    @chatkit.hookimpl
    async def chatkit_authenticate(self, name: str) -> None:
        if name == self.name:
            await self.opened.wait()


@asynccontextmanager
async def serving(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    *,
    receive_buffer: int | None = None,
) -> AsyncIterator[int]:
    """A server written by hand: ``handler`` serves each connection to a
    free loopback port, which this yields (the stream is closed when the
    handler returns). ``receive_buffer`` fixes the connections' socket
    receive buffer (``SO_RCVBUF``), so that a large send backs up."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    if receive_buffer is not None:
        for listener in listeners:  # accepted sockets inherit it
            listener.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer
            )
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def open_small_window(port: int) -> RawClient:
    """A RawClient whose socket has a tiny receive buffer, so a client that
    does not read backs the server up after a few kilobytes (the caller
    closes it)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        with trio.fail_after(TIMEOUT):
            await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return RawClient(trio.SocketStream(sock))
