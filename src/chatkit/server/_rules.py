"""The chat rules: what each request does (hello, join, leave, nick, who,
rooms, ping, bye here; say, dm and history in ``_messages``), and what
coming and leaving do.

Handlers decide and send; they never write bytes nor know about batches:
everything goes through the fan-out, and every await (a plugin, a store, the
cluster) holds nobody's output back.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from collections.abc import Iterable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import msgspec

from .._events import (
    LOBBY,
    PROTOCOL_VERSION,
    Bye,
    ClientRequest,
    Command,
    Dm,
    ErrorReply,
    Hello,
    History,
    Join,
    Joined,
    Leave,
    Left,
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
from .._moderation_events import MODERATION_REQUESTS
from ..backplane import JOINED, LEFT, RENAMED
from ..protocol import Mode, is_valid_name, is_valid_room
from ._admission import Admission
from ._announcer import Announcer
from ._bucket import Bucket
from ._commands import run_command
from ._messages import Messages
from ._moderation import Moderation, ModerationStore, host_of
from ._moderator import Moderator
from ._node import Node
from ._port import NodePort
from ._session import Directory, LeaveReason, Session, login_of

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
# Random bytes of a session's resume secret (welcome.resume): 144 bits.
_RESUME_BYTES = 18


def _resumes(hello: Hello, holder: Session) -> bool:
    """Whether ``hello`` presents ``holder``'s resume secret."""
    offered = hello.resume
    if not offered:
        return False
    return hmac.compare_digest(offered.encode(), holder.resume.encode())


