"""Property tests of the sans-IO protocol layer (hypothesis).

Arbitrary bytes, split at arbitrary points: the decoders never raise
anything but RemoteProtocolError (with a documented code), and never lose a
valid line after an invalid one. Streams are built from lines whose outcome
is known, so the decoded sequence is compared exactly, however it is split.
"""

from __future__ import annotations

import itertools
import json
import os
import unicodedata
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatkit.protocol import (
    EOF,
    NEED_DATA,
    Bye,
    ClientConnection,
    DirectMessage,
    Dm,
    ErrorCode,
    ErrorReply,
    Event,
    Hello,
    History,
    HistoryReply,
    Join,
    Joined,
    Leave,
    Left,
    LineFramer,
    Message,
    Nick,
    Ping,
    Pong,
    RemoteProtocolError,
    Renamed,
    RoomInfo,
    Rooms,
    RoomsReply,
    Say,
    ServerConnection,
    Shutdown,
    Status,
    Welcome,
    Who,
    WhoReply,
    encode_json,
    encode_line,
)

MAX = 300  # a small line limit, so overlong lines are cheap to generate
WELCOME = Welcome(name="alice", protocol=1, server="fuzz", rooms=("lobby",))
HELLO = b'{"type":"hello","name":"alice","protocol":1}'
CODES = frozenset(ErrorCode)

FAST = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# An outcome per line: the event decoded, the error code raised, or None
# when the line is skipped (a blank line in line mode).
Outcome = Any

# --- strategies -------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8"), max_size=12)
short = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
refs = st.none() | st.integers(-(2**53), 2**53) | st.text(max_size=6)
ints = st.integers(-(2**53), 2**53)
# Ids and counts in a request: 0 to 2**63 - 1 (MAX_INT).
counts = st.integers(0, 2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)

requests: st.SearchStrategy[Event] = st.one_of(
    st.builds(Say, text=texts, room=short, ref=refs),
    st.builds(Say, text=texts),
    st.builds(Dm, to=short, text=texts, ref=refs),
    st.builds(Join, room=short, ref=refs),
    st.builds(Leave, room=short, ref=refs),
    st.builds(Nick, name=short, ref=refs),
    st.builds(Who, room=short, ref=refs),
    st.builds(Rooms, ref=refs),
    st.builds(
        History,
        room=short,
        limit=st.none() | counts,
        before=st.none() | counts,
        after=st.none() | counts,
        ref=refs,
    ),
    st.builds(Ping, ref=refs),
    st.builds(Bye, ref=refs),
)

messages = st.builds(
    Message, id=ints, ts=floats, room=short, sender=short, text=texts, ref=refs
)
server_events: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        Welcome,
        name=short,
        protocol=st.just(1),
        server=short,
        rooms=st.lists(short, max_size=3).map(tuple),
        ref=refs,
    ),
    messages,
    st.builds(
        DirectMessage, id=ints, ts=floats, sender=short, to=short, text=texts, ref=refs
    ),
    st.builds(Joined, room=short, name=short, ref=refs),
    st.builds(Left, room=short, name=short, reason=st.none() | short, ref=refs),
    st.builds(Renamed, old=short, new=short, ref=refs),
    st.builds(WhoReply, room=short, names=st.lists(short, max_size=3).map(tuple)),
    st.builds(
        RoomsReply,
        rooms=st.lists(
            st.builds(RoomInfo, name=short, members=st.integers(0, 100)), max_size=3
        ).map(tuple),
        ref=refs,
    ),
    st.builds(
        HistoryReply,
        room=short,
        messages=st.lists(messages, max_size=2).map(tuple),
        ref=refs,
    ),
    st.builds(Pong, ref=refs),
    st.builds(ErrorReply, code=st.sampled_from(sorted(CODES)), message=texts, ref=refs),
    st.builds(Shutdown, reason=texts),
)

no_newline = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))

