"""The fan-out benchmark's WebSocket framing (benchmarks/wsframes.py).

The load generator counts deliveries over whole buffers of server frames
with :func:`wsframes.fast_end` and walks them one by one only when a buffer
holds something other than text frames of JSON. These tests hold the fast
path to the exact walk on random streams split at random points: the same
boundaries, every marker counted once, no control frame skipped.
"""

from __future__ import annotations

import importlib.util
import random
import struct
from pathlib import Path

import pytest

# Loaded from its file: benchmarks/ is not a package, and its directory on
# sys.path would put fanout, loadgen, cluster... in every test's way.
_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "wsframes.py"
_SPEC = importlib.util.spec_from_file_location("bench_wsframes", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
wsframes = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(wsframes)

MARK = b'"~q'


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, n))
    elif n < 65536:
        head = struct.pack("!BBH", first, 126, n)
    else:
        head = struct.pack("!BBQ", first, 127, n)
    return head + payload


def json_payload(rng: random.Random, newline: float) -> bytes:
    kind = rng.random()
    if kind < 0.6:
        text = b"~q%d.%d.%d." % (rng.randrange(10), rng.randrange(10**4), 10**12)
        text += b"x" * rng.choice([0, 10, 64, 200, 300])
        body = b'{"type":"message","id":%d,"from":"c%d","text":"%s"}' % (
            rng.randrange(10**6),
            rng.randrange(1000),
            text,
        )
    elif kind < 0.75:
        body = b'{"type":"joined","room":"lobby","name":"c%d"}' % rng.randrange(99)
    elif kind < 0.85:  # not ASCII, and braces in the text
        text = rng.choice(["é}", "}\u0101", "日本", "x" * rng.randrange(40000)])
        body = ('{"type":"message","text":"' + text + '~q"}').encode()
    elif kind < 0.9:  # lengths whose bytes spell "}\x81" or "\n\x81"
        size = rng.choice([2689 - 28, 32129 - 28, 32129 - 29, 70000])
        body = b'{"type":"message","text":"' + b"y" * size + b'"}'
    else:
        body = b"{}"
    if rng.random() < newline:
        body += b"\n"
    return body


def random_stream(rng: random.Random) -> tuple[bytes, int, list[tuple[int, bytes]]]:
    """Frames as a server may send them; the markers and control frames."""
    newline = rng.choice([0, 0.3, 1])
    frames, marks, controls = [], 0, []
    for _ in range(rng.randrange(1, 60)):
        kind = rng.random()
        if kind < 0.85:
            payload = json_payload(rng, newline)
            frames.append(server_frame(wsframes.OP_TEXT, payload))
            marks += payload.count(MARK)
        elif kind < 0.93:
            opcode = rng.choice([wsframes.OP_PING, wsframes.OP_PONG])
            payload = rng.randbytes(rng.randrange(126))
            if rng.random() < 0.3:
                payload = b"}\x81" + payload[:100]
            frames.append(server_frame(opcode, payload))
            controls.append((opcode, payload))
        else:
            payload = json_payload(rng, newline)
            cut = rng.randrange(len(payload) + 1)
            frames.append(server_frame(wsframes.OP_TEXT, payload[:cut], fin=False))
            frames.append(server_frame(wsframes.OP_CONTINUATION, payload[cut:]))
            marks += payload.count(MARK)
    return b"".join(frames), marks, controls


def consume(data: bytes, rng: random.Random) -> tuple[int, list[tuple[int, bytes]]]:
    """What the load generator's client does with ``data`` read in random
    pieces: its markers and control frames."""
    tail = b""
    marks = 0
    controls: list[tuple[int, bytes]] = []
    fragments: list[bytes] | None = None
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 5, 50, 200, 1000, 65536, 262144])
        buf = tail + data[pos : pos + step]
        pos += step
        end = wsframes.fast_end(buf) if fragments is None else -1
        if end >= 0:
            walked, frames = wsframes.walk(buf[:end])
            assert walked == end
            assert all(op == wsframes.OP_TEXT and fin for op, fin, _ in frames)
            marks += buf.count(MARK, 0, end)
            tail = buf[end:]
            continue
        end, frames = wsframes.walk(buf)
        tail = buf[end:]
        for opcode, fin, payload in frames:
            if opcode == wsframes.OP_TEXT:
                fragments = [payload]
            elif opcode == wsframes.OP_CONTINUATION:
                assert fragments is not None
                fragments.append(payload)
            else:
                controls.append((opcode, payload))
                continue
            if fin:
                assert fragments is not None
                marks += b"".join(fragments).count(MARK)
                fragments = None
    assert tail == b""
    return marks, controls


@pytest.mark.parametrize("seed", range(40))
def test_fast_path_agrees_with_the_walk(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        data, marks, controls = random_stream(rng)
        assert consume(data, rng) == (marks, controls)


def test_a_buffer_of_message_frames_takes_the_fast_path() -> None:
    payload = b'{"type":"message","id":1,"text":"~q1.2.3.' + b"x" * 100 + b'"}'
    buf = server_frame(wsframes.OP_TEXT, payload) * 50
    assert wsframes.fast_end(buf) == len(buf)
    assert wsframes.fast_end(buf[:-10]) == len(buf) - len(buf) // 50
    assert wsframes.fast_end(buf + server_frame(wsframes.OP_PING, b"")) == -1


def test_the_handshake_and_a_client_frame_as_in_rfc_6455() -> None:
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    accept = wsframes.accept_for(key)
    assert accept == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
    )
    wsframes.check_response(head, accept)
    with pytest.raises(wsframes.ProtocolError, match="refused"):
        wsframes.check_response(b"HTTP/1.1 403 Forbidden\r\nX: y", accept)
    with pytest.raises(wsframes.ProtocolError, match="Accept"):
        wsframes.check_response(head[: -len(accept)] + b"wrong", accept)
    with pytest.raises(wsframes.ProtocolError, match="extension"):
        wsframes.check_response(
            head + b"\r\nSec-WebSocket-Extensions: permessage-deflate", accept
        )
    masked = wsframes.client_frame(b"Hello", bytes.fromhex("37fa213d"))
    assert masked == bytes.fromhex("818537fa213d7f9f4d5158")
