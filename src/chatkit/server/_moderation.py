"""Moderation: who may keep order, and the bans and mutes in force.

:class:`Moderation` is the state (roles, restrictions, room settings),
kept by the server and saved whole, as one JSON document, in the history
store whenever it changes (when the store can keep one:
:class:`ModerationStore`), so that it survives a restart. In a cluster the
document lives in Redis instead (:class:`SharedModeration`), with a
version: a node commits a :class:`Change` only on top of the version it
made it on, and every node applies the changes in the order committed.
The moderator (``_moderator``) answers the requests and tells those
concerned. docs/moderation.md is the guide.

Roles are checked here for every request, from the server's own state; a
client claims nothing. Server operators are named in the server's
configuration, or made so by their login (an authenticator's
:class:`~chatkit.Login`: the session's role); a room's owner is whoever
created it (the first to join it), and its operators are those the owner
(or a server operator) made so.

Times: a ban's or mute's end is Unix time (kept across restarts), read
against a clock anchored to trio's at start (so that trio's test clocks
move it too).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from .._events import BansReply
from .._exceptions import ErrorCode
from ..protocol import is_valid_name, is_valid_room
from ._moderation_state import (
    Change,
    Document,
    ModerationStore,
    Restriction,
    RoomSettings,
    SharedModeration,
    decode,
    decode_change,
    decode_document,
)

if TYPE_CHECKING:
    from ._session import Session

__all__ = [
    "Change",
    "Moderation",
    "ModerationStore",
    "Restriction",
    "RoomSettings",
    "SharedModeration",
]

log = logging.getLogger("chatkit.server")

# Slow mode's memory of who spoke when: pruned past this many entries of
# anything older than the longest slow mode (a day).
_MAX_SPOKE: Final = 10_000
_DAY: Final = 86_400


class Moderation:
    """Roles and restrictions of one server.

    Args:
        operators: the server operators' names.
        store: where the state is saved (or None: kept in memory only).
        shared: the cluster's state, which this node's follows (``store``
            is then unused).

    Raises:
        ValueError: an operator's name is not a valid user name.
    """

    def __init__(
        self,
        operators: Iterable[str] = (),
        store: ModerationStore | None = None,
        shared: SharedModeration | None = None,
    ) -> None:
        operators = list(operators)
        for name in operators:
            if not is_valid_name(name):
                raise ValueError(f"operator {name!r} is not a user name")
        self.server_operators = frozenset(name.casefold() for name in operators)
        self._store = store
        self._shared = shared
        self.version = 0
        """How many changes the cluster's state has had (with ``shared``)."""
        self._stale = False  # changes were missed: reload before the next
        self._doc = Document()
        self._anchor = 0.0  # Unix time minus trio's clock (set by open())
        # When each member last spoke in a slow-mode room (not saved).
        self._spoke: dict[tuple[str, str], float] = {}

    async def open(self) -> None:
        """Load the saved state (the server is starting; a cluster's is
        loaded when the node joins it: :meth:`reload`)."""
        self._anchor = time.time() - trio.current_time()
        if self._store is None or self._shared is not None:
            return
        self._doc = decode(await self._store.load_moderation())

    def now(self) -> float:
        """Unix time, as far as moderation is concerned."""
        return self._anchor + trio.current_time()

    async def reload(self, *, newer_only: bool = False) -> bool:
        """Load the cluster's state (the node joined the cluster, or missed
        changes): it replaces this node's, unless ``newer_only`` and this
        node's is further on (the stream moved it on meanwhile). True if
        the cluster has none (its Redis restarted empty) and this node has
        one to give it back (:meth:`restore`): this node's is kept.

        Raises:
            OSError: the cluster is unreachable.
        """
        shared = self._shared
        if shared is None:
            return False
        self._stale = False
        version, document = await shared.load_moderation()
        if document is None and not newer_only and self._doc != Document():
            self.version = 0
            return True
        if newer_only and version < self.version:
            return False
        self._doc = decode(document)
        self.version = version
        return False

    async def restore(self) -> None:
        """Give the cluster this node's state, which it lost (see
        :meth:`reload`).

        Raises:
            OSError: the cluster is unreachable.
        """
        mine = self._doc
        await self._change(
            lambda: Change(
                restrictions=mine.restrictions,
                owners=mine.owners,
                operators=mine.operators,
                rooms=mine.rooms,
            )
        )
        log.warning("the cluster had lost its moderation state: given this node's")

    def shared_change(self, version: int, change: str) -> bool:
        """A node of the cluster (this one too) made ``change`` (a
        :class:`Change`, in JSON), taking the state to ``version``. True
        if this node missed changes before it: :meth:`reload` is due."""
        if version <= self.version:
            return False  # this node has it already (its own, committed)
        if version > self.version + 1:
            log.warning(
                "moderation changes %d to %d missed; reloading",
                self.version + 1,
                version - 1,
            )
            self._stale = True
        decode_change(change).apply(self._doc)
        self.version = version
        return self._stale

    async def _change(self, make: Callable[[], Change | None]) -> bool:
        """Apply the change ``make`` finds (None: nothing to do; False),
        then save it (in a cluster: commit it, if no other node changed
        the state first; if one did, ``make`` is asked again on the state
        it left).

        Raises:
            ConnectionError: in a cluster, Redis is unreachable.
        """
        shared = self._shared
        if shared is not None and self._stale:
            await self.reload(newer_only=True)
        while True:
            change = make()
            if change is None:
                return False
            if shared is None:
                change.apply(self._doc)
                if self._store is not None:
                    await self._store.save_moderation(msgspec.json.encode(self._doc))
                return True
            version = self.version
            document = decode_document(msgspec.json.encode(self._doc))  # a copy
            change.apply(document)
            encoded = msgspec.json.encode(document)
            if await shared.commit_moderation(
                version, encoded, msgspec.json.encode(change)
            ):
                if self.version == version:  # not applied from the stream yet
                    self._doc = document
                    self.version = version + 1
                return True
            before = self.version
            await self.reload(newer_only=True)
            if self.version == before:  # the cluster went back: its word
                await self.reload()

    # --- roles ------------------------------------------------------------

    def is_server_operator(self, who: Session) -> bool:
        """Whether ``who`` is a server operator: by its name, in the
        configuration, or by its login (:attr:`Session.operator`)."""
        return who.operator or who.name.casefold() in self.server_operators

    def owner(self, room: str) -> str | None:
        """The casefolded name of ``room``'s owner, if it has one."""
        return self._doc.owners.get(room)

    def may_moderate(self, who: Session, room: str | None) -> bool:
        """Whether ``who`` may act on ``room`` (None: the server)."""
        if self.is_server_operator(who):
            return True
        if room is None:
            return False
        key = who.name.casefold()
        return key == self._doc.owners.get(room) or key in self._doc.operators.get(
            room, ()
        )

    async def room_created(self, room: str, creator: str) -> None:
        """``creator`` made ``room`` (it did not exist): it owns it, unless
        it had an owner already."""
        await self._change(
            lambda: (
                None
                if room in self._doc.owners
                else Change(owners={room: creator.casefold()})
            )
        )

    async def set_owner(self, room: str, name: str) -> None:
        """``name`` owns ``room`` from now on."""
        await self._change(lambda: Change(owners={room: name.casefold()}))

    async def set_operator(self, room: str, name: str, *, on: bool) -> bool:
        """Make ``name`` an operator of ``room`` (or not); False if nothing
        changed."""
        key = name.casefold()

        def make() -> Change | None:
            operators = self._doc.operators.get(room, [])
            if on == (key in operators):
                return None
            if on:
                return Change(operators={room: [*operators, key]})
            return Change(operators={room: [n for n in operators if n != key]})

        return await self._change(make)

    def operators(self, room: str | None) -> tuple[str, ...]:
        """The operators of ``room`` (its owner first) or of the server."""
        if room is None:
            return tuple(sorted(self.server_operators))
        owner = self._doc.owners.get(room)
        rest = self._doc.operators.get(room, [])
        return ((owner,) if owner else ()) + tuple(rest)

    # --- room settings ----------------------------------------------------

    def settings(self, room: str) -> RoomSettings:
        """``room``'s settings (defaults if it has none)."""
        return self._doc.rooms.get(room) or RoomSettings()

    async def change_settings(self, room: str, **changes: Any) -> RoomSettings:
        """Set fields of ``room``'s settings (and save them); the new
        settings."""
        return await self.edit_settings(
            room, lambda settings: msgspec.structs.replace(settings, **changes)
        )

    async def edit_settings(
        self, room: str, edit: Callable[[RoomSettings], RoomSettings]
    ) -> RoomSettings:
        """Change ``room``'s settings to what ``edit`` makes of them (and
        save them; in a cluster ``edit`` may be asked again, of the
        settings another node left); the new settings."""

        def make() -> Change | None:
            settings = self.settings(room)
            edited = edit(settings)
            return None if edited == settings else Change(rooms={room: edited})

        await self._change(make)
        return self.settings(room)

    async def invite(self, room: str, name: str) -> None:
        """Let ``name`` into invite-only ``room``, once."""
        key = name.casefold()
        await self.edit_settings(
            room,
            lambda s: (
                s
                if key in s.invited
                else msgspec.structs.replace(s, invited=[*s.invited, key])
            ),
        )

    async def set_voice(self, room: str, name: str, *, on: bool) -> None:
        """Let ``name`` speak in moderated ``room`` (``on``) or not."""
        key = name.casefold()

        def edit(settings: RoomSettings) -> RoomSettings:
            voiced = [n for n in settings.voiced if n != key]
            return msgspec.structs.replace(
                settings, voiced=[*voiced, key] if on else voiced
            )

        await self.edit_settings(room, edit)

    def may_join(self, who: Session, room: str, members: int) -> tuple[str, str] | None:
        """Why ``who`` may not join ``room`` (with ``members`` now), as an
        error code and message; None if it may. Operators always may."""
        settings = self._doc.rooms.get(room)
        if settings is None or self.may_moderate(who, room):
            return None
        if settings.invite_only and who.name.casefold() not in settings.invited:
            return "forbidden", f"{room} is invite-only: ask an operator for an invite"
        if settings.limit and members >= settings.limit:
            return "room_full", f"{room} is full ({settings.limit} members)"
        return None

    async def joined(self, name: str, room: str) -> None:
        """``name`` joined ``room``: its invite, if any, is used up."""
        key = name.casefold()
        if key in self.settings(room).invited:
            await self.edit_settings(
                room,
                lambda s: msgspec.structs.replace(
                    s, invited=[n for n in s.invited if n != key]
                ),
            )

    def may_speak(self, who: Session, room: str) -> tuple[str, str] | None:
        """Why ``who`` may not speak in ``room`` now (moderated, or slow
        mode), as an error code and message; None if it may (and, in slow
        mode, the message is counted)."""
        settings = self._doc.rooms.get(room)
        if settings is None or self.may_moderate(who, room):
            return None
        key = who.name.casefold()
        if settings.moderated and key not in settings.voiced:
            return (
                "muted",
                f"{room} is moderated: only operators and voiced members speak",
            )
        if settings.slow:
            now = self.now()
            last = self._spoke.get((room, key))
            if last is not None and now - last < settings.slow:
                wait = settings.slow - (now - last)
                return "rate_limited", f"slow mode in {room}: wait {wait:.0f} s"
            spoke = self._spoke
            if len(spoke) >= _MAX_SPOKE:  # bounded: forget what no mode needs
                self._spoke = spoke = {k: t for k, t in spoke.items() if now - t < _DAY}
            spoke[(room, key)] = now
        return None

    def visible(self, room: str, member: bool) -> bool:
        """Whether ``room`` is listed for someone (a ``member`` of it, or not)."""
        settings = self._doc.rooms.get(room)
        return member or settings is None or not settings.secret

    # --- restrictions -----------------------------------------------------

    def _current(self) -> list[Restriction]:
        """Restrictions in force (expired ones dropped from memory; the
        saved document loses them at the next save)."""
        restrictions = self._doc.restrictions
        if restrictions:
            now = self.now()
            if any(r.until is not None and r.until <= now for r in restrictions):
                restrictions[:] = [
                    r for r in restrictions if r.until is None or r.until > now
                ]
        return restrictions

    def banned(self, name: str, host: str, room: str | None) -> Restriction | None:
        """The ban keeping ``name`` (from ``host``) out of ``room`` (None:
        off the server), if any. A server ban counts for every room."""
        if not self._doc.restrictions:
            return None
        key = name.casefold()
        address = _address(host)
        for r in self._current():
            if r.kind != "ban" or r.room not in (None, room):
                continue
            if r.name == key:
                return r
            if (
                r.address is not None
                and address is not None
                and address in ipaddress.ip_network(r.address)
            ):
                return r
        return None

    def muted(self, name: str, room: str | None) -> Restriction | None:
        """The mute keeping ``name`` quiet in ``room`` (None: in direct
        messages), if any. A server mute counts everywhere."""
        if not self._doc.restrictions:
            return None
        key = name.casefold()
        for r in self._current():
            if r.kind == "mute" and r.name == key and r.room in (None, room):
                return r
        return None

    async def restrict(self, restriction: Restriction) -> None:
        """Impose ``restriction`` (replacing one on the same target)."""
        await self._change(
            lambda: Change(restrictions=[*self._others(restriction), restriction])
        )

    async def lift(self, restriction: Restriction) -> bool:
        """Lift the restriction of ``restriction``'s kind on its target;
        False if there was none."""

        def make() -> Change | None:
            kept = self._others(restriction)
            if len(kept) == len(self._doc.restrictions):
                return None
            return Change(restrictions=kept)

        return await self._change(make)

    def _others(self, like: Restriction) -> list[Restriction]:
        """The restrictions in force but the one of ``like``'s kind on its
        target."""
        target = (like.kind, like.name, like.address, like.room)
        return [
            r for r in self._current() if (r.kind, r.name, r.address, r.room) != target
        ]

    def listing(self, room: str | None) -> tuple[list[Restriction], list[Restriction]]:
        """The bans and the mutes of ``room`` (None: the server's)."""
        current = [r for r in self._current() if r.room == room]
        return (
            [r for r in current if r.kind == "ban"],
            [r for r in current if r.kind == "mute"],
        )

    def reply(self, room: str | None, ref: Any) -> BansReply:
        """The ``bans`` reply for ``room``."""
        bans, mutes = self.listing(room)
        return BansReply(
            room=room,
            bans=tuple(r.info() for r in bans),
            mutes=tuple(r.info() for r in mutes),
            operators=self.operators(room),
            ref=ref,
        )


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_network(text: str) -> str:
    """``text`` (an address or a CIDR network) as a canonical CIDR string.

    Raises:
        ValueError: it is neither.
    """
    return str(ipaddress.ip_network(text.strip(), strict=False))


def host_of(session: Session) -> str:
    """The peer's host of ``session`` (its ``address`` is ``host:port``)."""
    return session.address.rpartition(":")[0]


def api_target(
    name: str | None, address: str | None, duration: float | None
) -> str | None:
    """Check the target of a ban or mute from the Python API (raising
    ValueError); ``address`` as a canonical network."""
    if (name is None) == (address is None):
        raise ValueError("give a name or an address, not both")
    if duration is not None and not duration > 0:
        raise ValueError(f"duration must be positive, not {duration}")
    return None if address is None else parse_network(address)


def check_target(name: str | None, room: str | None) -> tuple[ErrorCode, str] | None:
    """Why a request naming ``name`` and ``room`` is malformed, if it is."""
    if name is not None and not is_valid_name(name):
        return ErrorCode.BAD_NAME, f"{name!r} is not a user name"
    if room is not None and not is_valid_room(room):
        return ErrorCode.BAD_NAME, f"{room!r} is not a room name"
    return None
