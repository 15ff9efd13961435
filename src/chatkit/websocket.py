"""WebSocket (RFC 6455) for chatkit, sans-IO: bytes in, requests and bytes
out, no I/O: the WebSocket layer of :mod:`chatkit.protocol`.

Protocol v1 over WebSocket is one JSON object per text frame, both ways.
The server side is three small pieces, each driven by the transport
(``chatkit.server._web``):

* :class:`HttpRequestReader`: the one HTTP request a connection makes
  (parsed by h11): a page to serve, or the upgrade to a WebSocket, whose
  answer :func:`accept_websocket` writes.
* :class:`WebSocketReader`: the frames a client sends (parsed by wsproto:
  masking, fragments, control frames, UTF-8), turned into the JSON lines
  that :class:`chatkit.protocol.ServerConnection` reads, so that a browser
  is served by the same code as a TCP client; plus what the link must
  answer (a pong, a close).
* :data:`WEBSOCKET`: the wire format of what the server sends. A server
  frame is not masked, so one encoded frame (header and payload) is the
  same bytes for every WebSocket member of a room: a broadcast is framed
  once, like a JSON line.

No extension is negotiated (permessage-deflate would compress each frame
once per connection, not once per broadcast).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from collections.abc import Iterable
from types import MappingProxyType
from typing import Final, NamedTuple

import h11
import msgspec
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)

from ._events import Event
from ._framing import NEED_DATA, Status
from .protocol import WireFormat

__all__ = [
    "WEBSOCKET",
    "WEBSOCKET_PATH",
    "BadHttpRequest",
    "CloseCode",
    "HttpRequest",
    "HttpRequestReader",
    "WebSocketReader",
    "accept_websocket",
    "close_frame",
    "encode_websocket",
    "frame",
    "frame_json_lines",
    "http_response",
]

#: Where a browser opens its WebSocket (``ws://host:port/ws``).
WEBSOCKET_PATH: Final = "/ws"
_ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Longest HTTP request head accepted (request line and headers).
MAX_REQUEST_HEAD: Final = 16 * 1024
# Frames taken from one read before the rest is refused as abuse: one
# read of 64 KiB holds at most about 650 requests of 100 bytes, and each
# frame costs wsproto's Python, token or not.
_MAX_FRAMES_PER_READ: Final = 2048

_TEXT: Final = 0x1
_CLOSE: Final = 0x8
_PONG: Final = 0xA
_FIN: Final = 0x80


class CloseCode(enum.IntEnum):
    """RFC 6455's close codes, as the server uses them."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    TOO_BIG = 1009


# --- what the server sends --------------------------------------------------


