"""The web port's WebSocket, at the protocol level (no browser): the
handshake, the frames RFC 6455 lets a client send (fragmented, masked,
control frames in between) and the ones it forbids, the close handshake,
keepalive, Origin, TLS; and that WebSocket users share the server with TCP
users. tests/test_browser.py drives the same port from a real browser."""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatkit
import chatkit.auth
from chatkit.websocket import WEBSOCKET, WebSocketReader, encode_websocket
from tests.conftest import OpenRaw, login
from tests.programs import start_server
from tests.wsclient import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    WsClient,
    client_frame,
    upgrade_request,
)


@pytest.fixture
async def web(request: pytest.FixtureRequest) -> AsyncIterator[chatkit.ChatServer]:
    """A server with a web port; ``@pytest.mark.web_server(**kwargs)`` adds
    arguments."""
    marker = request.node.get_closest_marker("web_server")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    async with chatkit.open_server(web_port=0, **kwargs) as server:
        yield server


@pytest.fixture
async def opened() -> AsyncIterator[list[WsClient]]:
    """Clients a test opens, closed at teardown."""
    clients: list[WsClient] = []
    yield clients
    for client in clients:
        await client.aclose()


@pytest.fixture
def open_ws(web: chatkit.ChatServer, opened: list[WsClient]) -> Any:
    """``await open_ws(**kwargs)``: a WsClient on ``web``'s web port."""

    async def open_(**kwargs: Any) -> WsClient:
        assert web.web_port is not None
        client = await WsClient.open(web.web_port, **kwargs)
        opened.append(client)
        return client

    return open_


@pytest.fixture
def connect(web: chatkit.ChatServer, opened: list[WsClient]) -> Any:
    """``await connect()``: a TCP connection to the web port, not upgraded."""

    async def connect_() -> WsClient:
        assert web.web_port is not None
        client = await WsClient.connect(web.web_port)
        opened.append(client)
        return client

    return connect_


def say(text: str, **fields: Any) -> bytes:
    """A ``say`` as a JSON payload."""
    import json

    return json.dumps(
        {"type": "say", "text": text, **fields}, ensure_ascii=False
    ).encode()


# --- sans-IO ---------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_a_server_frame_is_unmasked_with_the_shortest_length(size: int) -> None:
    event = chatkit.protocol.ErrorReply(code="x", message="y" * size)
    data = encode_websocket(event)
    payload = data[data.index(b"{") :]
    assert data[0] == 0x81  # FIN, text
    assert not data[1] & 0x80  # not masked
    length = data[1] & 0x7F
    if len(payload) < 126:
        assert length == len(payload)
    elif len(payload) < 65536:
        assert (length, struct.unpack("!H", data[2:4])[0]) == (126, len(payload))
    else:
        assert (length, struct.unpack("!Q", data[2:10])[0]) == (127, len(payload))


@given(st.lists(st.text(), min_size=1, max_size=5))
def test_framing_json_lines_is_framing_each_event(texts: list[str]) -> None:
    # The fan-out frames the JSON lines it made once for JSON-mode members
    # instead of encoding the events again: the same bytes.
    events = [
        chatkit.Message(id=i, ts=1.5, room="lobby", sender="a", text=text)
        for i, text in enumerate(texts)
    ]
    lines = b"".join(map(chatkit.protocol.encode_json, events))
    framed = b"".join(map(encode_websocket, events))
    assert WEBSOCKET.from_json is not None
    assert WEBSOCKET.from_json(lines) == framed


def test_frame_end_finds_each_frame_of_a_run() -> None:
    frames = [
        encode_websocket(chatkit.protocol.ErrorReply(code="x", message="y" * size))
        for size in (1, 200, 70000, 3)
    ]
    data = b"".join(frames)
    ends = [sum(map(len, frames[: i + 1])) for i in range(len(frames))]
    start = 0
    for end in ends:
        for position in (start, (start + end) // 2, end - 1):
            assert WEBSOCKET.frame_end(data, position) == end
        start = end


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes, int]:
    """Client frames as a browser (or a stranger client) may send them:
    text messages, some fragmented, some large, pings between fragments;
    the stream cut in random pieces. Returns the pieces, the lines the
    reader must make of them, and how many pings there were."""
    stream = bytearray()
    expected = bytearray()
    pings = 0
    for _ in range(draw(st.integers(1, 8))):
        # Sizes around each header form: 7-bit, 16-bit and 64-bit lengths.
        text = draw(st.text(max_size=40)) * draw(st.sampled_from([1, 1, 1, 300, 2000]))
        payload = text.encode()
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [
            payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)
        ]
        for index, piece in enumerate(pieces):
            if index and draw(st.booleans()):
                stream += client_frame(b"p%d" % pings, PING)
                pings += 1
            opcode = CONTINUATION if index else TEXT
            stream += client_frame(piece, opcode, fin=index == len(pieces) - 1)
        expected += payload.replace(b"\n", b"\r") + b"\n"
    points = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [
        bytes(stream[a:b])
        for a, b in zip([0, *points], [*points, len(stream)], strict=True)
    ]
    return chunks, bytes(expected), pings


