"""chatkit wire protocol v1, sans-IO: bytes in, events out.

Nothing here does I/O or imports trio (a test enforces it), in the manner of
h11. An I/O layer feeds received bytes to :meth:`ServerConnection.receive_data`
(``b""`` meaning end of file), pulls events from
:meth:`~ServerConnection.next_event` until it returns :data:`NEED_DATA`, and
writes what :meth:`~ServerConnection.send` returns.

Bad input never breaks a connection: :meth:`~ServerConnection.next_event`
raises :class:`RemoteProtocolError` carrying the wire error code for the one
offending line, and the next call carries on with the next line.

For fan-out, :func:`encode_json` and :func:`encode_line` encode an event once
so the same bytes can be appended to every recipient's buffer.

This module is public as ``chatkit.protocol``: with it, anything (a test, a
bot in another framework, a proxy) can speak the protocol. It also exports
the request events (what a client sends: :class:`Hello`, :class:`Say`, ...)
and, for convenience, the server events that :mod:`chatkit` exports too.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Final, Literal, NamedTuple, TypeVar, overload

import msgspec

from ._events import LOBBY as LOBBY
from ._events import MAX_INT as MAX_INT
from ._events import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._events import Ban as Ban
from ._events import BanInfo as BanInfo
from ._events import Bans as Bans
from ._events import BansReply as BansReply
from ._events import Bye as Bye
from ._events import ClientRequest as ClientRequest
from ._events import Command as Command
from ._events import CommandReply as CommandReply
from ._events import Deop as Deop
from ._events import Devoice as Devoice
from ._events import DirectMessage as DirectMessage
from ._events import Dm as Dm
from ._events import ErrorReply as ErrorReply
from ._events import Event as Event
from ._events import Hello as Hello
from ._events import History as History
from ._events import HistoryReply as HistoryReply
from ._events import Invite as Invite
from ._events import Join as Join
from ._events import Joined as Joined
from ._events import Kick as Kick
from ._events import Leave as Leave
from ._events import Left as Left
from ._events import Message as Message
from ._events import Moderated as Moderated
from ._events import Modes as Modes
from ._events import ModesReply as ModesReply
from ._events import Mute as Mute
from ._events import Nick as Nick
from ._events import Op as Op
from ._events import Owner as Owner
from ._events import Ping as Ping
from ._events import Pong as Pong
from ._events import Ref as Ref
from ._events import Renamed as Renamed
from ._events import RoomInfo as RoomInfo
from ._events import Rooms as Rooms
from ._events import RoomsReply as RoomsReply
from ._events import Say as Say
from ._events import ServerEvent as ServerEvent
from ._events import Shutdown as Shutdown
from ._events import Topic as Topic
from ._events import TopicReply as TopicReply
from ._events import Unban as Unban
from ._events import Unmute as Unmute
from ._events import Voice as Voice
from ._events import Welcome as Welcome
from ._events import Who as Who
from ._events import WhoReply as WhoReply
from ._exceptions import ErrorCode as ErrorCode
from ._exceptions import LocalProtocolError as LocalProtocolError
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import RemoteProtocolError as RemoteProtocolError
from ._framing import DEFAULT_MAX_LINE_LENGTH as DEFAULT_MAX_LINE_LENGTH
from ._framing import EOF as EOF
from ._framing import NEED_DATA as NEED_DATA
from ._framing import LineFramer as LineFramer
from ._framing import Status as Status

__all__ = [
    "BLANK",
    "DEFAULT_MAX_LINE_LENGTH",
    "EOF",
    "JSON_LINES",
    "LOBBY",
    "MAX_INT",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "TEXT_LINES",
    "Ban",
    "BanInfo",
    "Bans",
    "BansReply",
    "Blank",
    "Bye",
    "ClientConnection",
    "ClientRequest",
    "Command",
    "CommandReply",
    "Deop",
    "Devoice",
    "DirectMessage",
    "Dm",
    "ErrorCode",
    "ErrorReply",
    "Event",
    "Hello",
    "History",
    "HistoryReply",
    "Invite",
    "Join",
    "Joined",
    "Kick",
    "Leave",
    "Left",
    "LineFramer",
    "LocalProtocolError",
    "Message",
    "Mode",
    "Moderated",
    "Modes",
    "ModesReply",
    "Mute",
    "Nick",
    "Op",
    "Owner",
    "Ping",
    "Pong",
    "ProtocolError",
    "Ref",
    "RemoteProtocolError",
    "Renamed",
    "RoomInfo",
    "Rooms",
    "RoomsReply",
    "Say",
    "ServerConnection",
    "ServerEvent",
    "Shutdown",
    "Status",
    "Topic",
    "TopicReply",
    "Unban",
    "Unmute",
    "Voice",
    "Welcome",
    "Who",
    "WhoReply",
    "WireFormat",
    "encode_json",
    "encode_line",
    "is_valid_name",
    "is_valid_room",
    "replace_controls",
    "wire_format",
]

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
_ROOM_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Control characters would let one user's text break another's line framing
# or drive their terminal; line-mode output replaces them with spaces. C1
# controls (NEL, CSI, ...) and U+2028/U+2029 count too: str.splitlines()
# and some terminals treat them as line breaks or escape sequences.
_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def is_valid_name(name: str) -> bool:
    """True if ``name`` is a valid user name: 1-32 of ``A-Za-z0-9_.-``."""
    return _NAME_RE.fullmatch(name) is not None


def is_valid_room(room: str) -> bool:
    """True if ``room`` is a valid room name: 1-64 of ``A-Za-z0-9_.-``."""
    return _ROOM_RE.fullmatch(room) is not None


class Blank(enum.Enum):
    """What ``ServerConnection.next_event(report_blank_lines=True)`` returns
    for a blank line (see :meth:`ServerConnection.next_event`)."""

    BLANK = "BLANK"
    """A blank line that says nothing was consumed: call again for the next
    event."""


BLANK: Final = Blank.BLANK


class Mode(enum.Enum):
    """How a server connection talks, chosen by the client's first line."""

    UNKNOWN = "unknown"
    JSON = "json"
    LINE = "line"


