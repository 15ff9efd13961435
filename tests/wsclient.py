"""A raw WebSocket client for the tests: frames built by hand (masked or
not, fragmented, any opcode), so that tests can send what browsers never
would; and server frames parsed by hand, so that tests see exactly what the
server sent."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import struct
from dataclasses import dataclass
from typing import Any

import trio

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def client_frame(
    payload: bytes,
    opcode: int = TEXT,
    *,
    fin: bool = True,
    masked: bool = True,
    key: bytes | None = None,
) -> bytes:
    """One client frame (masked, as RFC 6455 requires, unless not; with a
    random key unless ``key``)."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, mask_bit | size)
    elif size < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return head + payload
    key = os.urandom(4) if key is None else key
    # XOR with the key repeated, as one big-integer operation.
    repeated = (key * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        size, "big"
    )
    return head + key + body


@dataclass
class Frame:
    """One frame the server sent."""

    opcode: int
    payload: bytes
    fin: bool
    masked: bool

    def json(self) -> Any:
        """The payload of a text frame, as JSON."""
        assert self.opcode == TEXT, self
        return json.loads(self.payload)

    @property
    def close_code(self) -> int | None:
        """A close frame's code."""
        assert self.opcode == CLOSE, self
        return struct.unpack("!H", self.payload[:2])[0] if self.payload else None


def upgrade_request(
    path: str = "/ws", *, host: str = "127.0.0.1", origin: str | None = None
) -> tuple[bytes, bytes]:
    """The upgrade request, and the Sec-WebSocket-Accept it must get."""
    key = base64.b64encode(os.urandom(16))
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), accept


TIMEOUT = 5.0


class WsClient:
    """A WebSocket over a trio stream, frame by frame (every wait bounded)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        origin: str | None = None,
        host: str | None = None,
        path: str = "/ws",
        tls: ssl.SSLContext | None = None,
    ) -> WsClient:
        """Connect to ``port`` on 127.0.0.1 and upgrade (asserting 101 and
        the accept token)."""
        client = await cls.connect(port, tls=tls)
        request, accept = upgrade_request(
            path, origin=origin, host=host or f"127.0.0.1:{port}"
        )
        await client.send_raw(request)
        status, headers = await client.read_head()
        assert status == 101, (status, headers, bytes(client.buffer))
        assert headers["sec-websocket-accept"] == accept.decode()
        return client

    @classmethod
    async def connect(cls, port: int, *, tls: ssl.SSLContext | None = None) -> WsClient:
        """A TCP (or TLS) connection to ``port``, not upgraded yet."""
        with trio.fail_after(TIMEOUT):
            if tls is None:
                return cls(await trio.open_tcp_stream("127.0.0.1", port))
            return cls(
                await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=tls)
            )

    async def read_head(self) -> tuple[int, dict[str, str]]:
        """An HTTP response's status and headers (the body stays buffered)."""
        with trio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in self.buffer:
                data = await self.stream.receive_some()
                assert data, f"closed before the response head: {bytes(self.buffer)!r}"
                self.buffer += data
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def read_to_end(self) -> bytes:
        """Everything until the server closes (an HTTP response's body)."""
        with trio.fail_after(TIMEOUT):
            while data := await self.stream.receive_some():
                self.buffer += data
        rest, self.buffer = bytes(self.buffer), bytearray()
        return rest

    async def send_json(self, **fields: Any) -> None:
        """One JSON object in one masked text frame."""
        await self.send_raw(client_frame(json.dumps(fields).encode()))

    async def send_raw(self, data: bytes) -> None:
        """Bytes as they are."""
        with trio.fail_after(TIMEOUT):
            await self.stream.send_all(data)

    async def _fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return False
            self.buffer += data
        return True

    async def frame(self, within: float = TIMEOUT) -> Frame | None:
        """The next frame the server sent; None at end of stream."""
        with trio.fail_after(within):
            if not await self._fill(2):
                assert not self.buffer, f"closed inside a frame: {self.buffer!r}"
                return None
            first, second = self.buffer[0], self.buffer[1]
            size = second & 0x7F
            offset = 2
            if size == 126:
                assert await self._fill(4)
                size = struct.unpack_from("!H", self.buffer, 2)[0]
                offset = 4
            elif size == 127:
                assert await self._fill(10)
                size = struct.unpack_from("!Q", self.buffer, 2)[0]
                offset = 10
            masked = bool(second & 0x80)
            if masked:
                offset += 4
            assert await self._fill(offset + size), "closed inside a frame"
        payload = bytes(self.buffer[offset : offset + size])
        del self.buffer[: offset + size]
        return Frame(first & 0x0F, payload, bool(first & 0x80), masked)

    async def receive_json(self, within: float = TIMEOUT) -> dict[str, Any]:
        """The next text frame's JSON (pings skipped)."""
        while True:
            frame = await self.frame(within)
            assert frame is not None, "closed"
            if frame.opcode != PING:
                result: dict[str, Any] = frame.json()
                return result

    async def expect(self, type: str, **fields: Any) -> dict[str, Any]:
        """Read events until one of ``type`` whose ``fields`` match."""
        skipped = []
        try:
            with trio.fail_after(TIMEOUT):
                while True:
                    event = await self.receive_json()
                    if event["type"] == type and all(
                        event.get(k) == v for k, v in fields.items()
                    ):
                        return event
                    skipped.append(event)
        except trio.TooSlowError:
            raise AssertionError(f"no {type} with {fields}; got {skipped}") from None

    async def hello(self, name: str, **fields: Any) -> dict[str, Any]:
        """Log in as ``name``; the welcome."""
        await self.send_json(type="hello", name=name, protocol=1, **fields)
        return await self.expect("welcome", name=name)

    async def frames_to_end(self) -> list[Frame]:
        """Every frame until the server closes the connection."""
        frames = []
        while (frame := await self.frame()) is not None:
            frames.append(frame)
        return frames

    async def aclose(self) -> None:
        """Close the connection."""
        await self.stream.aclose()