# Lines that are bad requests whatever their details.
BAD_JSON_LINES = [
    b"[]",
    b"null",
    b"42",
    b'"say"',
    b"{}",
    b'{"text":"hi"}',
    b'{"type":"shout"}',
    b'{"type":5}',
    b'{"type":"say"}',
    b'{"type":"say","text":5}',
    b'{"type":"history","room":"r","limit":-1}',
    b'{"type":"history","room":"r","after":-1}',
    b'{"type":"history","room":"r","before":9223372036854775808}',
    b'{"type":"ping","ref":9223372036854775808}',
    b'{"type":"ping","ref":1.5}',
    b'{"type":"say","text":"\xff"}',
    b'{"type":"say","text":"x","y":"\xc3"}',
    b'{"type":"ping","x":' + b"[" * 250,
    b"{",
    b"not json at all",
    b"",
    HELLO,  # hello again
]
bad_json_lines = st.one_of(
    st.sampled_from(BAD_JSON_LINES),
    no_newline.map(lambda b: b"}" + b),  # never valid JSON
    no_newline.map(lambda b: b"\xff" + b),  # never valid UTF-8
    st.builds(
        lambda value: json.dumps(value).encode(),
        st.none() | st.booleans() | st.integers() | st.lists(st.integers()) | texts,
    ),
)
overlong = st.builds(
    lambda first, n, fill: first + fill * n,
    st.sampled_from([b"{", b"x", b"\xff", b" "]),
    st.integers(MAX + 1, MAX + 200),
    st.sampled_from([b"a", b"[", b"\x00", b"\r"]),
)


def fits(line: bytes) -> bool:
    """Within the limit: the \\r of a \\r\\n does not count."""
    return len(line.removesuffix(b"\r")) <= MAX


def json_item(request: Event, crlf: bool) -> tuple[bytes, Outcome]:
    line = encode_json(request)[:-1] + (b"\r" if crlf else b"")
    return line, (request if fits(line) else ErrorCode.TOO_LARGE)


def bad_item(line: bytes) -> tuple[bytes, Outcome]:
    # A bad line past the length limit is too large before it is bad.
    return line, ErrorCode.BAD_REQUEST if fits(line) else ErrorCode.TOO_LARGE


json_items = st.one_of(
    st.builds(json_item, requests, st.booleans()),
    st.builds(json_item, requests, st.booleans()),
    bad_json_lines.map(bad_item),
    overlong.map(lambda b: (b, ErrorCode.TOO_LARGE)),
)


def line_mode_outcome(text: str) -> Outcome:
    """The protocol's line mode: \\r stripped, blank skipped, exit leaves."""
    text = text.removesuffix("\r")
    if not text.strip():
        return None
    if text.strip() == "exit":
        return Bye()
    return Say(text=text, room="lobby")


line_texts = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=20),
    st.sampled_from(["", " ", "\r", "exit", " exit\r", "exit now", "{", "{}", "hi\r"]),
)


def text_item(text: str) -> tuple[bytes, Outcome]:
    line = text.encode()
    return line, (line_mode_outcome(text) if fits(line) else ErrorCode.TOO_LARGE)


line_items = st.one_of(
    line_texts.map(text_item),
    line_texts.map(text_item),
    no_newline.map(lambda b: bad_item(b + b"\xff")),
    overlong.map(lambda b: (b, ErrorCode.TOO_LARGE)),
)


def event_item(event: Event) -> tuple[bytes, Outcome]:
    line = encode_json(event)[:-1]
    return line, (event if fits(line) else ErrorCode.TOO_LARGE)