class _RefOnly(msgspec.Struct):
    ref: Ref = None


_REQUEST_DECODER: Final[msgspec.json.Decoder[ClientRequest]] = msgspec.json.Decoder(
    ClientRequest
)
_EVENT_DECODER: Final[msgspec.json.Decoder[ServerEvent]] = msgspec.json.Decoder(
    ServerEvent
)
_REF_DECODER: Final = msgspec.json.Decoder(_RefOnly)
_DECODE_ERRORS: Final = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    UnicodeDecodeError,
    # msgspec's own guard against deeply nested input.
    RecursionError,
)


_T = TypeVar("_T")


def _decode(decoder: msgspec.json.Decoder[_T], line: bytes) -> _T:
    try:
        if not line.isascii():
            # msgspec skips unknown fields without checking their UTF-8;
            # the protocol answers any invalid UTF-8 with bad_request.
            line.decode()
        return decoder.decode(line)
    except _DECODE_ERRORS as exc:
        raise RemoteProtocolError(
            ErrorCode.BAD_REQUEST, f"invalid message: {exc}", _recover_ref(line)
        ) from None


def _recover_ref(line: bytes) -> Ref:
    # Only on the error path: find the ref of an invalid request so the
    # client can match the error to what it sent.
    try:
        return _REF_DECODER.decode(line).ref
    except _DECODE_ERRORS:
        return None


def encode_json(event: Event) -> bytes:
    """Encode ``event`` as one JSON-mode line (with its ``\\n``)."""
    return msgspec.json.encode(event) + b"\n"


def replace_controls(text: str, by: str = " ") -> str:
    """``text`` with each control character (C0 but tab, DEL, C1, and the
    line and paragraph separators) replaced ``by``: safe on one line of a
    terminal."""
    return text if text.isprintable() else _CONTROL_RE.sub(by, text)


def encode_line(event: Event) -> bytes:
    """Encode ``event`` as line-mode text (``b""`` if line mode omits it).

    Line mode speaks like the original chat program: ``alice: hi``,
    ``alice has joined the chat.``, ``alice has left the chat.`` (or, when
    a JSON-mode user leaves ``lobby`` but stays connected, ``alice has left
    lobby.``).
    """
    match event:
        case Message(sender=sender, text=text):
            line = f"{sender}: {replace_controls(text)}"
        case DirectMessage(sender=sender, text=text):
            line = f"{sender} (private): {replace_controls(text)}"
        case Joined(name=name):
            line = f"{name} has joined the chat."
        case Left(name=name, room=room, reason="leave"):
            line = f"{name} has left {room}."  # a leave request: still here
        case Left(name=name):
            line = f"{name} has left the chat."
        case Renamed(old=old, new=new):
            line = f"{old} is now known as {new}."
        case ErrorReply(code=code, message=message):
            line = f"error ({code}): {replace_controls(message)}"
        case Shutdown(reason=reason):
            line = f"Server is shutting down: {replace_controls(reason)}"
        case Moderated():
            line = _moderated_line(event)
        case TopicReply(room=room, text=text) if text:
            line = f"Topic of {room}: {replace_controls(text)}"
        case _:
            return b""
    return (line + "\n").encode()