@pytest.mark.parametrize("size", [125, 126, 65535, 65536, 200_000])
def test_the_reader_reads_each_length_form_in_pieces(size: int) -> None:
    payload = b"x" * size
    stream = client_frame(payload) + client_frame(b"after")
    reader = WebSocketReader()
    out = b"".join(
        reader.receive_data(stream[i : i + 4096]) for i in range(0, len(stream), 4096)
    )
    assert reader.close_code is None, reader.close_reason
    assert out == payload + b"\nafter\n"


def test_a_frame_with_a_64_bit_length_is_read_to_its_end() -> None:
    # With a zero key the payload is on the wire as it is: "é" is C3 A9, a
    # header to a reader that lost its place (a masked frame of 41 bytes),
    # thousands of them in one read.
    payload = "é".encode() * 100_000
    stream = client_frame(payload, key=bytes(4)) + client_frame(b"after")
    reader = WebSocketReader()
    out = reader.receive_data(stream)
    assert reader.close_code is None, reader.close_reason
    assert out == payload + b"\nafter\n"


# A failing example's repr is megabytes: hypothesis warns about it.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@given(client_streams())
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_the_reader_makes_one_line_per_message_however_the_bytes_come(
    case: tuple[list[bytes], bytes, int],
) -> None:
    chunks, expected, pings = case
    reader = WebSocketReader()
    out = bytearray()
    pongs = 0
    for chunk in chunks:
        if chunk:
            out += reader.receive_data(chunk)
            pongs += reader.pong is not None
    assert reader.close_code is None, reader.close_reason
    assert bytes(out) == expected
    assert (pongs > 0) == (pings > 0)


# --- handshake and HTTP ----------------------------------------------------


async def test_the_handshake_answers_101_with_the_accept_token(
    web: chatkit.ChatServer,
) -> None:
    assert web.web_port is not None and web.web_port != web.port
    ws = await WsClient.open(web.web_port)
    welcome = await ws.hello("alice")
    assert welcome["rooms"] == ["lobby"]
    assert await ws.receive_json() == {
        "type": "joined",
        "room": "lobby",
        "name": "alice",
    }
    await ws.aclose()


@pytest.mark.parametrize(
    ("change", "status"),
    [
        (("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"), 426),
        (("Sec-WebSocket-Key: ", "Sec-WebSocket-Nope: "), 400),
        (("Connection: Upgrade", "Connection: keep-alive"), 400),
        (("GET /ws", "POST /ws"), 405),
        (("GET /ws", "GET /elsewhere"), 404),
    ],
)
async def test_a_bad_upgrade_gets_an_http_error(
    web: chatkit.ChatServer, connect: Any, change: tuple[str, str], status: int
) -> None:
    request, _ = upgrade_request()
    client = await connect()
    await client.send_raw(request.replace(change[0].encode(), change[1].encode()))
    got, headers = await client.read_head()
    assert got == status
    assert headers["connection"] == "close"
    await client.read_to_end()
    assert web.connections == 0


async def test_a_request_head_too_large_gets_431(
    web: chatkit.ChatServer, connect: Any
) -> None:
    client = await connect()
    await client.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000)
    status, _ = await client.read_head()
    assert status == 431


