"""Typed events for every message type of chatkit wire protocol v1.

Each event is a frozen :class:`msgspec.Struct` tagged by its ``type`` field, so
one ``msgspec.json.Decoder`` decodes *and* validates a line in a single step.

Client-to-server messages are "requests"; server-to-client messages are
"events". Where the protocol uses one ``type`` in both directions with
different fields (``dm``, ``who``, ``rooms``, ``history``) the two sides get
different Python names: ``Dm`` is what a client sends, ``DirectMessage`` what
the server delivers; ``Who`` asks, ``WhoReply`` answers.

Extensions to v1 (all additive, as the protocol allows): every request takes
an optional ``ref`` that the server echoes on the reply or error it causes,
so clients can match answers to questions; ``history`` takes optional
``before`` / ``after`` message ids; ``error`` codes ``too_slow`` and ``kicked``
announce that the server is closing this connection; ``welcome`` may carry a
``resume`` secret that a reconnecting client sends back in its ``hello`` to
take over its own session, still logged in (``error replaced`` tells the
session taken over).
"""

from __future__ import annotations

from typing import Annotated, Final, TypeAlias

import msgspec

__all__ = [
    "LOBBY",
    "MAX_INT",
    "PROTOCOL_VERSION",
    "Ban",
    "BanInfo",
    "Bans",
    "BansReply",
    "Bye",
    "ClientRequest",
    "Command",
    "CommandReply",
    "Count",
    "Deop",
    "DirectMessage",
    "Dm",
    "Duration",
    "ErrorReply",
    "Event",
    "Hello",
    "History",
    "HistoryReply",
    "Join",
    "Joined",
    "Kick",
    "Leave",
    "Left",
    "Message",
    "Moderated",
    "Mute",
    "Nick",
    "Op",
    "Ping",
    "Pong",
    "Ref",
    "Renamed",
    "RoomInfo",
    "Rooms",
    "RoomsReply",
    "Say",
    "ServerEvent",
    "Shutdown",
    "Unban",
    "Unmute",
    "Welcome",
    "Who",
    "WhoReply",
]

#: The room every user is in on login (part of the protocol: ``say`` and
#: ``who`` default to it).
LOBBY: Final = "lobby"

PROTOCOL_VERSION = 1

#: The largest message id, ``limit`` or ``ref`` a request may carry: ids are
#: 64-bit signed integers (SQLite's INTEGER), so anything above is refused by
#: the protocol layer (``bad_request``) before it reaches a store.
MAX_INT: Final = 2**63 - 1

#: A message id or a count in a request: 0 to :data:`MAX_INT`.
Count: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]

#: A client-chosen correlation value, echoed back by the server: a string or
#: a 64-bit signed integer.
Ref: TypeAlias = str | Annotated[int, msgspec.Meta(ge=-MAX_INT - 1, le=MAX_INT)] | None


# ``omit_defaults``: optional fields (``ref``, ``reason``, ...) are left out of
# the wire form when unset, so every field the protocol requires has no default.
class Event(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    tag_field="type",
):
    """Base class of every protocol message, in either direction."""


# --- client to server -----------------------------------------------------


class Hello(Event, tag="hello", frozen=True):
    """First message of a JSON-mode connection: claims a name, joins ``lobby``."""

    name: str
    # Optional on decode (lenient to minimal clients); chatkit always sends it.
    protocol: Count | None = None
    token: str | None = None
    resume: str | None = None
    """Extension: the ``resume`` of the ``welcome`` of this client's previous
    connection. If that session still holds ``name`` (the server has not
    noticed that it is gone), the new connection takes it over."""
    ref: Ref = None


class Say(Event, tag="say", frozen=True):
    """Send ``text`` to ``room`` (which the sender must be in)."""

    text: str
    room: str = LOBBY
    ref: Ref = None


class Dm(Event, tag="dm", frozen=True):
    """Send ``text`` privately to the user named ``to``."""

    to: str
    text: str
    ref: Ref = None


class Join(Event, tag="join", frozen=True):
    """Join ``room``, creating it if needed."""

    room: str
    ref: Ref = None


class Leave(Event, tag="leave", frozen=True):
    """Leave ``room``."""

    room: str
    ref: Ref = None


