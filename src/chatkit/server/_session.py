"""One connection to the server: the :class:`Session` that reads it, and the
:class:`User` that plugins see of it."""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from .._events import ClientRequest, ErrorReply, ServerEvent
from .._exceptions import ErrorCode, RemoteProtocolError
from ..protocol import EOF, NEED_DATA, Blank, Mode, ServerConnection, Status
from ._outbox import Outbox

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._bucket import Bucket
    from ._fanout import Fanout
    from ._limits import Limits
    from ._outbox import Stats
    from ._transport import Link

__all__ = [
    "SERVER_SENDER",
    "Directory",
    "Handler",
    "LeaveReason",
    "Login",
    "RemoteUser",
    "Session",
    "User",
    "login_of",
]

log = logging.getLogger("chatkit.server")

#: Default ``from`` of messages the server itself posts; ``*`` is not allowed
#: in user names, so it cannot be impersonated.
SERVER_SENDER: Final = "*server*"

# Lines handled from one read before the reader lets others run: refused
# and blank lines are cheap, admitted requests fan out.
_PAUSE_EVERY_REFUSED: Final = 8
_PAUSE_EVERY_ADMITTED: Final = 128
# Bytes read at once before the handshake, beyond the longest line then:
# what the rest of a hello's read may hold (a pipelined request or two).
_HELLO_READ_SLACK: Final = 1024


class LeaveReason(enum.StrEnum):
    """Why a user left a room or the server (the ``reason`` of ``left``)."""

    LEAVE = "leave"
    """A ``leave`` request (one room)."""
    BYE = "bye"
    """A JSON-mode ``bye``."""
    EXIT = "exit"
    """A line-mode ``exit``."""
    DISCONNECT = "disconnect"
    """The connection closed or broke without a goodbye."""
    KICKED = "kicked"
    """:meth:`ChatServer.kick`."""
    SHUTDOWN = "shutdown"
    """The server shut down."""
    TOO_SLOW = "too_slow"
    """The client's outgoing buffer overflowed."""
    FLOOD = "flood"
    """The client kept sending past its rate limit."""
    TIMEOUT = "timeout"
    """No handshake, or no traffic, within the server's timeout."""
    REPLACED = "replaced"
    """The same user logged in again on a new connection, which took the
    session over (its ``resume`` secret, or its password)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Login:
    """What an authenticator says of a login: a ``chatkit_authenticate``
    implementation may return one (see
    :meth:`~chatkit.hookspecs.ServerSpec.chatkit_authenticate`).

    Returning ``True`` means ``Login(identified=True)``, and ``None``
    ``Login()``. Over all the implementations that let the login in, a
    field holds if any of them said so.

    Attributes:
        identified: the token proves that the client *is* the name it logs
            in as (a password of that name, not a secret shared by many):
            it may take over a session of that name still logged in.
        operator: the login is a server operator's: for this session (a
            rename and a resume keep it), not for the name, whoever logs in
            under it next. See docs/moderation.md.
    """

    identified: bool = False
    operator: bool = False


def login_of(results: Iterable[Any]) -> Login:
    """What ``chatkit_authenticate``'s implementations said, together:
    ``True`` or a :class:`Login` from any of them counts; ``False`` says
    nothing, and anything else is logged and ignored."""
    identified = operator = False
    for result in results:
        if isinstance(result, Login):
            identified = identified or result.identified
            operator = operator or result.operator
        elif result is True:
            identified = True
        elif result is not False:
            log.warning(
                "chatkit_authenticate returned %r, not a bool, a Login or None;"
                " ignored",
                result,
            )
    return Login(identified=identified, operator=operator)


class Handler(Protocol):
    """What a session hands its requests to, and tells about its life (the
    chat rules)."""

    gone_by: float
    """When a leaving connection's hooks and goodbye must be done by."""

    def opened(self, session: Session) -> None:
        """A connection came."""
        ...

    async def handle(
        self, session: Session, request: ClientRequest
    ) -> LeaveReason | None:
        """Act on ``request``; a reason when the connection must end."""
        ...

    async def stopped(self, session: Session) -> None:
        """The session stopped reading for good (it is closing)."""
        ...

    async def gone(self, session: Session) -> None:
        """The connection is over, whatever happened (shielded, bounded)."""
        ...


