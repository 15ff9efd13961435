"""The web transport: browsers, over WebSocket, and the chat page they load.

One port serves HTTP: ``GET /`` and the page's files (:class:`Pages`, from
``chatkit/web``), and the WebSocket at ``/ws``. An upgraded connection is a
:class:`WebSocketLink`: to the server core it is one more :class:`Link`,
speaking JSON from the start, whose output is framed as WebSocket text
frames (:data:`chatkit.websocket.WEBSOCKET`). A server frame is the same
bytes for every member, so the fan-out frames a broadcast once and the room
fast path writes it to plain sockets as it does JSON lines.

The HTTP and WebSocket parsing is sans-IO (:mod:`chatkit.websocket`); this
module does the I/O: one request per connection, within the handshake
timeout, then the link; and the keepalive (one task per transport, not one
per connection).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from functools import partial
from importlib import resources
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import trio

from ..protocol import NEED_DATA, Mode, WireFormat
from ..websocket import (
    WEBSOCKET,
    WEBSOCKET_PATH,
    BadHttpRequest,
    CloseCode,
    HttpRequest,
    HttpRequestReader,
    WebSocketReader,
    accept_websocket,
    close_frame,
    http_response,
)
from ._transport import Link, TcpTransport

__all__ = ["Pages", "WebSocketLink", "WebTransport", "normalize_origin"]

log = logging.getLogger("chatkit.server")

_PING: Final = b"\x89\x00"  # a final ping frame, empty: frame(b"", 0x9)
_SCHEMES: Final = ("http", "https")
# Close codes that say nothing went wrong (1006: closed without a frame).
_CLEAN_CLOSES: Final = frozenset((CloseCode.NORMAL, CloseCode.GOING_AWAY, 1006))
_CONTENT_TYPES: Final = MappingProxyType(
    {
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".svg": "image/svg+xml",
        ".png": "image/png",
        ".ico": "image/x-icon",
        ".json": "application/json",
        ".txt": "text/plain; charset=utf-8",
    }
)
_SECURITY_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; base-uri 'none'; form-action 'self'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


def normalize_origin(origin: str) -> str:
    """``origin`` as browsers send it (``scheme://host[:port]``, lower
    case, without a default port or a path); ``"*"`` stays ``"*"``.

    Raises:
        ValueError: ``origin`` is not an http(s) origin.
    """
    if origin == "*":
        return origin
    parts = urlsplit(origin.strip())
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ValueError(
            f"{origin!r} is not an origin (such as https://example.com:8443)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{origin!r} is not an origin: it has a path")
    port = parts.port  # ValueError if out of range
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


class Pages:
    """The files of the chat page (``chatkit/web``), read once, served by
    name: ``/`` is ``index.html``."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        if files is None:
            files = {}
            directory = resources.files("chatkit") / "web"
            if directory.is_dir():
                for entry in directory.iterdir():
                    if entry.is_file() and not entry.name.startswith((".", "_")):
                        files[entry.name] = entry.read_bytes()
        self._files = files

    def respond(self, request: HttpRequest) -> bytes:
        """The whole response to ``request`` (not an upgrade)."""
        if request.path == WEBSOCKET_PATH:
            text = b"this is chatkit's WebSocket\n"
            return http_response(426, text, headers=[("Upgrade", "websocket")])
        name = "index.html" if request.path == "/" else request.path[1:]
        body = self._files.get(name)
        if body is None:
            return http_response(404, b"not found\n")
        if request.method not in ("GET", "HEAD"):
            return http_response(405, b"", headers=[("Allow", "GET, HEAD")])
        suffix = name[name.rfind(".") :] if "." in name else ""
        headers = [
            ("Content-Type", _CONTENT_TYPES.get(suffix, "application/octet-stream")),
            *_SECURITY_HEADERS,
        ]
        if suffix == ".js":
            # Another site's page may import chatkit.js from here (a module
            # script is fetched with CORS); it is public.
            headers.append(("Access-Control-Allow-Origin", "*"))
        return http_response(200, body, headers=headers, head=request.method == "HEAD")