class Nick(Event, tag="nick", frozen=True):
    """Change the sender's name to ``name``."""

    name: str
    ref: Ref = None


class Who(Event, tag="who", frozen=True):
    """Ask for the members of ``room``."""

    room: str = LOBBY
    ref: Ref = None


class Rooms(Event, tag="rooms", frozen=True):
    """Ask for the list of rooms and their member counts."""

    ref: Ref = None


class History(Event, tag="history", frozen=True):
    """Ask for recent messages of ``room``, oldest first.

    ``limit`` caps how many; ``before`` / ``after`` (message ids, an
    extension to v1) page backwards or catch up. Each is an integer from 0
    to :data:`MAX_INT`; anything else is a ``bad_request``.
    """

    room: str
    limit: Count | None = None
    before: Count | None = None
    after: Count | None = None
    ref: Ref = None


class Ping(Event, tag="ping", frozen=True):
    """Liveness check; answered by :class:`Pong` with the same ``ref``."""

    ref: Ref = None


class Bye(Event, tag="bye", frozen=True):
    """Leave the server cleanly."""

    ref: Ref = None


# --- moderation (extensions to v1; docs/moderation.md) ---------------------

#: Seconds a ban or mute lasts: 1 s to about 68 years.
Duration: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]


class Kick(Event, tag="kick", frozen=True):
    """Put user ``name`` out of ``room``, or (no ``room``) off the server.
    Room operators kick from their room, server operators from anywhere."""

    name: str
    room: str | None = None
    reason: str = ""
    ref: Ref = None


class Ban(Event, tag="ban", frozen=True):
    """Ban a ``name`` or an ``address`` (an IP address or a CIDR network)
    from ``room``, or (no ``room``) from the server, for ``duration``
    seconds or until unbanned. A banned user in the room (or on the
    server) is put out at once."""

    name: str | None = None
    address: str | None = None
    room: str | None = None
    reason: str = ""
    duration: Duration | None = None
    ref: Ref = None


class Unban(Event, tag="unban", frozen=True):
    """Lift the ban of ``name`` or ``address`` from ``room`` (or the
    server)."""

    name: str | None = None
    address: str | None = None
    room: str | None = None
    ref: Ref = None


class Mute(Event, tag="mute", frozen=True):
    """Keep user ``name`` from speaking in ``room`` (or anywhere on the
    server) for ``duration`` seconds or until unmuted."""

    name: str
    room: str | None = None
    reason: str = ""
    duration: Duration | None = None
    ref: Ref = None


class Unmute(Event, tag="unmute", frozen=True):
    """Let user ``name`` speak in ``room`` (or on the server) again."""

    name: str
    room: str | None = None
    ref: Ref = None


class Op(Event, tag="op", frozen=True):
    """Make user ``name`` an operator of ``room`` (its owner, or a server
    operator, may)."""

    room: str
    name: str
    ref: Ref = None


class Deop(Event, tag="deop", frozen=True):
    """Take ``room``'s operator role from user ``name``."""

    room: str
    name: str
    ref: Ref = None


class Bans(Event, tag="bans", frozen=True):
    """Ask for the bans and mutes of ``room`` (or of the server): operators
    only."""

    room: str | None = None
    ref: Ref = None


# --- plugin commands (extension to v1; docs/plugins.md) --------------------


class Command(Event, tag="command", frozen=True):
    """Run the plugin command ``name`` (``/roll 2d6``: ``name="roll"``,
    ``args="2d6"``), optionally about ``room`` (which the sender must be
    in); answered by :class:`CommandReply`, or ``error bad_request`` when
    no plugin knows the command."""

    name: str
    args: str = ""
    room: str | None = None
    ref: Ref = None


ClientRequest: TypeAlias = (
    Hello
    | Say
    | Dm
    | Join
    | Leave
    | Nick
    | Who
    | Rooms
    | History
    | Ping
    | Bye
    | Kick
    | Ban
    | Unban
    | Mute
    | Unmute
    | Op
    | Deop
    | Bans
    | Command
)


# --- server to client -----------------------------------------------------


