"""Protocol messages of moderation and plugin commands (extensions to v1;
docs/moderation.md, docs/plugins.md): the requests and the events, part of
:mod:`._events`' unions."""

from __future__ import annotations

from typing import Annotated, Final, TypeAlias

import msgspec

from ._event_base import Event, Ref

__all__ = [
    "MAX_DURATION",
    "MAX_LIMIT",
    "MAX_SLOW",
    "MODERATION_REQUESTS",
    "Ban",
    "BanInfo",
    "Bans",
    "BansReply",
    "Command",
    "CommandReply",
    "Deop",
    "Devoice",
    "Duration",
    "Invite",
    "Kick",
    "Moderated",
    "Modes",
    "ModesReply",
    "Mute",
    "Op",
    "Owner",
    "Topic",
    "TopicReply",
    "Unban",
    "Unmute",
    "Voice",
]


# --- moderation (extensions to v1; docs/moderation.md) ---------------------

#: The longest ban or mute, in seconds (about 68 years).
MAX_DURATION: Final = 2**31 - 1
#: The most a room's ``limit`` (members) and ``slow`` (seconds) modes may be.
MAX_LIMIT: Final = 1_000_000
MAX_SLOW: Final = 86_400

#: Seconds a ban or mute lasts: 1 s to :data:`MAX_DURATION`.
Duration: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=MAX_DURATION)]


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


class Owner(Event, tag="owner", frozen=True):
    """Hand ``room`` over to user ``name``, its new owner (its owner, or a
    server operator, may)."""

    room: str
    name: str
    ref: Ref = None


class Bans(Event, tag="bans", frozen=True):
    """Ask for the bans and mutes of ``room`` (or of the server): operators
    only."""

    room: str | None = None
    ref: Ref = None


class Topic(Event, tag="topic", frozen=True):
    """Set ``room``'s topic to ``text`` (its operators may), or without
    ``text`` ask for it (answered by :class:`TopicReply`)."""

    room: str
    text: str | None = None
    ref: Ref = None


class Modes(Event, tag="mode", frozen=True):
    """Set ``room``'s modes (its operators may; fields left out stay as
    they are), or with none ask for them (answered by :class:`ModesReply`).
    Its wire ``type`` is ``mode``.

    Attributes:
        invite_only: only invited users (and operators) may join.
        moderated: only operators and voiced members may speak.
        secret: not listed in ``rooms``; ``who`` for members only.
        limit: the most members (0: no limit).
        slow: seconds a member waits between messages (0: no wait).
    """

    room: str
    invite_only: bool | None = None
    moderated: bool | None = None
    secret: bool | None = None
    limit: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] | None = None
    slow: Annotated[int, msgspec.Meta(ge=0, le=MAX_SLOW)] | None = None
    ref: Ref = None


class Invite(Event, tag="invite", frozen=True):
    """Let user ``name`` join invite-only ``room`` (once)."""

    room: str
    name: str
    ref: Ref = None


class Voice(Event, tag="voice", frozen=True):
    """Let user ``name`` speak in moderated ``room``."""

    room: str
    name: str
    ref: Ref = None


class Devoice(Event, tag="devoice", frozen=True):
    """Take ``name``'s voice in ``room``."""

    room: str
    name: str
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


class Moderated(Event, tag="moderated", frozen=True):
    """What an operator did, told to those it concerns: the room's members
    (a room action), or everyone sharing a room with the target and the
    target itself (a server action). An address ban is told to its operator
    only.

    Attributes:
        action: ``kick``, ``ban``, ``unban``, ``mute``, ``unmute``, ``op``,
            ``deop``, ``owner``, ``invite``, ``voice`` or ``devoice``.
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


class TopicReply(Event, tag="topic", frozen=True):
    """``room``'s topic (``""``: none), set by ``by``: to its members when
    it changes, to a joiner after ``joined``, and as the answer to
    :class:`Topic`."""

    room: str
    text: str
    by: str | None = None
    ref: Ref = None


class ModesReply(Event, tag="modes", frozen=True):
    """``room``'s modes (see :class:`Modes`): to its members when they
    change (``by``), and as the answer to :class:`Modes`."""

    room: str
    invite_only: bool
    moderated: bool
    secret: bool
    limit: int
    slow: int
    by: str | None = None
    ref: Ref = None


class CommandReply(Event, tag="command", frozen=True):
    """Answer to :class:`Command`, to its sender only: the plugin's ``text``
    (``room`` as the request gave it)."""

    name: str
    text: str
    room: str | None = None
    ref: Ref = None


#: The requests :class:`chatkit.server` hands its moderator.
MODERATION_REQUESTS: Final = (
    Kick,
    Ban,
    Unban,
    Mute,
    Unmute,
    Op,
    Deop,
    Owner,
    Bans,
    Topic,
    Modes,
    Invite,
    Voice,
    Devoice,
)
