"""WebSocket (RFC 6455) framing for the load generator's clients, sans I/O.

The client's half of the opening handshake (the request, and the checks of
the ``101`` answer and of ``Sec-WebSocket-Accept``), masked client frames,
and the parsing of server frames in two ways:

- :func:`walk`: exact, frame by frame (RFC 6455 section 5.2), for whatever
  the server sends: control frames, fragments, any payload.
- :func:`fast_end`: a whole buffer of server frames at C speed, with a
  constant amount of Python per buffer rather than per frame, for the
  traffic of a fan-out benchmark. Walking every frame in Python would cost
  the load generator ~3x the JSON-lines client's CPU per delivery (which is
  one ``count`` over the buffer) and make it the bottleneck on a 2-core
  machine; with :func:`fast_end`, a WebSocket client costs about what a
  JSON-lines client does.

:func:`fast_end` relies on what protocol v1 puts in a text frame: one JSON
object (every name and text of the benchmark is ASCII), optionally followed
by ``\\n``. Its payload bytes are then printable ASCII, so every byte
``>= 0x80`` of the stream is a frame's first byte or a length byte, and
every boundary between two text frames is ``}\\x81`` or ``}\\n\\x81``. A
buffer qualifies when it starts with an unfragmented text frame (``0x81``),
holds no first byte of another kind of frame (a memchr for each, then, if
one is there, maybe as a length byte, a search for a ``}`` ending a payload
before anything but ``0x81``), and the last frame's header, parsed exactly,
ends at the buffer's end or runs past it. Anything else goes to
:func:`walk`. (A frame of 8 MB or more could have length bytes that spell
``}\\x81`` or ``"~q``: the benchmark has none, and chatkit's are far below
that.)
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

try:  # the C helper of the websockets library (benchmarks need it anyway)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - pure Python fallback

    def apply_mask(data: bytes, mask: bytes) -> bytes:
        n = len(data)
        repeated = (mask * (n // 4 + 1))[:n]
        value = int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")
        return value.to_bytes(n, "big")


class ProtocolError(Exception):
    """The server broke RFC 6455 (or the handshake failed)."""


# --- the opening handshake ----------------------------------------------------


def accept_for(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key``."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def handshake_request(host: str, port: int, path: str = "/ws") -> tuple[bytes, bytes]:
    """The opening handshake's request and the accept value it expects.

    No ``Origin`` (a non-browser client), no extensions offered (so no
    permessage-deflate), no subprotocol.
    """
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
    return request, accept_for(key)


def check_response(head: bytes, accept: bytes) -> None:
    """Check the server's answer (status line and headers, without the
    blank line): ``101``, ``Upgrade: websocket``, ``Connection: Upgrade``,
    the right ``Sec-WebSocket-Accept``, and no extension (none was offered).
    """
    status, *lines = head.split(b"\r\n")
    parts = status.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.1") or parts[1] != b"101":
        raise ProtocolError(f"handshake refused: {status.decode(errors='replace')}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ProtocolError(f"bad header line {line!r}")
        headers.setdefault(name.strip().lower(), []).append(value.strip())

    def tokens(name: bytes) -> set[bytes]:
        return {t.strip().lower() for v in headers.get(name, []) for t in v.split(b",")}

    if b"websocket" not in tokens(b"upgrade"):
        raise ProtocolError("handshake: no Upgrade: websocket")
    if b"upgrade" not in tokens(b"connection"):
        raise ProtocolError("handshake: no Connection: Upgrade")
    if headers.get(b"sec-websocket-accept") != [accept]:
        raise ProtocolError("handshake: wrong Sec-WebSocket-Accept")
    if b"sec-websocket-extensions" in headers:
        raise ProtocolError("handshake: an extension nobody offered")


# --- client frames ----------------------------------------------------------


def client_frame(payload: bytes, key: bytes, opcode: int = OP_TEXT) -> bytes:
    """One masked, unfragmented client frame; ``key``: 4 random bytes."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return head + key + apply_mask(payload, key)


def client_frames(payloads: list[bytes]) -> bytes:
    """Masked text frames, each with a fresh key (one ``os.urandom`` for
    them all: RFC 6455 wants unpredictable keys, and a system call per
    frame would weigh on the senders)."""
    keys = os.urandom(4 * len(payloads))
    return b"".join(
        client_frame(p, keys[4 * i : 4 * i + 4]) for i, p in enumerate(payloads)
    )


