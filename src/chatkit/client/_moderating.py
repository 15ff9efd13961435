"""The terminal client's moderation commands (``/kick``, ``/ban``, ...,
``/topic``, ``/mode``, ``/invite``, ``/voice``) and how a ``moderated``,
``topic`` or ``modes`` event reads there.

Each command acts on the current room, or with ``-s`` on the whole
server; what the server did comes back as a ``moderated`` event (or a
``topic`` or ``modes`` one), shown (to us as to everyone it concerns) by
:func:`describe_moderated` (:func:`describe_topic`, :func:`describe_modes`),
so a command prints nothing of its own but what it asks for: the ``/bans``
listing, the topic, the modes.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Final

from .._events import BanInfo, Moderated, ModesReply, TopicReply
from .._moderation_events import MAX_DURATION, MAX_LIMIT, MAX_SLOW
from ._client import ChatClient

__all__ = [
    "COMMANDS",
    "describe_moderated",
    "describe_modes",
    "describe_topic",
    "moderate",
    "parse_duration",
    "parse_modes",
]

#: The commands :func:`moderate` knows.
COMMANDS: Final = frozenset(
    (
        "/kick",
        "/ban",
        "/unban",
        "/mute",
        "/unmute",
        "/op",
        "/deop",
        "/bans",
        "/topic",
        "/mode",
        "/invite",
        "/voice",
        "/devoice",
    )
)

# /mode's letters, and the most its numbers may be (the protocol's).
_FLAGS: Final = MappingProxyType({"i": "invite_only", "m": "moderated", "s": "secret"})
_NUMBERS: Final = MappingProxyType({"limit": MAX_LIMIT, "slow": MAX_SLOW})

_DURATION: Final = re.compile(r"([1-9][0-9]{0,9})([smhdw])")
_UNIT_SECONDS: Final = MappingProxyType(
    {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
)


def parse_duration(word: str) -> int | None:
    """``30s``, ``10m``, ``2h``, ``1d`` or ``1w`` in seconds; ``None`` if
    ``word`` is no such duration (or one longer than the protocol allows)."""
    match = _DURATION.fullmatch(word.strip().lower())
    if match is None:
        return None
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    return seconds if seconds <= MAX_DURATION else None


def parse_modes(words: list[str]) -> dict[str, bool | int] | None:
    """``/mode``'s words (``+i``, ``-m``, ``+is``, ``limit=20``,
    ``slow=10``, ``slow=1m``) as :meth:`ChatClient.modes` arguments;
    ``None`` if a word is none of those."""
    changes: dict[str, bool | int] = {}
    for word in words:
        sign, letters = word[:1], word[1:]
        key, equals, value = word.partition("=")
        if sign in ("+", "-") and letters and all(c in _FLAGS for c in letters):
            for letter in letters:
                changes[_FLAGS[letter]] = sign == "+"
        elif equals and key in _NUMBERS:
            if value.isascii() and value.isdigit() and len(value) <= 10:
                number: int | None = int(value)
            else:
                number = parse_duration(value) if key == "slow" else None
            if number is None or number > _NUMBERS[key]:
                return None
            changes[key] = number
        else:
            return None
    return changes or None


def describe_modes(modes: ModesReply) -> str:
    """The modes in force, as ``/mode`` takes them: ``+im limit=20``;
    ``none``."""
    letters = "".join(c for c, field in _FLAGS.items() if getattr(modes, field))
    words = [f"+{letters}"] if letters else []
    words += [f"{key}={getattr(modes, key)}" for key in _NUMBERS if getattr(modes, key)]
    return " ".join(words) or "none"


def describe_topic(event: TopicReply, me: str) -> str:
    """A change of topic as one line: ``* alice set the topic of dev:
    release on Friday``."""
    by = "You" if event.by == me else event.by or "someone"
    if not event.text:
        return f"* {by} cleared the topic of {event.room}"
    return f"* {by} set the topic of {event.room}: {event.text}"


def _is_address(word: str) -> bool:
    try:
        ipaddress.ip_network(word, strict=False)
    except ValueError:
        return False
    return True


async def moderate(
    client: ChatClient,
    room: str,
    command: str,
    line: str,
    show: Callable[[str], None],
) -> bool:
    """Carry out moderation ``command`` (one of :data:`COMMANDS`) with the
    rest of its ``line``, in ``room`` (``-s`` first: on the server); False
    when the words do not fit the command (nothing sent).

    Raises:
        RequestError: the server's refusal (``Forbidden``...).
    """
    words = line.split()
    server = bool(words) and words[0] == "-s"
    if server:
        words = words[1:]
    where = None if server else room
    match command, words:
        case "/kick", [name, *why]:
            await client.kick(name, room=where, reason=" ".join(why))
        case "/ban" | "/mute", [target, *rest]:
            duration = parse_duration(rest[0]) if rest else None
            reason = " ".join(rest[1:] if duration is not None else rest)
            if command == "/mute":
                await client.mute(target, room=where, reason=reason, duration=duration)
            elif _is_address(target):
                await client.ban(
                    address=target, room=where, reason=reason, duration=duration
                )
            else:
                await client.ban(target, room=where, reason=reason, duration=duration)
        case "/unban", [target]:
            if _is_address(target):
                await client.unban(address=target, room=where)
            else:
                await client.unban(target, room=where)
        case "/unmute", [name]:
            await client.unmute(name, room=where)
        case "/op", [name] if not server:
            await client.op(room, name)
        case "/deop", [name] if not server:
            await client.deop(room, name)
        case "/invite", [name] if not server:
            await client.invite(room, name)
        case "/voice", [name] if not server:
            await client.voice(room, name)
        case "/devoice", [name] if not server:
            await client.devoice(room, name)
        case "/topic", [] if not server:
            topic = await client.topic(room)
            if topic.text:
                by = f" (set by {topic.by})" if topic.by else ""
                show(f"Topic of {room}: {topic.text}{by}")
            else:
                show(f"No topic in {room}.")
        case "/topic", [_, *_] if not server:
            await client.topic(room, line)
        case "/mode", [] if not server:
            show(f"Modes of {room}: {describe_modes(await client.modes(room))}")
        case "/mode", _ if not server and (changes := parse_modes(words)):
            await client.modes(room, **changes)  # type: ignore[arg-type]
        case "/bans", []:
            reply = await client.bans(where)
            place = f"in {room}" if where else "on the server"
            show(f"Bans {place}: {_listing(reply.bans)}")
            show(f"Mutes {place}: {_listing(reply.mutes)}")
            if where:
                show(f"Operators of {room}: {', '.join(reply.operators) or 'none'}")
            else:
                show(f"Server operators: {', '.join(reply.operators) or 'none'}")
        case _:
            return False
    return True


def _listing(entries: tuple[BanInfo, ...]) -> str:
    if not entries:
        return "none"
    described = []
    for entry in entries:
        details = f"by {entry.by}"
        if entry.until is not None:
            details += f", until {_when(entry.until)}"
        if entry.reason:
            details += f": {entry.reason}"
        described.append(f"{entry.name or entry.address} ({details})")
    return "; ".join(described)


def _when(until: float) -> str:
    """Local time: ``14:05`` within a day, else ``2026-11-02 14:05``."""
    shape = "%H:%M" if until - time.time() < 86400 else "%Y-%m-%d %H:%M"
    return time.strftime(shape, time.localtime(until))


def describe_moderated(event: Moderated, me: str) -> str:
    """``event`` as one line, seen by ``me``: ``* root kicked bob from dev:
    spam``, ``* alice muted you in dev until 14:05``."""
    target = "you" if event.name == me else event.name or event.address or "?"
    whose = "your" if target == "you" else f"{target}'s"
    room = event.room
    match event.action:
        case "kick":
            what = f"kicked {target} " + (f"from {room}" if room else "off the server")
        case "ban" | "unban":
            where = f"from {room}" if room else "from the server"
            what = f"{event.action}ned {target} {where}"
        case "mute" | "unmute":
            where = f"in {room}" if room else "on the server"
            what = f"{event.action}d {target} {where}"
        case "op":
            what = f"made {target} an operator of {room}"
        case "deop":
            what = f"took {whose} operator role in {room}"
        case "invite":
            what = f"invited {target} to {room}"
        case "voice":
            what = f"gave {target} a voice in {room}"
        case "devoice":
            what = f"took {whose} voice in {room}"
        case action:
            what = f"{action}: {target}" + (f" in {room}" if room else "")
    if event.until is not None and event.action in ("ban", "mute"):
        what += f" until {_when(event.until)}"
    reason = f": {event.reason}" if event.reason else ""
    by = "You" if event.by == me else event.by
    return f"* {by} {what}{reason}"