class ChatRules:
    """The rules of one server's chat: the requests (messages are
    :class:`Messages`' part, moderation the :class:`Moderator`'s), and the
    life of a connection.

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
        operators: Iterable[str] = (),
    ) -> None:
        self.fanout = fanout
        self.rooms = rooms
        self.hooks = hooks
        self.limits = limits
        self.server_name = server_name
        self.node = Node(backplane)
        self.directory = Directory()
        self.admission = Admission(limits)
        """Who may connect (told here of logins and of connections gone)."""
        self.moderation = Moderation(
            operators,
            store if isinstance(store, ModerationStore) else None,
            shared=backplane,
        )
        """Roles, bans and mutes (loaded by :meth:`Moderation.open`)."""
        self.messages = Messages(
            fanout,
            rooms,
            self.directory,
            store,
            hooks,
            limits,
            self.node,
            self.moderation,
        )
        announcer = Announcer(
            self.moderation,
            self.directory,
            rooms,
            fanout,
            self.node,
            self._remove_member,
        )
        self.moderator = Moderator(
            self.moderation, announcer, self.directory, self.node, hooks
        )
        self.port = NodePort(
            self.messages, self.moderation, self.moderator, self.directory, limits
        )
        """What the backplane may ask of this server."""
        self.closing = False
        """The server is shutting down: no presence notices for leavers."""
        self.gone_by = math.inf
        """When leavers' hooks and goodbyes must be done (the shutdown's
        deadline, once it began)."""

    def get(self, name: str) -> Session | None:
        """The logged-in session called ``name`` (case-insensitively)."""
        return self.directory.get(name)

    # --- the handler a session calls --------------------------------------

    async def handle(
        self, session: Session, request: ClientRequest
    ) -> LeaveReason | None:
        """Act on one request; a reason when the connection must end."""
        match request:
            case Say():
                await self.messages.say(session, request)
            case Hello():
                return await self._hello(session, request)
            case Dm():
                await self.messages.dm(session, request)
            case Join():
                await self._join(session, request)
            case Leave():
                await self._leave(session, request)
            case Nick():
                await self._nick(session, request)
            case Who():
                if not self.moderation.visible(
                    request.room, request.room in session.rooms
                ):
                    session.error(
                        ErrorCode.NOT_IN_ROOM, f"{request.room} is secret", request.ref
                    )
                    return None
                names = await self._who(request.room)
                session.send(WhoReply(room=request.room, names=names, ref=request.ref))
            case Rooms():
                counts = {
                    name: count
                    for name, count in (await self._room_counts()).items()
                    if self.moderation.visible(name, name in session.rooms)
                }
                infos = tuple(
                    RoomInfo(name=name, members=counts[name]) for name in sorted(counts)
                )
                session.send(RoomsReply(rooms=infos, ref=request.ref))
            case History():
                await self.messages.history(session, request)
            case Ping():
                session.send(Pong(ref=request.ref))
            case Bye():
                return LeaveReason.EXIT if session.mode == "line" else LeaveReason.BYE
            case _ if isinstance(request, MODERATION_REQUESTS):
                await self.moderator.handle(session, request)
            case Command():
                await run_command(
                    session, request, self.hooks, self.messages, self.limits
                )
        return None

    def opened(self, session: Session) -> None:
        """A connection came (closed at once if the server is shutting
        down)."""
        self.directory.connections.add(session)
        if self.closing:
            session.close(LeaveReason.SHUTDOWN)

    async def stopped(self, session: Session) -> None:
        """The session stopped reading: what it said goes out first (in a
        cluster), then it leaves its rooms."""
        await self.node.settle(session)
        self.detach(session)

    async def gone(self, session: Session) -> None:
        """The connection is over (whatever happened): it leaves everything,
        then the leave hooks run."""
        self.directory.connections.discard(session)
        self.admission.gone(session)
        if session.reason is LeaveReason.REPLACED:
            return  # detached, and its hooks run, by the session taking over
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
            login = login_of(
                await self.hooks.veto(
                    "chatkit_authenticate",
                    name=name,
                    token=hello.token,
                    address=session.address,
                )
            )
        except Veto as exc:
            log.info("refused %s from %s: %s", name, session.address, exc.reason)
            session.error(ErrorCode.UNAUTHORIZED, exc.reason, hello.ref)
            return LeaveReason.DISCONNECT
        ban = self.moderation.banned(name, host_of(session), None)
        if ban is not None:
            log.info("refused %s from %s: banned", name, session.address)
            session.error(ErrorCode.BANNED, ban.refusal("from this server"), hello.ref)
            return LeaveReason.DISCONNECT
        # The same user, back before its old session was reaped, takes it
        # over: the name stays this node's, claimed already. (Nothing is
        # awaited from here to the login then, so nobody else can take it.)
        replaced = await self._take_over(session, hello, identified=login.identified)
        # Is the name in use (the hooks may have awaited)? Claim it across
        # the cluster, and check it again after that await.
        if (
            self._name_refused(session, name, hello.ref)
            or not (
                replaced is not None or await self.node.claim(session, name, hello.ref)
            )
            or self._name_refused(session, name, hello.ref)
        ):
            return None
        # The role is the session's: a resume (the same session, going on)
        # keeps it; a new login has what its authenticators gave it.
        operator = login.operator or (
            replaced is not None and replaced.operator and _resumes(hello, replaced)
        )
        # Line mode cannot send a hello.resume: no secret to keep.
        json_mode = session.mode == Mode.JSON.value
        session.accept(
            name,
            secrets.token_urlsafe(_RESUME_BYTES) if json_mode else "",
            operator=operator,
        )
        self.directory.log_in(session, name)
        self.admission.logged_in(session)
        session.send(
            Welcome(
                name=name,
                protocol=PROTOCOL_VERSION,
                server=self.server_name,
                rooms=(LOBBY,),
                resume=session.resume or None,
                ref=hello.ref,
            )
        )
        self._add_member(session, self.rooms[LOBBY], ref=None)
        log.info("%s has joined the chat.", name)
        if replaced is not None:
            # Plugins hear of the old session's end before of the new one.
            await self.after_detach(replaced)
        await self.hooks.notify("chatkit_user_connected", user=session.user)
        await self.hooks.notify("chatkit_user_joined", user=session.user, room=LOBBY)
        return None

    async def _take_over(
        self, session: Session, hello: Hello, *, identified: bool
    ) -> Session | None:
        """If ``hello``'s name is held here by the same user (``identified``
        by its password, or presenting the session's ``resume`` secret),
        close that session and free the name for ``session``; the session
        closed, whose leave hooks are then the caller's to run."""
        holder = self.directory.get(hello.name)
        if holder is None or holder is session or session.closed:
            return None
        if not identified and not _resumes(hello, holder):
            return None
        # What the old session said goes out before it leaves (a cluster).
        await self.node.settle(holder)
        if self.directory.get(hello.name) is not holder or session.closed:
            return None  # it left, or we did, meanwhile: the usual checks
        log.info("%s is taken over from %s", holder, session.address)
        error = ErrorReply(
            code=ErrorCode.REPLACED,
            message="you logged in again on another connection",
        )
        holder.close(LeaveReason.REPLACED, error, discard=True)
        self.detach(holder, release=False)
        return holder

    def _name_refused(self, session: Session, name: str, ref: Any) -> bool:
        """Tell ``session`` why ``name`` cannot be theirs (invalid, or
        someone else's here); True if so."""
        if not is_valid_name(name):
            session.error(ErrorCode.BAD_NAME, _NAME_RULE, ref)
            return True
        holder = self.directory.get(name)
        if (holder is not None and holder is not session) or session.closed:
            session.error(ErrorCode.NAME_TAKEN, f"{name} is taken", ref)
            return True
        return False

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
        if self.moderator.banned_from(session, join.room, join.ref):
            return
        if self.hooks.has("chatkit_join"):
            try:
                await self.hooks.veto(
                    "chatkit_join", fail_closed=False, user=session.user, room=join.room
                )
            except Veto as exc:
                session.error(ErrorCode.REJECTED, exc.reason, join.ref)
                return
            # The hooks may have awaited: gone, or banned meanwhile?
            if session.closed or self.moderator.banned_from(
                session, join.room, join.ref
            ):
                return
            room = self.rooms.get(join.room)
            if room is not None and session in room.members:
                session.send(Joined(room=room.name, name=session.name, ref=join.ref))
                return
        if self.moderator.keeps_out(session, join.room, room, join.ref):
            return
        try:
            if room is None and join.room != LOBBY:
                await self.moderation.room_created(join.room, session.name)
        except OSError as exc:  # the cluster: the room stays without owner
            log.warning(
                "%s has no owner: the cluster is unreachable (%s)", join.room, exc
            )
        room = self.rooms.open(join.room)
        self._add_member(session, room, ref=join.ref)
        # The topic right after the joiner's `joined`, before anything
        # else can reach it (a client shows it as the room's topic then).
        if self.moderation.settings(room.name).topic:
            session.send(self.moderator.topic(room.name))
        with suppress(OSError):  # the cluster: the invite stays
            await self.moderation.joined(session.name, room.name)
        await self.hooks.notify(
            "chatkit_user_joined", user=session.user, room=room.name
        )

    def _add_member(self, session: Session, room: Room, ref: Any) -> None:
        announce = self.rooms.add(room, session)
        session.rooms += (room.name,)
        self.node.member(room.name, session.name, present=True)
        joined = Joined(room=room.name, name=session.name)
        if announce:
            self.node.publish(JOINED, room=room.name, sender=session.name)
            self.fanout.publish(room, joined, origin=session, ref=ref)
        elif session.mode != Mode.LINE.value:
            # Too large a room to announce joins: only the joiner's own copy.
            session.send(msgspec.structs.replace(joined, ref=ref))

    async def _leave(self, session: Session, leave: Leave) -> None:
        room = self.messages.member_room(session, leave.room, leave.ref)
        if room is None:
            return
        await self.node.settle(session)
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
        self.node.member(room.name, session.name, present=False)
        if announce:
            self.node.publish(LEFT, room=room.name, sender=session.name, reason=reason)
            self.fanout.publish(
                room, Left(room=room.name, name=session.name, reason=reason)
            )

    async def _nick(self, session: Session, nick: Nick) -> None:
        await self.node.settle(session)
        new = nick.name
        if self._name_refused(session, new, nick.ref):
            return
        budget = session.renames
        if budget is None:
            limits = self.limits
            budget = Bucket(limits.rename_interval, limits.rename_burst)
            session.renames = budget
        if not budget.take():
            interval = self.limits.rename_interval
            session.error(
                ErrorCode.RATE_LIMITED,
                f"too many renames: one more every {interval:g} s",
                nick.ref,
            )
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
        if new.casefold() != old.casefold():
            if not await self.node.claim(session, new, nick.ref) or self._name_refused(
                session, new, nick.ref
            ):
                return
            self.node.release(old)
        self.directory.rename(session, old, new)
        session.name = new
        rooms = [self.rooms[name] for name in session.rooms]
        self.messages.renamed(rooms, Renamed(old=old, new=new), session, nick.ref)
        for room_name in session.rooms:
            self.node.member(room_name, old, present=False)
            self.node.member(room_name, new, present=True)
        self.node.publish(RENAMED, old=old, sender=new, rooms=session.rooms)
        log.info("%s is now known as %s.", old, new)
        await self.hooks.notify(
            "chatkit_user_renamed", user=session.user, old=old, new=new
        )

    async def _who(self, room_name: str) -> tuple[str, ...]:
        """The names in a room: the whole cluster's if there is one."""
        cluster = self.node.cluster
        if cluster is not None:
            with suppress(OSError):
                return await cluster.who(room_name)
        room = self.rooms.get(room_name)
        return tuple(member.name for member in room.members) if room else ()

    async def _room_counts(self) -> dict[str, int]:
        """Each room's number of members: the whole cluster's if there is one."""
        cluster = self.node.cluster
        if cluster is not None:
            with suppress(OSError):
                return await cluster.rooms()
        return {room.name: len(room.members) for room in self.rooms}

    # --- leaving ------------------------------------------------------------

    def detach(self, session: Session, *, release: bool = True) -> None:
        """Free the session's name and take it out of its rooms (once; the
        rooms it left are kept in ``session.left_rooms`` for the hooks);
        ``release=False`` keeps the name this node's in the cluster (for
        the session taking this one over)."""
        if not session.name or self.get(session.name) is not session:
            return
        reason = session.reason or LeaveReason.DISCONNECT
        session.left_rooms = session.rooms
        for name in session.left_rooms:
            self._remove_member(
                session, self.rooms[name], reason, notify=not self.closing
            )
        self.directory.log_out(session, session.name)
        if release:
            self.node.release(session.name)
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
