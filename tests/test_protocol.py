"""The sans-IO protocol layer: bytes in, events out, no sockets, no trio.

In the manner of h11's tests: synchronous, exact bytes and exact events, and
a client and a server connection wired back to back.
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any, NamedTuple

import pytest

import chatkit
from chatkit import (
    BadName,
    BadRequest,
    Banned,
    Forbidden,
    Kicked,
    Muted,
    NameTaken,
    NoSuchUser,
    NotInRoom,
    NotReady,
    RateLimited,
    Rejected,
    Replaced,
    RequestError,
    ServerFull,
    TimedOut,
    TooLarge,
    TooManyRooms,
    TooSlow,
    Unauthorized,
    Unavailable,
)
from chatkit.protocol import (
    BLANK,
    DEFAULT_MAX_LINE_LENGTH,
    EOF,
    NEED_DATA,
    PROTOCOL_VERSION,
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
    LocalProtocolError,
    Message,
    Mode,
    Nick,
    Ping,
    Pong,
    ProtocolError,
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
    is_valid_name,
    is_valid_room,
)

WELCOME = Welcome(
    name="alice", protocol=PROTOCOL_VERSION, server="chatkit", rooms=("lobby",)
)
HELLO_LINE = b'{"type":"hello","name":"alice","protocol":1}\n'


class Err(NamedTuple):
    """A RemoteProtocolError, as recorded by :func:`drain`."""

    code: ErrorCode
    ref: str | int | None = None


def drain(conn: ServerConnection | ClientConnection) -> list[Any]:
    """Every event (or :class:`Err`) available now, then the final Status."""
    out: list[Any] = []
    while True:
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)
            out.append(Err(exc.code, exc.ref))
            continue
        out.append(event)
        if isinstance(event, Status):
            return out


def lines(framer: LineFramer) -> list[bytes | Status | Err]:
    out: list[bytes | Status | Err] = []
    while True:
        try:
            line = framer.next_line()
        except RemoteProtocolError as exc:
            out.append(Err(exc.code, exc.ref))
            continue
        out.append(line)
        if isinstance(line, Status):
            return out


def json_server(**kwargs: Any) -> ServerConnection:
    """A JSON-mode server connection whose handshake is complete."""
    conn = ServerConnection(**kwargs)
    conn.receive_data(HELLO_LINE)
    assert drain(conn) == [Hello(name="alice", protocol=1), NEED_DATA]
    conn.send(WELCOME)
    assert conn.ready
    return conn


def mode_of(conn: ServerConnection) -> Mode:
    # A function call, so mypy does not narrow conn.mode across feed().
    return conn.mode


def line_server() -> ServerConnection:
    """A line-mode server connection whose handshake is complete."""
    conn = ServerConnection()
    conn.receive_data(b"alice\n")
    assert drain(conn) == [Hello(name="alice"), NEED_DATA]
    assert conn.send(WELCOME) == b""
    assert conn.ready
    return conn


def feed(conn: ServerConnection | ClientConnection, data: bytes) -> list[Any]:
    conn.receive_data(data)
    return drain(conn)


# --- LineFramer ---------------------------------------------------------------


def test_framer_splits_lines() -> None:
    framer = LineFramer()
    framer.receive_data(b"one\ntwo\n\nthree")
    assert lines(framer) == [b"one", b"two", b"", NEED_DATA]
    assert framer.buffered == 5
    framer.receive_data(b"\n")
    assert lines(framer) == [b"three", NEED_DATA]
    assert framer.buffered == 0


def test_framer_reassembles_a_line_from_many_chunks() -> None:
    framer = LineFramer()
    for byte in b"hello, world":
        framer.receive_data(bytes([byte]))
        assert framer.next_line() is NEED_DATA
    framer.receive_data(b"\nnext")
    assert lines(framer) == [b"hello, world", NEED_DATA]
    framer.receive_data(b"\n")
    assert lines(framer) == [b"next", NEED_DATA]


def test_framer_frames_on_newline_and_keeps_carriage_return() -> None:
    # \r\n is handled a layer up: JSON ignores it as whitespace, line mode
    # strips it. The framer itself only splits on \n.
    framer = LineFramer()
    framer.receive_data(b"a\r\nb\r")
    assert lines(framer) == [b"a\r", NEED_DATA]
    framer.receive_data(b"\n")
    assert lines(framer) == [b"b\r", NEED_DATA]


def test_framer_accepts_a_line_of_exactly_the_maximum() -> None:
    framer = LineFramer(max_line_length=10)
    framer.receive_data(b"x" * 10)
    assert framer.next_line() is NEED_DATA
    framer.receive_data(b"\n")
    assert lines(framer) == [b"x" * 10, NEED_DATA]


def test_framer_does_not_count_the_cr_of_a_crlf() -> None:
    framer = LineFramer(max_line_length=10)
    framer.receive_data(b"x" * 10 + b"\r")
    assert framer.next_line() is NEED_DATA  # the \r may end the line
    framer.receive_data(b"\n" + b"y" * 10 + b"z\r\n")
    assert lines(framer) == [b"x" * 10 + b"\r", Err(ErrorCode.TOO_LARGE), NEED_DATA]


def test_framer_rejects_a_complete_overlong_line_and_carries_on() -> None:
    framer = LineFramer(max_line_length=10)
    framer.receive_data(b"x" * 11 + b"\nafter\n")
    assert lines(framer) == [Err(ErrorCode.TOO_LARGE), b"after", NEED_DATA]


def test_framer_reports_an_overlong_partial_line_once() -> None:
    framer = LineFramer(max_line_length=10)
    framer.receive_data(b"before\n" + b"y" * 8)
    assert lines(framer) == [b"before", NEED_DATA]
    errors = 0
    for _ in range(100):
        framer.receive_data(b"y" * 7)
        try:
            assert framer.next_line() is NEED_DATA
        except RemoteProtocolError as exc:
            assert exc.code is ErrorCode.TOO_LARGE
            assert exc.message == "line longer than 10 bytes"
            errors += 1
        # Bounded memory: the discarded line is not kept.
        assert framer.buffered <= 10 + 7
    assert errors == 1
    framer.receive_data(b"yyy\nafter\nlast")
    assert lines(framer) == [b"after", NEED_DATA]
    framer.receive_data(b"\n")
    assert lines(framer) == [b"last", NEED_DATA]


def test_framer_overlong_line_ending_in_the_same_chunk_as_it_overflows() -> None:
    framer = LineFramer(max_line_length=4)
    framer.receive_data(b"abcd")
    assert framer.next_line() is NEED_DATA
    framer.receive_data(b"efgh\nok\n")
    assert lines(framer) == [Err(ErrorCode.TOO_LARGE), b"ok", NEED_DATA]


def test_framer_drops_an_incomplete_line_at_eof() -> None:
    framer = LineFramer()
    framer.receive_data(b"complete\nincomplete")
    framer.receive_data(b"")
    assert framer.eof
    assert lines(framer) == [b"complete", EOF]
    assert framer.next_line() is EOF


def test_framer_closed_after_eof() -> None:
    framer = LineFramer()
    assert not framer.eof
    assert framer.next_line() is NEED_DATA
    framer.receive_data(b"")
    assert framer.next_line() is EOF
    # A second EOF is harmless.
    framer.receive_data(b"")
    assert framer.next_line() is EOF


@pytest.mark.parametrize("piece", [1, 1000, 5000, 65_000])
def test_framer_holds_an_incomplete_line_in_about_its_size(piece: int) -> None:
    # An incomplete line arriving in pieces is held in little more than its
    # own size (not a growing buffer's over-allocation).
    size = 65_000
    framer = LineFramer()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, size, piece):
            framer.receive_data(b"x" * min(piece, size - start))
            assert framer.next_line() is NEED_DATA
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert framer.buffered == size
    assert held < size * 1.05, f"{held} bytes held for a {size}-byte partial line"
    framer.receive_data(b"\n")
    assert lines(framer) == [b"x" * size, NEED_DATA]


def test_framer_line_bound_may_change_between_calls() -> None:
    framer = LineFramer(max_line_length=5)
    framer.receive_data(b"abcdef\nabc")
    assert lines(framer) == [Err(ErrorCode.TOO_LARGE), NEED_DATA]
    framer.max_line_length = 10
    framer.receive_data(b"defghij\nabcdefghijk\n")
    assert lines(framer) == [b"abcdefghij", Err(ErrorCode.TOO_LARGE), NEED_DATA]


def test_framer_data_after_eof_is_a_local_error() -> None:
    framer = LineFramer()
    framer.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of file"):
        framer.receive_data(b"more\n")
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)


def test_framer_handles_ten_thousand_frames_in_one_chunk() -> None:
    framer = LineFramer()
    framer.receive_data(b"".join(b"m%d\n" % i for i in range(10_000)))
    got = lines(framer)
    assert got[-1] is NEED_DATA
    assert got[:-1] == [b"m%d" % i for i in range(10_000)]
    assert framer.buffered == 0


def test_framer_peeks_the_first_unconsumed_byte() -> None:
    framer = LineFramer()
    assert framer.peek_first_byte() is None
    framer.receive_data(b"ab\ncd")
    assert framer.peek_first_byte() == ord("a")
    assert framer.next_line() == b"ab"
    assert framer.peek_first_byte() == ord("c")


def test_framer_needs_a_positive_maximum() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LineFramer(max_line_length=0)
    assert LineFramer().max_line_length == DEFAULT_MAX_LINE_LENGTH == 65536


# --- mode detection -------------------------------------------------------------


def test_mode_is_unknown_until_the_first_line() -> None:
    conn = ServerConnection()
    assert mode_of(conn) is Mode.UNKNOWN
    assert not conn.ready
    assert feed(conn, b'{"type":"hel') == [NEED_DATA]
    assert mode_of(conn) is Mode.UNKNOWN


def test_brace_first_line_selects_json_mode() -> None:
    conn = ServerConnection()
    assert feed(conn, HELLO_LINE) == [Hello(name="alice", protocol=1), NEED_DATA]
    assert mode_of(conn) is Mode.JSON


def test_other_first_line_selects_line_mode() -> None:
    conn = ServerConnection()
    assert feed(conn, b"alice\n") == [Hello(name="alice"), NEED_DATA]
    assert mode_of(conn) is Mode.LINE


def test_first_line_with_leading_space_is_line_mode() -> None:
    # The protocol: line mode is "any first line that does not start with {".
    conn = ServerConnection()
    assert feed(conn, b' {"type":"hello"}\n') == [
        Hello(name='{"type":"hello"}'),
        NEED_DATA,
    ]
    assert mode_of(conn) is Mode.LINE


@pytest.mark.parametrize("blank", [b"\n", b"\r\n", b"  \t \n", b"\n\n\r\n"])
def test_blank_lines_before_the_first_line_are_ignored(blank: bytes) -> None:
    conn = ServerConnection()
    assert feed(conn, blank) == [NEED_DATA]
    assert mode_of(conn) is Mode.UNKNOWN
    assert feed(conn, HELLO_LINE) == [Hello(name="alice", protocol=1), NEED_DATA]
    assert mode_of(conn) is Mode.JSON


@pytest.mark.parametrize(
    ("first", "mode"), [(b"{", Mode.JSON), (b"a", Mode.LINE), (b"[", Mode.LINE)]
)
def test_oversized_first_line_picks_the_mode_from_its_first_byte(
    first: bytes, mode: Mode
) -> None:
    conn = ServerConnection(max_line_length=100)
    # Partial and oversized: the error comes before the line ends.
    assert feed(conn, b"\n" + first + b"x" * 50) == [NEED_DATA]
    assert mode_of(conn) is Mode.UNKNOWN
    assert feed(conn, b"x" * 60) == [Err(ErrorCode.TOO_LARGE), NEED_DATA]
    assert mode_of(conn) is mode
    # The error frame is answered in that mode.
    error = conn.send(ErrorReply(code="too_large", message="too long"))
    if mode is Mode.JSON:
        assert json.loads(error) == {
            "type": "error",
            "code": "too_large",
            "message": "too long",
        }
    else:
        assert error == b"error (too_large): too long\n"
    # The rest of the oversized line is discarded; the next line counts.
    if mode is Mode.JSON:
        assert feed(conn, b"x" * 500 + b"\n" + HELLO_LINE) == [
            Hello(name="alice", protocol=1),
            NEED_DATA,
        ]
    else:
        assert feed(conn, b"x" * 500 + b"\nbob\n") == [Hello(name="bob"), NEED_DATA]


def test_complete_oversized_first_line_picks_the_mode_too() -> None:
    conn = ServerConnection(max_line_length=60)
    assert feed(conn, b"{" + b"x" * 60 + b"\n" + HELLO_LINE) == [
        Err(ErrorCode.TOO_LARGE),
        Hello(name="alice", protocol=1),
        NEED_DATA,
    ]
    assert mode_of(conn) is Mode.JSON


def test_server_connection_closed_after_eof() -> None:
    conn = json_server()
    conn.receive_data(b'{"type":"ping","ref":1}\n{"type":"pi')
    conn.receive_data(b"")
    assert drain(conn) == [Ping(ref=1), EOF]
    assert conn.next_event() is EOF
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


def test_server_connection_closed_before_any_line() -> None:
    conn = ServerConnection()
    assert feed(conn, b"") == [EOF]
    assert mode_of(conn) is Mode.UNKNOWN


# --- JSON mode: decoding every request ------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"type":"say","text":"hi"}', Say(text="hi", room="lobby")),
        (
            b'{"type":"say","text":"hi","room":"dev","ref":"m1"}',
            Say(text="hi", room="dev", ref="m1"),
        ),
        (b'{"type":"dm","to":"bob","text":"psst"}', Dm(to="bob", text="psst")),
        (
            b'{"type":"dm","to":"bob","text":"psst","ref":7}',
            Dm(to="bob", text="psst", ref=7),
        ),
        (b'{"type":"join","room":"dev"}', Join(room="dev")),
        (b'{"type":"leave","room":"dev"}', Leave(room="dev")),
        (b'{"type":"nick","name":"alicia"}', Nick(name="alicia")),
        (b'{"type":"who"}', Who(room="lobby")),
        (b'{"type":"who","room":"dev"}', Who(room="dev")),
        (b'{"type":"rooms"}', Rooms()),
        (b'{"type":"history","room":"dev"}', History(room="dev")),
        (b'{"type":"history","room":"dev","limit":5}', History(room="dev", limit=5)),
        (b'{"type":"history","room":"dev","limit":0}', History(room="dev", limit=0)),
        (
            b'{"type":"history","room":"dev","limit":5,"before":10,"after":2}',
            History(room="dev", limit=5, before=10, after=2),
        ),
        (b'{"type":"ping"}', Ping()),
        (b'{"type":"ping","ref":"p1"}', Ping(ref="p1")),
        (b'{"type":"bye"}', Bye()),
        # Key order and whitespace do not matter; \r\n line ends are fine.
        (b' { "text" : "hi" , "type" : "say" } \r', Say(text="hi")),
        (b'{"type":"say","text":"caf\\u00e9 \\ud83d\\ude00"}', Say(text="café 😀")),
        ('{"type":"say","text":"café 😀"}'.encode(), Say(text="café 😀")),
    ],
)
def test_json_requests_decode_to_typed_events(line: bytes, expected: Event) -> None:
    conn = json_server()
    got = feed(conn, line + b"\n")
    assert got == [expected, NEED_DATA]
    assert type(got[0]) is type(expected)


def test_say_and_who_default_to_the_lobby() -> None:
    conn = json_server()
    say, who, _ = feed(conn, b'{"type":"say","text":"x"}\n{"type":"who"}\n')
    assert isinstance(say, Say)
    assert say.room == "lobby"
    assert say.ref is None
    assert isinstance(who, Who)
    assert who.room == "lobby"


def test_hello_decodes_with_token_and_ref() -> None:
    conn = ServerConnection()
    line = b'{"type":"hello","name":"alice","protocol":1,"token":"s3cr3t","ref":1}\n'
    assert feed(conn, line) == [
        Hello(name="alice", protocol=1, token="s3cr3t", ref=1),
        NEED_DATA,
    ]


def test_hello_without_protocol_is_accepted() -> None:
    conn = ServerConnection()
    assert feed(conn, b'{"type":"hello","name":"alice"}\n') == [
        Hello(name="alice", protocol=None),
        NEED_DATA,
    ]


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"say","text":"hi","ref":"r"}',
        b'{"type":"dm","to":"bob","text":"hi","ref":"r"}',
        b'{"type":"join","room":"dev","ref":"r"}',
        b'{"type":"leave","room":"dev","ref":"r"}',
        b'{"type":"nick","name":"bob","ref":"r"}',
        b'{"type":"who","ref":"r"}',
        b'{"type":"rooms","ref":"r"}',
        b'{"type":"history","room":"lobby","ref":"r"}',
        b'{"type":"ping","ref":"r"}',
        b'{"type":"bye","ref":"r"}',
    ],
)
def test_anything_but_hello_first_is_not_ready(line: bytes) -> None:
    conn = ServerConnection()
    assert feed(conn, line + b"\n") == [Err(ErrorCode.NOT_READY, "r"), NEED_DATA]
    assert mode_of(conn) is Mode.JSON
    # The connection stays usable: hello still works afterwards.
    assert feed(conn, HELLO_LINE) == [Hello(name="alice", protocol=1), NEED_DATA]


def test_requests_are_not_ready_until_the_server_sends_welcome() -> None:
    conn = ServerConnection()
    assert feed(conn, HELLO_LINE + b'{"type":"ping","ref":1}\n') == [
        Hello(name="alice", protocol=1),
        Err(ErrorCode.NOT_READY, 1),
        NEED_DATA,
    ]
    # The server refused the name: the client may try again.
    conn.send(ErrorReply(code="name_taken", message="alice is taken"))
    assert not conn.ready
    line = b'{"type":"hello","name":"alicia","protocol":1}\n'
    assert feed(conn, line) == [Hello(name="alicia", protocol=1), NEED_DATA]
    conn.send(WELCOME)
    assert feed(conn, b'{"type":"ping","ref":2}\n') == [Ping(ref=2), NEED_DATA]


def test_hello_twice_is_a_bad_request() -> None:
    conn = json_server()
    line = b'{"type":"hello","name":"bob","protocol":1,"ref":"h2"}\n'
    assert feed(conn, line) == [Err(ErrorCode.BAD_REQUEST, "h2"), NEED_DATA]
    assert feed(conn, b'{"type":"ping"}\n') == [Ping(), NEED_DATA]


@pytest.mark.parametrize("version", [0, 2, 99, -1])
def test_wrong_protocol_version_is_a_bad_request(version: int) -> None:
    conn = ServerConnection()
    line = b'{"type":"hello","name":"alice","protocol":%d,"ref":"v"}\n' % version
    assert feed(conn, line) == [Err(ErrorCode.BAD_REQUEST, "v"), NEED_DATA]
    conn.receive_data(line)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    if version < 0:  # not a version at all: refused as it is decoded
        assert "$.protocol" in info.value.message
    else:
        assert info.value.message == f"unsupported protocol version {version}"
    assert not conn.ready
    # A hello with the right version still gets in.
    assert feed(conn, HELLO_LINE) == [Hello(name="alice", protocol=1), NEED_DATA]


BAD_REQUESTS = [
    # invalid UTF-8, in a value, in a key, in an ignored field, bare
    b'{"type":"say","text":"\xff"}',
    b'{"type":"say","text":"hi","\xc3":1}',
    b'{"type":"say","text":"hi","extra":"\xed\xa0\x80"}',
    b'{"type":"ping"}\xff',
    # invalid JSON
    b"{",
    b'{"type":"say","text":"hi"',
    b'{"type":"say","text":"hi"} trailing',
    b'{"type":"say",,"text":"hi"}',
    b"{'type':'ping'}",
    b'{"type":"say","text":"\\ud800"}',
    b"{}}",
    b"",
    b"   ",
    # not an object
    b"[]",
    b'["ping"]',
    b'"ping"',
    b"42",
    b"null",
    b"true",
    # type missing, unknown or not a string
    b"{}",
    b'{"text":"hi"}',
    b'{"type":"shout","text":"hi"}',
    b'{"type":"SAY","text":"hi"}',
    b'{"type":"welcome","name":"a","protocol":1,"server":"s","rooms":[]}',
    b'{"type":null}',
    b'{"type":5}',
    b'{"type":["say"]}',
    # required fields missing
    b'{"type":"say"}',
    b'{"type":"dm","text":"hi"}',
    b'{"type":"dm","to":"bob"}',
    b'{"type":"join"}',
    b'{"type":"leave"}',
    b'{"type":"nick"}',
    b'{"type":"history"}',
    # wrong field types
    b'{"type":"say","text":5}',
    b'{"type":"say","text":null}',
    b'{"type":"say","text":"hi","room":null}',
    b'{"type":"say","text":"hi","room":["dev"]}',
    b'{"type":"dm","to":1,"text":"hi"}',
    b'{"type":"join","room":{}}',
    b'{"type":"leave","room":false}',
    b'{"type":"nick","name":["bob"]}',
    b'{"type":"who","room":1}',
    b'{"type":"history","room":"lobby","limit":"5"}',
    b'{"type":"history","room":"lobby","limit":1.5}',
    b'{"type":"history","room":"lobby","limit":true}',
    b'{"type":"history","room":"lobby","limit":-1}',
    b'{"type":"history","room":"lobby","before":"10"}',
    b'{"type":"history","room":"lobby","after":[]}',
    b'{"type":"ping","ref":1.5}',
    b'{"type":"ping","ref":true}',
    b'{"type":"ping","ref":{"id":1}}',
    b'{"type":"hello","name":"bob","protocol":1}',  # hello twice
]


@pytest.mark.parametrize("line", BAD_REQUESTS)
def test_bad_input_is_a_bad_request_and_the_next_line_still_works(
    line: bytes,
) -> None:
    conn = json_server()
    assert feed(conn, line + b'\n{"type":"ping","ref":"after"}\n') == [
        Err(ErrorCode.BAD_REQUEST),
        Ping(ref="after"),
        NEED_DATA,
    ]


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000,
        b"{" * 100_000,
        b'{"type":"ping","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"type":"ping","x":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
    ],
    ids=["arrays", "braces", "nested-array-field", "nested-object-field"],
)
def test_deeply_nested_json_is_a_bad_request(line: bytes) -> None:
    conn = json_server(max_line_length=10 * len(line))
    assert feed(conn, line + b'\n{"type":"ping"}\n') == [
        Err(ErrorCode.BAD_REQUEST),
        Ping(),
        NEED_DATA,
    ]


def test_deeply_nested_json_within_the_default_limit() -> None:
    line = b'{"type":"ping","x":' + b"[" * 60_000 + b"]" * 2
    assert len(line) < DEFAULT_MAX_LINE_LENGTH
    conn = json_server()
    assert feed(conn, line + b"\n") == [Err(ErrorCode.BAD_REQUEST), NEED_DATA]


@pytest.mark.parametrize(
    ("line", "ref"),
    [
        (b'{"type":"say","text":5,"ref":"r1"}', "r1"),
        (b'{"ref":42,"type":"say"}', 42),
        (b'{"type":"shout","ref":"s"}', "s"),
        (b'{"ref":"t"}', "t"),
        (b'{"type":"history","room":"lobby","limit":-1,"ref":3}', 3),
        (b'{"type":"say","text":"\xff","ref":"utf"}', "utf"),
        (b'{"type":"say","text":"hi","extra":"\xff","ref":"utf2"}', "utf2"),
        # Not recoverable: no object, broken JSON, or a ref of a wrong type.
        (b'{"type":"say","text":5,"ref":1.5}', None),
        (b'{"type":"say","ref":"r","text":', None),
        (b'[{"ref":"r"}]', None),
        (b'{"type":"say","text":5}', None),
    ],
)
def test_error_ref_is_recovered_from_invalid_requests(
    line: bytes, ref: str | int | None
) -> None:
    conn = json_server()
    assert feed(conn, line + b"\n") == [Err(ErrorCode.BAD_REQUEST, ref), NEED_DATA]


def test_bad_request_message_says_what_is_wrong() -> None:
    conn = json_server()
    conn.receive_data(b'{"type":"say","text":5}\n')
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.message.startswith("invalid message: ")
    assert "$.text" in info.value.message
    assert str(info.value) == info.value.message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"type":"say","text":"hi","mood":"happy"}', Say(text="hi")),
        (
            b'{"type":"say","text":"hi","attachments":[{"url":"x"}],"v":2.5}',
            Say(text="hi"),
        ),
        (b'{"type":"ping","trace":{"id":[1,2,3]},"ref":9}', Ping(ref=9)),
        (b'{"type":"bye","reason":"done"}', Bye()),
        (b'{"type":"who","room":"dev","detail":true}', Who(room="dev")),
        (b'{"type":"history","room":"dev","since":0}', History(room="dev")),
    ],
)
def test_unknown_extra_fields_are_ignored(line: bytes, expected: Event) -> None:
    conn = json_server()
    assert feed(conn, line + b"\n") == [expected, NEED_DATA]


def test_unknown_fields_in_hello_are_ignored() -> None:
    conn = ServerConnection()
    line = b'{"type":"hello","name":"alice","protocol":1,"client":"x/2.0"}\n'
    assert feed(conn, line) == [Hello(name="alice", protocol=1), NEED_DATA]


def test_json_mode_never_reads_plain_text_as_a_message() -> None:
    conn = json_server()
    assert feed(conn, b"hello everyone\nexit\n") == [
        Err(ErrorCode.BAD_REQUEST),
        Err(ErrorCode.BAD_REQUEST),
        NEED_DATA,
    ]


def test_json_mode_too_large_then_carries_on() -> None:
    conn = json_server(max_line_length=64)
    text = "x" * 100
    line = json.dumps({"type": "say", "text": text, "ref": "big"}).encode()
    assert feed(conn, line + b'\n{"type":"ping"}\n') == [
        Err(ErrorCode.TOO_LARGE),
        Ping(),
        NEED_DATA,
    ]


def test_many_json_requests_in_one_chunk() -> None:
    conn = json_server()
    data = b"".join(
        b'{"type":"say","text":"%d","ref":%d}\n' % (i, i) for i in range(10_000)
    )
    got = feed(conn, data)
    assert got[-1] is NEED_DATA
    assert got[:-1] == [Say(text=str(i), ref=i) for i in range(10_000)]


# --- line mode: decoding ----------------------------------------------------------


def test_line_mode_first_line_is_the_name_stripped() -> None:
    conn = ServerConnection()
    assert feed(conn, b"  alice \t\r\n") == [Hello(name="alice"), NEED_DATA]
    assert mode_of(conn) is Mode.LINE


def test_line_mode_names_are_retried_until_welcome() -> None:
    conn = ServerConnection()
    assert feed(conn, b"alice\nalice2\n") == [
        Hello(name="alice"),
        Hello(name="alice2"),
        NEED_DATA,
    ]
    # Each refusal goes back as a line, and the next line is another name.
    assert conn.send(ErrorReply(code="name_taken", message="alice2 is taken")) == (
        b"error (name_taken): alice2 is taken\n"
    )
    assert feed(conn, b"exit\n") == [Hello(name="exit"), NEED_DATA]
    assert feed(conn, b"alicia\n") == [Hello(name="alicia"), NEED_DATA]
    assert conn.send(WELCOME) == b""
    assert conn.ready
    assert feed(conn, b"bob\n") == [Say(text="bob", room="lobby"), NEED_DATA]


def test_line_mode_lines_are_messages_to_the_lobby() -> None:
    conn = line_server()
    got = feed(conn, b'hi all\n  spaced out  \n{"type":"ping"}\nexit now\n')
    assert got == [
        Say(text="hi all", room="lobby"),
        Say(text="  spaced out  ", room="lobby"),
        Say(text='{"type":"ping"}', room="lobby"),
        Say(text="exit now", room="lobby"),
        NEED_DATA,
    ]
    assert all(isinstance(e, Say) and e.ref is None for e in got[:-1])


@pytest.mark.parametrize("line", [b"exit\n", b"exit\r\n", b"  exit \n"])
def test_line_mode_exit_is_bye(line: bytes) -> None:
    conn = line_server()
    assert feed(conn, line) == [Bye(), NEED_DATA]


def test_line_mode_blank_lines_are_skipped() -> None:
    conn = line_server()
    assert feed(conn, b"\n\r\n   \n\t\nhi\n\n") == [Say(text="hi"), NEED_DATA]


def test_line_mode_strips_the_carriage_return() -> None:
    conn = line_server()
    assert feed(conn, b"hi there\r\nsecond\r\n") == [
        Say(text="hi there"),
        Say(text="second"),
        NEED_DATA,
    ]


def test_line_mode_decodes_utf8() -> None:
    conn = line_server()
    assert feed(conn, "café ☕\n".encode()) == [Say(text="café ☕"), NEED_DATA]


def test_line_mode_invalid_utf8_is_a_bad_request() -> None:
    conn = line_server()
    assert feed(conn, b"caf\xe9\n\xff\xfe\nok\n") == [
        Err(ErrorCode.BAD_REQUEST),
        Err(ErrorCode.BAD_REQUEST),
        Say(text="ok"),
        NEED_DATA,
    ]


def test_line_mode_invalid_utf8_as_the_name() -> None:
    conn = ServerConnection()
    assert feed(conn, b"\xffalice\nalice\n") == [
        Err(ErrorCode.BAD_REQUEST),
        Hello(name="alice"),
        NEED_DATA,
    ]
    assert mode_of(conn) is Mode.LINE


def test_line_mode_too_large_then_carries_on() -> None:
    conn = ServerConnection(max_line_length=20)
    conn.receive_data(b"alice\n")
    assert drain(conn) == [Hello(name="alice"), NEED_DATA]
    conn.send(WELCOME)
    assert feed(conn, b"z" * 21 + b"\nshort\n") == [
        Err(ErrorCode.TOO_LARGE),
        Say(text="short"),
        NEED_DATA,
    ]


# --- encoding: JSON mode ------------------------------------------------------------

MSG = Message(id=7, ts=1700000000.25, room="lobby", sender="alice", text="hi")

SERVER_EVENTS: list[tuple[Event, dict[str, Any]]] = [
    (
        WELCOME,
        {
            "type": "welcome",
            "name": "alice",
            "protocol": 1,
            "server": "chatkit",
            "rooms": ["lobby"],
        },
    ),
    (
        Welcome(name="bob", protocol=1, server="s", rooms=("lobby", "dev"), ref="h"),
        {
            "type": "welcome",
            "name": "bob",
            "protocol": 1,
            "server": "s",
            "rooms": ["lobby", "dev"],
            "ref": "h",
        },
    ),
    (
        MSG,
        {
            "type": "message",
            "id": 7,
            "ts": 1700000000.25,
            "room": "lobby",
            "from": "alice",
            "text": "hi",
        },
    ),
    (
        Message(id=8, ts=2.5, room="dev", sender="bob", text="yo", ref="m1"),
        {
            "type": "message",
            "id": 8,
            "ts": 2.5,
            "room": "dev",
            "from": "bob",
            "text": "yo",
            "ref": "m1",
        },
    ),
    (
        DirectMessage(id=9, ts=3.5, sender="alice", to="bob", text="psst"),
        {
            "type": "dm",
            "id": 9,
            "ts": 3.5,
            "from": "alice",
            "to": "bob",
            "text": "psst",
        },
    ),
    (
        DirectMessage(id=10, ts=4.0, sender="alice", to="bob", text="x", ref=3),
        {
            "type": "dm",
            "id": 10,
            "ts": 4.0,
            "from": "alice",
            "to": "bob",
            "text": "x",
            "ref": 3,
        },
    ),
    (
        Joined(room="lobby", name="bob"),
        {"type": "joined", "room": "lobby", "name": "bob"},
    ),
    (
        Left(room="lobby", name="bob"),
        {"type": "left", "room": "lobby", "name": "bob"},
    ),
    (
        Left(room="dev", name="bob", reason="bye"),
        {"type": "left", "room": "dev", "name": "bob", "reason": "bye"},
    ),
    (
        Renamed(old="bob", new="robert"),
        {"type": "renamed", "old": "bob", "new": "robert"},
    ),
    (
        WhoReply(room="lobby", names=("alice", "bob")),
        {"type": "who", "room": "lobby", "names": ["alice", "bob"]},
    ),
    (
        WhoReply(room="empty", names=(), ref="w"),
        {"type": "who", "room": "empty", "names": [], "ref": "w"},
    ),
    (
        RoomsReply(
            rooms=(RoomInfo(name="lobby", members=2), RoomInfo(name="dev", members=1))
        ),
        {
            "type": "rooms",
            "rooms": [{"name": "lobby", "members": 2}, {"name": "dev", "members": 1}],
        },
    ),
    (
        HistoryReply(room="lobby", messages=(MSG,)),
        {
            "type": "history",
            "room": "lobby",
            "messages": [
                {
                    "type": "message",
                    "id": 7,
                    "ts": 1700000000.25,
                    "room": "lobby",
                    "from": "alice",
                    "text": "hi",
                }
            ],
        },
    ),
    (
        HistoryReply(room="dev", messages=(), ref=1),
        {"type": "history", "room": "dev", "messages": [], "ref": 1},
    ),
    (Pong(), {"type": "pong"}),
    (Pong(ref="p1"), {"type": "pong", "ref": "p1"}),
    (
        ErrorReply(code="not_in_room", message="you are not in dev"),
        {"type": "error", "code": "not_in_room", "message": "you are not in dev"},
    ),
    (
        ErrorReply(code="bad_request", message="nope", ref=5),
        {"type": "error", "code": "bad_request", "message": "nope", "ref": 5},
    ),
    (Shutdown(reason="maintenance"), {"type": "shutdown", "reason": "maintenance"}),
]


def event_id(value: object) -> str | None:
    return type(value).__name__ if isinstance(value, Event) else None


@pytest.mark.parametrize(("event", "wire"), SERVER_EVENTS, ids=event_id)
def test_json_mode_encodes_the_documented_fields(
    event: Event, wire: dict[str, Any]
) -> None:
    data = json_server().send(event)  # type: ignore[arg-type]
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert json.loads(data) == wire
    assert data == encode_json(event)
    # The type tag leads, so a reader can dispatch before the rest.
    assert data.startswith(b'{"type":"%s"' % wire["type"].encode())


def test_json_mode_uses_from_not_sender() -> None:
    data = encode_json(MSG)
    assert b'"from":"alice"' in data
    assert b"sender" not in data


def test_json_mode_omits_ref_when_none() -> None:
    assert b"ref" not in encode_json(Pong())
    assert b"ref" not in encode_json(MSG)
    assert b"ref" not in encode_json(ErrorReply(code="x", message="y"))


def test_json_mode_escapes_newlines_in_text() -> None:
    message = Message(id=1, ts=0.0, room="lobby", sender="m", text="a\nb\r\u2028")
    data = encode_json(message)
    assert data.count(b"\n") == 1
    assert json.loads(data)["text"] == "a\nb\r\u2028"


def test_send_before_the_mode_is_known_is_json() -> None:
    conn = ServerConnection()
    assert conn.send(ErrorReply(code="too_large", message="x")) == (
        b'{"type":"error","code":"too_large","message":"x"}\n'
    )


def test_sending_welcome_completes_the_handshake() -> None:
    conn = ServerConnection()
    conn.receive_data(HELLO_LINE)
    conn.next_event()
    assert not conn.ready
    conn.send(Joined(room="lobby", name="bob"))
    assert not conn.ready
    conn.send(WELCOME)
    assert conn.ready


# --- encoding: line mode ----------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (MSG, b"alice: hi\n"),
        (Joined(room="lobby", name="alice"), b"alice has joined the chat.\n"),
        (Left(room="lobby", name="alice"), b"alice has left the chat.\n"),
        (
            Left(room="lobby", name="alice", reason="disconnect"),
            b"alice has left the chat.\n",
        ),
        (
            Left(room="lobby", name="alice", reason="leave"),
            b"alice has left lobby.\n",
        ),
        (
            DirectMessage(id=1, ts=0.0, sender="bob", to="alice", text="psst"),
            b"bob (private): psst\n",
        ),
        (Renamed(old="bob", new="robert"), b"bob is now known as robert.\n"),
        (
            ErrorReply(code="name_taken", message="bob is taken"),
            b"error (name_taken): bob is taken\n",
        ),
        (Shutdown(reason="bye now"), b"Server is shutting down: bye now\n"),
        (
            Message(id=2, ts=0.0, room="lobby", sender="bob", text="café ☕"),
            "bob: café ☕\n".encode(),
        ),
    ],
    ids=event_id,
)
def test_line_mode_renders_like_the_original(event: Event, text: bytes) -> None:
    conn = line_server()
    assert conn.send(event) == text  # type: ignore[arg-type]
    assert encode_line(event) == text


@pytest.mark.parametrize(
    "event",
    [
        WELCOME,
        WhoReply(room="lobby", names=("alice",)),
        RoomsReply(rooms=(RoomInfo(name="lobby", members=1),)),
        HistoryReply(room="lobby", messages=(MSG,)),
        Pong(ref=1),
    ],
    ids=event_id,
)
def test_line_mode_omits_what_it_cannot_show(event: Event) -> None:
    conn = line_server()
    assert conn.send(event) == b""  # type: ignore[arg-type]
    assert encode_line(event) == b""


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("hi\nbob: I owe alice $100", "hi bob: I owe alice $100"),
        ("fake\r\nbob has left the chat.", "fake  bob has left the chat."),
        ("\x1b[2J\x1b[Hclear", " [2J [Hclear"),
        ("nul\x00bell\x07del\x7f", "nul bell del "),
        ("\x0b\x0c\x1c\x1d\x1e", "     "),
        ("nel\x85csi\x9b1m", "nel csi 1m"),
        ("ls\u2028ps\u2029end", "ls ps end"),
        ("tab\tkept", "tab\tkept"),
        ("plain text", "plain text"),
    ],
)
def test_line_mode_strips_control_characters_from_user_text(
    text: str, shown: str
) -> None:
    conn = line_server()
    message = Message(id=1, ts=0.0, room="lobby", sender="mallory", text=text)
    data = conn.send(message)
    assert data == f"mallory: {shown}\n".encode()
    assert data.count(b"\n") == 1
    assert len(data.decode().splitlines()) == 1
    dm = DirectMessage(id=2, ts=0.0, sender="mallory", to="alice", text=text)
    assert conn.send(dm) == f"mallory (private): {shown}\n".encode()


def test_line_mode_strips_control_characters_from_reasons() -> None:
    conn = line_server()
    assert conn.send(Shutdown(reason="a\nb")) == b"Server is shutting down: a b\n"
    assert conn.send(ErrorReply(code="rejected", message="no\r\nway")) == (
        b"error (rejected): no  way\n"
    )


def test_a_broadcast_is_encoded_once_per_mode() -> None:
    # The server appends the same bytes to every recipient of a mode.
    json_conn, line_conn = json_server(), line_server()
    assert json_conn.send(MSG) == encode_json(MSG)
    assert line_conn.send(MSG) == encode_line(MSG)


# --- ClientConnection ---------------------------------------------------------------


@pytest.mark.parametrize(("event", "wire"), SERVER_EVENTS, ids=event_id)
def test_client_decodes_every_server_event(event: Event, wire: dict[str, Any]) -> None:
    client = ClientConnection()
    got = feed(client, json.dumps(wire).encode() + b"\n")
    assert got == [event, NEED_DATA]
    assert type(got[0]) is type(event)


def test_client_decodes_a_message_from_the_wire() -> None:
    client = ClientConnection()
    line = b'{"type":"message","id":3,"ts":12,"room":"lobby","from":"bob","text":"hi"}'
    [message, _] = feed(client, line + b"\r\n")
    assert isinstance(message, Message)
    assert message.sender == "bob"
    assert message.ts == 12.0
    assert isinstance(message.ts, float)


def test_client_ignores_unknown_fields() -> None:
    client = ClientConnection()
    line = b'{"type":"pong","ref":1,"server_time":5.5,"extra":{"a":[1]}}\n'
    assert feed(client, line) == [Pong(ref=1), NEED_DATA]


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b'{"type":"say","text":"hi"}',  # a request, not an event
        b'{"type":"welcome","name":"a"}',
        b'{"type":"message","id":"1","ts":0,"room":"r","from":"a","text":"t"}',
        b'{"type":"dm","to":"bob","text":"hi"}',  # the request shape of dm
        b'{"type":"pong","ref":"\xff"}',
        b"[]",
    ],
)
def test_client_reports_a_bad_line_and_carries_on(line: bytes) -> None:
    client = ClientConnection()
    assert feed(client, line + b'\n{"type":"pong"}\n') == [
        Err(ErrorCode.BAD_REQUEST),
        Pong(),
        NEED_DATA,
    ]


def test_client_connection_max_line_length_and_eof() -> None:
    client = ClientConnection(max_line_length=30)
    assert feed(client, b'{"type":"shutdown","reason":"' + b"x" * 40) == [
        Err(ErrorCode.TOO_LARGE),
        NEED_DATA,
    ]
    client.receive_data(b'"}\n{"type":"pong"}\n{"type":')
    client.receive_data(b"")
    assert drain(client) == [Pong(), EOF]
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"late")


@pytest.mark.parametrize(
    ("request_", "wire"),
    [
        (
            Hello(name="alice", protocol=1),
            {"type": "hello", "name": "alice", "protocol": 1},
        ),
        (
            Hello(name="alice", protocol=1, token="t", ref=1),
            {"type": "hello", "name": "alice", "protocol": 1, "token": "t", "ref": 1},
        ),
        (Say(text="hi"), {"type": "say", "text": "hi"}),
        (
            Say(text="hi", room="dev", ref="m"),
            {"type": "say", "text": "hi", "room": "dev", "ref": "m"},
        ),
        (Dm(to="bob", text="psst"), {"type": "dm", "to": "bob", "text": "psst"}),
        (Join(room="dev"), {"type": "join", "room": "dev"}),
        (Leave(room="dev"), {"type": "leave", "room": "dev"}),
        (Nick(name="al"), {"type": "nick", "name": "al"}),
        (Who(), {"type": "who"}),
        (Who(room="dev"), {"type": "who", "room": "dev"}),
        (Rooms(), {"type": "rooms"}),
        (
            History(room="dev", limit=3, before=9),
            {"type": "history", "room": "dev", "limit": 3, "before": 9},
        ),
        (Ping(ref=2), {"type": "ping", "ref": 2}),
        (Bye(), {"type": "bye"}),
    ],
    ids=event_id,
)
def test_client_encodes_requests(request_: Event, wire: dict[str, Any]) -> None:
    data = ClientConnection().send(request_)  # type: ignore[arg-type]
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert json.loads(data) == wire


# --- back to back -----------------------------------------------------------------


class Pair:
    """A client and a server protocol object wired back to back (h11 style)."""

    def __init__(self) -> None:
        self.client = ClientConnection()
        self.server = ServerConnection()

    def request(self, request: Any) -> list[Any]:
        """The client sends ``request``; returns what the server decodes."""
        self.server.receive_data(self.client.send(request))
        return drain(self.server)

    def reply(self, *events: Any) -> list[Any]:
        """The server sends ``events``; returns what the client decodes."""
        self.client.receive_data(b"".join(self.server.send(e) for e in events))
        return drain(self.client)


def test_back_to_back_session() -> None:
    pair = Pair()
    hello = Hello(name="alice", protocol=PROTOCOL_VERSION, ref=0)
    assert pair.request(hello) == [hello, NEED_DATA]
    assert pair.server.mode is Mode.JSON
    welcome = Welcome(name="alice", protocol=1, server="test", rooms=("lobby",), ref=0)
    joined = Joined(room="lobby", name="alice")
    assert pair.reply(welcome, joined) == [welcome, joined, NEED_DATA]

    say = Say(text="hello, world", ref="m1")
    assert pair.request(say) == [
        Say(text="hello, world", room="lobby", ref="m1"),
        NEED_DATA,
    ]
    echo = Message(
        id=1, ts=10.5, room="lobby", sender="alice", text="hello, world", ref="m1"
    )
    assert pair.reply(echo) == [echo, NEED_DATA]

    for request, answer in [
        (Join(room="dev", ref=1), Joined(room="dev", name="alice", ref=1)),
        (Who(room="dev", ref=2), WhoReply(room="dev", names=("alice",), ref=2)),
        (
            Rooms(ref=3),
            RoomsReply(
                rooms=(
                    RoomInfo(name="dev", members=1),
                    RoomInfo(name="lobby", members=2),
                ),
                ref=3,
            ),
        ),
        (
            History(room="lobby", limit=10, ref=4),
            HistoryReply(room="lobby", messages=(echo,), ref=4),
        ),
        (
            Dm(to="bob", text="psst", ref=5),
            DirectMessage(id=2, ts=11.0, sender="alice", to="bob", text="psst", ref=5),
        ),
        (Nick(name="alicia", ref=6), Renamed(old="alice", new="alicia", ref=6)),
        (
            Leave(room="dev", ref=7),
            Left(room="dev", name="alicia", reason="leave", ref=7),
        ),
        (Ping(ref=8), Pong(ref=8)),
        (
            Say(text="x", room="dev", ref=9),
            ErrorReply(code="not_in_room", message="no", ref=9),
        ),
    ]:
        assert pair.request(request) == [request, NEED_DATA]
        assert pair.reply(answer) == [answer, NEED_DATA]

    assert pair.request(Bye()) == [Bye(), NEED_DATA]
    assert pair.reply(Left(room="lobby", name="alicia", reason="bye")) == [
        Left(room="lobby", name="alicia", reason="bye"),
        NEED_DATA,
    ]
    pair.server.receive_data(b"")
    assert pair.server.next_event() is EOF
    pair.client.receive_data(b"")
    assert pair.client.next_event() is EOF


def test_back_to_back_shutdown_and_errors() -> None:
    pair = Pair()
    # Not ready: the server answers the error and the client decodes it.
    early = pair.request(Ping(ref="early"))
    assert early == [Err(ErrorCode.NOT_READY, "early"), NEED_DATA]
    error = ErrorReply(
        code=ErrorCode.NOT_READY, message="send hello first", ref="early"
    )
    [decoded, _] = pair.reply(error)
    assert decoded == ErrorReply(
        code="not_ready", message="send hello first", ref="early"
    )
    assert isinstance(decoded, ErrorReply)
    assert isinstance(RequestError.from_code(decoded.code, decoded.message), NotReady)

    assert pair.request(Hello(name="alice", protocol=1)) == [
        Hello(name="alice", protocol=1),
        NEED_DATA,
    ]
    pair.reply(WELCOME)
    assert pair.reply(Shutdown(reason="bye")) == [Shutdown(reason="bye"), NEED_DATA]


# --- errors and names -----------------------------------------------------------------

CHAT_ERRORS: dict[ErrorCode, type[RequestError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.NAME_TAKEN: NameTaken,
    ErrorCode.BAD_NAME: BadName,
    ErrorCode.NOT_IN_ROOM: NotInRoom,
    ErrorCode.NO_SUCH_USER: NoSuchUser,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.SERVER_FULL: ServerFull,
    ErrorCode.REJECTED: Rejected,
    ErrorCode.NOT_READY: NotReady,
    ErrorCode.TOO_SLOW: TooSlow,
    ErrorCode.KICKED: Kicked,
    ErrorCode.REPLACED: Replaced,
    ErrorCode.TIMEOUT: TimedOut,
    ErrorCode.TOO_MANY_ROOMS: TooManyRooms,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.BANNED: Banned,
    ErrorCode.MUTED: Muted,
    ErrorCode.ROOM_FULL: chatkit.RoomFull,
}


def test_every_error_code_has_a_chat_error() -> None:
    assert set(CHAT_ERRORS) == set(ErrorCode)


def test_error_codes_include_every_protocol_code() -> None:
    documented = {
        "bad_request",
        "too_large",
        "name_taken",
        "bad_name",
        "not_in_room",
        "no_such_user",
        "rate_limited",
        "unauthorized",
        "server_full",
        "rejected",
        "not_ready",
    }
    assert documented <= {code.value for code in ErrorCode}


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_chat_error_from_code(code: ErrorCode) -> None:
    error = RequestError.from_code(code.value, "explained")
    assert type(error) is CHAT_ERRORS[code]
    assert error.code == code
    assert error.message == "explained"
    assert str(error) == f"{code.value}: explained"
    assert isinstance(error, RequestError)


def test_chat_error_from_an_unknown_code() -> None:
    error = RequestError.from_code("brand_new", "from the future")
    assert type(error) is RequestError
    assert error.code == "brand_new"
    assert str(error) == "brand_new: from the future"


def test_remote_protocol_error_carries_code_and_ref() -> None:
    exc = RemoteProtocolError(ErrorCode.TOO_LARGE, "too long", ref="r")
    assert (exc.code, exc.message, exc.ref, str(exc)) == (
        ErrorCode.TOO_LARGE,
        "too long",
        "r",
        "too long",
    )
    assert isinstance(exc, ProtocolError)
    assert not issubclass(RemoteProtocolError, RequestError)


NAME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"


@pytest.mark.parametrize(
    "name", ["a", "A", "0", "_", ".", "-", "alice", "Bob_2.0-x", "a" * 32]
)
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)
    assert is_valid_room(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 33,
        "al ice",
        " alice",
        "alice ",
        "alice\n",
        "al\tice",
        "*server*",
        "a/b",
        "a@b",
        "a:b",
        "café",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: a digit, but not an ASCII one
        "\uff41",  # FULLWIDTH LATIN SMALL LETTER A
    ],
)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)


def test_name_alphabet_is_exactly_the_documented_one() -> None:
    allowed = {chr(c) for c in range(0x2FF) if is_valid_name(chr(c))}
    assert allowed == set(NAME_ALPHABET)
    assert {chr(c) for c in range(0x2FF) if is_valid_room(chr(c))} == set(NAME_ALPHABET)


def test_room_length_bounds() -> None:
    assert is_valid_room("r" * 64)
    assert not is_valid_room("r" * 65)
    assert not is_valid_room("")
    assert is_valid_room("r" * 33)
    assert not is_valid_name("r" * 33)
    assert not is_valid_room("lob by")
    assert not is_valid_room("lobby\n")


# --- blank lines on request; the line bound before hello ----------------------


def drain_with_blanks(conn: ServerConnection) -> list[Any]:
    """As :func:`drain`, asking for blank lines."""
    out: list[Any] = []
    while True:
        try:
            event = conn.next_event(report_blank_lines=True)
        except RemoteProtocolError as exc:
            out.append(Err(exc.code, exc.ref))
            continue
        out.append(event)
        if isinstance(event, Status):
            return out


def test_blank_lines_before_the_mode_is_known_are_reported_on_request() -> None:
    conn = ServerConnection()
    conn.receive_data(b"\n\r\n  \t \n")
    assert drain_with_blanks(conn) == [BLANK, BLANK, BLANK, NEED_DATA]
    assert mode_of(conn) is Mode.UNKNOWN
    conn.receive_data(HELLO_LINE + b"\n")
    assert drain_with_blanks(conn) == [
        Hello(name="alice", protocol=1),
        Err(ErrorCode.BAD_REQUEST),  # in JSON mode a blank line is a bad line
        NEED_DATA,
    ]


def test_blank_lines_in_line_mode_are_reported_on_request() -> None:
    conn = line_server()
    conn.receive_data(b"\n\r\n   \n\t\nhi\n\n")
    assert drain_with_blanks(conn) == [*[BLANK] * 4, Say(text="hi"), BLANK, NEED_DATA]


def test_a_flood_of_newlines_comes_back_one_line_at_a_time() -> None:
    for conn in (ServerConnection(), line_server()):
        conn.receive_data(b"\n" * 10_000)
        assert drain_with_blanks(conn) == [*[BLANK] * 10_000, NEED_DATA]


def test_a_blank_line_is_still_a_name_attempt_in_line_mode() -> None:
    conn = ServerConnection()
    conn.receive_data(b"bob\n\n")
    assert drain_with_blanks(conn) == [Hello(name="bob"), Hello(name=""), NEED_DATA]


def test_lines_before_hello_are_bounded_by_max_hello_length() -> None:
    conn = ServerConnection(max_line_length=100, max_hello_length=50)
    assert len(HELLO_LINE) - 1 <= 50
    # Complete, or growing past the bound across reads: too_large, once.
    assert feed(conn, b"{" + b"x" * 50 + b"\n") == [Err(ErrorCode.TOO_LARGE), NEED_DATA]
    assert feed(conn, b"{" + b"x" * 49) == [NEED_DATA]
    assert feed(conn, b"x" * 10) == [Err(ErrorCode.TOO_LARGE), NEED_DATA]
    assert feed(conn, b"x\n" + HELLO_LINE) == [
        Hello(name="alice", protocol=1),
        NEED_DATA,
    ]
    # Once the handshake is complete, lines may be max_line_length long.
    conn.send(WELCOME)
    say = b'{"type":"say","text":"' + b"y" * 76 + b'"}'
    assert len(say) == 100
    assert feed(conn, say + b"\n") == [Say(text="y" * 76), NEED_DATA]
    assert feed(conn, say + b" \n") == [Err(ErrorCode.TOO_LARGE), NEED_DATA]


def test_line_mode_names_are_bounded_by_max_hello_length_too() -> None:
    conn = ServerConnection(max_hello_length=10)
    assert feed(conn, b"b" * 11 + b"\n") == [Err(ErrorCode.TOO_LARGE), NEED_DATA]
    assert mode_of(conn) is Mode.LINE
    assert feed(conn, b"b" * 10 + b"\n") == [Hello(name="b" * 10), NEED_DATA]
    conn.accept()
    assert feed(conn, b"c" * 11 + b"\n") == [Say(text="c" * 11), NEED_DATA]


def test_max_hello_length_is_at_most_max_line_length() -> None:
    conn = ServerConnection(max_line_length=10, max_hello_length=50)
    assert feed(conn, b"b" * 11 + b"\n") == [Err(ErrorCode.TOO_LARGE), NEED_DATA]


def test_max_hello_length_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_hello_length"):
        ServerConnection(max_hello_length=0)
