"""The moderation requests: ``kick``, ``ban``, ``unban``, ``mute``,
``unmute``, ``op``, ``deop`` and ``bans`` (:class:`Moderator`), on the state
that :class:`~chatkit.server._moderation.Moderation` keeps.

Every request is checked against the requester's role first (``error
forbidden``); what is done is told (``moderated``) to those it concerns,
the requester's copy carrying its ``ref`` as the acknowledgement. Then
the ``chatkit_moderated`` hook sees it, once per action.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from .._events import (
    Ban,
    Bans,
    ClientRequest,
    Deop,
    Devoice,
    ErrorReply,
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
from .._exceptions import ErrorCode
from ._moderation import (
    Moderation,
    Restriction,
    check_target,
    host_of,
    parse_network,
)
from ._session import SERVER_SENDER, Directory, LeaveReason, Session

if TYPE_CHECKING:
    from .._hooks import HookDispatcher
    from ._fanout import Fanout
    from ._rooms import Room, Rooms

__all__ = ["Moderator"]

log = logging.getLogger("chatkit.server")

#: Takes ``session`` out of ``room`` for ``reason`` (announcing its leave).
RemoveMember = Callable[[Session, "Room", LeaveReason], None]
#: Runs ``function(*args)`` in a task (a nursery's ``start_soon``).
Spawn = Callable[..., None]


class Moderator:
    """Answers the moderation requests of one server.

    Args:
        moderation: the roles and restrictions.
        directory: who is logged in.
        rooms: the server's rooms.
        fanout: where everything sent goes.
        remove_member: takes a member out of a room, announcing it.
        hooks: the plugins, told of every action (``chatkit_moderated``).
    """

    def __init__(
        self,
        moderation: Moderation,
        directory: Directory,
        rooms: Rooms,
        fanout: Fanout,
        remove_member: RemoveMember,
        hooks: HookDispatcher | None = None,
    ) -> None:
        self.moderation = moderation
        self.hooks = hooks
        self.spawn: Spawn | None = None
        """Where the hook of an action taken without awaiting (``kick``
        from the server's Python API) runs: the server's connections
        nursery's ``start_soon``, set while it serves."""
        self._directory = directory
        self._rooms = rooms
        self._fanout = fanout
        self._remove_member = remove_member

    def banned_from(self, session: Session, room: str, ref: Any) -> bool:
        """Tell ``session`` it is banned from ``room`` (which it would
        join); True if so."""
        ban = self.moderation.banned(session.name, host_of(session), room)
        if ban is None:
            return False
        text = f"you are banned from {room}"
        session.error(
            ErrorCode.BANNED, f"{text}: {ban.reason}" if ban.reason else text, ref
        )
        return True

    def keeps_out(
        self, session: Session, name: str, room: Room | None, ref: Any
    ) -> bool:
        """Tell ``session`` why ``room`` (called ``name``; None: not made
        yet) does not let it in (invite-only, full); True if so."""
        members = len(room.members) if room is not None else 0
        refusal = self.moderation.may_join(session, name, members)
        if refusal is None:
            return False
        session.error(ErrorCode(refusal[0]), refusal[1], ref)
        return True

    async def handle(self, session: Session, request: ClientRequest) -> None:
        """Act on a moderation request from ``session`` (asking for a
        room's topic or modes needs no role)."""
        if isinstance(request, Topic) and request.text is None:
            if self.moderation.visible(request.room, request.room in session.rooms):
                session.send(self.topic(request.room, request.ref))
            else:
                session.error(
                    ErrorCode.NOT_IN_ROOM, f"{request.room} is secret", request.ref
                )
            return
        if isinstance(request, Modes) and request == Modes(
            room=request.room, ref=request.ref
        ):
            session.send(self.modes(request.room, request.ref))
            return
        name = getattr(request, "name", None)
        room = getattr(request, "room", None)
        ref = request.ref
        problem = check_target(name, room)
        if problem is not None:
            session.error(problem[0], problem[1], ref)
            return
        if not self.moderation.may_moderate(session, room) or (
            isinstance(request, Op | Deop | Owner)
            and not self._may_grant(session, room)
        ):
            where = f"in {room}" if room is not None else "on this server"
            session.error(ErrorCode.FORBIDDEN, f"you are not an operator {where}", ref)
            return
        match request:
            case Kick():
                event = self._kick(
                    request.name, request.room, request.reason, session, ref
                )
                if event is not None:
                    await self._observed(event)
            case Ban() | Unban():
                await self._ban(session, request)
            case Mute():
                await self.mute(
                    request.name,
                    request.room,
                    request.reason,
                    request.duration,
                    by=session,
                    ref=ref,
                )
            case Unmute():
                await self.unmute(request.name, request.room, by=session, ref=ref)
            case Op() | Deop():
                await self.set_operator(
                    request.room, request.name, isinstance(request, Op), session, ref
                )
            case Owner():
                await self.set_owner(request.room, request.name, session, ref)
            case Bans():
                session.send(self.moderation.reply(request.room, ref))
            case Topic():
                assert request.text is not None  # asking is not moderating
                await self.set_topic(request.room, request.text, session, ref)
            case Modes():
                await self.set_modes(request, session)
            case Invite():
                await self.invite(request.room, request.name, session, ref)
            case Voice() | Devoice():
                await self.set_voice(
                    request.room, request.name, isinstance(request, Voice), session, ref
                )

    def _may_grant(self, session: Session, room: str | None) -> bool:
        """Only a room's owner or a server operator makes room operators."""
        key = session.name.casefold()
        return self.moderation.is_server_operator(session) or (
            room is not None and self.moderation.owner(room) == key
        )

    # --- the actions (also the Python API's, with by=None: the server) -----

    def kick(
        self,
        name: str,
        room: str | None,
        reason: str,
        by: Session | None = None,
        ref: Any = None,
    ) -> bool:
        """Put ``name`` out of ``room`` (None: off the server); False (and
        an error to ``by``) if it is not there. Does not wait for the
        ``chatkit_moderated`` hook: it runs in a task of its own."""
        event = self._kick(name, room, reason, by, ref)
        if event is None:
            return False
        hooks, spawn = self.hooks, self.spawn
        if hooks is not None and spawn is not None and hooks.has("chatkit_moderated"):
            spawn(self._observed, event)
        return True

    def _kick(
        self,
        name: str,
        room: str | None,
        reason: str,
        by: Session | None,
        ref: Any,
    ) -> Moderated | None:
        """The kick itself; what was told, or None if ``name`` is not there."""
        target = self._directory.get(name)
        place = None if room is None else self._rooms.get(room)
        if target is None or (
            room is not None and (place is None or target not in place.members)
        ):
            where = f" in {room}" if room is not None else ""
            self._error(by, ErrorCode.NO_SUCH_USER, f"no user {name}{where}", ref)
            return None
        event = Moderated(
            action="kick", by=_name(by), name=target.name, room=room, reason=reason
        )
        if place is not None:
            self._tell(place.members, event, by, ref)
            self._remove_member(target, place, LeaveReason.KICKED)
        else:  # the target hears it as the error it is closed with
            self._tell(self._sharing(target)[1:], event, by, ref)
            target.close(
                LeaveReason.KICKED,
                ErrorReply(code=ErrorCode.KICKED, message=reason or "kicked"),
            )
        log.info(
            "%s kicked %s from %s: %s", _name(by), name, room or "the server", reason
        )
        return event

    async def _ban(self, session: Session, request: Ban | Unban) -> None:
        if (request.name is None) == (request.address is None):
            session.error(
                ErrorCode.BAD_REQUEST, "give a name or an address", request.ref
            )
            return
        address = None
        if request.address is not None:
            try:
                address = parse_network(request.address)
            except ValueError:
                session.error(
                    ErrorCode.BAD_REQUEST,
                    f"{request.address!r} is not an address or a network",
                    request.ref,
                )
                return
        if isinstance(request, Ban):
            await self.ban(
                request.name,
                address,
                request.room,
                request.reason,
                request.duration,
                by=session,
                ref=request.ref,
            )
        else:
            await self.unban(
                request.name, address, request.room, by=session, ref=request.ref
            )

    async def ban(
        self,
        name: str | None,
        address: str | None,
        room: str | None,
        reason: str,
        duration: float | None,
        *,
        by: Session | None = None,
        ref: Any = None,
    ) -> Restriction:
        """Ban ``name`` or ``address`` (a canonical network) from ``room``
        (None: the server), and put out whoever it keeps out."""
        moderation = self.moderation
        until = None if duration is None else moderation.now() + duration
        ban = Restriction(
            kind="ban",
            by=_name(by),
            name=None if name is None else name.casefold(),
            address=address,
            room=room,
            reason=reason,
            until=until,
        )
        await moderation.restrict(ban)
        event = Moderated(
            action="ban",
            by=ban.by,
            name=name,
            address=address,
            room=room,
            reason=reason,
            until=until,
        )
        place = None if room is None else self._rooms.get(room)
        if address is not None:
            self._tell((), event, by, ref)  # an address is for operators' eyes
        elif place is not None:
            self._tell(place.members, event, by, ref)
        else:
            target = self._directory.get(name or "")
            # The target hears it as the error it is closed with.
            self._tell(self._sharing(target)[1:] if target else (), event, by, ref)
        self._enforce(ban)
        log.info("%s banned %s from %s", ban.by, name or address, room or "the server")
        await self._observed(event)
        return ban

    def _enforce(self, ban: Restriction) -> None:
        """Put out of the room (or off the server) whoever ``ban`` keeps out."""
        moderation = self.moderation
        room = ban.room
        if room is not None:
            place = self._rooms.get(room)
            if place is None:
                return
            for member in list(place.members):
                if isinstance(member, Session) and moderation.banned(
                    member.name, host_of(member), room
                ):
                    if ban.address is not None:
                        # Told by name (not the address, which is for
                        # operators' eyes): its client must know it is out.
                        member.send(
                            Moderated(
                                action="ban",
                                by=ban.by,
                                name=member.name,
                                room=room,
                                reason=ban.reason,
                                until=ban.until,
                            )
                        )
                    self._remove_member(member, place, LeaveReason.KICKED)
            return
        for session in list(self._directory.users):
            if moderation.banned(session.name, host_of(session), None):
                message = "you are banned from this server"
                if ban.reason:
                    message += f": {ban.reason}"
                session.close(
                    LeaveReason.KICKED,
                    ErrorReply(code=ErrorCode.BANNED, message=message),
                )

    async def unban(
        self,
        name: str | None,
        address: str | None,
        room: str | None,
        *,
        by: Session | None = None,
        ref: Any = None,
    ) -> bool:
        """Lift a ban; False (and an error to ``by``) if there was none."""
        like = Restriction(
            kind="ban",
            by="",
            name=None if name is None else name.casefold(),
            address=address,
            room=room,
        )
        if not await self.moderation.lift(like):
            self._error(
                by, ErrorCode.BAD_REQUEST, f"{name or address} is not banned", ref
            )
            return False
        event = Moderated(
            action="unban", by=_name(by), name=name, address=address, room=room
        )
        place = None if room is None or address is not None else self._rooms.get(room)
        self._tell(place.members if place is not None else (), event, by, ref)
        await self._observed(event)
        return True

    async def mute(
        self,
        name: str,
        room: str | None,
        reason: str,
        duration: float | None,
        *,
        by: Session | None = None,
        ref: Any = None,
    ) -> Restriction:
        """Keep ``name`` quiet in ``room`` (None: everywhere)."""
        moderation = self.moderation
        until = None if duration is None else moderation.now() + duration
        mute = Restriction(
            kind="mute",
            by=_name(by),
            name=name.casefold(),
            room=room,
            reason=reason,
            until=until,
        )
        await moderation.restrict(mute)
        event = Moderated(
            action="mute", by=mute.by, name=name, room=room, reason=reason, until=until
        )
        self._tell(self._concerned(name, room), event, by, ref)
        await self._observed(event)
        return mute

    async def unmute(
        self, name: str, room: str | None, *, by: Session | None = None, ref: Any = None
    ) -> bool:
        """Let ``name`` speak again; False (and an error to ``by``) if it
        was not muted."""
        like = Restriction(kind="mute", by="", name=name.casefold(), room=room)
        if not await self.moderation.lift(like):
            self._error(by, ErrorCode.BAD_REQUEST, f"{name} is not muted", ref)
            return False
        event = Moderated(action="unmute", by=_name(by), name=name, room=room)
        self._tell(self._concerned(name, room), event, by, ref)
        await self._observed(event)
        return True

    async def set_operator(
        self,
        room: str,
        name: str,
        on: bool,
        by: Session | None = None,
        ref: Any = None,
    ) -> bool:
        """Make ``name`` an operator of ``room`` (``on``) or not."""
        changed = await self.moderation.set_operator(room, name, on=on)
        event = Moderated(
            action="op" if on else "deop", by=_name(by), name=name, room=room
        )
        place = self._rooms.get(room)
        self._tell(place.members if place is not None else (), event, by, ref)
        await self._observed(event)
        return changed

    async def set_owner(
        self, room: str, name: str, by: Session | None = None, ref: Any = None
    ) -> None:
        """Hand ``room`` over to ``name``; the room's members are told."""
        await self.moderation.set_owner(room, name)
        self._tell_room(
            room, Moderated(action="owner", by=_name(by), name=name, room=room), by, ref
        )

    # --- topics and modes -------------------------------------------------

    def topic(self, room: str, ref: Any = None) -> TopicReply:
        """``room``'s topic, as told."""
        settings = self.moderation.settings(room)
        return TopicReply(room=room, text=settings.topic, by=settings.topic_by, ref=ref)

    def modes(self, room: str, ref: Any = None) -> ModesReply:
        """``room``'s modes, as told."""
        s = self.moderation.settings(room)
        return ModesReply(
            room=room,
            invite_only=s.invite_only,
            moderated=s.moderated,
            secret=s.secret,
            limit=s.limit,
            slow=s.slow,
            ref=ref,
        )

    async def set_topic(
        self, room: str, text: str, by: Session | None = None, ref: Any = None
    ) -> None:
        """Set ``room``'s topic; its members are told."""
        who = _name(by)
        await self.moderation.change_settings(room, topic=text, topic_by=who)
        event = msgspec.structs.replace(self.topic(room), by=who)
        self._tell_room(room, event, by, ref)

    async def set_modes(self, request: Modes, by: Session | None = None) -> None:
        """Change the modes ``request`` gives; the room's members are told."""
        changes = {
            field: getattr(request, field)
            for field in ("invite_only", "moderated", "secret", "limit", "slow")
            if getattr(request, field) is not None
        }
        await self.moderation.change_settings(request.room, **changes)
        event = msgspec.structs.replace(self.modes(request.room), by=_name(by))
        self._tell_room(request.room, event, by, request.ref)

    async def invite(
        self, room: str, name: str, by: Session | None = None, ref: Any = None
    ) -> None:
        """Let ``name`` join invite-only ``room`` once; it is told (if
        online), and so is ``by``."""
        key = name.casefold()
        invited = self.moderation.settings(room).invited
        if key not in invited:
            await self.moderation.change_settings(room, invited=[*invited, key])
        event = Moderated(action="invite", by=_name(by), name=name, room=room)
        target = self._directory.get(name)
        self._tell([target] if target is not None else (), event, by, ref)

    async def set_voice(
        self, room: str, name: str, on: bool, by: Session | None = None, ref: Any = None
    ) -> None:
        """Let ``name`` speak in moderated ``room`` (``on``) or not."""
        key = name.casefold()
        voiced = [n for n in self.moderation.settings(room).voiced if n != key]
        await self.moderation.change_settings(
            room, voiced=[*voiced, key] if on else voiced
        )
        event = Moderated(
            action="voice" if on else "devoice", by=_name(by), name=name, room=room
        )
        self._tell_room(room, event, by, ref)

    def _tell_room(self, room: str, event: Any, by: Session | None, ref: Any) -> None:
        place = self._rooms.get(room)
        self._tell(place.members if place is not None else (), event, by, ref)

    # --- telling ------------------------------------------------------------

    def _concerned(self, name: str, room: str | None) -> Iterable[Any]:
        """Who hears of an action on ``name`` in ``room`` (None: the
        server): the room's members, or those sharing a room with it."""
        if room is not None:
            place = self._rooms.get(room)
            return place.members if place is not None else ()
        target = self._directory.get(name)
        return self._sharing(target) if target is not None else ()

    def _sharing(self, target: Session) -> list[Any]:
        """``target`` (first) and everyone in a room with it, each once."""
        seen: dict[Any, None] = {target: None}
        for room_name in target.rooms:
            place = self._rooms.get(room_name)
            if place is not None:
                seen.update(dict.fromkeys(place.members))
        return list(seen)

    def _tell(
        self,
        members: Iterable[Any],
        event: Moderated | TopicReply | ModesReply,
        by: Session | None,
        ref: Any,
    ) -> None:
        """``event`` to ``members``; ``by`` gets its copy with ``ref``."""
        others = [member for member in members if member is not by]
        if others:
            self._fanout.send_each(others, event)
        if by is not None:
            by.send(msgspec.structs.replace(event, ref=ref))

    async def _observed(self, event: Moderated) -> None:
        """The ``chatkit_moderated`` hook, once the action was told."""
        hooks = self.hooks
        if hooks is not None and hooks.has("chatkit_moderated"):
            await hooks.notify("chatkit_moderated", event=event)

    def _error(self, by: Session | None, code: ErrorCode, text: str, ref: Any) -> None:
        if by is not None:
            by.error(code, text, ref)


def _name(by: Session | None) -> str:
    return SERVER_SENDER if by is None else by.name