class User:
    """One connection to a :class:`~chatkit.ChatServer`, as the server and
    its plugins see it. Plugins get these in hook arguments; they are
    read-only views, and the same object for the connection's lifetime.

    Attributes:
        address: the peer's ``host:port``.
    """

    __slots__ = ("_session", "address")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.address = session.address

    @property
    def name(self) -> str:
        """The user's current name (``""`` before the handshake completes)."""
        return self._session.name

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms the user is in."""
        return frozenset(self._session.rooms)

    @property
    def mode(self) -> str:
        """``"json"`` or ``"line"`` (``"unknown"`` before the first line)."""
        return self._session.mode

    @property
    def operator(self) -> bool:
        """Whether the user's login made it a server operator (an
        authenticator returned :class:`~chatkit.Login` with
        ``operator=True``). It lasts as long as the session; the operators
        named in the server's configuration (``ChatServer(operators=...)``)
        are operators by name, and not counted here."""
        return self._session.operator

    def __repr__(self) -> str:
        return f"<User {self.name!r} {self.address}>"


class RemoteUser:
    """A user connected to another node of the cluster (see
    :mod:`chatkit.cluster`): the ``recipient`` of ``chatkit_dm`` when the
    recipient is not on this node. It has a name and nothing else here
    (its login's role, :attr:`User.operator`, is known on its own node
    only: False here)."""

    address = ""
    mode = "remote"
    operator = False
    rooms: frozenset[str] = frozenset()

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        """The user's name."""
        return self._name

    def __repr__(self) -> str:
        return f"<RemoteUser {self._name!r}>"