async def test_the_websocket_path_without_upgrade_says_so(
    web: chatkit.ChatServer,
    connect: Any,
) -> None:
    client = await connect()
    await client.send_raw(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, headers = await client.read_head()
    assert (status, headers["upgrade"]) == (426, "websocket")


@pytest.mark.web_server(limits=chatkit.Limits(handshake_timeout=0.3))
async def test_a_silent_http_connection_is_closed_after_the_handshake_timeout(
    web: chatkit.ChatServer,
    connect: Any,
) -> None:
    client = await connect()
    await client.send_raw(b"GET / HTTP/1.1\r\n")  # and nothing more
    with trio.fail_after(3):
        assert await client.read_to_end() == b""


# --- Origin ----------------------------------------------------------------


async def test_the_pages_own_origin_and_no_origin_are_let_in(
    web: chatkit.ChatServer, open_ws: Any
) -> None:
    await open_ws(origin=f"http://127.0.0.1:{web.web_port}")
    # https: the page was served through a proxy that ends TLS.
    await open_ws(origin=f"https://127.0.0.1:{web.web_port}")
    await open_ws(
        origin=f"http://LOCALHOST:{web.web_port}", host=f"localhost:{web.web_port}"
    )
    await open_ws()  # not a browser


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://127.0.0.1:1", "http://127.0.0.2:{port}"],
)
async def test_another_origin_is_refused_with_403(
    web: chatkit.ChatServer, connect: Any, origin: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert web.web_port is not None
    origin = origin.format(port=web.web_port)
    request, _ = upgrade_request(origin=origin, host=f"127.0.0.1:{web.web_port}")
    client = await connect()
    await client.send_raw(request)
    status, _ = await client.read_head()
    assert status == 403
    assert b"origin" in await client.read_to_end()
    assert f"origin {origin} is not allowed" in caplog.text


@pytest.mark.web_server(
    web_origins=["https://chat.example.com", "http://other.test:8080/"]
)
async def test_origins_on_the_allow_list_are_let_in(open_ws: Any) -> None:
    await open_ws(origin="https://chat.example.com")
    await open_ws(origin="https://chat.example.com:443")
    await open_ws(origin="http://other.test:8080")


def test_an_origin_that_is_not_one_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="not an origin"):
        chatkit.ChatServer(web_port=0, web_origins=["example.com"])
    with pytest.raises(ValueError, match="has a path"):
        chatkit.ChatServer(web_port=0, web_origins=["https://example.com/chat"])
    with pytest.raises(ValueError, match="needs a web_port"):
        chatkit.ChatServer(web_origins=["https://example.com"])


# --- frames ----------------------------------------------------------------


async def test_browsers_and_tcp_users_share_a_room(
    web: chatkit.ChatServer, open_ws: Any, open_raw: OpenRaw
) -> None:
    ws = await open_ws()
    await ws.hello("alice")
    bob = await login(open_raw, web.port, "bob")
    await ws.expect("joined", name="bob")
    await ws.send_json(type="say", text="hi bob", ref=1)
    own = await ws.expect("message", text="hi bob")
    assert own["ref"] == 1
    message = await bob.expect("message", text="hi bob")
    assert message["from"] == "alice" and "ref" not in message
    await bob.send_json(type="say", text="hi alice")
    await ws.expect("message", text="hi alice", **{"from": "bob"})
    await bob.send_json(type="dm", to="alice", text="psst")
    await ws.expect("dm", text="psst", to="alice")
    await bob.send_json(type="bye")
    await ws.expect("left", name="bob")
    await ws.send_json(type="bye")
    frames = await ws.frames_to_end()
    assert frames[-1].opcode == CLOSE and frames[-1].close_code == 1000


async def test_a_broadcast_to_idle_browsers_is_one_room_wide_write(
    web: chatkit.ChatServer, open_ws: Any, open_raw: OpenRaw
) -> None:
    sockets = [await open_ws() for _ in range(3)]
    for index, ws in enumerate(sockets):
        await ws.hello(f"user{index}")
    bob = await login(open_raw, web.port, "bob")
    for ws in sockets:
        await ws.expect("joined", name="bob")
    before = web.stats.room_sends
    await bob.send_json(type="say", text="to all")
    for ws in sockets:
        await ws.expect("message", text="to all")
    assert web.stats.room_sends == before + 1


async def test_fragmented_masked_frames_with_a_ping_between_make_one_message(
    open_ws: Any,
) -> None:
    ws = await open_ws()
    await ws.hello("alice")
    await ws.expect("joined", name="alice")
    payload = say("héllo wörld", ref="f")
    # Split inside the two-byte é, with a ping between two fragments.
    cut = payload.index("é".encode()) + 1
    await ws.send_raw(
        client_frame(payload[:cut], TEXT, fin=False)
        + client_frame(payload[cut : cut + 5], CONTINUATION, fin=False)
        + client_frame(b"are you there", PING)
        + client_frame(payload[cut + 5 :], CONTINUATION)
    )
    pong = await ws.frame()
    assert pong is not None and (pong.opcode, pong.payload) == (PONG, b"are you there")
    assert not pong.masked
    message = await ws.expect("message", ref="f")
    assert message["text"] == "héllo wörld"


