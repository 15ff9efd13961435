"""The moderation requests: ``kick``, ``ban``, ``unban``, ``mute``,
``unmute``, ``op``, ``deop``, ``owner``, ``bans``, ``topic``, ``mode``,
``invite``, ``voice`` and ``devoice`` (:class:`Moderator`), on the state
that :class:`~chatkit.server._moderation.Moderation` keeps.

Every request is checked against the requester's role first (``error
forbidden``); the state is changed (in a cluster, for every node), then
what was done is told to those it concerns and carried out, on every node
(:class:`~chatkit.server._announcer.Announcer`), the requester's copy
carrying its ``ref`` as the acknowledgement. Then the ``chatkit_moderated``
hook sees it, once per action, on the node that acted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from .._events import (
    Ban,
    Bans,
    ClientRequest,
    Deop,
    Devoice,
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
from ._session import SERVER_SENDER, Directory, Session

if TYPE_CHECKING:
    from .._hooks import HookDispatcher
    from ._announcer import Announcer
    from ._node import Node
    from ._rooms import Room

__all__ = ["Moderator"]

log = logging.getLogger("chatkit.server")

#: Runs ``function(*args)`` in a task (a nursery's ``start_soon``).
Spawn = Callable[..., None]


class Moderator:
    """Answers the moderation requests of one server.

    Args:
        moderation: the roles and restrictions.
        announcer: tells what is done, and carries it out.
        directory: who is logged in.
        node: the cluster, if any.
        hooks: the plugins, told of every action (``chatkit_moderated``).
    """

    def __init__(
        self,
        moderation: Moderation,
        announcer: Announcer,
        directory: Directory,
        node: Node,
        hooks: HookDispatcher | None = None,
    ) -> None:
        self.moderation = moderation
        self.announcer = announcer
        self.hooks = hooks
        self.spawn: Spawn | None = None
        """Where the hook of an action taken without awaiting (``kick``
        from the server's Python API) runs: the server's connections
        nursery's ``start_soon``, set while it serves."""
        self._directory = directory
        self._node = node

    def banned_from(self, session: Session, room: str, ref: Any) -> bool:
        """Tell ``session`` it is banned from ``room`` (which it would
        join); True if so."""
        ban = self.moderation.banned(session.name, host_of(session), room)
        if ban is None:
            return False
        session.error(ErrorCode.BANNED, ban.refusal(f"from {room}"), ref)
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
        room's topic or modes needs no role); ``error unavailable`` if it
        needs the cluster and the cluster is unreachable."""
        try:
            await self._handle(session, request)
        except OSError as exc:
            log.warning(
                "%s refused: the cluster is unreachable (%s)",
                type(request).__name__,
                exc,
            )
            session.error(
                ErrorCode.UNAVAILABLE,
                "the cluster is unreachable; try again later",
                request.ref,
            )

    async def _handle(self, session: Session, request: ClientRequest) -> None:
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
                await self.kick(
                    request.name, request.room, request.reason, session, ref
                )
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

    async def _where(self, name: str) -> tuple[str, tuple[str, ...]] | None:
        """User ``name`` (as this node knows it) and its rooms, on any
        node; None if there is no such user.

        Raises:
            OSError: the cluster is unreachable.
        """
        target = self._directory.get(name)
        if target is not None:
            return target.name, target.rooms
        cluster = self._node.cluster
        return None if cluster is None else await cluster.locate(name)

    async def kick(
        self,
        name: str,
        room: str | None,
        reason: str,
        by: Session | None = None,
        ref: Any = None,
    ) -> bool:
        """Put ``name`` out of ``room`` (None: off the server), on whichever
        node it is; False (and an error to ``by``) if it is not there.

        Raises:
            OSError: the cluster is unreachable.
        """
        where = await self._where(name)
        if where is None or (room is not None and room not in where[1]):
            in_room = f" in {room}" if room is not None else ""
            self._error(by, ErrorCode.NO_SUCH_USER, f"no user {name}{in_room}", ref)
            return False
        spelt, rooms = where
        await self._observed(self._put_out(spelt, rooms, room, reason, by, ref))
        return True

    def _put_out(
        self,
        name: str,
        rooms: tuple[str, ...],
        room: str | None,
        reason: str,
        by: Session | None = None,
        ref: Any = None,
        *,
        share: bool = True,
    ) -> Moderated:
        """Kick ``name`` (in ``rooms``) out of ``room`` (None: off the
        server), on every node (``share=False``: this one); what was told."""
        event = Moderated(
            action="kick", by=_name(by), name=name, room=room, reason=reason
        )
        audience = rooms if room is None else (room,)
        self.announcer.announce(event, audience, by=by, ref=ref, share=share)
        log.info(
            "%s kicked %s from %s: %s", event.by, name, room or "the server", reason
        )
        return event

    def kick_soon(self, name: str, room: str | None, reason: str) -> bool:
        """The server's own kick, which cannot await: a user of this node
        is put out now (True; False if it is not there); in a cluster, one
        of another node in a task (True: asked). The ``chatkit_moderated``
        hook runs in a task of its own."""
        target = self._directory.get(name)
        spawn = self.spawn
        if target is None:
            if self._node.cluster is None or spawn is None:
                return False
            spawn(self._kick_elsewhere, name, room, reason)
            return True
        if room is not None and room not in target.rooms:
            return False
        event = self._put_out(target.name, target.rooms, room, reason)
        hooks = self.hooks
        if hooks is not None and spawn is not None and hooks.has("chatkit_moderated"):
            spawn(self._observed, event)
        return True

    async def _kick_elsewhere(self, name: str, room: str | None, reason: str) -> None:
        try:
            await self.kick(name, room, reason)
        except OSError as exc:
            log.warning("could not kick %s: the cluster is unreachable (%s)", name, exc)

    def kick_here(self, name: str, reason: str) -> bool:
        """Put ``name``, a user of this node, off it, telling this node's
        users alone (its name is another node's now); False if there is
        no such user here."""
        target = self._directory.get(name)
        if target is None:
            return False
        self._put_out(target.name, target.rooms, None, reason, share=False)
        return True

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

    async def _audience(self, name: str | None, room: str | None) -> tuple[str, ...]:
        """The rooms whose members hear of an action on ``name`` in
        ``room`` (None: across the server: the rooms it is in).

        Raises:
            OSError: the cluster is unreachable.
        """
        if room is not None:
            return (room,)
        where = None if name is None else await self._where(name)
        return () if where is None else where[1]

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
        (None: the server), and put out whoever it keeps out.

        Raises:
            OSError: the cluster is unreachable.
        """
        moderation = self.moderation
        # An address ban is for operators' eyes.
        rooms = () if address is not None else await self._audience(name, room)
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
        self.announcer.announce(event, rooms, by=by, ref=ref)
        log.info("%s banned %s from %s", ban.by, name or address, room or "the server")
        await self._observed(event)
        return ban

    async def unban(
        self,
        name: str | None,
        address: str | None,
        room: str | None,
        *,
        by: Session | None = None,
        ref: Any = None,
    ) -> bool:
        """Lift a ban; False (and an error to ``by``) if there was none.

        Raises:
            OSError: the cluster is unreachable.
        """
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
        rooms = (room,) if room is not None and address is None else ()
        self.announcer.announce(event, rooms, by=by, ref=ref)
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
        """Keep ``name`` quiet in ``room`` (None: everywhere).

        Raises:
            OSError: the cluster is unreachable.
        """
        moderation = self.moderation
        rooms = await self._audience(name, room)
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
        self.announcer.announce(event, rooms, by=by, ref=ref)
        await self._observed(event)
        return mute

    async def unmute(
        self, name: str, room: str | None, *, by: Session | None = None, ref: Any = None
    ) -> bool:
        """Let ``name`` speak again; False (and an error to ``by``) if it
        was not muted.

        Raises:
            OSError: the cluster is unreachable.
        """
        rooms = await self._audience(name, room)
        like = Restriction(kind="mute", by="", name=name.casefold(), room=room)
        if not await self.moderation.lift(like):
            self._error(by, ErrorCode.BAD_REQUEST, f"{name} is not muted", ref)
            return False
        event = Moderated(action="unmute", by=_name(by), name=name, room=room)
        self.announcer.announce(event, rooms, by=by, ref=ref)
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
        self.announcer.announce(event, (room,), by=by, ref=ref)
        await self._observed(event)
        return changed

    async def set_owner(
        self, room: str, name: str, by: Session | None = None, ref: Any = None
    ) -> None:
        """Hand ``room`` over to ``name``; the room's members are told."""
        await self.moderation.set_owner(room, name)
        event = Moderated(action="owner", by=_name(by), name=name, room=room)
        self.announcer.announce(event, (room,), by=by, ref=ref)

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
        self.announcer.announce(event, (room,), by=by, ref=ref)

    async def set_modes(self, request: Modes, by: Session | None = None) -> None:
        """Change the modes ``request`` gives; the room's members are told."""
        changes = {
            field: getattr(request, field)
            for field in ("invite_only", "moderated", "secret", "limit", "slow")
            if getattr(request, field) is not None
        }
        await self.moderation.change_settings(request.room, **changes)
        event = msgspec.structs.replace(self.modes(request.room), by=_name(by))
        self.announcer.announce(event, (request.room,), by=by, ref=request.ref)

    async def invite(
        self, room: str, name: str, by: Session | None = None, ref: Any = None
    ) -> None:
        """Let ``name`` join invite-only ``room`` once; it is told (if
        online), and so is ``by``."""
        await self.moderation.invite(room, name)
        event = Moderated(action="invite", by=_name(by), name=name, room=room)
        self.announcer.announce(event, to=name, by=by, ref=ref)

    async def set_voice(
        self, room: str, name: str, on: bool, by: Session | None = None, ref: Any = None
    ) -> None:
        """Let ``name`` speak in moderated ``room`` (``on``) or not."""
        await self.moderation.set_voice(room, name, on=on)
        event = Moderated(
            action="voice" if on else "devoice", by=_name(by), name=name, room=room
        )
        self.announcer.announce(event, (room,), by=by, ref=ref)

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
