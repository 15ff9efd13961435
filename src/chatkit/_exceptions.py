"""chatkit's error vocabulary: everything chatkit raises is a :class:`ChatkitError`.

::

    ChatkitError
    ├── ProtocolError            the sans-IO layer (chatkit.protocol)
    │   ├── RemoteProtocolError  the peer sent something bad (carries the code)
    │   └── LocalProtocolError   we misused a protocol object (a bug)
    ├── RequestError             a ChatClient request failed
    │   ├── BadRequest, NameTaken, ... one per wire error code
    │   └── ConnectionClosed     the connection ended while it was needed
    └── StartupError             a ChatServer cannot start
        ├── HistoryStoreError    (chatkit.history)
        └── BackplaneError       (chatkit.cluster)

:class:`Veto` stands apart: it is not an error but a plugin's way of saying
no, raised by hook implementations and caught by chatkit.
"""

from __future__ import annotations

import enum
from types import MappingProxyType

__all__ = [
    "BadName",
    "BadRequest",
    "ChatkitError",
    "ConnectionClosed",
    "ErrorCode",
    "Kicked",
    "LocalProtocolError",
    "NameTaken",
    "NoSuchUser",
    "NotInRoom",
    "NotReady",
    "ProtocolError",
    "RateLimited",
    "Rejected",
    "RemoteProtocolError",
    "Replaced",
    "RequestError",
    "ServerFull",
    "StartupError",
    "TimedOut",
    "TooLarge",
    "TooManyRooms",
    "TooSlow",
    "Unauthorized",
    "Unavailable",
    "Veto",
]


class ErrorCode(enum.StrEnum):
    """The ``code`` values of the wire ``error`` message."""

    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    NAME_TAKEN = "name_taken"
    BAD_NAME = "bad_name"
    NOT_IN_ROOM = "not_in_room"
    NO_SUCH_USER = "no_such_user"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    SERVER_FULL = "server_full"
    REJECTED = "rejected"
    NOT_READY = "not_ready"
    # Extension to v1: a cluster node cannot reach its backplane; try again.
    UNAVAILABLE = "unavailable"
    # Extensions to v1: the server closes the connection right after these.
    TOO_SLOW = "too_slow"
    KICKED = "kicked"
    TIMEOUT = "timeout"
    TOO_MANY_ROOMS = "too_many_rooms"
    # Extension to v1: the same user logged in again (a reconnect with the
    # session's resume secret, or the user's password); this connection ends.
    REPLACED = "replaced"
    # Extensions to v1 (docs/moderation.md): the request needs a role the
    # user does not have; the user is banned (from the server at hello, or
    # from a room at join); the user is muted (say).
    FORBIDDEN = "forbidden"
    BANNED = "banned"
    MUTED = "muted"
    # Extension to v1: the room has as many members as its limit allows.
    ROOM_FULL = "room_full"


class ChatkitError(Exception):
    """The root of every exception chatkit raises."""