class WebTransport(TcpTransport):
    """HTTP and WebSocket on one TCP port (TLS with an ``ssl_context``:
    ``https://`` and ``wss://``).

    Args:
        host: as :class:`TcpTransport`.
        port: as :class:`TcpTransport`.
        ssl_context: as :class:`TcpTransport` (``https://`` and ``wss://``).
        user_timeout: as :class:`TcpTransport`.
        origins: the ``Origin`` values a browser's WebSocket may come from,
            besides the page's own (``"*"``: any); a request without
            ``Origin`` (not a browser) is let in.
        handshake_timeout: seconds a connection has for its HTTP request.
        ping_interval: seconds between pings to each WebSocket; one that
            sent nothing (not even the pong) for two intervals is closed.
            ``None``: no pings.
        max_opening: connections at most in their HTTP request at once
            (more are closed at once).
        pages: the files served (default: chatkit's chat page).
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        *,
        user_timeout: float | None = None,
        origins: Iterable[str] = (),
        handshake_timeout: float = 10.0,
        ping_interval: float | None = 30.0,
        max_opening: int = 1000,
        pages: Pages | None = None,
    ) -> None:
        super().__init__(host, port, ssl_context, user_timeout=user_timeout)
        self.origins = frozenset(map(normalize_origin, origins))
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.max_opening = max_opening
        self.pages = Pages() if pages is None else pages
        self._opening = 0
        self._links: set[WebSocketLink] = set()

    async def serve(
        self,
        handler: Callable[[Link], Awaitable[None]],
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """See :meth:`Transport.serve`: ``handler`` gets each WebSocket."""
        if self._bound is None:
            async with self.bound():
                await self.serve(handler, handler_nursery, task_status=task_status)
            return
        async with trio.open_nursery() as nursery:
            if self.ping_interval is not None:
                nursery.start_soon(self._keepalive, self.ping_interval)
            await nursery.start(
                partial(TcpTransport.serve, self),
                partial(self._open, handler),
                handler_nursery,
            )
            task_status.started()

    async def _open(
        self, handler: Callable[[Link], Awaitable[None]], stream: Link
    ) -> None:
        """A connection's task: its HTTP request, then (a WebSocket) the
        handler's session."""
        if self._opening >= self.max_opening:
            await stream.abort()
            return
        self._opening += 1
        link = None
        try:
            with trio.move_on_after(self.handshake_timeout):
                link = await self._answer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("internal error on web connection %s", stream.address)
        finally:
            self._opening -= 1
        if link is None:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await stream.aclose()
                await stream.abort()
            return
        self._links.add(link)
        try:
            await handler(link)
        finally:
            self._links.discard(link)

    async def _answer(self, stream: Link) -> WebSocketLink | None:
        """Read the request and answer it: a page, an error, or the upgrade
        (then the link)."""
        reader = HttpRequestReader()
        try:
            while (request := reader.next_request()) is NEED_DATA:
                reader.receive_data(await stream.receive_some())
            if not isinstance(request, HttpRequest):
                return None  # closed before asking
            origin = request.headers.get("origin")
            if not request.websocket or request.path != WEBSOCKET_PATH:
                response = self.pages.respond(request)
            elif origin is not None and not self._allows(origin, request.headers):
                log.warning(
                    "refused a WebSocket from %s: origin %s is not allowed",
                    stream.address,
                    origin,
                )
                body = b"origin not allowed (see --web-origin)\n"
                response = http_response(403, body)
            else:
                await stream.send_all(accept_websocket(request))
                return WebSocketLink(stream, reader.trailing_data)
        except BadHttpRequest as exc:
            response = http_response(exc.status, f"{exc}\n".encode())
        await stream.send_all(response)
        return None

    def _allows(self, origin: str, headers: dict[str, str]) -> bool:
        """Whether a browser's page at ``origin`` may open a WebSocket."""
        if "*" in self.origins:
            return True
        try:
            origin = normalize_origin(origin)
        except ValueError:
            return False  # "null" (a sandboxed page, a file) and the like
        if origin in self.origins:
            return True
        # The page's own origin: the host (and port) the browser asked for.
        # Either scheme: behind a proxy that ends TLS, a page served over
        # https reaches this port as plain http.
        host = headers.get("host", "")
        try:
            own = {normalize_origin(f"{scheme}://{host}") for scheme in _SCHEMES}
        except ValueError:
            return False
        return origin in own

    async def _keepalive(self, interval: float) -> None:
        """Ping every WebSocket every ``interval`` seconds; close those that
        sent nothing since the last ping."""
        while True:
            await trio.sleep(interval)
            for link in list(self._links):
                link.keepalive()