# --- server frames ----------------------------------------------------------

#: The first bytes of the frames that are not unfragmented text frames: a
#: fragment's (0x01, 0x02; its continuations, 0x00 and 0x80, follow one),
#: binary, close, ping, pong. A buffer without any of them is all text
#: frames; one with some (maybe as length bytes) is searched for them.
_OTHER_FIRST_BYTES = (b"\x89", b"\x88", b"\x8a", b"\x80", b"\x82", b"\x01", b"\x02")
#: A ``}`` ending a payload before anything but a text frame's first byte.
_SUSPECT = re.compile(rb"\}\n?[^\x81\x20-\x7e\n]")


def fast_end(buf: bytes | bytearray) -> int:
    """Where the complete frames of ``buf`` end, all of them unfragmented
    text frames of JSON (see the module's doc); -1 when the buffer does not
    qualify (then use :func:`walk`). ``buf`` starts at a frame boundary,
    not inside a fragmented message."""
    n = len(buf)
    if n < 2 or buf[0] != 0x81:
        return -1
    # A read that is one whole text frame (in the latency phase, nearly
    # every read): its header says so, no scan needed.
    length = buf[1]
    if length < 126:
        if n == 2 + length:
            return n
    elif length == 126 and n >= 4 and n == 4 + (buf[2] << 8 | buf[3]):
        return n
    # Seven memchr scans, then the exact search only if one found something
    # (a length byte, mostly): together a fraction of the marker count.
    for byte in _OTHER_FIRST_BYTES:
        if byte in buf:
            if _SUSPECT.search(buf) is not None:
                return -1
            break
    # The last frame's start: the last 0x81 after "}" or "}\n".
    start = buf.rfind(b"\x81")
    while start > 0:
        before = buf[start - 1]
        if before == 0x7D or (before == 0x0A and start >= 2 and buf[start - 2] == 0x7D):
            break
        start = buf.rfind(b"\x81", 0, start)
    if start >= 3 and buf[start - 2] == 0x7E and buf[start - 3] == 0x81:
        # Not a boundary: the length bytes of a 32,129-byte frame (0x7D81)
        # after its 0x81, 0x7E (a JSON payload never ends with "~}").
        start -= 3
    start = max(start, 0)
    if start + 2 > n:
        return start
    length = buf[start + 1]
    if length < 126:
        end = start + 2 + length
    elif length == 126:
        if start + 4 > n:
            return start
        end = start + 4 + (buf[start + 2] << 8 | buf[start + 3])
    elif length == 127:
        if start + 10 > n:
            return start
        end = start + 10 + int.from_bytes(buf[start + 2 : start + 10], "big")
    else:  # masked: not from a server
        return -1
    if end == n:
        return n
    if end > n:
        return start
    return -1  # the last "frame" ends early: not this traffic


def walk(buf: bytes | bytearray) -> tuple[int, list[tuple[int, bool, bytes]]]:
    """Parse ``buf``'s complete frames exactly: where they end, and each as
    (opcode, fin, payload). Raises :class:`ProtocolError` on a masked frame,
    a reserved bit or opcode, or a bad control frame."""
    frames: list[tuple[int, bool, bytes]] = []
    pos = 0
    n = len(buf)
    while n - pos >= 2:
        first, second = buf[pos], buf[pos + 1]
        if second & 0x80:
            raise ProtocolError("a masked server frame")
        if first & 0x70:
            raise ProtocolError("a reserved bit set (no extension was agreed)")
        opcode = first & 0x0F
        fin = bool(first & 0x80)
        length = second & 0x7F
        head = 2
        if length == 126:
            head = 4
            if n - pos < head:
                break
            length = buf[pos + 2] << 8 | buf[pos + 3]
        elif length == 127:
            head = 10
            if n - pos < head:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
        if opcode >= 8:
            if not fin or length > 125 or opcode > OP_PONG:
                raise ProtocolError(f"bad control frame (opcode {opcode})")
        elif opcode > OP_BINARY:
            raise ProtocolError(f"reserved opcode {opcode}")
        end = pos + head + length
        if end > n:
            break
        frames.append((opcode, fin, bytes(buf[pos + head : end])))
        pos = end
    return pos, frames