def _line_end(data: bytes | bytearray, position: int) -> int:
    return data.index(b"\n", position) + 1


_VERBS: Final = MappingProxyType(
    {
        "kick": "kicked",
        "ban": "banned",
        "unban": "unbanned",
        "mute": "muted",
        "unmute": "unmuted",
        "op": "made",
        "owner": "made",
        "deop": "took",
    }
)


def _moderated_line(event: Moderated) -> str:
    """A moderation notice as line mode says it (``alice kicked bob from
    dev: spam.``)."""
    target = event.name or event.address or "?"
    room = event.room
    match event.action:
        case "kick":
            text = f"{target} {'from ' + room if room else 'off the server'}"
        case "ban" | "unban":
            text = f"{target} {'from ' + room if room else 'from the server'}"
        case "op":
            text = f"{target} an operator of {room}"
        case "owner":
            text = f"{target} the owner of {room}"
        case "deop":
            text = f"{target}'s operator role in {room}"
        case _:
            text = f"{target}{' in ' + room if room else ''}"
    verb = _VERBS.get(event.action, event.action)
    reason = f": {event.reason}" if event.reason else ""
    return replace_controls(f"{event.by} {verb} {text}{reason}.")


class WireFormat(NamedTuple):
    """How one kind of connection carries server events: one encoder, used
    once per event whoever receives it (a broadcast is encoded once per
    format present in a room, never once per recipient).

    Attributes:
        name: what :attr:`chatkit.User.mode` says (``"json"``, ``"line"``).
        encode: the event as the bytes of one frame (``b""``: the format
            has no such frame).
        echo: whether a sender gets its own room messages back (JSON mode:
            yes, as the acknowledgement; line mode: no, as in the original
            chat program).
        frame_end: given bytes that begin with a frame, and a position in
            them, where the frame holding that position ends (so that
            output cut short after a partial write can finish the frame on
            the wire).
        from_json: the format's bytes for JSON-mode lines (each one an
            event as :func:`encode_json` makes it), if it can make them
            more cheaply than :attr:`encode` from the events (a WebSocket
            frames each line); ``None``: it cannot.
    """

    name: str
    encode: Callable[[Event], bytes]
    echo: bool
    frame_end: Callable[[bytes | bytearray, int], int] = _line_end
    from_json: Callable[[bytes], bytes] | None = None

    def encode_all(self, events: Iterable[Event]) -> bytes:
        """Several events, one after the other, as one piece of bytes."""
        return b"".join(map(self.encode, events))


#: JSON mode: one JSON object per line (protocol v1's main format).
JSON_LINES: Final = WireFormat("json", encode_json, echo=True)
#: Line mode: the original chat program's plain text lines.
TEXT_LINES: Final = WireFormat("line", encode_line, echo=False)


def wire_format(mode: Mode) -> WireFormat:
    """What a connection in ``mode`` is sent: :data:`TEXT_LINES` in line
    mode, else :data:`JSON_LINES` (until the first line, errors are answered
    in JSON)."""
    return TEXT_LINES if mode is Mode.LINE else JSON_LINES