def frame(payload: bytes, opcode: int = _TEXT) -> bytes:
    """One final, unmasked frame (a server's) carrying ``payload``."""
    size = len(payload)
    if size < 126:
        head = bytes((_FIN | opcode, size))
    elif size < 65536:
        head = struct.pack("!BBH", _FIN | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", _FIN | opcode, 127, size)
    return head + payload


def close_frame(code: int = CloseCode.NORMAL, reason: str = "") -> bytes:
    """A close frame with ``code`` (and ``reason``, cut to fit 125 bytes)."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return frame(payload, _CLOSE)


def encode_websocket(event: Event) -> bytes:
    """``event`` as one text frame of JSON (a server's: unmasked)."""
    return frame(msgspec.json.encode(event))


def _frame_end(data: bytes | bytearray, position: int) -> int:
    """The end of the frame that holds byte ``position`` of ``data``, which
    begins with a frame (as :attr:`WireFormat.frame_end` asks)."""
    start = 0
    while True:
        size = data[start + 1] & 0x7F
        if size == 126:
            end: int = start + 4 + struct.unpack_from("!H", data, start + 2)[0]
        elif size == 127:
            end = start + 10 + struct.unpack_from("!Q", data, start + 2)[0]
        else:
            end = start + 2 + size
        if end > position:
            return end
        start = end


def frame_json_lines(lines: bytes) -> bytes:
    """JSON-mode lines (each ended by ``\\n``, none holding another: JSON
    escapes them) as text frames, one per line, without the ``\\n``."""
    if lines.count(b"\n") == 1:
        return frame(lines[:-1])
    return b"".join(map(frame, lines.split(b"\n")[:-1]))


#: WebSocket: one JSON object per text frame (JSON mode's events and echo).
WEBSOCKET: Final = WireFormat(
    "websocket", encode_websocket, True, _frame_end, frame_json_lines
)


# --- the HTTP request -------------------------------------------------------


class HttpRequest(NamedTuple):
    """The one HTTP request of a web connection.

    Attributes:
        method: ``"GET"``, ``"HEAD"``, ...
        path: the target without its query string.
        headers: each header's value by its lower-case name (repeated
            headers joined by ``", "``).
        websocket: whether it asks to become a WebSocket (``Upgrade:
            websocket``).
    """

    method: str
    path: str
    headers: dict[str, str]
    websocket: bool


class BadHttpRequest(Exception):
    """The client's HTTP request is not one we can answer; :attr:`status`
    says which error to answer with (400, 431, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpRequestReader:
    """Reads the one HTTP request a web connection makes (with h11).

    Raises :class:`BadHttpRequest` from :meth:`next_request` on a malformed
    request or a head longer than :data:`MAX_REQUEST_HEAD`.
    """

    __slots__ = ("_http",)

    def __init__(self) -> None:
        self._http = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD
        )

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add received bytes (``b""``: the client closed its side)."""
        self._http.receive_data(bytes(data))

    def next_request(self) -> HttpRequest | Status | None:
        """The request once its head is complete; :data:`NEED_DATA`; or None
        if the client closed before sending one."""
        try:
            event = self._http.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadHttpRequest(exc.error_status_hint, str(exc)) from None
        if event is h11.NEED_DATA:
            return NEED_DATA
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        upgrade = "websocket" in _tokens(headers.get("upgrade", ""))
        path = event.target.decode("latin-1").partition("?")[0]
        return HttpRequest(event.method.decode("latin-1"), path, headers, upgrade)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the request's head (a client may send its
        first frames right after the upgrade request)."""
        return self._http.trailing_data[0]


def _unmask(key: bytes, payload: bytes) -> bytes:
    """A client frame's ``payload`` unmasked: XORed with its ``key``
    repeated, as one big-integer operation (in C, not a byte at a time)."""
    size = len(payload)
    if not size:
        return payload
    mask = (key * ((size + 3) // 4))[:size]
    return (int.from_bytes(payload) ^ int.from_bytes(mask)).to_bytes(size)


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


def http_response(
    status: int,
    body: bytes = b"",
    *,
    headers: Iterable[tuple[str, str]] = (),
    head: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection (``head``:
    the answer to a HEAD request, without the body)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}".encode()]
    for name, value in (
        *headers,
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ):
        lines.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


_REASONS: Final = MappingProxyType(
    {
        200: "OK",
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        426: "Upgrade Required",
        431: "Request Header Fields Too Large",
        503: "Service Unavailable",
    }
)


def accept_websocket(request: HttpRequest) -> bytes:
    """The ``101 Switching Protocols`` answer to a WebSocket upgrade.

    Raises:
        BadHttpRequest: ``request`` is not a valid version-13 upgrade (GET,
            ``Connection: upgrade``, a 16-byte ``Sec-WebSocket-Key``).
    """
    headers = request.headers
    if request.method != "GET":
        raise BadHttpRequest(405, "a WebSocket is opened with GET")
    if "upgrade" not in _tokens(headers.get("connection", "")):
        raise BadHttpRequest(400, "missing Connection: upgrade")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise BadHttpRequest(426, "only WebSocket version 13 is supported")
    key = headers.get("sec-websocket-key", "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid = False
    if not valid:
        raise BadHttpRequest(400, "missing or invalid Sec-WebSocket-Key")
    token = base64.b64encode(hashlib.sha1(key.encode() + _ACCEPT_GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + token + b"\r\n\r\n"
    )


# --- what the client sends --------------------------------------------------


class WebSocketReader:
    """The frames a WebSocket client sends, as JSON lines.

    Each text message becomes one line: its UTF-8 bytes, each ``\\n`` in it
    made ``\\r`` (both are JSON whitespace outside strings and invalid
    inside them, so a message is valid JSON exactly when its line is), then
    ``\\n`` once the message is complete. Fragments are passed on as they
    come: a message is never held whole here, and the line reader's length
    limit applies to it as to a TCP line.

    What browsers send is almost always a whole, final, masked text frame of
    up to 64 KiB: such a frame is read here directly (its header parsed in
    place, its payload unmasked by one big-integer XOR, its UTF-8 checked by
    ``isascii`` or a decode). Every other frame (control frames, fragments,
    larger or incomplete frames, anything RFC 6455 forbids) goes to wsproto,
    which then reads exactly that frame: this reader finds where each frame
    ends, so wsproto is always at a frame boundary when a frame it does not
    see comes.

    After :meth:`receive_data`, :attr:`pong` is the pong to send, if a ping
    came (one for the last ping of a read, as RFC 6455 allows), and
    :attr:`close_code` is set once the connection must close: the client
    sent a close frame (the code to echo) or broke the protocol (an
    unmasked frame: 1002, invalid UTF-8: 1007, a binary message: 1003, too
    many frames in one read: 1008). Nothing is read after that.
    """

    __slots__ = (
        "_head",
        "_in_message",
        "_to_wsproto",
        "_ws",
        "close_code",
        "close_reason",
        "heard",
        "pong",
    )

    def __init__(self) -> None:
        # wsproto's connection, made for the first frame it must read (most
        # connections never send one: an idle one then costs less).
        self._ws: Connection | None = None
        self._head = b""  # the start of a frame header, not complete yet
        self._to_wsproto = 0  # bytes of the current frame still for wsproto
        self._in_message = False  # a fragmented message is under way
        self.pong: bytes | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.heard = False
        """Set by every read (the keepalive clears it)."""

    def receive_data(self, data: bytes | bytearray) -> bytes:
        """Read ``data`` (``b""``: the client closed); returns the line
        bytes it completes or continues (possibly ``b""``)."""
        self.pong = None
        if self.close_code is not None:
            return b""
        self.heard = True
        if not data:
            self._close(1006, "closed without a close frame")
            return b""
        buf = self._head + data if self._head else bytes(data)
        self._head = b""
        size = len(buf)
        out = bytearray()
        position = frames = 0
        while position < size and self.close_code is None:
            if self._to_wsproto:
                take = min(self._to_wsproto, size - position)
                self._to_wsproto -= take
                self._wsproto(buf[position : position + take], out)
                position += take
                continue
            first = buf[position]
            length = buf[position + 1] & 0x7F if position + 1 < size else 0
            head = 2 + (2 if length == 126 else 8 if length == 127 else 0) + 4
            if position + head > size:
                self._head = buf[position:]  # at most 13 bytes
                break
            frames += 1
            if frames > _MAX_FRAMES_PER_READ:
                self._close(CloseCode.POLICY_VIOLATION, "too many frames at once")
                break
            if length == 126:
                length = (buf[position + 2] << 8) | buf[position + 3]
                minimal = length > 125
            elif length == 127:
                length = int.from_bytes(buf[position + 2 : position + 10])
                minimal = False  # never read here (wsproto checks it)
            else:
                minimal = True
            end = position + head + length
            if (
                first == 0x81  # final text frame, no extension bits
                and buf[position + 1] & 0x80  # masked
                and minimal
                and end <= size
                and not self._in_message
            ):
                start = position + head
                payload = _unmask(buf[start - 4 : start], buf[start:end])
                if not payload.isascii():
                    try:
                        payload.decode()
                    except UnicodeDecodeError:
                        self._close(
                            CloseCode.INVALID_DATA, "invalid UTF-8 in a text frame"
                        )
                        break
                if b"\n" in payload:
                    payload = payload.replace(b"\n", b"\r")
                out += payload
                out += b"\n"
                position = end
                continue
            # wsproto reads this frame. An unmasked one (whose header is
            # shorter) it refuses from its header: it gets the rest.
            opcode = first & 0x0F
            if opcode in (0x0, 0x1, 0x2):
                self._in_message = not first & 0x80
            masked = buf[position + 1] & 0x80
            self._to_wsproto = end - position if masked else size - position
        return bytes(out)

    def _wsproto(self, data: bytes, out: bytearray) -> None:
        """Give wsproto bytes of the frame it reads; act on what it makes."""
        ws = self._ws
        if ws is None:
            ws = self._ws = Connection(ConnectionType.SERVER)
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage):
                out += event.data.encode().replace(b"\n", b"\r")
                if event.message_finished:
                    out += b"\n"
            elif isinstance(event, Ping):
                self.pong = frame(bytes(event.payload), _PONG)
            elif isinstance(event, CloseConnection):
                code = event.code
                self._close(
                    CloseCode.NORMAL if code == CloseCode.NO_STATUS else code,
                    event.reason or "",
                )
                return
            elif isinstance(event, BytesMessage):
                self._close(CloseCode.UNSUPPORTED_DATA, "binary frames are not used")
                return
            # A pong (to the keepalive's ping) needs nothing.

    def closed(self) -> bool:
        """Whether the connection must close (:attr:`close_code` is set)."""
        return self.close_code is not None

    def _close(self, code: int, reason: str) -> None:
        self.close_code = code
        self.close_reason = reason
        self.pong = None
