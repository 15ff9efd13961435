"""Telling a moderation action to those it concerns, and putting out whom
it puts out: :class:`Announcer`, on this node and, through the cluster,
on every node.

An action is told to the members of some rooms (a room action: the
room's; an action on a user across the server: the rooms it is in), or to
one user (an invite), or to no one but the operator (an address ban). In a
cluster each node tells its own members and puts out its own users: the
node that acted publishes the action (:data:`~chatkit.backplane.MODERATED`)
and the others do their part when it reaches them
(:meth:`Announcer.told`), after the change of state it made, which the
cluster published first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from .._events import ErrorReply, Moderated, ModesReply, TopicReply
from .._exceptions import ErrorCode
from ..backplane import MODERATED, Envelope
from ._moderation import Moderation, host_of
from ._session import Directory, LeaveReason, Session

if TYPE_CHECKING:
    from ._fanout import Fanout
    from ._node import Node
    from ._rooms import Room, Rooms

__all__ = ["Announcer", "Told"]

log = logging.getLogger("chatkit.server")

#: What an action tells.
Told = Moderated | ModesReply | TopicReply
#: Takes ``session`` out of ``room`` for ``reason`` (announcing its leave).
RemoveMember = Callable[[Session, "Room", LeaveReason], None]

_decode_told = msgspec.json.Decoder(Told).decode


class Announcer:
    """Tells the moderation actions of one server, and carries them out
    on its users.

    Args:
        moderation: the roles and restrictions (a ban's, checked here).
        directory: who is logged in.
        rooms: the server's rooms.
        fanout: where everything sent goes.
        node: the cluster, if any.
        remove_member: takes a member out of a room, announcing it.
    """

    def __init__(
        self,
        moderation: Moderation,
        directory: Directory,
        rooms: Rooms,
        fanout: Fanout,
        node: Node,
        remove_member: RemoveMember,
    ) -> None:
        self._moderation = moderation
        self._directory = directory
        self._rooms = rooms
        self._fanout = fanout
        self._node = node
        self._remove_member = remove_member

    def announce(
        self,
        event: Told,
        rooms: Sequence[str] = (),
        *,
        to: str = "",
        by: Session | None = None,
        ref: Any = None,
        share: bool = True,
    ) -> None:
        """Tell ``event`` to the members of ``rooms`` (or to the user
        ``to``), on every node (``share=False``: on this one), and carry
        it out; ``by`` (the operator, if it is a user) gets its copy with
        ``ref``."""
        self._here(event, rooms, to, by, ref)
        if share:
            self._node.publish(
                MODERATED,
                text=msgspec.json.encode(event).decode(),
                rooms=tuple(rooms),
                to=to,
            )

    def told(self, env: Envelope) -> None:
        """Another node's action (``MODERATED``): this node's part."""
        try:
            event = _decode_told(env.text)
        except msgspec.DecodeError:
            log.error("bad moderation event from node %s: %r", env.node, env.text)
            return
        self._here(event, env.rooms, env.to, None, None)

    def _here(
        self, event: Told, rooms: Sequence[str], to: str, by: Session | None, ref: Any
    ) -> None:
        """Tell ``event`` to this node's concerned, then carry it out here."""
        target = None
        if to:  # one user hears it (an invite)
            invitee = self._directory.get(to)
            listeners: list[Any] = [invitee] if invitee is not None else []
        else:
            rooms_here = [room for name in rooms if (room := self._rooms.get(name))]
            listeners = self._rooms.each_member(rooms_here)
            if isinstance(event, Moderated) and event.name is not None:
                target = self._directory.get(event.name)
        if target is not None and event.room is None:  # an action on a user
            assert isinstance(event, Moderated)
            if event.action in ("kick", "ban"):
                # Put off the server, it hears it as the error it is closed
                # with.
                if target in listeners:
                    listeners.remove(target)
            elif target not in listeners:
                listeners.append(target)
        others = [member for member in listeners if member is not by]
        if others:
            self._fanout.send_each(others, event)
        if by is not None:
            by.send(msgspec.structs.replace(event, ref=ref))
        if isinstance(event, Moderated):
            if event.action == "kick" and target is not None:
                self._kick(target, event)
            elif event.action == "ban":
                self._enforce(event)

    def _kick(self, target: Session, event: Moderated) -> None:
        if event.room is None:
            reason = event.reason or "kicked"
            target.close(
                LeaveReason.KICKED, ErrorReply(code=ErrorCode.KICKED, message=reason)
            )
            return
        room = self._rooms.get(event.room)
        if room is not None and target in room.members:
            self._remove_member(target, room, LeaveReason.KICKED)

    def _enforce(self, ban: Moderated) -> None:
        """Put out of the room (or off the server) this node's users whom
        ``ban`` keeps out."""
        moderation = self._moderation
        if ban.room is not None:
            room = self._rooms.get(ban.room)
            if room is None:
                return
            for member in list(room.members):
                if isinstance(member, Session) and moderation.banned(
                    member.name, host_of(member), room.name
                ):
                    if ban.address is not None:
                        # Told by name (not the address, which is for
                        # operators' eyes): its client must know it is out.
                        member.send(
                            msgspec.structs.replace(ban, name=member.name, address=None)
                        )
                    self._remove_member(member, room, LeaveReason.KICKED)
            return
        for session in list(self._directory.users):
            keeps_out = moderation.banned(session.name, host_of(session), None)
            if keeps_out is not None:
                message = keeps_out.refusal("from this server")
                session.close(
                    LeaveReason.KICKED,
                    ErrorReply(code=ErrorCode.BANNED, message=message),
                )
