"""The terminal client's moderation commands (``/kick``, ``/ban``, ...)
and how a ``moderated`` event reads there.

Each command acts on the current room, or with ``-s`` on the whole
server; what the server did comes back as a ``moderated`` event, shown
(to us as to everyone it concerns) by :func:`describe_moderated`, so a
command prints nothing of its own but the ``/bans`` listing.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Final

from .._events import BanInfo, Moderated
from ._client import ChatClient

__all__ = ["COMMANDS", "describe_moderated", "moderate", "parse_duration"]

#: The commands :func:`moderate` knows.
COMMANDS: Final = frozenset(
    ("/kick", "/ban", "/unban", "/mute", "/unmute", "/op", "/deop", "/bans")
)

_DURATION: Final = re.compile(r"([1-9][0-9]{0,9})([smhdw])")
_UNIT_SECONDS: Final = MappingProxyType(
    {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
)
_MAX_DURATION: Final = 2**31 - 1  # the protocol's limit


def parse_duration(word: str) -> int | None:
    """``30s``, ``10m``, ``2h``, ``1d`` or ``1w`` in seconds; ``None`` if
    ``word`` is no such duration (or one longer than the protocol allows)."""
    match = _DURATION.fullmatch(word.strip().lower())
    if match is None:
        return None
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    return seconds if seconds <= _MAX_DURATION else None


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
    words: list[str],
    show: Callable[[str], None],
) -> bool:
    """Carry out moderation ``command`` (one of :data:`COMMANDS`) with its
    ``words``, in ``room`` (``-s`` first: on the server); False when the
    words do not fit the command (nothing sent).

    Raises:
        RequestError: the server's refusal (``Forbidden``...).
    """
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
            whose = "your" if target == "you" else f"{target}'s"
            what = f"took {whose} operator role in {room}"
        case action:
            what = f"{action}: {target}" + (f" in {room}" if room else "")
    if event.until is not None and event.action in ("ban", "mute"):
        what += f" until {_when(event.until)}"
    reason = f": {event.reason}" if event.reason else ""
    by = "You" if event.by == me else event.by
    return f"* {by} {what}{reason}"