class ProtocolError(ChatkitError):
    """Base class of errors raised by the sans-IO protocol layer."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the protocol.

    The connection stays usable: answer with an ``error`` frame carrying
    :attr:`code` and carry on with the next line.

    Attributes:
        code: the wire error code to answer with.
        ref: the offending request's ``ref``, when it could be recovered.
    """

    def __init__(
        self, code: ErrorCode, message: str, ref: str | int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


class LocalProtocolError(ProtocolError):
    """This side misused the protocol object (a bug in the calling code)."""


class Veto(Exception):
    """Raised by a plugin's hook implementation to veto what the hook is about.

    A control-flow signal for plugins, not an error: chatkit catches it and
    never raises it to an application (so it is not a :class:`ChatkitError`).
    From ``chatkit_authenticate`` it refuses the user (``error unauthorized``);
    from ``chatkit_message`` / ``chatkit_dm`` it refuses the message
    (``error rejected``, to the sender only). The reason is sent to the user.
    """

    def __init__(self, reason: str = "rejected by a plugin") -> None:
        super().__init__(reason)
        self.reason = reason


class StartupError(ChatkitError):
    """A :class:`~chatkit.ChatServer` cannot start: its history store or
    its cluster backplane is unusable. Raised by ``serve()`` before it
    listens; the server CLI prints it on one line and exits with status 1."""


class RequestError(ChatkitError):
    """A request failed: the server answered it with an ``error`` (a
    subclass per wire code), or the connection ended first
    (:class:`ConnectionClosed`).

    Attributes:
        code: the wire error code (an :class:`ErrorCode` value where known).
        message: the server's human-readable explanation.
    """

    code: str = ""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @staticmethod
    def from_code(code: str, message: str) -> RequestError:
        """Build the :class:`RequestError` subclass that matches ``code``."""
        cls = _BY_CODE.get(code)
        if cls is None:
            return RequestError(message, code)
        return cls(message)


class BadRequest(RequestError):
    """``bad_request``: the request was malformed."""

    code = ErrorCode.BAD_REQUEST


class TooLarge(RequestError):
    """``too_large``: the line exceeded the server's limit."""

    code = ErrorCode.TOO_LARGE


class NameTaken(RequestError):
    """``name_taken``: another user has that name (case-insensitively)."""

    code = ErrorCode.NAME_TAKEN


class BadName(RequestError):
    """``bad_name``: not a valid user or room name."""

    code = ErrorCode.BAD_NAME


class NotInRoom(RequestError):
    """``not_in_room``: the request needs membership of a room."""

    code = ErrorCode.NOT_IN_ROOM


class NoSuchUser(RequestError):
    """``no_such_user``: nobody of that name is connected."""

    code = ErrorCode.NO_SUCH_USER


class RateLimited(RequestError):
    """``rate_limited``: slow down."""

    code = ErrorCode.RATE_LIMITED


class Unauthorized(RequestError):
    """``unauthorized``: authentication refused."""

    code = ErrorCode.UNAUTHORIZED


class ServerFull(RequestError):
    """``server_full``: the server accepts no more connections."""

    code = ErrorCode.SERVER_FULL


class Rejected(RequestError):
    """``rejected``: a server plugin refused the request."""

    code = ErrorCode.REJECTED


class NotReady(RequestError):
    """``not_ready``: the request came before ``hello`` was accepted."""

    code = ErrorCode.NOT_READY


class TooSlow(RequestError):
    """``too_slow``: this client did not read fast enough and was dropped."""

    code = ErrorCode.TOO_SLOW


class Kicked(RequestError):
    """``kicked``: the server removed this client."""

    code = ErrorCode.KICKED


class Replaced(RequestError):
    """``replaced``: the same user logged in again on another connection,
    which took this one's session over; the server closes this one."""

    code = ErrorCode.REPLACED


class TimedOut(RequestError):
    """``timeout``: no handshake, or no traffic, in time; the server closes."""

    code = ErrorCode.TIMEOUT


class TooManyRooms(RequestError):
    """``too_many_rooms``: joining would exceed the server's per-user limit."""

    code = ErrorCode.TOO_MANY_ROOMS


class Unavailable(RequestError):
    """``unavailable``: the server cannot do that right now (its history
    store could not store the message, so nobody saw it; or a cluster node
    that lost its backplane refuses new names); try again later."""

    code = ErrorCode.UNAVAILABLE


class Forbidden(RequestError):
    """``forbidden``: the request needs a role (room or server operator)
    that the user does not have (docs/moderation.md)."""

    code = ErrorCode.FORBIDDEN


class Banned(RequestError):
    """``banned``: the user (its name or address) is banned from the server
    (at ``hello``) or from the room (at ``join``)."""

    code = ErrorCode.BANNED


class Muted(RequestError):
    """``muted``: the user may not speak there now."""

    code = ErrorCode.MUTED


class RoomFull(RequestError):
    """``room_full``: the room has as many members as its limit allows."""

    code = ErrorCode.ROOM_FULL


class ConnectionClosed(RequestError):
    """The connection to the server ended while a request needed it (not an
    answer from the server: :attr:`code` is ``connection_closed``)."""

    code = "connection_closed"


# Read-only: no module-level mutable state.
_BY_CODE: MappingProxyType[str, type[RequestError]] = MappingProxyType(
    {
        cls.code: cls
        for cls in (
            BadRequest,
            TooLarge,
            NameTaken,
            BadName,
            NotInRoom,
            NoSuchUser,
            RateLimited,
            Unauthorized,
            ServerFull,
            Rejected,
            NotReady,
            TooSlow,
            Kicked,
            Replaced,
            TimedOut,
            TooManyRooms,
            Unavailable,
            Forbidden,
            Banned,
            Muted,
            RoomFull,
        )
    }
)
