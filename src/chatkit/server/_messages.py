"""Messages: what ``say``, ``dm``, ``history`` and ``ChatServer.post`` do,
and how a message is handed out (stored, then sent through the fan-out);
also what the cluster delivers."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import msgspec

from .._events import (
    DirectMessage,
    Dm,
    History,
    HistoryReply,
    Joined,
    Left,
    Message,
    Renamed,
    Say,
)
from .._exceptions import ErrorCode, Veto
from ..backplane import DM, JOINED, LEFT, MESSAGE, RENAMED, Envelope, Publication
from ..protocol import encode_json
from ._session import Directory, RemoteUser, Session

if TYPE_CHECKING:
    from .._hooks import HookDispatcher
    from ..history import HistoryStore
    from ._fanout import Fanout
    from ._limits import Limits
    from ._moderation import Moderation
    from ._node import Node
    from ._rooms import Room
    from ._rooms import Rooms as RoomSet

__all__ = ["Messages"]

log = logging.getLogger("chatkit.server")


class Messages:
    """The messages of one server: their ids, the requests that say or read
    them, and their way out (the store first, then the fan-out).

    Args:
        fanout: where everything sent goes.
        rooms: the server's rooms.
        directory: who is logged in (for direct messages).
        store: the history store.
        hooks: the plugins (called with ``server=`` already bound).
        limits: the server's limits.
        node: the server as a node of its cluster.
    """

    def __init__(
        self,
        fanout: Fanout,
        rooms: RoomSet,
        directory: Directory,
        store: HistoryStore,
        hooks: HookDispatcher,
        limits: Limits,
        node: Node,
        moderation: Moderation,
    ) -> None:
        self.moderation = moderation
        self.fanout = fanout
        self.rooms = rooms
        self.directory = directory
        self.store = store
        self.hooks = hooks
        self.limits = limits
        self.node = node
        self.last_id = 0
        """The highest message id handed out (or seen in the cluster)."""

    def next_id(self) -> int:
        """A new message id."""
        self.last_id += 1
        return self.last_id

    def see_id(self, id: int) -> None:
        """Ids from now on are above ``id``."""
        self.last_id = max(self.last_id, id)

    def _muted(self, session: Session, room: str | None, ref: Any) -> bool:
        """Whether ``session`` may not speak in ``room`` (None: in direct
        messages) now; if so, it is told (``error muted``)."""
        mute = self.moderation.muted(session.name, room)
        if mute is None:
            refusal = None if room is None else self.moderation.may_speak(session, room)
            if refusal is None:
                return False
            session.error(ErrorCode(refusal[0]), refusal[1], ref)
            return True
        where = f"in {room}" if room is not None else "on this server"
        session.error(ErrorCode.MUTED, mute.refusal(where), ref)
        return True

    def member_room(self, session: Session, room: str, ref: Any) -> Room | None:
        """``session``'s room called ``room``; None (and ``error
        not_in_room``) if it is not in it."""
        target = self.rooms.get(room)
        if target is None or session not in target.members:
            session.error(ErrorCode.NOT_IN_ROOM, f"you are not in {room}", ref)
            return None
        return target

    def _too_long(self, session: Session, text: str, ref: Any) -> bool:
        limit = self.limits.max_message_length
        if len(text) <= limit:
            return False
        session.error(
            ErrorCode.TOO_LARGE, f"messages are at most {limit} characters", ref
        )
        return True

    async def say(self, session: Session, say: Say) -> None:
        room = self.member_room(session, say.room, say.ref)
        if (
            room is None
            or self._too_long(session, say.text, say.ref)
            or self._muted(session, room.name, say.ref)
        ):
            return
        text = say.text
        if self.hooks.has("chatkit_message"):
            try:
                text = await self.hooks.rewrite(
                    "chatkit_message",
                    "text",
                    user=session.user,
                    room=room.name,
                    text=text,
                )
            except Veto as exc:
                session.error(ErrorCode.REJECTED, exc.reason, say.ref)
                return
            # The user may have left the room while the hooks ran.
            if session not in room.members or self.rooms.get(room.name) is not room:
                session.error(ErrorCode.NOT_IN_ROOM, f"you left {room.name}", say.ref)
                return
        # In a cluster, delivered (the sender's copy too) when it comes back
        # from the backplane: see deliver().
        if self.node.publish(
            MESSAGE,
            origin=session,
            ref=say.ref,
            room=room.name,
            sender=session.name,
            text=text,
        ):
            return
        message = self.hand_out_message(
            self.next_id(), time.time(), room.name, session.name, text, session, say.ref
        )
        if message is not None:
            await self.delivered(message)

    def hand_out_message(
        self,
        id: int,
        ts: float,
        room_name: str,
        sender: str,
        text: str,
        origin: Session | None,
        ref: Any,
    ) -> Message | None:
        """Store a room message and send it to this node's members of the
        room; ``origin`` (the sender, if a member here) gets ``ref``. None
        (and ``error unavailable`` to ``origin``) if the store refused it."""
        message = Message(id=id, ts=ts, room=room_name, sender=sender, text=text)
        try:
            self.store.append(message)
        except Exception:
            log.exception("the history store refused message %d", id)
            if origin is not None:
                origin.error(
                    ErrorCode.UNAVAILABLE, "your message could not be stored", ref
                )
            return None
        room = self.rooms.get(room_name)
        if room is not None:
            if origin not in room.members:
                origin = None  # it left the room meanwhile (or is elsewhere)
            self.fanout.publish(room, message, origin=origin, ref=ref)
        return message

    def hand_out_dm(
        self,
        id: int,
        ts: float,
        sender: str,
        to: str,
        text: str,
        origin: Session | None,
        ref: Any,
    ) -> DirectMessage | None:
        """Send a direct message to its recipient and to ``origin`` (the
        sender, with ``ref``), as far as they are on this node."""
        dm = DirectMessage(id=id, ts=ts, sender=sender, to=to, text=text)
        recipient = self.directory.get(to)
        if (
            recipient is not None
            and origin is not None
            and recipient is not origin
            and self._dm_refused(recipient, dm, origin, ref)
        ):
            return None
        try:
            self.store.note_id(id)  # not stored, but its id is not to be reused
        except Exception:
            log.exception("the history store refused id %d", id)
            if origin is not None:
                origin.error(
                    ErrorCode.UNAVAILABLE, "your message could not be stored", ref
                )
            return None
        if recipient is not None and recipient is not origin:
            recipient.send(dm)
        if origin is not None:
            origin.send(msgspec.structs.replace(dm, ref=ref), echo=True)
        return dm

    def _dm_refused(
        self, recipient: Session, dm: DirectMessage, origin: Session, ref: Any
    ) -> bool:
        """Whether ``recipient`` has too much of ``origin``'s direct messages
        (or of everyone's) unwritten to take ``dm`` (see
        :meth:`Outbox.admit_dm`); if so, ``origin`` gets ``error
        rate_limited``. Else ``dm`` is counted at the recipient until
        written. The batch it goes in is the open one, or the next."""
        outbox = recipient.outbox
        fanout = self.fanout
        size = len(outbox.wire.encode(dm))
        if outbox.admit_dm(origin.name, size, fanout.mark() + 1, fanout.released):
            return False
        origin.error(
            ErrorCode.RATE_LIMITED,
            f"{recipient.name} has not read your earlier messages yet; try again later",
            ref,
        )
        return True

    async def delivered(self, event: Message | DirectMessage) -> None:
        """Run the delivery hooks of ``event``, once it was released (stored
        and handed to its recipients)."""
        hook = (
            "chatkit_message_delivered"
            if isinstance(event, Message)
            else "chatkit_dm_delivered"
        )
        if self.hooks.has(hook) and await self.fanout.settled(self.fanout.mark()):
            await self.hooks.notify(hook, message=event)

    async def post(self, room: str, text: str, sender: str) -> Message | None:
        """A message on the server's behalf (see :meth:`ChatServer.post`):
        returned once delivered; None if the store refused it."""
        publication = self.node.publish(MESSAGE, room=room, sender=sender, text=text)
        if publication is not None:
            await publication.done.wait()  # it came back (hooks run after)
            result = publication.result
            return result if isinstance(result, Message) else None
        message = self.hand_out_message(
            self.next_id(), time.time(), room, sender, text, None, None
        )
        if message is None or not await self.fanout.settled(self.fanout.mark()):
            return None
        if self.hooks.has("chatkit_message_delivered"):
            await self.hooks.notify("chatkit_message_delivered", message=message)
        return message

    async def dm(self, session: Session, dm: Dm) -> None:
        if self._too_long(session, dm.text, dm.ref) or self._muted(
            session, None, dm.ref
        ):
            return
        cluster = self.node.cluster
        recipient: Session | RemoteUser | None = self.directory.get(dm.to)
        if recipient is None and cluster is not None:
            with suppress(OSError):
                if await cluster.holds(dm.to):
                    recipient = RemoteUser(dm.to)
        if recipient is None:
            session.error(ErrorCode.NO_SUCH_USER, f"nobody is called {dm.to}", dm.ref)
            return
        text = dm.text
        if self.hooks.has("chatkit_dm"):
            seen = recipient.user if isinstance(recipient, Session) else recipient
            try:
                text = await self.hooks.rewrite(
                    "chatkit_dm", "text", user=session.user, recipient=seen, text=text
                )
            except Veto as exc:
                session.error(ErrorCode.REJECTED, exc.reason, dm.ref)
                return
            if isinstance(recipient, Session) and recipient.closed:
                session.error(ErrorCode.NO_SUCH_USER, f"{dm.to} left", dm.ref)
                return
        if self.node.publish(
            DM,
            origin=session,
            ref=dm.ref,
            sender=session.name,
            to=recipient.name,
            text=text,
        ):
            return
        if not isinstance(recipient, Session):
            session.error(ErrorCode.UNAVAILABLE, "the cluster is unreachable", dm.ref)
            return
        message = self.hand_out_dm(
            self.next_id(),
            time.time(),
            session.name,
            recipient.name,
            text,
            session,
            dm.ref,
        )
        if message is not None:
            await self.delivered(message)

    async def history(self, session: Session, request: History) -> None:
        """Answer a page of history: the newest ``limit`` messages (before
        ``before``), or with ``after``, the oldest ``limit`` after it (a
        client catching up asks again after the last one it got)."""
        room = self.member_room(session, request.room, request.ref)
        if room is None:
            return
        limit = self.limits.max_history_page
        if request.limit is not None:
            limit = min(limit, request.limit)
        before, after = request.before, request.after
        store = self.store
        messages: Sequence[Message] = ()
        try:
            if limit == 0:
                pass
            elif after is not None:
                messages = await store.after(room.name, after, limit)
                if before is not None:
                    messages = [m for m in messages if m.id < before]
            elif before is not None:
                messages = await store.before(room.name, before, limit)
            else:
                messages = await store.recent(room.name, limit)
        except Exception:
            log.exception("the history store failed to answer a history request")
            session.error(ErrorCode.UNAVAILABLE, "history is unavailable", request.ref)
            return
        budget = self.limits.max_queued_bytes // 2
        messages = _fit(messages, budget, oldest=after is not None)
        session.send(
            HistoryReply(room=room.name, messages=tuple(messages), ref=request.ref)
        )

    def deliver(
        self, id: int, env: Envelope, publication: Publication | None
    ) -> Message | DirectMessage | None:
        """See :meth:`chatkit.backplane.ClusterPort.deliver`."""
        if id > self.last_id:
            self.last_id = id
        mine = publication is not None
        kind = env.kind
        if kind in (MESSAGE, DM):
            origin = publication.user if publication is not None else None
            ref = publication.ref if publication is not None else None
            event = self._hand_out(
                id, env, origin if isinstance(origin, Session) else None, ref
            )
            return event if mine else None
        if mine:
            return None  # presence: delivered to this node's users already
        if kind in (JOINED, LEFT):
            room = self.rooms.get(env.room)
            if room is not None:
                self.fanout.publish(
                    room,
                    Joined(room=env.room, name=env.sender)
                    if kind == JOINED
                    else Left(
                        room=env.room, name=env.sender, reason=env.reason or None
                    ),
                )
        elif kind == RENAMED:
            rooms = [room for name in env.rooms if (room := self.rooms.get(name))]
            self.renamed(rooms, Renamed(old=env.old, new=env.sender))
        return None

    def renamed(
        self,
        rooms: list[Room],
        event: Renamed,
        origin: Session | None = None,
        ref: Any = None,
    ) -> None:
        """Tell a rename to the members of ``rooms`` (the renamer's), each
        once, as far as presence is told in the room (``presence_limit``):
        a broadcast to the largest such room, encoded once and released
        like its messages, and one event for each member of the others not
        in it. ``origin`` (the renamer, if it is here) gets its own copy,
        with ``ref``, whatever the rooms."""
        told = [room for room in rooms if self.rooms.announces(room)]
        if not told:
            if origin is not None:
                origin.send(msgspec.structs.replace(event, ref=ref))
            return
        first = max(told, key=lambda room: len(room.members))
        if origin is not None and not origin.outbox.wire.echo:
            # A format without echo: the renamer's copy is a member's.
            self.fanout.publish(first, event)
        else:
            self.fanout.publish(first, event, origin=origin, ref=ref)
        if len(told) > 1:
            rest = [room for room in told if room is not first]
            members = first.members
            self.fanout.send_each(
                (m for m in self.rooms.each_member(rest) if m not in members), event
            )

    def deliver_here(self, publication: Publication) -> Message | DirectMessage | None:
        """See :meth:`chatkit.backplane.ClusterPort.deliver_here`."""
        env, origin, ref = publication.env, publication.user, publication.ref
        session = origin if isinstance(origin, Session) else None
        if env.kind == MESSAGE and self.rooms.get(env.room) is not None:
            return self._hand_out(self.next_id(), env, session, ref)
        if env.kind == DM and session is not None:
            if self.directory.get(env.to) is None:
                session.error(ErrorCode.UNAVAILABLE, "the cluster is unreachable", ref)
                return None
            return self._hand_out(self.next_id(), env, session, ref)
        return None

    def _hand_out(
        self, id: int, env: Envelope, origin: Session | None, ref: Any
    ) -> Message | DirectMessage | None:
        if env.kind == MESSAGE:
            return self.hand_out_message(
                id, env.ts, env.room, env.sender, env.text, origin, ref
            )
        return self.hand_out_dm(id, env.ts, env.sender, env.to, env.text, origin, ref)


def _fit(
    messages: Sequence[Message], budget: int, *, oldest: bool
) -> Sequence[Message]:
    """As many of ``messages`` (at least one) as fit in ``budget`` bytes of
    JSON: the oldest (a client catching up asks again after the last one)
    or the newest (it asks again before the first one). A page of long
    messages is then shorter than asked for, never dropped as too_slow for
    overflowing the asker's buffer."""
    # The usual page is answered at once: a character is at most 6 bytes of
    # JSON (an escape), and a message's other fields under 256.
    text = sum(len(m.text) for m in messages)
    if len(messages) < 2 or 6 * text + 256 * len(messages) <= budget:
        return messages
    order = messages if oldest else messages[::-1]
    size = count = 0
    for message in order:
        size += len(encode_json(message))
        if size > budget and count:
            break
        count += 1
    return messages[:count] if oldest else messages[len(messages) - count :]