async def test_a_message_with_newlines_between_its_json_tokens_is_read_whole(
    open_ws: Any,
) -> None:
    ws = await open_ws()
    await ws.hello("alice")
    await ws.send_raw(client_frame(b'{\n  "type": "say",\n  "text": "x", "ref": 7\n}'))
    assert (await ws.expect("message", ref=7))["text"] == "x"
    # A raw newline inside a string is invalid JSON, as it is in a line.
    await ws.send_raw(client_frame(b'{"type": "say", "text": "a\nb", "ref": 8}'))
    error = await ws.expect("error")
    assert error["code"] == "bad_request"


async def test_a_4_mib_frame_is_too_large_and_the_connection_stays_usable(
    web: chatkit.ChatServer, open_ws: Any
) -> None:
    ws = await open_ws()
    await ws.hello("alice")
    big = say("x" * (4 * 1024 * 1024), ref="big")
    await ws.send_raw(client_frame(big))
    error = await ws.expect("error")
    assert error["code"] == "too_large"
    await ws.send_json(type="say", text="still here", ref=2)
    await ws.expect("message", text="still here", ref=2)
    assert web.connections == 1


async def test_an_unmasked_client_frame_closes_with_1002(
    web: chatkit.ChatServer, open_ws: Any, open_raw: OpenRaw
) -> None:
    bob = await login(open_raw, web.port, "bob")
    ws = await open_ws()
    await ws.hello("alice")
    await ws.send_raw(client_frame(say("sneaky"), masked=False))
    frames = await ws.frames_to_end()
    assert [f.opcode for f in frames][-1] == CLOSE
    assert frames[-1].close_code == 1002
    assert not any(f.opcode == TEXT and b"sneaky" in f.payload for f in frames)
    await bob.expect("left", name="alice")
    await bob.send_json(type="say", text="unaffected")
    await bob.expect("message", text="unaffected")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(b'{"type":"say","text":"\xff"}'), 1007),
        (client_frame(b"\x00\x01", BINARY), 1003),
        (client_frame(b"x", CONTINUATION), 1002),
        (client_frame(b"x" * 126, PING), 1002),
        (client_frame(b'{"type":', fin=False) + client_frame(b'"ping"}'), 1002),
        # A 16-bit length of 4: RFC 6455 wants the shortest form.
        (bytes([0x81, 0xFE, 0, 4]) + client_frame(b"abcd")[2:], 1002),
    ],
    ids=[
        "invalid-utf8",
        "binary",
        "stray-continuation",
        "long-ping",
        "text-inside-a-message",
        "long-length-for-a-short-frame",
    ],
)
async def test_frames_rfc_6455_forbids_close_with_its_code(
    open_ws: Any, frame: bytes, code: int
) -> None:
    ws = await open_ws()
    await ws.hello("alice")
    await ws.send_raw(frame)
    frames = await ws.frames_to_end()
    assert frames[-1].opcode == CLOSE and frames[-1].close_code == code


async def test_the_close_handshake_echoes_the_code_and_the_others_see_a_leave(
    web: chatkit.ChatServer, open_ws: Any, open_raw: OpenRaw
) -> None:
    bob = await login(open_raw, web.port, "bob")
    ws = await open_ws()
    await ws.hello("alice")
    await bob.expect("joined", name="alice")
    await ws.send_raw(client_frame(struct.pack("!H", 1001) + b"bye", CLOSE))
    frames = await ws.frames_to_end()
    assert frames[-1].opcode == CLOSE and frames[-1].close_code == 1001
    left = await bob.expect("left", name="alice")
    assert left["reason"] == "disconnect"
    assert web.connections == 1


async def test_a_shutdown_is_said_then_closed_with_a_close_frame(
    web: chatkit.ChatServer, open_ws: Any
) -> None:
    ws = await open_ws()
    await ws.hello("alice")
    await web.aclose("maintenance")
    frames = await ws.frames_to_end()
    texts = [f.json() for f in frames if f.opcode == TEXT]
    assert texts[-1] == {"type": "shutdown", "reason": "maintenance"}
    assert frames[-1].opcode == CLOSE and frames[-1].close_code == 1000


@pytest.mark.web_server(limits=chatkit.Limits(ws_ping_interval=0.2))
async def test_keepalive_pings_and_closes_a_websocket_that_never_answers(
    open_ws: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "chatkit.server")
    alive = await open_ws()
    await alive.hello("alive")
    dead = await open_ws()
    await dead.hello("dead")
    # alive answers every ping; dead reads but never answers.
    with trio.fail_after(5):
        pings = 0
        while pings < 4:
            frame = await alive.frame()
            assert frame is not None
            if frame.opcode == PING:
                pings += 1
                await alive.send_raw(client_frame(frame.payload, PONG))
    frames = await dead.frames_to_end()
    assert PING in [f.opcode for f in frames]
    assert "answered no ping" in caplog.text
    await alive.send_json(type="say", text="still here")
    await alive.expect("message", text="still here")


