"""What a fan-out batch holds, and how a released batch reaches the
outboxes: the items (:class:`Broadcast` runs, :class:`Direct` events,
:class:`Each`, :class:`Close`), each encoded once per wire format present,
and :func:`hand_over`, which gives every outbox its share of a batch in one
write. :mod:`._fanout` owns the batches; this module only reads them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import msgspec

from .._events import Joined, Left, Message, Renamed, ServerEvent
from ..protocol import JSON_LINES, WireFormat, encode_json

if TYPE_CHECKING:
    from ._outbox import Outbox
    from ._rooms import Member, Room

__all__ = [
    "Broadcast",
    "Close",
    "Direct",
    "Each",
    "Item",
    "RoomEvent",
    "Run",
    "encode_or_nothing",
    "hand_over",
    "others_copy",
    "own_copy",
    "with_ref",
]

RoomEvent: TypeAlias = Message | Joined | Left | Renamed


class Run:
    """Consecutive broadcasts to one room from one origin."""

    __slots__ = ("data", "events", "origin", "own", "reframed", "refs")

    def __init__(self, origin: Member | None) -> None:
        self.origin = origin
        self.events: list[RoomEvent] = []
        self.refs: list[Any] = []  # each event's ref, for the origin's copy
        self.data = bytearray()  # JSON, for every member but origin
        self.own = bytearray()  # JSON, origin's copies (with refs)
        # data and own in a format made from JSON (WireFormat.from_json),
        # made once per run and format, when the release first needs them:
        # every origin's copy of a batch is made of its runs.
        self.reframed: dict[WireFormat, tuple[bytes, bytes]] | None = None

    def reframe(self, wire: WireFormat) -> tuple[bytes, bytes]:
        """:attr:`data` and :attr:`own` in ``wire`` (which has a
        ``from_json``)."""
        reframed = self.reframed
        if reframed is None:
            reframed = self.reframed = {}
        pair = reframed.get(wire)
        if pair is None:
            assert wire.from_json is not None
            data = wire.from_json(bytes(self.data))
            own = data if self.own == self.data else wire.from_json(bytes(self.own))
            pair = reframed[wire] = (data, own)
        return pair


class Broadcast:
    """Consecutive broadcasts to one room, for the members it had when they
    were published (its ``version``): whoever joined since does not get
    them, whoever left since does (see :class:`Room`)."""

    __slots__ = ("frames", "room", "runs", "version")

    def __init__(self, room: Room) -> None:
        self.room = room
        self.version = room.version
        self.runs: list[Run] = []
        self.frames = 0


class Direct:
    """Consecutive events for one connection; ``echoes``: the positions of
    the sender's own copies of its direct messages."""

    __slots__ = ("echoes", "events", "outbox")

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.events: list[ServerEvent] = []
        self.echoes: list[int] | None = None


class Each:
    """One event for several members, each once (a rename)."""

    __slots__ = ("event", "members")

    def __init__(self, members: list[Member], event: ServerEvent) -> None:
        self.members = members
        self.event = event


class Close:
    """A connection's last output."""

    __slots__ = ("farewell", "outbox")

    def __init__(self, outbox: Outbox, farewell: ServerEvent | None) -> None:
        self.outbox = outbox
        self.farewell = farewell


Item: TypeAlias = Broadcast | Direct | Each | Close


def encode_or_nothing(wire: WireFormat, event: ServerEvent | None) -> bytes:
    return b"" if event is None else wire.encode(event)


def with_ref(event: RoomEvent, ref: Any) -> bytes:
    if ref is None:
        return encode_json(event)
    return encode_json(msgspec.structs.replace(event, ref=ref))


def others_copy(wire: WireFormat, runs: Sequence[Run]) -> bytes:
    """What every member but the origins gets of ``runs``, in ``wire``."""
    if wire is JSON_LINES:
        return b"".join(run.data for run in runs)
    if wire.from_json is not None:
        return b"".join(run.reframe(wire)[0] for run in runs)
    return wire.encode_all(event for run in runs for event in run.events)


def own_copy(origin: Member, runs: Sequence[Run]) -> tuple[bytes, int]:
    """What ``origin`` gets of ``runs`` (some of them its own), and how many
    frames: with echo, everything, its own messages with their refs;
    without, only the others'."""
    wire = origin.outbox.wire
    if not wire.echo:
        events = [e for run in runs if run.origin is not origin for e in run.events]
        return wire.encode_all(events), len(events)
    count = sum(len(run.events) for run in runs)
    if wire is JSON_LINES:
        return b"".join(
            run.own if run.origin is origin else run.data for run in runs
        ), count
    if wire.from_json is not None:
        return b"".join(run.reframe(wire)[run.origin is origin] for run in runs), count
    own = (
        msgspec.structs.replace(event, ref=ref)
        if ref is not None and run.origin is origin
        else event
        for run in runs
        for event, ref in zip(run.events, run.refs, strict=True)
    )
    return wire.encode_all(own), count


def hand_over(items: Sequence[Item]) -> None:
    """Give ``items`` to the outboxes, in order, then write each outbox once.
    Each outbox's share is gathered first (the payloads, encoded once, by
    reference), so that an idle connection's share goes straight to its
    socket and is copied into no buffer: a batch never costs a copy of
    itself per member."""
    shares: dict[Outbox, list[Any]] = {}  # outbox: [frames, data, ...]
    for item in items:
        if isinstance(item, Broadcast):
            _deliver(item, shares)
        elif isinstance(item, Direct):
            outbox = item.outbox
            _add(shares, outbox, outbox.wire.encode_all(item.events), len(item.events))
        elif isinstance(item, Each):
            _deliver_each(item, shares)
        else:
            outbox = item.outbox
            share = shares.pop(outbox, None)
            if share is not None:
                outbox.append(b"".join(share[1:]), share[0])
            outbox.finish(encode_or_nothing(outbox.wire, item.farewell))
    for outbox, share in shares.items():
        outbox.deliver(share[1] if len(share) == 2 else b"".join(share[1:]), share[0])


def _add(shares: dict[Outbox, list[Any]], outbox: Outbox, data: bytes, n: int) -> None:
    share = shares.get(outbox)
    if share is None:
        shares[outbox] = [n, data]
    else:
        share[0] += n
        share.append(data)


def _deliver(item: Broadcast, shares: dict[Outbox, list[Any]]) -> None:
    """Add ``item`` to each member's share: bytes encoded once per wire
    format (each origin its own copy)."""
    runs = item.runs
    origins = {run.origin for run in runs}
    frames = item.frames
    payloads: dict[WireFormat, bytes] = {}
    room = item.room
    members = (
        room.members if item.version == room.version else room.members_at(item.version)
    )
    for member in members:
        outbox = member.outbox
        if member in origins:
            data, count = own_copy(member, runs)
            if count:
                _add(shares, outbox, data, count)
        else:
            wire = outbox.wire
            payload = payloads.get(wire)
            if payload is None:
                payload = payloads[wire] = others_copy(wire, runs)
            _add(shares, outbox, payload, frames)


def _deliver_each(item: Each, shares: dict[Outbox, list[Any]]) -> None:
    payloads: dict[WireFormat, bytes] = {}
    for member in item.members:
        outbox = member.outbox
        wire = outbox.wire
        data = payloads.get(wire)
        if data is None:
            data = payloads[wire] = wire.encode(item.event)
        _add(shares, outbox, data, 1)