class ServerConnection:
    """The server's side of one connection.

    Detects the mode from the first non-blank line, decodes requests into
    typed events, enforces that ``hello`` comes first, and encodes events for
    this connection's mode. In line mode, a line before the handshake is
    reported as :class:`Hello` (the line is the name), ``exit`` as
    :class:`Bye` and any other non-blank line as :class:`Say` to ``lobby``.

    The handshake completes when the server sends :class:`Welcome`; until
    then, each line-mode line is another attempt at a name.

    Args:
        max_line_length: the longest line, in bytes (``too_large`` beyond).
        max_hello_length: if given, the longest line until the handshake
            completes (at most ``max_line_length``): a connection that has
            not said hello yet then holds at most about this much.
        mode: the mode from the start (:attr:`Mode.JSON` for a transport
            that speaks JSON only, such as WebSocket), instead of the first
            line's choice.
    """

    __slots__ = ("_framer", "_max_line_length", "mode", "ready")

    def __init__(
        self,
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_hello_length: int | None = None,
        mode: Mode = Mode.UNKNOWN,
    ) -> None:
        if max_hello_length is not None and max_hello_length < 1:
            raise ValueError("max_hello_length must be at least 1")
        self._framer = LineFramer(
            max_line_length
            if max_hello_length is None
            else min(max_hello_length, max_line_length)
        )
        self._max_line_length = max_line_length
        self.mode = mode
        self.ready = False

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        self._framer.receive_data(data)

    @overload
    def next_event(
        self, *, report_blank_lines: Literal[False] = False
    ) -> ClientRequest | Status: ...

    @overload
    def next_event(
        self, *, report_blank_lines: bool
    ) -> ClientRequest | Status | Blank: ...

    def next_event(
        self, *, report_blank_lines: bool = False
    ) -> ClientRequest | Status | Blank:
        """Return the next request, :data:`NEED_DATA` or :data:`EOF`.

        Blank lines that say nothing (before the mode is known, and in line
        mode after the handshake) are skipped; with ``report_blank_lines``,
        each is returned as :data:`BLANK` instead, so that a server can make
        every line cost its sender (a rate limit), and a flood of newlines
        comes back to it one line at a time.

        Raises:
            RemoteProtocolError: one line was bad; its ``code`` says how.
                Call again to carry on with the next line.
        """
        while True:
            first = self._framer.peek_first_byte()
            try:
                line = self._framer.next_line()
            except RemoteProtocolError:
                if self.mode is Mode.UNKNOWN:
                    # An oversized first line still tells the mode to answer in.
                    self.mode = Mode.JSON if first == ord("{") else Mode.LINE
                raise
            if isinstance(line, Status):
                return line
            if self.mode is Mode.JSON:
                return self._json_request(line)
            if self.mode is Mode.LINE:
                event = self._line_request(line)
            elif line.startswith(b"{"):
                self.mode = Mode.JSON
                return self._json_request(line)
            elif not line.strip():
                event = None  # blank lines before the mode is known say nothing
            else:
                self.mode = Mode.LINE
                event = self._line_request(line)
            if event is not None:
                return event
            if report_blank_lines:
                return BLANK

    def _json_request(self, line: bytes) -> ClientRequest:
        request = _decode(_REQUEST_DECODER, line)
        if isinstance(request, Hello):
            if self.ready:
                raise RemoteProtocolError(
                    ErrorCode.BAD_REQUEST, "hello was already accepted", request.ref
                )
            if request.protocol not in (None, PROTOCOL_VERSION):
                raise RemoteProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"unsupported protocol version {request.protocol}",
                    request.ref,
                )
        elif not self.ready:
            raise RemoteProtocolError(
                ErrorCode.NOT_READY, "send hello first", request.ref
            )
        return request

    def _line_request(self, line: bytes) -> ClientRequest | None:
        try:
            text = line.decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError(
                ErrorCode.BAD_REQUEST, "line is not valid UTF-8"
            ) from None
        text = text.removesuffix("\r")
        if not self.ready:
            return Hello(name=text.strip())
        if not text.strip():
            return None
        if text.strip() == "exit":
            return Bye()
        return Say(text=text)

    @property
    def wire(self) -> WireFormat:
        """The format of what this connection is sent (see
        :func:`wire_format`)."""
        return wire_format(self.mode)

    def accept(self) -> None:
        """The handshake is complete: from now on requests other than
        ``hello`` are let through, and lines may be ``max_line_length``
        long (sending :class:`Welcome` does this too)."""
        self.ready = True
        self._framer.max_line_length = self._max_line_length

    def send(self, event: ServerEvent) -> bytes:
        """Encode ``event`` for this connection; sending Welcome completes the
        handshake."""
        if isinstance(event, Welcome):
            self.accept()
        return self.wire.encode(event)


class ClientConnection:
    """The client's side of one JSON-mode connection."""

    __slots__ = ("_framer",)

    def __init__(self, *, max_line_length: int = DEFAULT_MAX_LINE_LENGTH) -> None:
        self._framer = LineFramer(max_line_length)

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add received bytes; ``b""`` means the server closed its side."""
        self._framer.receive_data(data)

    def next_event(self) -> ServerEvent | Status:
        """Return the next server event, :data:`NEED_DATA` or :data:`EOF`.

        Raises:
            RemoteProtocolError: the server sent a bad line (skipped).
        """
        line = self._framer.next_line()
        if isinstance(line, Status):
            return line
        return _decode(_EVENT_DECODER, line)

    def send(self, request: ClientRequest) -> bytes:
        """Encode ``request`` as one line."""
        return encode_json(request)
