"""Rooms: who is in which room, in join order, and when presence is told."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from .._events import LOBBY

if TYPE_CHECKING:
    from ..protocol import WireFormat
    from ._outbox import Outbox

__all__ = ["Group", "Member", "Room", "Rooms"]


class Member(Protocol):
    """What a room needs of a member (a connection's session)."""

    @property
    def name(self) -> str:
        """The member's name."""
        ...

    @property
    def outbox(self) -> Outbox:
        """Where the member's output goes."""
        ...


#: The members of a room that share a wire format: their plain sockets, and
#: each member's position among them (see :meth:`Room.groups`).
Group = tuple["WireFormat", list[socket.socket], dict[Member, int]]


class Room:
    """One room: its members in join order.

    Every change of membership has a number (:attr:`version`), and each
    member the number of its join, so that what was said in the room at
    some version can go to the members it had then (:meth:`members_at`),
    whoever joined or left since.
    """

    __slots__ = ("_departed", "_groups", "_sockets", "members", "name", "version")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict[Member, int] = {}  # join order: member -> its join
        self.version = 0  # the number of the last change of membership
        # Members who left, with their join and their leave, while
        # something said before may still be owed to them (see remove).
        self._departed: list[tuple[Member, int, int]] = []
        # The members with a plain socket, for the room fast path.
        self._sockets: dict[Member, socket.socket] = {}
        self._groups: list[Group] | None = None

    def __repr__(self) -> str:
        return f"<Room {self.name!r}, {len(self.members)} members>"

    def add(self, member: Member) -> None:
        """Make ``member`` the newest member."""
        self.version += 1
        self.members[member] = self.version
        sock = member.outbox.sock
        if isinstance(sock, socket.socket):
            self._sockets[member] = sock
        self._groups = None

    def remove(self, member: Member, *, owed: bool = False) -> None:
        """Make ``member`` no longer a member; ``owed``: something said
        before may still be owed to it (see :meth:`members_at`)."""
        self.version += 1
        joined = self.members.pop(member)
        if owed:
            self._departed.append((member, joined, self.version))
        self._sockets.pop(member, None)
        self._groups = None

    def members_at(self, version: int) -> list[Member]:
        """The members the room had at ``version`` (in join order, the
        departed last), if departures since were ``owed``."""
        members = [m for m, joined in self.members.items() if joined <= version]
        members += self.departed_since(version)
        return members

    def joined_since(self, version: int) -> list[Member]:
        """The members who joined after ``version`` and are still here."""
        joined = []
        for member, at in reversed(self.members.items()):
            if at <= version:
                break  # join order: every earlier one joined before
            joined.append(member)
        return joined

    def departed_since(self, version: int) -> list[Member]:
        """The members who were here at ``version`` and have left (as far as
        departures were ``owed``)."""
        return [m for m, joined, left in self._departed if joined <= version < left]

    def forget_departed(self) -> None:
        """Nothing said before is owed to those who left any more."""
        self._departed.clear()

    @property
    def plain(self) -> bool:
        """Every member can be written to on a plain socket."""
        return len(self._sockets) == len(self.members)

    def groups(self) -> list[Group]:
        """The members' plain sockets, one list per wire format, and each
        member's position in its list; kept until the membership changes,
        and never changed in place (a fan-out in progress keeps its own). A
        broadcast then reads no member and scans for no sender (building
        these per message held the first delivery back: see
        docs/performance.md)."""
        groups = self._groups
        if groups is None:
            by_wire: dict[WireFormat, tuple[list[socket.socket], dict[Member, int]]]
            by_wire = {}
            for member, sock in self._sockets.items():
                sockets, index = by_wire.setdefault(member.outbox.wire, ([], {}))
                index[member] = len(sockets)
                sockets.append(sock)
            groups = self._groups = [
                (wire, sockets, index) for wire, (sockets, index) in by_wire.items()
            ]
        return groups


class Rooms:
    """Every room of a server; ``lobby`` always exists.

    Args:
        presence_limit: see :attr:`chatkit.Limits.presence_limit`.
        owes: tells whether something said in a room is still owed to its
            members (the fan-out's broadcasts not released yet): then a
            member who leaves still gets it.
    """

    def __init__(
        self, presence_limit: int | None, owes: Callable[[Room], bool]
    ) -> None:
        self.presence_limit = presence_limit
        self._owes = owes
        self._rooms = {LOBBY: Room(LOBBY)}

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, name: str) -> Room | None:
        """The room called ``name``, if it exists."""
        return self._rooms.get(name)

    def __getitem__(self, name: str) -> Room:
        return self._rooms[name]

    def open(self, name: str) -> Room:
        """The room called ``name``, created if needed."""
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name)
        return room

    def add(self, room: Room, member: Member) -> bool:
        """Add ``member`` to ``room``; whether the others are told."""
        room.add(member)
        return self.announces(room)

    def announces(self, room: Room) -> bool:
        """Whether presence in ``room`` (joins, leaves, renames) is told to
        its members: it has at most ``presence_limit`` members."""
        limit = self.presence_limit
        return limit is None or len(room.members) <= limit

    def remove(self, room: Room, member: Member) -> bool:
        """Take ``member`` out of ``room`` (an empty room other than the
        lobby goes); whether the others are told."""
        room.remove(member, owed=self._owes(room))
        if not room.members and room.name != LOBBY:
            del self._rooms[room.name]
        limit = self.presence_limit
        # The room had len + 1 members: told only if that is in the limit.
        return limit is None or len(room.members) < limit

    def each_member(self, rooms: list[Room], but: Member | None = None) -> list[Member]:
        """The members of ``rooms``, each once, except ``but``."""
        seen = dict.fromkeys(member for room in rooms for member in room.members)
        seen.pop(but, None)  # type: ignore[arg-type]
        return list(seen)
