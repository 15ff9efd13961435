"""The chat rules: what each request does (hello, say, dm, join, leave,
nick, who, rooms, history, ping, bye) and what leaving does.

Handlers decide and send; they never write bytes nor know about batches:
everything goes through the fan-out, and every await (a plugin, a store, the
cluster) holds nobody's output back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import msgspec

from .._events import (
    LOBBY,
    PROTOCOL_VERSION,
    Bye,
    ClientRequest,
    DirectMessage,
    Dm,
    ErrorReply,
    Hello,
    History,
    HistoryReply,
    Join,
    Joined,
    Leave,
    Left,
    Message,
    Nick,
    Ping,
    Pong,
    Renamed,
    RoomInfo,
    Rooms,
    RoomsReply,
    Say,
    Welcome,
    Who,
    WhoReply,
)
from .._exceptions import ErrorCode, Veto
from ..backplane import DM, JOINED, LEFT, MESSAGE, RENAMED, Envelope, Publication
from ..protocol import Mode, encode_json, is_valid_name, is_valid_room
from ._session import LeaveReason, RemoteUser, Session

if TYPE_CHECKING:
    from .._hooks import HookDispatcher
    from ..backplane import Backplane
    from ..history import HistoryStore
    from ._fanout import Fanout
    from ._limits import Limits
    from ._rooms import Room
    from ._rooms import Rooms as RoomSet

__all__ = ["ChatRules"]

log = logging.getLogger("chatkit.server")

_NAME_RULE = "names are 1-32 letters, digits, '_', '-' or '.'"
_ROOM_RULE = "room names are 1-64 letters, digits, '_', '-' or '.'"


class ChatRules:
    """The rules of one server's chat, and who is logged in.

    Args:
        fanout: where everything sent goes.
        rooms: the server's rooms.
        store: the history store.
        hooks: the plugins (called with ``server=`` already bound).
        limits: the server's limits.
        server_name: the ``server`` field of ``welcome``.
        backplane: the cluster, if the server is one node of several.
    """

    def __init__(
        self,
        fanout: Fanout,
        rooms: RoomSet,
        store: HistoryStore,
        hooks: HookDispatcher,
        limits: Limits,
        server_name: str,
        backplane: Backplane | None,
    ) -> None:
        self.fanout = fanout
        self.rooms = rooms
        self.store = store
        self.hooks = hooks
        self.limits = limits
        self.server_name = server_name
        self.backplane = backplane
        self.last_id = 0
        """The highest message id handed out (or seen in the cluster)."""
        self.closing = False
        """The server is shutting down: no presence notices for leavers."""
        self.names: dict[str, Session] = {}  # casefolded name -> session
        self.users: dict[Session, None] = {}  # logged in, in login order
        self.connections: set[Session] = set()
        """Every connection, logged in or not."""
        self.gone_by = math.inf
        """When leavers' hooks and goodbyes must be done (the shutdown's
        deadline, once it began)."""

    def next_id(self) -> int:
        """A new message id."""
        self.last_id += 1
        return self.last_id

    def get(self, name: str) -> Session | None:
        """The logged-in session called ``name`` (case-insensitively)."""
        return self.names.get(name.casefold())

    def kick(self, name: str, reason: str) -> bool:
        """Disconnect user ``name`` with ``error kicked``; True if found."""
        session = self.get(name)
        if session is None:
            return False
        error = ErrorReply(code=ErrorCode.KICKED, message=reason)
        session.close(LeaveReason.KICKED, error)
        return True

    # --- what the backplane may ask (chatkit.backplane.ClusterPort) ----------

    def see_id(self, id: int) -> None:
        """Ids from now on are above ``id``."""
        self.last_id = max(self.last_id, id)

    @property
    def close_timeout(self) -> float:
        """How long closing may take (the limits')."""
        return self.limits.close_timeout

    def memberships(self) -> list[tuple[str, tuple[str, ...]]]:
        """Each local user's name and rooms, in login order."""
        return [(session.name, session.rooms) for session in self.users]

    def has_user(self, name: str) -> bool:
        """Whether a local user is called ``name``."""
        return self.get(name) is not None

    # --- the handler a session calls --------------------------------------

    async def handle(
        self, session: Session, request: ClientRequest
    ) -> LeaveReason | None:
        """Act on one request; a reason when the connection must end."""
        match request:
            case Say():
                await self._say(session, request)
            case Hello():
                return await self._hello(session, request)
            case Dm():
                await self._dm(session, request)
            case Join():
                await self._join(session, request)
            case Leave():
                await self._leave(session, request)
            case Nick():
                await self._nick(session, request)
            case Who():
                names = await self._who(request.room)
                session.send(WhoReply(room=request.room, names=names, ref=request.ref))
            case Rooms():
                counts = await self._room_counts()
                infos = tuple(
                    RoomInfo(name=name, members=counts[name]) for name in sorted(counts)
                )
                session.send(RoomsReply(rooms=infos, ref=request.ref))
            case History():
                await self._history(session, request)
            case Ping():
                session.send(Pong(ref=request.ref))
            case Bye():
                return LeaveReason.EXIT if session.mode == "line" else LeaveReason.BYE
        return None

    def opened(self, session: Session) -> None:
        """A connection came (closed at once if the server is shutting
        down)."""
        self.connections.add(session)
        if self.closing:
            session.close(LeaveReason.SHUTDOWN)

    async def stopped(self, session: Session) -> None:
        """The session stopped reading: what it said goes out first (in a
        cluster), then it leaves its rooms."""
        await self.settle(session)
        self.detach(session)

    async def gone(self, session: Session) -> None:
        """The connection is over (whatever happened): it leaves everything,
        then the leave hooks run."""
        self.connections.discard(session)
        self.detach(session)
        await self.after_detach(session)

    # --- hello --------------------------------------------------------------

    async def _hello(self, session: Session, hello: Hello) -> LeaveReason | None:
        name = hello.name
        # Only the name's form before authenticating: whether it is in use
        # is for authenticated clients to learn (docs/security.md).
        if not is_valid_name(name):
            self._name_refused(session, name, hello.ref)
            return None
        try:
            await self.hooks.veto(
                "chatkit_authenticate",
                name=name,
                token=hello.token,
                address=session.address,
            )
        except Veto as exc:
            log.info("refused %s from %s: %s", name, session.address, exc.reason)
            session.error(ErrorCode.UNAUTHORIZED, exc.reason, hello.ref)
            return LeaveReason.DISCONNECT
        # Is the name in use (the hooks may have awaited)? Claim it across
        # the cluster, and check it again after that await.
        if (
            self._name_refused(session, name, hello.ref)
            or not await self._claim(session, name, hello.ref)
            or self._name_refused(session, name, hello.ref)
        ):
            return None
        session.accept(name)
        self.names[name.casefold()] = session
        self.users[session] = None
        session.send(
            Welcome(
                name=name,
                protocol=PROTOCOL_VERSION,
                server=self.server_name,
                rooms=(LOBBY,),
                ref=hello.ref,
            )
        )
        self._add_member(session, self.rooms[LOBBY], ref=None)
        log.info("%s has joined the chat.", name)
        await self.hooks.notify("chatkit_user_connected", user=session.user)
        await self.hooks.notify("chatkit_user_joined", user=session.user, room=LOBBY)
        return None

    def _name_refused(self, session: Session, name: str, ref: Any) -> bool:
        """Tell ``session`` why ``name`` cannot be theirs (invalid, or
        someone else's here); True if so."""
        if not is_valid_name(name):
            session.error(ErrorCode.BAD_NAME, _NAME_RULE, ref)
            return True
        holder = self.names.get(name.casefold())
        if (holder is not None and holder is not session) or session.closed:
            session.error(ErrorCode.NAME_TAKEN, f"{name} is taken", ref)
            return True
        return False

    async def _claim(self, session: Session, name: str, ref: Any) -> bool:
        """Claim ``name`` across the cluster, if there is one; tell
        ``session`` if it cannot be."""
        bp = self.backplane
        if bp is None:
            return True
        try:
            claimed = await bp.claim(name)
        except OSError:
            session.error(
                ErrorCode.UNAVAILABLE,
                "the cluster is unreachable; try again later",
                ref,
            )
            return False
        if not claimed:
            session.error(ErrorCode.NAME_TAKEN, f"{name} is taken", ref)
        return claimed

    # --- messages -----------------------------------------------------------

    def _member_room(self, session: Session, room: str, ref: Any) -> Room | None:
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

    async def _say(self, session: Session, say: Say) -> None:
        room = self._member_room(session, say.room, say.ref)
        if room is None or self._too_long(session, say.text, say.ref):
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
        if self._publish(
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
        try:
            self.store.note_id(id)  # not stored, but its id is not to be reused
        except Exception:
            log.exception("the history store refused id %d", id)
            if origin is not None:
                origin.error(
                    ErrorCode.UNAVAILABLE, "your message could not be stored", ref
                )
            return None
        recipient = self.get(to)
        if recipient is not None and recipient is not origin:
            recipient.send(dm)
        if origin is not None:
            origin.send(msgspec.structs.replace(dm, ref=ref), echo=True)
        return dm

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
        publication = self._publish(MESSAGE, room=room, sender=sender, text=text)
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

    async def _dm(self, session: Session, dm: Dm) -> None:
        if self._too_long(session, dm.text, dm.ref):
            return
        cluster = self.cluster
        recipient: Session | RemoteUser | None = self.get(dm.to)
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
        if self._publish(
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

    # --- rooms --------------------------------------------------------------

    async def _join(self, session: Session, join: Join) -> None:
        if not is_valid_room(join.room):
            session.error(ErrorCode.BAD_NAME, _ROOM_RULE, join.ref)
            return
        room = self.rooms.get(join.room)
        if room is not None and session in room.members:
            session.send(Joined(room=room.name, name=session.name, ref=join.ref))
            return
        if len(session.rooms) >= self.limits.max_rooms_per_user:
            session.error(
                ErrorCode.TOO_MANY_ROOMS,
                f"you are in {len(session.rooms)} rooms, the most allowed",
                join.ref,
            )
            return
        room = self.rooms.open(join.room)
        self._add_member(session, room, ref=join.ref)
        await self.hooks.notify(
            "chatkit_user_joined", user=session.user, room=room.name
        )

    def _add_member(self, session: Session, room: Room, ref: Any) -> None:
        announce = self.rooms.add(room, session)
        session.rooms += (room.name,)
        bp = self.backplane
        if bp is not None:
            bp.member(room.name, session.name, present=True)
            if announce:
                self._publish(JOINED, room=room.name, sender=session.name)
        joined = Joined(room=room.name, name=session.name)
        if announce:
            self.fanout.publish(room, joined, origin=session, ref=ref)
        elif session.mode != Mode.LINE.value:
            # Too large a room to announce joins: only the joiner's own copy.
            session.send(msgspec.structs.replace(joined, ref=ref))

    async def _leave(self, session: Session, leave: Leave) -> None:
        room = self._member_room(session, leave.room, leave.ref)
        if room is None:
            return
        await self.settle(session)
        self._remove_member(session, room, LeaveReason.LEAVE)
        session.send(
            Left(
                room=room.name,
                name=session.name,
                reason=LeaveReason.LEAVE,
                ref=leave.ref,
            )
        )
        await self.hooks.notify(
            "chatkit_user_left",
            user=session.user,
            room=room.name,
            reason=LeaveReason.LEAVE,
        )

    def _remove_member(
        self, session: Session, room: Room, reason: LeaveReason, *, notify: bool = True
    ) -> None:
        announce = self.rooms.remove(room, session) and notify
        session.rooms = tuple(name for name in session.rooms if name != room.name)
        bp = self.backplane
        if bp is not None:
            bp.member(room.name, session.name, present=False)
            if announce:
                self._publish(LEFT, room=room.name, sender=session.name, reason=reason)
        if announce:
            self.fanout.publish(
                room, Left(room=room.name, name=session.name, reason=reason)
            )

    async def _nick(self, session: Session, nick: Nick) -> None:
        await self.settle(session)
        new = nick.name
        if self._name_refused(session, new, nick.ref):
            return
        if self.hooks.has("chatkit_nick"):
            try:
                await self.hooks.veto("chatkit_nick", user=session.user, new=new)
            except Veto as exc:
                session.error(ErrorCode.REJECTED, exc.reason, nick.ref)
                return
            # The hooks may have awaited: check the name again.
            if self._name_refused(session, new, nick.ref):
                return
        old = session.name
        bp = self.backplane
        if new.casefold() != old.casefold():
            if not await self._claim(session, new, nick.ref) or self._name_refused(
                session, new, nick.ref
            ):
                return
            if bp is not None:
                bp.release(old)
        del self.names[old.casefold()]
        self.names[new.casefold()] = session
        session.name = new
        event = Renamed(old=old, new=new)
        rooms = [self.rooms[name] for name in session.rooms]
        self.fanout.send_each(self.rooms.each_member(rooms, but=session), event)
        session.send(msgspec.structs.replace(event, ref=nick.ref))
        if bp is not None:
            for room_name in session.rooms:
                bp.member(room_name, old, present=False)
                bp.member(room_name, new, present=True)
            self._publish(RENAMED, old=old, sender=new, rooms=session.rooms)
        log.info("%s is now known as %s.", old, new)
        await self.hooks.notify(
            "chatkit_user_renamed", user=session.user, old=old, new=new
        )

    async def _who(self, room_name: str) -> tuple[str, ...]:
        """The names in a room: the whole cluster's if there is one."""
        cluster = self.cluster
        if cluster is not None:
            with suppress(OSError):
                return await cluster.who(room_name)
        room = self.rooms.get(room_name)
        return tuple(member.name for member in room.members) if room else ()

    async def _room_counts(self) -> dict[str, int]:
        """Each room's number of members: the whole cluster's if there is one."""
        cluster = self.cluster
        if cluster is not None:
            with suppress(OSError):
                return await cluster.rooms()
        return {room.name: len(room.members) for room in self.rooms}

    async def _history(self, session: Session, request: History) -> None:
        """Answer a page of history: the newest ``limit`` messages (before
        ``before``), or with ``after``, the oldest ``limit`` after it (a
        client catching up asks again after the last one it got)."""
        room = self._member_room(session, request.room, request.ref)
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

    # --- leaving ------------------------------------------------------------

    def detach(self, session: Session) -> None:
        """Free the session's name and take it out of its rooms (once; the
        rooms it left are kept in ``session.left_rooms`` for the hooks)."""
        if not session.name or self.names.get(session.name.casefold()) is not session:
            return
        reason = session.reason or LeaveReason.DISCONNECT
        session.left_rooms = session.rooms
        for name in session.left_rooms:
            self._remove_member(
                session, self.rooms[name], reason, notify=not self.closing
            )
        del self.names[session.name.casefold()]
        del self.users[session]
        if self.backplane is not None:
            self.backplane.release(session.name)
        log.info("%s has left the chat.", session.name)

    async def after_detach(self, session: Session) -> None:
        """Run the leave hooks of a session that left the server."""
        if not session.name:
            return
        reason = session.reason or LeaveReason.DISCONNECT
        for room in session.left_rooms:
            await self.hooks.notify(
                "chatkit_user_left", user=session.user, room=room, reason=reason
            )
        await self.hooks.notify(
            "chatkit_user_disconnected", user=session.user, reason=reason
        )

    # --- the cluster --------------------------------------------------------

    @property
    def cluster(self) -> Backplane | None:
        """The backplane while it reaches the cluster; None when alone."""
        bp = self.backplane
        return bp if bp is not None and bp.available else None

    def _publish(
        self,
        kind: str,
        *,
        origin: Session | None = None,
        ref: Any = None,
        **fields: Any,
    ) -> Publication | None:
        """Publish an event to the cluster; None when there is none to
        publish to (no backplane, or it lost Redis): deliver it here."""
        cluster = self.cluster
        if cluster is None:
            return None
        return cluster.publish(
            Envelope(kind, ts=time.time(), **fields), user=origin, ref=ref
        )

    async def settle(self, session: Session) -> None:
        """In a cluster, wait until what ``session`` said has come back from
        the backplane (delivered here, the sender's copy with its ``ref``):
        a leave, rename or disconnect is applied here at once but reaches
        the other nodes through the stream, after those messages, so it
        must come after them here too. Losing the backplane ends the wait."""
        bp = self.backplane
        if bp is not None:
            for publication in bp.pending(session):
                await publication.done.wait()

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
            self.fanout.send_each(
                self.rooms.each_member(rooms), Renamed(old=env.old, new=env.sender)
            )
        return None

    def deliver_here(self, publication: Publication) -> Message | DirectMessage | None:
        """See :meth:`chatkit.backplane.ClusterPort.deliver_here`."""
        env, origin, ref = publication.env, publication.user, publication.ref
        session = origin if isinstance(origin, Session) else None
        if env.kind == MESSAGE and self.rooms.get(env.room) is not None:
            return self._hand_out(self.next_id(), env, session, ref)
        if env.kind == DM and session is not None:
            if self.get(env.to) is None:
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