class Session:
    """One connection: reads it (handshake timeout, then idle timeout, rate
    limit), hands each request to a :class:`Handler`, and closes it (its
    last output written within ``close_timeout``).

    Everything it sends goes through the fan-out, in order.
    """

    __slots__ = (
        "_close_by",
        "_closed",
        "_fanout",
        "_limits",
        "_link",
        "_mark",
        "_proto",
        "_reader_scope",
        "_refilled_at",
        "_tokens",
        "_violations",
        "address",
        "left_rooms",
        "name",
        "operator",
        "outbox",
        "reason",
        "renames",
        "resume",
        "rooms",
        "user",
    )

    def __init__(
        self,
        link: Link,
        fanout: Fanout,
        limits: Limits,
        stats: Stats,
        nursery: trio.Nursery,
    ) -> None:
        self._link = link
        self._fanout = fanout
        self._limits = limits
        self.address = link.address
        self._proto = ServerConnection(
            max_line_length=limits.max_line_length,
            max_hello_length=limits.max_hello_length,
            mode=link.mode,
        )
        self.outbox = Outbox(link, self, limits, fanout.busy, stats, nursery)
        self.name = ""
        """The user's name once logged in (``""`` before)."""
        self.rooms: tuple[str, ...] = ()  # in join order
        self.left_rooms: tuple[str, ...] = ()  # the rooms it was in when it went
        self.user = User(self)
        self.reason: LeaveReason | None = None
        """Why the connection ends, once it does."""
        self.renames: Bucket | None = None
        """The user's rename budget (``Limits.rename_burst``), from its
        first rename on."""
        self.resume = ""
        """The secret a reconnecting client presents to take this session
        over (``welcome.resume``; ``""`` before the handshake)."""
        self.operator = False
        """The login made this session a server operator (its
        authenticator's :class:`Login`): the session's role, not its
        name's, so it ends with the session."""
        self._closed = False
        self._mark = 0  # the fan-out's mark of this session's last output
        # The reader's deadline: the handshake timeout, then the idle
        # timeout (pushed forward on every read). Its one cancel scope is
        # all an idle connection has (see the outbox for its writer's).
        self._reader_scope = trio.CancelScope()
        self._close_by = math.inf  # closing began: its last output by then
        # Token bucket (see _admit).
        self._tokens = float(limits.rate_burst)
        self._refilled_at = trio.current_time()
        self._violations = 0

    def __repr__(self) -> str:
        return f"<Session {self.name!r} {self.address}>"

    @property
    def mode(self) -> str:
        """``"json"``, ``"line"`` or ``"unknown"`` (before the first line)."""
        return self._proto.mode.value

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # --- output -----------------------------------------------------------

    def send(self, event: ServerEvent, *, echo: bool = False) -> None:
        """Send ``event`` to this connection (after what was sent before);
        ``echo``: it is the user's own copy of its direct message."""
        self._fanout.send(self.outbox, event, echo=echo)

    def error(self, code: ErrorCode, message: str, ref: str | int | None) -> None:
        """Send an ``error``."""
        self._fanout.send(self.outbox, ErrorReply(code=code, message=message, ref=ref))

    def close(
        self,
        reason: LeaveReason,
        farewell: ServerEvent | None = None,
        *,
        discard: bool = False,
    ) -> None:
        """Stop reading, and end the output with ``farewell`` after what is
        pending (``discard``: instead of it); the connection then gets
        ``close_timeout`` to write that. Synchronous; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.reason = reason
        self._fanout.close(self.outbox, farewell, discard=discard)
        self._mark = self._fanout.mark()
        self._reader_scope.cancel()
        self._close_by = trio.current_time() + self._limits.close_timeout

    def overflowed(self) -> None:
        """The outbox overflowed: the client does not read fast enough."""
        log.warning("%s is not reading fast enough; disconnecting", self)
        error = ErrorReply(
            code=ErrorCode.TOO_SLOW,
            message="you are not reading fast enough; disconnecting",
        )
        self.close(LeaveReason.TOO_SLOW, error, discard=True)

    def broken(self) -> None:
        """Writing failed: the peer is gone."""
        self.close(LeaveReason.DISCONNECT)

    # --- the handshake ----------------------------------------------------

    def accept(self, name: str, resume: str = "", *, operator: bool = False) -> None:
        """The handshake is done: ``name`` is the user's (``resume`` the
        secret that takes the session over, ``operator`` its role); from
        now on only the idle timeout applies."""
        self.name = name
        self.resume = resume
        self.operator = operator
        self._proto.accept()
        idle = self._limits.idle_timeout
        self._reader_scope.deadline = (
            trio.current_time() + idle if idle is not None else math.inf
        )

    # --- reading ----------------------------------------------------------

    async def run(self, handler: Handler) -> None:
        """The connection's whole life: read and handle requests, tell
        ``handler`` when reading stopped, wait for the last output to be
        written (within ``close_timeout`` once closing began; a writer
        still at it then is cancelled), tell ``handler`` it is gone, and
        close the link.

        The end runs shielded, but within ``handler.gone_by`` and, when the
        server is cancelled, ``close_timeout``: a slow plugin cannot hold
        up a shutdown. A bug while serving one connection is logged and
        ends that connection alone.
        """
        link = self._link
        log.info("New connection from %s", link.peer)
        handler.opened(self)
        proto = self._proto
        fanout = self._fanout
        limits = self._limits
        try:
            # The read loop is inline, not a method of its own: an idle
            # connection's task is a stack of suspended frames, and each one
            # costs memory (what a read brought is handled by a method: its
            # frame is gone by the next wait).
            scope = self._reader_scope
            scope.deadline = min(
                scope.deadline, trio.current_time() + limits.handshake_timeout
            )
            with scope:
                reason: LeaveReason | None = None
                while reason is None:
                    if fanout.backlogged:
                        await fanout.wait_ready()
                    try:
                        # Before the handshake, small reads: a connection
                        # that has not said hello holds little
                        # (docs/security.md).
                        data = await link.receive_some(
                            None
                            if self.name
                            else limits.max_hello_length + _HELLO_READ_SLACK
                        )
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""  # gone: as if it had said goodbye silently
                    if self.name:
                        idle = limits.idle_timeout
                        if idle is not None:
                            scope.deadline = trio.current_time() + idle
                        elif scope.deadline != math.inf:  # the setter costs
                            scope.deadline = math.inf
                    proto.receive_data(data)
                    del data  # not held while idle
                    reason = await self._handle_read(handler)
                self.close(reason)
            if scope.cancelled_caught and not self._closed:
                self._time_out()
            with trio.move_on_at(self._close_by):
                await handler.stopped(self)
                await self._fanout.settled(self._mark)
                await self.outbox.wait_written()
        except Exception:
            log.exception("internal error on connection %s", self)
        finally:
            self.outbox.release()
            limit = handler.gone_by
            close_timeout = self._limits.close_timeout
            if trio.current_effective_deadline() == -math.inf:  # cancelled
                limit = min(limit, trio.current_time() + close_timeout)
            with trio.CancelScope(shield=True):
                with trio.CancelScope(deadline=limit):
                    await handler.gone(self)
                    with trio.move_on_after(close_timeout):
                        await link.aclose()
                await link.abort()

    def _time_out(self) -> None:
        limits = self._limits
        if not self.name:
            text = f"no hello within {limits.handshake_timeout}s"
        else:
            text = f"nothing received for {limits.idle_timeout}s"
        log.info("%s timed out: %s", self, text)
        self.close(
            LeaveReason.TIMEOUT, ErrorReply(code=ErrorCode.TIMEOUT, message=text)
        )

    async def _handle_read(self, handler: Handler) -> LeaveReason | None:
        """Handle the requests that the last read completed; a reason when
        the connection must end."""
        proto = self._proto
        link = self._link
        limits = self._limits
        # Every request decoded from one read is handled before the next
        # read, so that its output is one batch.
        handled = refused = 0
        unknown = proto.mode is Mode.UNKNOWN
        while True:
            if self._closed:
                # Closed mid-read (kicked by a plugin, too slow): the
                # requests still buffered must not be acted on.
                return self.reason or LeaveReason.DISCONNECT
            try:
                request: ClientRequest | Status | Blank | RemoteProtocolError = (
                    proto.next_event(report_blank_lines=True)
                )
            except RemoteProtocolError as exc:
                request = exc  # a bad line costs a token like any request
            if unknown and proto.mode is not Mode.UNKNOWN:
                # The first line chose the mode: output takes its format.
                self.outbox.wire = link.wire(proto.mode)
                unknown = False
            if request is NEED_DATA:
                return None
            if request is EOF:
                return LeaveReason.DISCONNECT
            # One read can hold thousands of lines: let the other
            # connections run now and then. Refused and blank lines (a
            # flood) come cheap and fast, so they pause often; admitted
            # requests pause rarely, as each pause can end the batch
            # early. Every line, blank or not, costs a token.
            admitted = self._admit()
            if not admitted or isinstance(request, (Blank, RemoteProtocolError)):
                refused += 1
                if refused % _PAUSE_EVERY_REFUSED == 0:
                    await trio.lowlevel.checkpoint()
                ref = None if isinstance(request, Blank) else request.ref
                if not admitted:
                    if self._violations >= limits.flood_limit:
                        self.error(
                            ErrorCode.RATE_LIMITED,
                            "too many requests; disconnecting",
                            ref,
                        )
                        return LeaveReason.FLOOD
                    self.error(ErrorCode.RATE_LIMITED, "slow down", ref)
                elif isinstance(request, RemoteProtocolError):  # a bad line
                    self.error(request.code, request.message, ref)
                continue
            handled += 1
            if handled % _PAUSE_EVERY_ADMITTED == 0:
                await trio.lowlevel.checkpoint()
            reason = await handler.handle(self, request)
            if reason is not None:
                return reason

    def _admit(self) -> bool:
        """Take a token from the bucket; False if it is empty."""
        limits = self._limits
        rate = limits.rate_limit
        if rate is None:
            return True
        now = trio.current_time()
        self._tokens = min(
            limits.rate_burst, self._tokens + (now - self._refilled_at) * rate
        )
        self._refilled_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            self._violations = 0
            return True
        self._violations += 1
        return False


class Directory:
    """Who is connected, and who is logged in under which name."""

    def __init__(self) -> None:
        self.connections: set[Session] = set()
        """Every connection, logged in or not."""
        self.users: dict[Session, None] = {}
        """The logged-in sessions, in login order."""
        self._names: dict[str, Session] = {}  # casefolded name -> session

    def get(self, name: str) -> Session | None:
        """The logged-in session called ``name`` (case-insensitively)."""
        return self._names.get(name.casefold())

    def log_in(self, session: Session, name: str) -> None:
        """``session`` is logged in as ``name`` (free: checked before)."""
        self._names[name.casefold()] = session
        self.users[session] = None

    def rename(self, session: Session, old: str, new: str) -> None:
        """``session`` is called ``new`` now."""
        del self._names[old.casefold()]
        self._names[new.casefold()] = session

    def log_out(self, session: Session, name: str) -> bool:
        """``session`` (called ``name``) is logged out; False if it was not
        logged in."""
        if self._names.get(name.casefold()) is not session:
            return False
        del self._names[name.casefold()]
        del self.users[session]
        return True