@pytest.mark.web_server(
    limits=chatkit.Limits(rate_limit=5, rate_burst=3, flood_limit=100)
)
async def test_a_websocket_has_the_rate_limit_of_tcp(open_ws: Any) -> None:
    ws = await open_ws()
    await ws.hello("alice")
    await ws.send_raw(b"".join(client_frame(say(str(i), ref=i)) for i in range(10)))
    error = await ws.expect("error", code="rate_limited")
    assert error["ref"] is not None


@pytest.mark.web_server(
    limits=chatkit.Limits(max_queued_bytes=64 * 1024, rate_limit=None)
)
async def test_a_browser_too_slow_gets_whole_frames_then_too_slow_and_a_close(
    web: chatkit.ChatServer, open_ws: Any, open_raw: OpenRaw
) -> None:
    slow = await open_ws()
    await slow.hello("slow")
    bob = await login(open_raw, web.port, "bob")
    text = "y" * 3000
    # slow reads nothing while bob says more than its buffers hold.
    with trio.fail_after(10):
        for _ in range(200):
            await bob.send_json(type="say", text=text)
            await bob.expect("message", text=text)
            if web.get_user("slow") is None:
                break
    assert web.get_user("slow") is None
    frames = await slow.frames_to_end()  # each one whole, or this fails
    texts = [f.json() for f in frames if f.opcode == TEXT]
    assert texts[-1]["code"] == "too_slow"
    assert frames[-1].opcode == CLOSE


async def test_wss_with_the_servers_certificate(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    async with chatkit.open_server(web_port=0, ssl_context=server_tls) as web:
        assert web.web_port is not None
        ws = await WsClient.open(
            web.web_port, tls=client_tls, origin=f"https://127.0.0.1:{web.web_port}"
        )
        await ws.hello("alice")
        await ws.send_json(type="say", text="secret", ref=1)
        await ws.expect("message", text="secret", ref=1)
        await ws.send_raw(client_frame(struct.pack("!H", 1000), CLOSE))
        frames = await ws.frames_to_end()
        assert frames[-1].close_code == 1000
        await ws.aclose()


async def test_plugins_see_browser_users_like_any_other() -> None:
    seen: list[tuple[str, str]] = []

    class Recorder:
        @chatkit.hookimpl
        def chatkit_user_joined(self, user: chatkit.User, room: str) -> None:
            seen.append((user.name, user.mode))

    async with chatkit.open_server(web_port=0, plugins=[Recorder()]) as web:
        assert web.web_port is not None
        ws = await WsClient.open(web.web_port)
        await ws.hello("alice")
        await ws.expect("joined", name="alice")
        assert seen == [("alice", "json")]
        await ws.aclose()


async def test_the_cli_serves_browsers_on_web_port(
    launch: Any, opened: list[WsClient]
) -> None:
    server, port = await start_server(launch, "--web-port", "0", "--interactive")
    match = await server.expect(r"^Web chat on http://127\.0\.0\.1:(\d+)/$")
    web_port = int(match.group(1))
    assert web_port != port
    ws = await WsClient.open(web_port, origin=f"http://127.0.0.1:{web_port}")
    opened.append(ws)
    await ws.hello("alice")
    await server.expect(r"alice has joined the chat\.")
    await ws.send_json(type="say", text="from a browser", ref=1)
    await ws.expect("message", text="from a browser", ref=1)
    await server.send("\n")  # Enter stops the server: the page is told
    frames = await ws.frames_to_end()
    assert frames[-2].json()["type"] == "shutdown"
    assert frames[-1].close_code == 1000
    assert await server.wait() == 0


async def test_the_cli_refuses_a_bad_web_origin(launch: Any) -> None:
    server = await launch("server", "--web-port", "0", "--web-origin", "example.com")
    assert "is not an origin" in "\n".join(await server.rest())
    assert await server.wait() == 2


async def test_a_browser_logs_in_with_the_token_in_hello(
    opened: list[WsClient],
) -> None:
    plugins = [chatkit.auth.TokenAuth("s3cret")]
    async with chatkit.open_server(web_port=0, plugins=plugins) as web:
        assert web.web_port is not None
        wrong = await WsClient.open(web.web_port)
        opened.append(wrong)
        await wrong.send_json(type="hello", name="eve", protocol=1, token="guess")
        error = await wrong.expect("error")
        assert error["code"] == "unauthorized"
        right = await WsClient.open(web.web_port)
        opened.append(right)
        await right.hello("alice", token="s3cret")