class WebSocketLink(Link):
    """A WebSocket, as the server core sees it: JSON lines in (each text
    message one line, see :class:`~chatkit.websocket.WebSocketReader`),
    WebSocket frames out (the core writes whole frames: see
    :meth:`Link.attach`), a close frame on :meth:`aclose`."""

    __slots__ = (
        "_inner",
        "_pinged",
        "_reader",
        "_torn",
        "_trailing",
        "_write",
        "address",
        "peer",
        "sock",
    )
    mode = Mode.JSON

    def __init__(self, inner: Link, trailing_data: bytes = b"") -> None:
        self._inner = inner
        self.peer = inner.peer
        self.address = inner.address
        self.sock = inner.sock  # a plain socket's frames are written directly
        self._reader = WebSocketReader()
        self._trailing = trailing_data  # frames sent with the upgrade request
        self._write: Callable[[bytes], None] | None = None
        # A write was cut short: the stream may end inside a frame, so no
        # close frame can follow.
        self._torn = False
        self._pinged = False

    def wire(self, mode: Mode) -> WireFormat:
        """:data:`~chatkit.websocket.WEBSOCKET`, whatever the mode."""
        return WEBSOCKET

    def attach(self, write: Callable[[bytes], None]) -> None:
        """See :meth:`Link.attach`: pongs and pings go through ``write``."""
        self._write = write

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next JSON line bytes the client's frames make (``b""``: it
        closed, or broke the protocol); answers pings on the way."""
        reader = self._reader
        while True:
            if reader.closed():
                await trio.lowlevel.checkpoint()
                return b""
            if self._trailing:
                data, self._trailing = self._trailing, b""
                await trio.lowlevel.checkpoint()
            else:
                data = bytes(await self._inner.receive_some(max_bytes))
            lines = reader.receive_data(data)
            if reader.pong is not None and self._write is not None:
                self._write(reader.pong)
            code = reader.close_code
            if code is not None and code not in _CLEAN_CLOSES:
                log.info(
                    "%s broke the WebSocket protocol: %s (%d)",
                    self.address,
                    reader.close_reason,
                    code,
                )
            if lines or code is not None:
                return lines

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """See :meth:`Link.try_send`."""
        return self._inner.try_send(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """See :meth:`trio.abc.SendStream.send_all`."""
        try:
            await self._inner.send_all(data)
        except BaseException:
            self._torn = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        """See :meth:`trio.abc.SendStream.wait_send_all_might_not_block`."""
        await self._inner.wait_send_all_might_not_block()

    def keepalive(self) -> None:
        """A keepalive round: ping, or, if nothing came since the last
        ping, close (the peer is gone)."""
        if self._write is None:
            return
        if self._pinged and not self._reader.heard:
            log.info("%s answered no ping; closing", self.address)
            self.close_now()
            return
        self._reader.heard = False
        self._pinged = True
        self._write(_PING)

    async def aclose(self) -> None:
        """End with a close frame (the client's code echoed, or 1000, or
        the protocol error's), then close the connection."""
        self.sock = None
        code = self._reader.close_code
        if not self._torn and code != 1006:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._inner.send_all(
                    close_frame(code or CloseCode.NORMAL, self._reader.close_reason)
                )
        await self._inner.aclose()

    async def abort(self) -> None:
        """See :meth:`Link.abort`."""
        self.sock = None
        await self._inner.abort()

    def close_now(self) -> None:
        """See :meth:`Link.close_now` (no close frame)."""
        self._torn = True  # nothing more is written
        self.sock = None
        self._inner.close_now()