client_items = st.one_of(
    st.builds(event_item, server_events),
    st.builds(event_item, server_events),
    bad_json_lines.map(bad_item),
    requests.map(lambda r: (encode_json(r)[:-1], ErrorCode.BAD_REQUEST)).filter(
        # A request is not an event; only dm/who/rooms/history share a tag.
        lambda item: fits(item[0])
    ),
    overlong.map(lambda b: (b, ErrorCode.TOO_LARGE)),
)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` split at arbitrary points into non-empty chunks."""
    if not data:
        return []
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=30))
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if a < b]


# --- harness ----------------------------------------------------------------


def drain(next_event: Callable[[], Any], out: list[Outcome], limit: int) -> Status:
    """Pull events until a Status, recording events and error codes."""
    for _ in range(limit):
        try:
            event = next_event()
        except RemoteProtocolError as exc:
            assert exc.code in CODES
            assert isinstance(exc.message, str)
            out.append(exc.code)
            continue
        if isinstance(event, Status):
            return event
        out.append(event)
    raise AssertionError("next_event() never asked for more data")


def run_server(chunks: list[bytes], *, welcome: bool = True) -> list[Outcome]:
    """Feed ``chunks`` then EOF; the server side welcomes every hello."""
    conn = ServerConnection(max_line_length=MAX)
    out: list[Outcome] = []
    limit = sum(map(len, chunks)) + 10

    def next_event() -> Any:
        event = conn.next_event()
        if welcome and isinstance(event, Hello) and not conn.ready:
            data = conn.send(WELCOME)
            assert data in (b"", encode_json(WELCOME))
        return event

    for chunk in chunks:
        conn.receive_data(chunk)
        assert drain(next_event, out, limit) is NEED_DATA
    conn.receive_data(b"")
    assert drain(next_event, out, limit) is EOF
    assert conn.next_event() is EOF
    return out


def run_client(chunks: list[bytes]) -> list[Outcome]:
    conn = ClientConnection(max_line_length=MAX)
    out: list[Outcome] = []
    limit = sum(map(len, chunks)) + 10
    for chunk in chunks:
        conn.receive_data(chunk)
        assert drain(conn.next_event, out, limit) is NEED_DATA
    conn.receive_data(b"")
    assert drain(conn.next_event, out, limit) is EOF
    return out


def stream(items: list[tuple[bytes, Outcome]], first: bytes) -> bytes:
    return b"".join(line + b"\n" for line in [first, *(line for line, _ in items)])


# --- arbitrary bytes ------------------------------------------------------------

FRAGMENTS = [
    b"\n",
    b"\r\n",
    b"{",
    b"}",
    b'"',
    b"\xff",
    b"\xc3",
    b"exit",
    HELLO,
    b'{"type":"say","text":"hi"}',
    b'{"type":"ping","ref":',
    b'{"type":"hello","name":"bob","protocol":2}',
    b"[" * 100,
    b"x" * (MAX + 1),
]
noise = st.lists(
    st.one_of(st.binary(max_size=30), st.sampled_from(FRAGMENTS)), max_size=25
).map(b"".join)


@FAST
@given(st.data(), noise, st.booleans())
def test_server_decoder_only_raises_remote_protocol_errors(
    data: st.DataObject, raw: bytes, welcome: bool
) -> None:
    chunks = data.draw(chunked(raw))
    out = run_server(chunks, welcome=welcome)
    assert len(out) <= raw.count(b"\n") + 1
    for outcome in out:
        assert outcome in CODES or isinstance(outcome, Event)


@FAST
@given(st.data(), noise)
def test_client_decoder_only_raises_remote_protocol_errors(
    data: st.DataObject, raw: bytes
) -> None:
    out = run_client(data.draw(chunked(raw)))
    assert len(out) <= raw.count(b"\n") + 1
    for outcome in out:
        assert outcome in CODES or isinstance(outcome, Event)


@FAST
@given(st.data(), noise)
def test_framer_returns_every_line_of_arbitrary_bytes(
    data: st.DataObject, raw: bytes
) -> None:
    framer = LineFramer(max_line_length=MAX)
    got: list[Outcome] = []
    for chunk in data.draw(chunked(raw)):
        framer.receive_data(chunk)
        assert drain(framer.next_line, got, len(raw) + 10) is NEED_DATA
        assert framer.buffered <= MAX + 1 + len(chunk)
    framer.receive_data(b"")
    assert drain(framer.next_line, got, len(raw) + 10) is EOF
    # Every complete line, or one too_large for it; the incomplete tail
    # after the last newline is dropped (reported once if already too long).
    *complete, tail = raw.split(b"\n")
    expected = [line if fits(line) else ErrorCode.TOO_LARGE for line in complete]
    if len(tail) > MAX + 1:  # (one more byte could be a \r)
        expected.append(ErrorCode.TOO_LARGE)
    assert got == expected


# --- no valid line lost, however the bytes are split ------------------------------


@FAST
@given(st.data(), st.lists(json_items, max_size=12))
def test_json_mode_keeps_every_valid_line(
    data: st.DataObject, items: list[tuple[bytes, Outcome]]
) -> None:
    raw = stream(items, HELLO)
    out = run_server(data.draw(chunked(raw)))
    assert out == [Hello(name="alice", protocol=1), *(o for _, o in items)]


@FAST
@given(st.data(), st.lists(line_items, max_size=12))
def test_line_mode_keeps_every_valid_line(
    data: st.DataObject, items: list[tuple[bytes, Outcome]]
) -> None:
    raw = stream(items, b"alice")
    out = run_server(data.draw(chunked(raw)))
    expected = [o for _, o in items if o is not None]
    assert out == [Hello(name="alice"), *expected]


@FAST
@given(st.data(), st.lists(client_items, max_size=12))
def test_client_keeps_every_valid_line(
    data: st.DataObject, items: list[tuple[bytes, Outcome]]
) -> None:
    raw = b"".join(line + b"\n" for line, _ in items)
    assert run_client(data.draw(chunked(raw))) == [o for _, o in items]


@FAST
@given(st.data(), st.lists(json_items, max_size=8))
def test_json_mode_before_welcome_is_not_ready(
    data: st.DataObject, items: list[tuple[bytes, Outcome]]
) -> None:
    # Without a welcome every valid request is refused, but still seen.
    items = [item for item in items if item[0] != HELLO]
    raw = stream(items, HELLO)
    out = run_server(data.draw(chunked(raw)), welcome=False)
    expected = [ErrorCode.NOT_READY if isinstance(o, Event) else o for _, o in items]
    assert out == [Hello(name="alice", protocol=1), *expected]


# --- round trips and line-mode rendering --------------------------------------------


@FAST
@given(requests)
def test_every_request_round_trips(request: Event) -> None:
    server = ServerConnection()
    server.receive_data(HELLO + b"\n")
    server.next_event()
    server.send(WELCOME)
    server.receive_data(ClientConnection().send(request))  # type: ignore[arg-type]
    assert server.next_event() == request
    assert server.next_event() is NEED_DATA


@FAST
@given(server_events)
def test_every_server_event_round_trips(event: Event) -> None:
    client = ClientConnection()
    client.receive_data(ServerConnection().send(event))  # type: ignore[arg-type]
    assert client.next_event() == event
    assert client.next_event() is NEED_DATA


@FAST
@given(st.text(st.characters(codec="utf-8")))
def test_line_mode_text_is_always_one_line(text: str) -> None:
    message = Message(id=1, ts=0.0, room="lobby", sender="bob", text=text)
    data = encode_line(message)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    shown = data.decode()
    assert len(shown.splitlines()) == 1
    body = shown.removeprefix("bob: ").removesuffix("\n")
    # Same length: each control character became one space, the rest kept.
    assert len(body) == len(text)
    for original, rendered in zip(text, body, strict=True):
        control = unicodedata.category(original) == "Cc" and original != "\t"
        if control or original in "\u2028\u2029":
            assert rendered == " "
        else:
            assert rendered == original
