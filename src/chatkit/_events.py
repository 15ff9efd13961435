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

from typing import TypeAlias

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
    "Devoice",
    "DirectMessage",
    "Dm",
    "Duration",
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
    "Message",
    "Moderated",
    "Modes",
    "ModesReply",
    "Mute",
    "Nick",
    "Op",
    "Owner",
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
    "Topic",
    "TopicReply",
    "Unban",
    "Unmute",
    "Voice",
    "Welcome",
    "Who",
    "WhoReply",
]

from ._event_base import (
    LOBBY,
    MAX_INT,
    PROTOCOL_VERSION,
    Count,
    Event,
    Ref,
)
from ._moderation_events import (
    Ban,
    BanInfo,
    Bans,
    BansReply,
    Command,
    CommandReply,
    Deop,
    Devoice,
    Duration,
    Invite,
    Kick,
    Moderated,
    Modes,
    ModesReply,
    Mute,
    Op,
    Owner,
    Topic,
    TopicReply,
    Unban,
    Unmute,
    Voice,
)

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
    | Owner
    | Bans
    | Topic
    | Modes
    | Invite
    | Voice
    | Devoice
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
    | TopicReply
    | ModesReply
    | CommandReply
)