class Welcome(Event, tag="welcome", frozen=True):
    """Answer to :class:`Hello`: the name granted and the rooms joined."""

    name: str
    protocol: int
    server: str
    rooms: tuple[str, ...]
    resume: str | None = None
    """Extension: a secret of this session, for the client to send back as
    ``hello.resume`` when it reconnects (see :class:`Hello`)."""
    ref: Ref = None


class Message(Event, tag="message", frozen=True):
    """A message said in a room. ``ref`` is set only on the sender's copy."""

    id: int
    ts: float
    room: str
    sender: str = msgspec.field(name="from")
    text: str
    ref: Ref = None


class DirectMessage(Event, tag="dm", frozen=True):
    """A private message. ``ref`` is set only on the sender's copy."""

    id: int
    ts: float
    sender: str = msgspec.field(name="from")
    to: str
    text: str
    ref: Ref = None


class Joined(Event, tag="joined", frozen=True):
    """``name`` joined ``room``."""

    room: str
    name: str
    ref: Ref = None


class Left(Event, tag="left", frozen=True):
    """``name`` left ``room``; ``reason`` is one of :class:`chatkit.LeaveReason`."""

    room: str
    name: str
    reason: str | None = None
    ref: Ref = None


class Renamed(Event, tag="renamed", frozen=True):
    """A user changed name from ``old`` to ``new``."""

    old: str
    new: str
    ref: Ref = None


class WhoReply(Event, tag="who", frozen=True):
    """Answer to :class:`Who`."""

    room: str
    names: tuple[str, ...]
    ref: Ref = None


class RoomInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of :class:`RoomsReply`."""

    name: str
    members: int


class RoomsReply(Event, tag="rooms", frozen=True):
    """Answer to :class:`Rooms`."""

    rooms: tuple[RoomInfo, ...]
    ref: Ref = None


class HistoryReply(Event, tag="history", frozen=True):
    """Answer to :class:`History`: messages oldest first."""

    room: str
    messages: tuple[Message, ...]
    ref: Ref = None


class Pong(Event, tag="pong", frozen=True):
    """Answer to :class:`Ping`."""

    ref: Ref = None


class ErrorReply(Event, tag="error", frozen=True):
    """The server refused a request (or is closing the connection).

    ``code`` is one of :class:`chatkit.ErrorCode`; ``ref`` echoes the
    offending request's ``ref`` when it had one.
    """

    code: str
    message: str
    ref: Ref = None


class Shutdown(Event, tag="shutdown", frozen=True):
    """The server is shutting down; the connection closes next."""

    reason: str


class Moderated(Event, tag="moderated", frozen=True):
    """What an operator did, told to those it concerns: the room's members
    (a room action), or everyone sharing a room with the target and the
    target itself (a server action). An address ban is told to its operator
    only.

    Attributes:
        action: ``kick``, ``ban``, ``unban``, ``mute``, ``unmute``, ``op``
            or ``deop``.
        by: the operator's name (``*server*``: the server's own code).
        name: the user it concerns (or ``address``: an address ban).
        until: when a ban or mute ends (Unix time); none: when lifted.
    """

    action: str
    by: str
    name: str | None = None
    address: str | None = None
    room: str | None = None
    reason: str = ""
    until: float | None = None
    ref: Ref = None


class BanInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One ban or mute in :class:`BansReply`."""

    name: str | None = None
    address: str | None = None
    by: str
    reason: str = ""
    until: float | None = None


class BansReply(Event, tag="bans", frozen=True):
    """Answer to :class:`Bans`: the bans and mutes in force, with the
    operators of ``room`` (its owner first) or of the server."""

    room: str | None = None
    bans: tuple[BanInfo, ...] = ()
    mutes: tuple[BanInfo, ...] = ()
    operators: tuple[str, ...] = ()
    ref: Ref = None


class CommandReply(Event, tag="command", frozen=True):
    """Answer to :class:`Command`, to its sender only: the plugin's ``text``
    (``room`` as the request gave it)."""

    name: str
    text: str
    room: str | None = None
    ref: Ref = None


ServerEvent: TypeAlias = (
    Welcome
    | Message
    | DirectMessage
    | Joined
    | Left
    | Renamed
    | WhoReply
    | RoomsReply
    | HistoryReply
    | Pong
    | ErrorReply
    | Shutdown
    | Moderated
    | BansReply
    | CommandReply
)
