"""The trio chat server.

Shape of a running server::

    serve()                                   (the caller's nursery owns it)
      connections nursery                     one task per connection
        _handle_connection(stream)
          connection nursery
            reader (the handler task itself)  bytes -> protocol -> requests
            _write_loop                       the writer, only while needed
      accept nursery
        trio.serve_listeners(...)             spawns handlers into the above

Fan-out never awaits per recipient: a message is encoded once per wire mode
and its bytes are appended to each member's bounded outgoing buffer
(:meth:`User._enqueue`, synchronous). A member whose buffer would overflow
is dropped (``error too_slow``), never waited for.

The requests decoded from one read form a batch (:meth:`ChatServer._begin_batch`):
consecutive broadcasts to one room are delivered with one append per member,
and the buffers filled are written once the readers woken together have
handled their reads, straight to each socket from the reader's task
(a non-blocking ``send`` on the socket: :meth:`User._write_now`).
Only what the kernel does not take is left to the connection's writer task,
started on demand, which sends everything pending in one ``send_all`` per
round and ends when nothing is left. A broadcast alone in its round (light
load) skips the buffers: it is written to every member of an idle room by
C-level loops (:meth:`ChatServer._write_room_now`); in a large room, half of
them from a thread of trio's thread cache, joined before the loop goes on
(:func:`_send_each_split`). See docs/performance.md.
"""

from __future__ import annotations

import enum
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, suppress
from functools import partial
from itertools import repeat
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import trio

from ._envelope import DM, JOINED, LEFT, MESSAGE, RENAMED, Envelope, Publication
from ._events import (
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
    ServerEvent,
    Shutdown,
    Welcome,
    Who,
    WhoReply,
)
from ._exceptions import ErrorCode, RemoteProtocolError, Veto
from ._hooks import HookDispatcher, make_plugin_manager
from .history import HistoryStore, MemoryHistory
from .hookspecs import ServerSpec
from .protocol import (
    DEFAULT_MAX_LINE_LENGTH,
    EOF,
    NEED_DATA,
    Mode,
    ServerConnection,
    Status,
    encode_json,
    encode_line,
    is_valid_name,
    is_valid_room,
)

if TYPE_CHECKING:
    from outcome import Outcome

    from .cluster import RedisBackplane

__all__ = [
    "LOBBY",
    "SERVER_SENDER",
    "ChatServer",
    "LeaveReason",
    "RemoteUser",
    "User",
    "open_server",
]

log = logging.getLogger("chatkit.server")

#: Default ``from`` of messages the server itself posts; ``*`` is not allowed
#: in user names, so it cannot be impersonated.
SERVER_SENDER: Final = "*server*"

_RECEIVE_SIZE: Final = 64 * 1024
# Lines handled from one read before the reader lets others run (see
# _read_loop): refused lines are cheap, admitted requests fan out.
_PAUSE_EVERY_REFUSED: Final = 8
_PAUSE_EVERY_ADMITTED: Final = 128
# Broadcasts held back for a read batch are delivered once they reach this
# share of a member's buffer bounds (see ChatServer._broadcast).
_HELD_SHARE: Final = 4
# Every direct write: send(2), not write(2), which goes through the VFS layer
# (a measurable share of the server's CPU at light load, docs/performance.md).
_SEND: Final = socket.socket.send
_T = TypeVar("_T")


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


class User:
    """One connection to a :class:`ChatServer`, as the server and its plugins
    see it. Plugins get these in hook arguments; treat them as read-only.

    Attributes:
        address: the peer's ``host:port``.
    """

    def __init__(self, server: ChatServer, stream: trio.abc.Stream) -> None:
        self._server = server
        self._stream = stream
        try:
            peer = _socket_of(stream).getpeername()
        except OSError:
            peer = ("?", 0)
        self._peer: Any = peer
        self.address: str = f"{peer[0]}:{peer[1]}"
        self._proto = ServerConnection(max_line_length=server.max_line_length)
        self._name: str | None = None
        self._rooms: dict[str, None] = {}  # ordered set of room names
        # Outgoing buffer: appended to by anyone (synchronously), drained by
        # _write_now or _write_loop. _queued counts frames in _out.
        self._out = bytearray()
        self._queued = 0
        # True once a write stopped partway through _out: its head may be
        # the rest of a frame on the wire, which discarding the buffer
        # (_close) keeps, or the line would be torn.
        self._torn = False
        # The connection's nursery, where _write_loop is started on demand.
        self._nursery: trio.Nursery | None = None
        # True while a _write_loop task exists: it alone writes then. Stays
        # True if its send_all fails (the stream is then unusable).
        self._writing = False
        # True while in ChatServer._dirty, waiting for the batch to end.
        self._dirty = False
        # Direct writes (see _write_now and ChatServer._write_room_now) go to
        # the standard-library socket under the trio one: never for TLS or
        # other wrapped streams. None: no direct writes. Once trio closes
        # the socket, a send to it fails (it cannot reach a reused
        # descriptor); it is dropped when the connection ends all the same.
        self._sock: socket.socket | None = None
        if type(stream) is trio.SocketStream and server._direct_writes:
            self._sock = _plain_socket(stream.socket)
        self._output_ended = False
        self._reason: LeaveReason | None = None
        self._detached = False
        self._left_rooms: list[str] = []
        self._reader_scope = trio.CancelScope()
        self._scope = trio.CancelScope()
        # Token bucket (see ChatServer._admit).
        self._tokens = float(server.rate_burst)
        self._refilled_at = trio.current_time()
        self._violations = 0

    @property
    def name(self) -> str:
        """The user's current name (``""`` before the handshake completes)."""
        return self._name or ""

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms the user is in."""
        return frozenset(self._rooms)

    @property
    def mode(self) -> str:
        """``"json"`` or ``"line"`` (``"unknown"`` before the first line)."""
        return self._proto.mode.value

    def __repr__(self) -> str:
        return f"<User {self._name!r} {self.address}>"

    # --- outgoing ---------------------------------------------------------

    def _enqueue(self, data: bytes, frames: int = 1) -> None:
        # The per-recipient hot path: no await, no encoding, one append of
        # ``frames`` already encoded frames.
        server = self._server
        if server._pending_room is not None:
            server._flush_room()  # what was broadcast before goes first
        if self._output_ended:
            return
        out = self._out
        if (
            len(out) + len(data) > server.max_queued_bytes
            or self._queued + frames > server.max_queued_messages
        ) and not self._make_room(len(data), frames):
            self._overflow()
            return
        if self._dirty or self._writing:
            out += data  # written when the batch ends / by the running writer
            self._queued += frames
            return
        owner = server._batch_owner
        if owner is not None and owner is trio.lowlevel.current_task():
            # Produced by a reader inside its read batch: one write per
            # recipient when the batch ends (ChatServer._end_batch).
            out += data
            self._queued += frames
            self._dirty = True
            server._dirty.append(self)
        elif not out and self._sock is not None:
            # Light load, nothing pending: the caller's bytes go straight to
            # the socket, without a copy into the buffer.
            try:
                sent = _SEND(self._sock, data)
            except OSError:
                sent = 0  # full (or broken: the writer will report it)
            if sent < len(data):
                self._keep_unsent(data, sent, frames)
        else:
            out += data
            self._queued += frames
            self._write_now()

    def _keep_unsent(self, data: bytes, sent: int, frames: int) -> None:
        """After a direct write of ``data`` (``frames`` frames, nothing
        pending before it) of which the socket took only ``sent`` bytes: keep
        the rest for a writer, started now."""
        self._out += memoryview(data)[sent:]
        self._queued += frames
        self._torn = sent > 0
        self._start_writer()

    def _make_room(self, size: int, frames: int) -> bool:
        """Whether ``size`` more bytes in ``frames`` fit once output held
        back only by a read batch is written: that is the server's doing,
        not the client's, so the socket takes it first (what the kernel
        refuses counts towards the bounds)."""
        if not self._dirty or self._writing or self._output_ended:
            return False
        self._write_now()
        server = self._server
        return (
            len(self._out) + size <= server.max_queued_bytes
            and self._queued + frames <= server.max_queued_messages
        )

    def _write_now(self) -> None:
        """Write pending output straight to the socket, without blocking, if
        no writer task is running; start one for what the kernel did not take
        (and to report any error).

        Saves a task switch per delivery at light load, and an idle
        connection holds no writer task. Never runs while a writer exists
        (``_writing``), so bytes cannot interleave with a ``send_all`` in
        progress; once closing began, only the writer writes.
        """
        out = self._out
        if not out or self._writing or self._output_ended:
            return
        if self._sock is not None:
            try:
                sent = _SEND(self._sock, out)
            except OSError:
                # BlockingIOError: the kernel buffer is full. Anything
                # else (a reset peer) the writer's send_all reports.
                sent = 0
            if sent == len(out):
                out.clear()
                self._queued = 0
                self._torn = False
                return
            if sent:
                self._torn = True
                del out[:sent]
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writing or self._nursery is None:
            return
        self._writing = True
        if self._sock is not None:  # only direct writes need to know
            self._server._busy.add(self)
        try:
            self._nursery.start_soon(self._write_loop)
        except RuntimeError:
            # The connection's nursery has closed: the connection is over
            # (it was being torn down after an internal error).
            self._out = bytearray()

    def _send(self, event: ServerEvent) -> None:
        data = self._proto.send(event)
        if data:
            self._enqueue(data)

    def _overflow(self) -> None:
        log.warning("%s is not reading fast enough; disconnecting", self)
        error = ErrorReply(
            code=ErrorCode.TOO_SLOW,
            message="you are not reading fast enough; disconnecting",
        )
        self._close(LeaveReason.TOO_SLOW, self._proto.send(error), discard=True)

    def _close(
        self, reason: LeaveReason, farewell: bytes = b"", *, discard: bool = False
    ) -> None:
        """Begin closing: stop reading, send what is pending (unless
        ``discard``) and then ``farewell``, then end, within close_timeout.

        Synchronous and safe to call from inside a broadcast loop: rooms are
        left later, by the connection's own task.
        """
        if self._output_ended:
            return
        server = self._server
        owner = server._batch_owner
        if owner is None or owner is trio.lowlevel.current_task():
            # A reader ending (it closes its own user when _read_loop
            # returns) writes what its batch held back; so does one whose
            # batch was paused (_pause_batch), or nobody would.
            server._end_batch()
        elif server._pending_room is not None:
            server._flush_room()  # the farewell comes after those
        self._reason = reason
        if discard:
            if self._torn:  # keep the rest of the frame on the wire
                del self._out[self._out.index(b"\n") + 1 :]
            else:
                self._out = bytearray()
        self._out += farewell
        self._output_ended = True
        if self._sock is not None:  # None too once the connection is over
            server._busy.add(self)
        if self._out:
            self._start_writer()
        self._reader_scope.cancel()
        self._scope.deadline = min(
            self._scope.deadline, trio.current_time() + self._server.close_timeout
        )

    async def _write_loop(self) -> None:
        # Started by _start_writer when there is output that cannot be
        # written at once; sends everything pending, in one send_all per
        # round (so writes coalesce under load), and ends when none is left.
        stream = self._stream
        try:
            while self._out:
                data, self._out, self._queued = self._out, bytearray(), 0
                self._torn = False
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The peer went away: stop the reader too. _writing stays True:
            # no direct write may follow a failed send_all.
            self._out = bytearray()
            self._close(LeaveReason.DISCONNECT)
            return
        # Not in a finally: after a cancelled send_all the stream is broken.
        self._writing = False
        if not self._output_ended:
            self._server._busy.discard(self)


class RemoteUser:
    """A user connected to another node of the cluster (see
    :mod:`chatkit.cluster`): the ``recipient`` of ``chatkit_dm`` when the
    recipient is not on this node. It has a name and nothing else here."""

    address = ""
    mode = "remote"
    rooms: frozenset[str] = frozenset()

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        """The user's name."""
        return self._name

    def __repr__(self) -> str:
        return f"<RemoteUser {self._name!r}>"


class _Run:
    """Consecutive broadcasts to one room from one origin, held back for the
    end of a read batch (see ChatServer._broadcast)."""

    __slots__ = ("data", "events", "origin", "own")

    def __init__(self, origin: User | None) -> None:
        self.origin = origin
        self.events: list[Message | Joined | Left] = []
        self.data = bytearray()  # JSON, for every member but origin
        self.own = bytearray()  # JSON, origin's copies (with refs)

    def add(self, event: Message | Joined | Left, data: bytes, own: bytes) -> None:
        """Append ``event``, encoded for the others and for its origin."""
        self.events.append(event)
        self.data += data
        self.own += own


def _copy_for(origin: User, runs: Sequence[_Run]) -> tuple[bytes, int]:
    """What ``origin`` gets of ``runs`` (some of them its own), and how many
    frames: in JSON mode everything, its own messages with their refs; in
    line mode only the others' (as in the original program)."""
    if origin._proto.mode is Mode.LINE:
        events = [
            event for run in runs if run.origin is not origin for event in run.events
        ]
        return b"".join(map(encode_line, events)), len(events)
    own = (run.own if run.origin is origin else run.data for run in runs)
    return b"".join(own), sum(len(run.events) for run in runs)


def _without(items: list[_T], positions: Sequence[int]) -> list[_T]:
    """A copy of ``items`` without the items at ``positions`` (descending)."""
    kept = items.copy()
    for position in positions:
        del kept[position]
    return kept


def _send_each(sockets: Sequence[socket.socket], payload: bytes) -> list[int | None]:
    """``send(payload)`` on each of ``sockets``, as one C-level loop: what
    each socket took, or None where the send raised (its buffer was full, or
    it failed: its writer, handed the rest, reports that)."""
    # list.extend keeps what map produced before an exception, and map has
    # taken the socket that raised from the iterator: the next round goes on
    # after it.
    sent: list[int | None] = []
    rest = iter(sockets)
    while True:
        try:
            sent.extend(map(_SEND, rest, repeat(payload)))
            return sent
        except OSError:  # BlockingIOError: its buffer is full
            sent.append(None)


@trio.lowlevel.enable_ki_protection
def _send_each_split(
    sockets: Sequence[socket.socket], payload: bytes
) -> list[int | None]:
    """:func:`_send_each`, the second half of ``sockets`` sent from a thread of
    trio's thread cache while this thread sends the first, so that two cores
    send (``socket.send`` releases the GIL).

    Fork and join: the call returns once both halves are done, and the event
    loop does nothing else meanwhile, so no socket is touched by both
    threads and no thread outlives the call. KeyboardInterrupt is held off
    (trio delivers it at the next checkpoint) so that the join always
    happens. With no thread to be had, this thread sends them all.
    """
    half = len(sockets) // 2
    done = threading.Lock()
    done.acquire()
    tail: list[Outcome[list[int | None]]] = []

    def deliver(result: Outcome[list[int | None]]) -> None:
        tail.append(result)
        done.release()

    try:
        trio.lowlevel.start_thread_soon(
            partial(_send_each, sockets[half:], payload), deliver
        )
    except RuntimeError:  # threading's "can't start new thread", job not taken
        return _send_each(sockets, payload)
    try:
        sent = _send_each(sockets[:half], payload)
    finally:
        # The join. The sockets are non-blocking: the other half's sends
        # return at once, taken or refused.
        done.acquire()
    sent.extend(tail[0].unwrap())
    return sent


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


class _Room:
    __slots__ = ("_sockets", "files", "members", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict[User, None] = {}  # ordered set, join order
        # The members that can be written to directly, in JSON mode, with
        # each one's (stdlib) socket: see ChatServer._write_room_now.
        self.files: dict[User, socket.socket] = {}
        self._sockets: tuple[list[socket.socket], dict[User, int]] | None = None

    def add(self, user: User) -> None:
        """Make ``user`` the newest member."""
        self.members[user] = None
        if user._sock is not None and user._proto.mode is not Mode.LINE:
            self.files[user] = user._sock
            self._sockets = None

    def remove(self, user: User) -> None:
        """Make ``user`` no longer a member."""
        del self.members[user]
        if self.files.pop(user, None) is not None:
            self._sockets = None

    def sockets(self) -> tuple[list[socket.socket], dict[User, int]]:
        """The values of :attr:`files` as a list, and each key's index in
        it; kept until the membership changes, and never changed in place
        (a fan-out in progress keeps its own). A broadcast then reads no
        member's ``User`` and scans for no sender (building these for each
        message held the first delivery back: see docs/performance.md)."""
        sockets = self._sockets
        if sockets is None:
            files = self.files
            sockets = self._sockets = (
                list(files.values()),
                dict(zip(files, range(len(files)), strict=True)),
            )
        return sockets


class ChatServer:
    """A chat server speaking chatkit protocol v1 (JSON and line mode).

    Run it in a nursery you own; stop it with :meth:`aclose`::

        server = ChatServer(port=0, plugins=[MyPlugin()])
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print("listening on", server.port)
            ...
            await server.aclose()

    Args:
        host: address to listen on.
        port: TCP port; ``0`` picks a free one (read it from :attr:`port`).
        plugins: plugin objects or modules, called in this order.
        load_entry_points: also load plugins from the ``chatkit`` entry-point
            group, filtered by ``CHATKIT_LOAD_PLUGINS``.
        history: where room messages are kept and ``history`` is answered
            from (see :mod:`chatkit.history`); by default a
            :class:`~chatkit.history.MemoryHistory` of ``history_size``
            messages per room.
        history_size: messages kept per room by the default store.
        max_history_page: most messages one ``history`` reply carries (a
            larger or missing ``limit`` is capped to it); a reply is also cut
            to half of ``max_queued_bytes`` (at least one message).
        max_line_length: longest accepted line, in bytes.
        max_queued_bytes: bound of each connection's outgoing buffer.
        max_queued_messages: bound, in frames, of the same buffer.
        presence_limit: in a room with more members than this, joins and
            leaves are not announced to the other members (the joiner still
            gets its own ``joined``, the leaver its own ``left``): without
            it every join to a room of N costs N deliveries, and N joins
            N²/2. ``None`` always announces. See docs/performance.md.
        split_fanout_at: a message sent alone (at light load) to at least
            this many other members of an idle room is sent from two
            threads, the event loop's and one from trio's thread cache, each
            writing to half of the sockets, and the server goes on once both
            are done: both cores send, which at light load gets the message
            to the last member sooner (docs/performance.md measures where
            it does and where not). ``None``: always from the event loop's
            thread alone.
        hook_timeout: seconds an awaited hook implementation may take.
        close_timeout: seconds a closing connection gets to flush.
        server_name: the ``server`` field of ``welcome``.
        max_connections: connections beyond this get ``error server_full``.
        max_rooms_per_user: a ``join`` beyond this gets ``error
            too_many_rooms``.
        max_message_length: longest ``say``/``dm`` text, in characters
            (``error too_large``).
        rate_limit: requests per second each connection may make on average
            (a token bucket); excess requests get ``error rate_limited``.
            ``None`` turns rate limiting off.
        rate_burst: the bucket's size: how many requests may come at once.
        flood_limit: after this many rate-limited requests in a row the
            connection is closed (``left`` reason ``flood``).
        handshake_timeout: seconds a new connection has to be accepted
            (``hello`` or a line-mode name) before ``error timeout`` and close.
        idle_timeout: if set, a connection that sends nothing for this long
            is closed with ``error timeout`` (:class:`ChatClient` pings to
            stay alive). Half-open TCP connections are also reaped by TCP
            keepalive, which is always on.
        ssl_context: serve TLS with this context (see :mod:`ssl`).
        backplane: join a cluster of servers through it (see
            :mod:`chatkit.cluster`); its shared history is then the default
            store.

    Raises:
        ValueError: a limit is out of range.
        pluggy.PluginValidationError: a plugin implements an unknown hook.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        plugins: Iterable[object] = (),
        load_entry_points: bool = False,
        history: HistoryStore | None = None,
        history_size: int = 100,
        max_history_page: int = 500,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_queued_bytes: int = 1024 * 1024,
        max_queued_messages: int = 10_000,
        presence_limit: int | None = 1000,
        split_fanout_at: int | None = 256,
        hook_timeout: float = 5.0,
        close_timeout: float = 2.0,
        server_name: str = "chatkit",
        max_connections: int = 10_000,
        max_rooms_per_user: int = 50,
        max_message_length: int = 4096,
        rate_limit: float | None = 20.0,
        rate_burst: int = 40,
        flood_limit: int = 20,
        handshake_timeout: float = 10.0,
        idle_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        backplane: RedisBackplane | None = None,
    ) -> None:
        for label, value in (
            ("history_size", history_size),
            ("max_history_page", max_history_page),
            ("max_line_length", max_line_length),
            ("max_queued_bytes", max_queued_bytes),
            ("max_queued_messages", max_queued_messages),
            ("max_connections", max_connections),
            ("max_rooms_per_user", max_rooms_per_user),
            ("max_message_length", max_message_length),
            ("rate_burst", rate_burst),
            ("flood_limit", flood_limit),
        ):
            if value < 1:
                raise ValueError(f"{label} must be at least 1, not {value}")
        for label, timeout in (
            ("hook_timeout", hook_timeout),
            ("close_timeout", close_timeout),
            ("handshake_timeout", handshake_timeout),
            ("idle_timeout", idle_timeout),
            ("rate_limit", rate_limit),
        ):
            if timeout is not None and timeout <= 0:
                raise ValueError(f"{label} must be positive, not {timeout}")
        self.host = host
        """The address the server listens on."""
        self.port = port
        """The TCP port; once :meth:`serve` has started, the bound one."""
        self.history_size = history_size
        self.backplane = backplane
        """The cluster backplane, if this server is one node of several."""
        if history is None:
            history = (
                backplane.history
                if backplane is not None
                else MemoryHistory(history_size)
            )
        self.history: HistoryStore = history
        """The server's history store."""
        # A store may keep ids handed out to direct messages, which it does
        # not store (see HistoryStore), so that they are not reused.
        self._note_id: Callable[[int], None] | None = getattr(history, "note_id", None)
        self.max_history_page = max_history_page
        self.max_line_length = max_line_length
        self.max_queued_bytes = max_queued_bytes
        self.max_queued_messages = max_queued_messages
        if presence_limit is not None and presence_limit < 0:
            raise ValueError(f"presence_limit must be at least 0, not {presence_limit}")
        self.presence_limit = presence_limit
        if split_fanout_at is not None and split_fanout_at < 2:
            raise ValueError(
                f"split_fanout_at must be at least 2, not {split_fanout_at}"
            )
        self.split_fanout_at = split_fanout_at
        self.close_timeout = close_timeout
        self.server_name = server_name
        self.max_connections = max_connections
        self.max_rooms_per_user = max_rooms_per_user
        self.max_message_length = max_message_length
        self.rate_limit = rate_limit
        self.rate_burst = rate_burst
        self.flood_limit = flood_limit
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.ssl_context = ssl_context
        self.plugin_manager = make_plugin_manager(
            ServerSpec, plugins, load_entry_points=load_entry_points
        )
        self._hooks = HookDispatcher(
            self.plugin_manager,
            timeout=hook_timeout,
            logger=log,
            # A reader about to yield to a plugin publishes its batch first.
            before_await=self._end_batch,
        )
        # Read batches (see _begin_batch): the reader task whose requests are
        # being handled, and the users with output held back for its end.
        self._batch_owner: trio.lowlevel.Task | None = None
        self._dirty: list[User] = []
        # The users that must not be written to directly: a writer task of
        # theirs is running, or their output has ended (User._start_writer,
        # User._close). Output is pending only for these and the _dirty
        # ones, so a room with none of either can be written to at once
        # (_write_room_now) without looking at each member. Only users with
        # direct writes (User._sock) are kept, and only while connected.
        self._busy: set[User] = set()
        # Broadcasts held back for the running reader's batch: consecutive
        # messages to one room, in runs by origin, delivered with one append
        # per member (see _broadcast and _flush_room).
        self._pending_room: _Room | None = None
        self._pending_runs: list[_Run] = []
        # Their size, bytes and frames: a burst is delivered in parts of at
        # most _HELD_SHARE of a member's buffer bounds (see _broadcast).
        self._held_bytes = 0
        self._held_frames = 0
        # The two fan-out optimisations, switchable only so that
        # benchmarks/fanout.py can measure each one's worth in the same run.
        self._direct_writes = True
        self._batch_reads = True
        self._names: dict[str, User] = {}  # casefolded name -> user
        self._users: dict[User, None] = {}  # logged-in users, login order
        self._rooms: dict[str, _Room] = {LOBBY: _Room(LOBBY)}
        self._connections: set[User] = set()
        self._last_id = 0
        self._started = False
        self._closing = False
        self._accept_scope = trio.CancelScope()
        self._connections_scope = trio.CancelScope()
        self._stopped = trio.Event()

    # --- public API -------------------------------------------------------

    @property
    def users(self) -> tuple[User, ...]:
        """Logged-in users, in login order."""
        return tuple(self._users)

    @property
    def rooms(self) -> Mapping[str, tuple[str, ...]]:
        """Each room's members' names."""
        return {
            name: tuple(u.name for u in room.members)
            for name, room in self._rooms.items()
        }

    def get_user(self, name: str) -> User | None:
        """The logged-in user called ``name`` (case-insensitively), if any."""
        return self._names.get(name.casefold())

    async def serve(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until :meth:`aclose` (or cancellation).

        Use as ``await nursery.start(server.serve)``, which returns the bound
        port once the server listens. Returns after a graceful shutdown,
        when every connection task has ended. Cancelling it instead stops
        everything at once (connections are closed without ``shutdown``).

        Raises:
            RuntimeError: the server was already started, or closed.
            OSError: the address could not be bound.
            chatkit.history.HistoryStoreError: the history store cannot be
                opened.
            chatkit.cluster.BackplaneError: the backplane cannot reach Redis.
        """
        # A server closed before it started would otherwise serve with no
        # way to stop it gracefully (aclose would return at once).
        if self._started or self._closing:
            raise RuntimeError("this ChatServer was already started or closed")
        self._started = True
        try:
            async with self.history.open() as last_id:
                # Ids keep increasing across restarts.
                self._last_id = max(self._last_id, last_id)
                if self.backplane is None:
                    await self._serve(task_status)
                else:
                    async with self.backplane.attach(self):
                        await self._serve(task_status)
        finally:
            self._closing = True
            self._stopped.set()

    async def _serve(self, task_status: trio.TaskStatus[int]) -> None:
        tcp_listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = tcp_listeners[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners)
        if self.ssl_context is not None:
            listeners = [
                trio.SSLListener(listener, self.ssl_context)
                for listener in tcp_listeners
            ]
        with self._connections_scope:
            async with trio.open_nursery() as connections:
                with self._accept_scope:
                    async with trio.open_nursery() as accept:
                        await accept.start(
                            partial(
                                trio.serve_listeners,
                                self._handle_connection,
                                listeners,
                                handler_nursery=connections,
                            )
                        )
                        await self._hooks.notify("chatkit_server_started", server=self)
                        task_status.started(self.port)
        # Connections wind down in the connections nursery (aclose told
        # them to; its deadline bounds them).

    async def aclose(self, reason: str = "server shutting down") -> None:
        """Shut down gracefully; idempotent.

        Stops accepting, fires ``chatkit_server_stopping``, sends every
        client what is pending and then ``shutdown``, and waits (at most
        ``close_timeout`` plus a second) for every connection task to end
        and :meth:`serve` to return.
        """
        if not self._started:
            self._closing = True
            self._stopped.set()
            return
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        await self._hooks.notify("chatkit_server_stopping", server=self)
        self._accept_scope.cancel()
        shutdown = Shutdown(reason=reason)
        json_bytes, line_bytes = encode_json(shutdown), encode_line(shutdown)
        for user in list(self._connections):
            farewell = line_bytes if user._proto.mode is Mode.LINE else json_bytes
            user._close(LeaveReason.SHUTDOWN, farewell)
        self._connections_scope.deadline = trio.current_time() + self.close_timeout + 1
        await self._stopped.wait()

    async def post(
        self, room: str, text: str, *, sender: str = SERVER_SENDER
    ) -> Message:
        """Say ``text`` in ``room`` on the server's own behalf.

        Delivered like a user's message (history, ids, the
        ``chatkit_message_delivered`` hook) but not passed through
        ``chatkit_message``: the program is trusted.

        Raises:
            KeyError: no such room.
        """
        if room not in self._rooms:
            raise KeyError(room)
        publication = self._publish(MESSAGE, room=room, sender=sender, text=text)
        if publication is not None:
            await publication.done.wait()  # it came back (hooks run after)
            result: Message = publication.result
            return result
        message = self._hand_out_message(
            self._next_id(), time.time(), room, sender, text, None, None
        )
        await self._delivered(message)
        return message

    async def _delivered(self, message: Message) -> None:
        if self._hooks.has("chatkit_message_delivered"):
            await self._hooks.notify(
                "chatkit_message_delivered", server=self, message=message
            )

    def kick(self, name: str, reason: str = "kicked") -> bool:
        """Disconnect user ``name`` with ``error kicked``; True if found."""
        user = self.get_user(name)
        if user is None:
            return False
        error = ErrorReply(code=ErrorCode.KICKED, message=reason)
        user._close(LeaveReason.KICKED, user._proto.send(error))
        return True

    # --- connections ------------------------------------------------------

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        _enable_keepalive(stream)
        if len(self._connections) >= self.max_connections:
            await self._refuse(stream, ErrorCode.SERVER_FULL, "the server is full")
            return
        user = User(self, stream)
        log.info("New connection from %s", user._peer)
        self._connections.add(user)
        try:
            with user._scope:
                async with trio.open_nursery() as nursery:
                    user._nursery = nursery  # for its writer, when needed
                    if self._closing:
                        user._close(LeaveReason.SHUTDOWN)
                    # The reader's deadline is the handshake timeout, then
                    # the idle timeout (pushed forward on every read).
                    user._reader_scope.deadline = (
                        trio.current_time() + self.handshake_timeout
                    )
                    with user._reader_scope:
                        reason = await self._read_loop(user)
                        user._close(reason)
                    if user._reader_scope.cancelled_caught and not user._output_ended:
                        self._time_out(user)
                    await self._settle(user)
                    self._detach(user)
        except Exception:
            # A bug while serving one connection must not take the server
            # (and everyone else) down with it.
            log.exception("internal error on connection %s", user)
        finally:
            self._connections.discard(user)
            self._detach(user)
            self._busy.discard(user)
            user._sock = None  # no direct write after the stream is closed
            # The leave hooks and a graceful close run shielded, but within
            # the shutdown's bound (aclose's deadline) and, when the server
            # is cancelled, close_timeout: a slow plugin cannot hold it up.
            limit = self._connections_scope.deadline
            if trio.current_effective_deadline() == -math.inf:  # cancelled
                limit = min(limit, trio.current_time() + self.close_timeout)
            with trio.CancelScope(shield=True):
                with trio.CancelScope(deadline=limit):
                    await self._after_detach(user)
                    with trio.move_on_after(self.close_timeout):
                        await stream.aclose()
                await trio.aclose_forcefully(stream)

    async def _refuse(
        self, stream: trio.abc.Stream, code: ErrorCode, text: str
    ) -> None:
        """Tell a connection we will not serve it, then close it (bounded)."""
        log.warning("refused a connection: %s", text)
        with trio.move_on_after(self.close_timeout):
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode_json(ErrorReply(code=code, message=text)))
        await trio.aclose_forcefully(stream)

    def _time_out(self, user: User) -> None:
        if user._name is None:
            text = f"no hello within {self.handshake_timeout}s"
        else:
            text = f"nothing received for {self.idle_timeout}s"
        log.info("%s timed out: %s", user, text)
        error = ErrorReply(code=ErrorCode.TIMEOUT, message=text)
        user._close(LeaveReason.TIMEOUT, user._proto.send(error))

    def _admit(self, user: User) -> bool:
        """Take a token from ``user``'s bucket; False if it is empty."""
        rate = self.rate_limit
        if rate is None:
            return True
        now = trio.current_time()
        user._tokens = min(
            self.rate_burst, user._tokens + (now - user._refilled_at) * rate
        )
        user._refilled_at = now
        if user._tokens >= 1:
            user._tokens -= 1
            user._violations = 0
            return True
        user._violations += 1
        return False

    def _begin_batch(self) -> None:
        """Hold back direct writes caused by the running reader until
        :meth:`_end_batch`, so that every request decoded from one read is
        one batch and each recipient gets one write per read, not one per
        message. Ended before the reader yields: before each read, before
        awaiting a plugin (HookDispatcher's ``before_await``), and when the
        reader closes its user; anything new that awaits inside request
        handling must call ``_end_batch`` first (or its batch waits for the
        next reader's).
        """
        if self._batch_reads:
            self._batch_owner = trio.lowlevel.current_task()

    async def _end_read_batch(self) -> None:
        """End the running reader's batch; write what it held back once the
        other readers woken with it have handled their reads too."""
        self._batch_owner = None
        if self._dirty or self._pending_room is not None:
            # Readers that received data together run in one scheduler
            # batch: yielding once lets them all add to _dirty, so that
            # under load each recipient gets one write per round of reads,
            # not one per read. Whoever comes back first writes for all.
            # A broadcast still held back stays so (any other output
            # delivers it first): alone in its round, it is written to the
            # whole room at once (_write_room_now).
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._end_batch()

    async def _pause_batch(self) -> None:
        """Let other tasks run in the middle of the running reader's batch
        without ending it: recipients it made dirty stay dirty and still get
        one write, when some reader's batch ends (this one's, at the latest,
        before its next read)."""
        if self._pending_room is not None:
            self._flush_room()
        self._batch_owner = None
        try:
            await trio.lowlevel.checkpoint()
        except BaseException:
            self._end_batch()  # cancelled: write what is held back first
            raise

    def _end_batch(self) -> None:
        if self._pending_room is not None and (
            self._dirty or not self._write_room_now()
        ):
            self._flush_room()
        self._batch_owner = None
        dirty = self._dirty
        if dirty:
            self._dirty = []
            for user in dirty:
                user._dirty = False
                user._write_now()

    async def _read_loop(self, user: User) -> LeaveReason:
        proto = user._proto
        stream = user._stream
        scope = user._reader_scope
        while True:
            await self._end_read_batch()
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if user._name is not None:
                idle = self.idle_timeout
                if idle is not None:
                    scope.deadline = trio.current_time() + idle
                elif scope.deadline != math.inf:  # the setter costs: not per read
                    scope.deadline = math.inf
            proto.receive_data(data)
            # Every request decoded from one read is handled before the next
            # read, so the writers see one batch per read and coalesce it.
            handled = refused = 0
            while True:
                if user._output_ended:
                    # Closed mid-batch (kicked by a plugin, too slow): the
                    # requests still buffered must not be acted on.
                    return user._reason or LeaveReason.DISCONNECT
                try:
                    request: ClientRequest | Status | RemoteProtocolError = (
                        proto.next_event()
                    )
                except RemoteProtocolError as exc:
                    request = exc  # a bad line costs a token like any request
                if request is NEED_DATA:
                    break
                if request is EOF:
                    return LeaveReason.DISCONNECT
                assert not isinstance(request, Status)
                # One read can hold thousands of lines: let the other
                # connections run now and then. Refused lines (a flood) come
                # cheap and fast, so they pause often; admitted requests pause
                # rarely, as each pause can cost the batch its coalescing.
                if not self._admit(user):
                    refused += 1
                    if refused % _PAUSE_EVERY_REFUSED == 0:
                        await self._pause_batch()
                    if user._violations >= self.flood_limit:
                        self._error(
                            user,
                            ErrorCode.RATE_LIMITED,
                            "too many requests; disconnecting",
                            request.ref,
                        )
                        return LeaveReason.FLOOD
                    self._error(user, ErrorCode.RATE_LIMITED, "slow down", request.ref)
                    continue
                if isinstance(request, RemoteProtocolError):
                    self._error(user, request.code, request.message, request.ref)
                    refused += 1
                    if refused % _PAUSE_EVERY_REFUSED == 0:
                        await self._pause_batch()
                    continue
                handled += 1
                if handled % _PAUSE_EVERY_ADMITTED == 0:
                    await self._pause_batch()
                self._begin_batch()
                reason = await self._handle_request(user, request)
                if reason is not None:
                    return reason

    async def _handle_request(
        self, user: User, request: ClientRequest
    ) -> LeaveReason | None:
        """Act on one request; return a reason when the connection must end."""
        match request:
            case Say():
                await self._on_say(user, request)
            case Hello():
                return await self._on_hello(user, request)
            case Dm():
                await self._on_dm(user, request)
            case Join():
                await self._on_join(user, request)
            case Leave():
                await self._on_leave(user, request)
            case Nick():
                await self._on_nick(user, request)
            case Who():
                names = await self._who(request.room)
                user._send(WhoReply(room=request.room, names=names, ref=request.ref))
            case Rooms():
                counts = await self._room_counts()
                infos = tuple(
                    RoomInfo(name=name, members=counts[name]) for name in sorted(counts)
                )
                user._send(RoomsReply(rooms=infos, ref=request.ref))
            case History():
                await self._on_history(user, request)
            case Ping():
                user._send(Pong(ref=request.ref))
            case Bye():
                return (
                    LeaveReason.EXIT
                    if user._proto.mode is Mode.LINE
                    else LeaveReason.BYE
                )
        return None

    async def _who(self, room_name: str) -> tuple[str, ...]:
        """The names in a room: the whole cluster's if there is one."""
        cluster = self._cluster
        if cluster is not None:
            self._end_batch()  # about to await (see _begin_batch)
            with suppress(OSError):
                return await cluster.who(room_name)
        room = self._rooms.get(room_name)
        return tuple(u.name for u in room.members) if room else ()

    async def _room_counts(self) -> dict[str, int]:
        """Each room's number of members: the whole cluster's if there is one."""
        cluster = self._cluster
        if cluster is not None:
            self._end_batch()  # about to await (see _begin_batch)
            with suppress(OSError):
                return await cluster.rooms()
        return {name: len(room.members) for name, room in self._rooms.items()}

    def _error(
        self, user: User, code: ErrorCode, message: str, ref: str | int | None
    ) -> None:
        user._send(ErrorReply(code=code, message=message, ref=ref))

    async def _on_hello(self, user: User, hello: Hello) -> LeaveReason | None:
        name = hello.name
        # Only the name's form before authenticating: whether it is in use
        # is for authenticated clients to learn (docs/security.md).
        if not is_valid_name(name):
            self._name_refused(user, name, hello.ref)
            return None
        try:
            await self._hooks.veto(
                "chatkit_authenticate",
                server=self,
                name=name,
                token=hello.token,
                address=user.address,
            )
        except Veto as exc:
            log.info("refused %s from %s: %s", name, user.address, exc.reason)
            self._error(user, ErrorCode.UNAUTHORIZED, exc.reason, hello.ref)
            return LeaveReason.DISCONNECT
        # Is the name in use (the hooks may have awaited)? Claim it across
        # the cluster, and check it again after that await.
        if (
            self._name_refused(user, name, hello.ref)
            or not await self._claim(user, name, hello.ref)
            or self._name_refused(user, name, hello.ref)
        ):
            return None
        user._name = name
        self._names[name.casefold()] = user
        self._users[user] = None
        # Handshake done: from now on only the idle timeout applies.
        user._reader_scope.deadline = (
            trio.current_time() + self.idle_timeout
            if self.idle_timeout is not None
            else math.inf
        )
        user._send(
            Welcome(
                name=name,
                protocol=PROTOCOL_VERSION,
                server=self.server_name,
                rooms=(LOBBY,),
                ref=hello.ref,
            )
        )
        self._add_member(user, self._rooms[LOBBY], ref=None)
        log.info("%s has joined the chat.", name)
        await self._hooks.notify("chatkit_user_connected", server=self, user=user)
        await self._hooks.notify(
            "chatkit_user_joined", server=self, user=user, room=LOBBY
        )
        return None

    def _name_refused(self, user: User, name: str, ref: str | int | None) -> bool:
        """Tell ``user`` why ``name`` cannot be theirs (invalid, or someone
        else's here); True if so."""
        if not is_valid_name(name):
            self._error(
                user,
                ErrorCode.BAD_NAME,
                "names are 1-32 letters, digits, '_', '-' or '.'",
                ref,
            )
            return True
        holder = self._names.get(name.casefold())
        if (holder is not None and holder is not user) or user._detached:
            self._error(user, ErrorCode.NAME_TAKEN, f"{name} is taken", ref)
            return True
        return False

    async def _claim(self, user: User, name: str, ref: str | int | None) -> bool:
        """Claim ``name`` across the cluster, if there is one; tell ``user``
        if it cannot be."""
        bp = self.backplane
        if bp is None:
            return True
        self._end_batch()  # about to await (see _begin_batch)
        try:
            claimed = await bp.claim(name)
        except OSError:
            self._error(
                user,
                ErrorCode.UNAVAILABLE,
                "the cluster is unreachable; try again later",
                ref,
            )
            return False
        if not claimed:
            self._error(user, ErrorCode.NAME_TAKEN, f"{name} is taken", ref)
        return claimed

    def _member_room(
        self, user: User, room: str, ref: str | int | None
    ) -> _Room | None:
        target = self._rooms.get(room)
        if target is None or user not in target.members:
            self._error(user, ErrorCode.NOT_IN_ROOM, f"you are not in {room}", ref)
            return None
        return target

    def _too_long(self, user: User, text: str, ref: str | int | None) -> bool:
        if len(text) <= self.max_message_length:
            return False
        self._error(
            user,
            ErrorCode.TOO_LARGE,
            f"messages are at most {self.max_message_length} characters",
            ref,
        )
        return True

    async def _on_say(self, user: User, say: Say) -> None:
        room = self._member_room(user, say.room, say.ref)
        if room is None or self._too_long(user, say.text, say.ref):
            return
        text = say.text
        if self._hooks.has("chatkit_message"):
            try:
                text = await self._hooks.rewrite(
                    "chatkit_message",
                    "text",
                    server=self,
                    user=user,
                    room=room.name,
                    text=text,
                )
            except Veto as exc:
                self._error(user, ErrorCode.REJECTED, exc.reason, say.ref)
                return
            # The user may have left the room while the hooks ran.
            if user not in room.members or self._rooms.get(room.name) is not room:
                self._error(
                    user, ErrorCode.NOT_IN_ROOM, f"you left {room.name}", say.ref
                )
                return
        # In a cluster, delivered (the sender's copy too) when it comes back
        # from the backplane: see _cluster_event.
        if self._publish(
            MESSAGE,
            origin=user,
            ref=say.ref,
            room=room.name,
            sender=user.name,
            text=text,
        ):
            return
        message = self._hand_out_message(
            self._next_id(), time.time(), room.name, user.name, text, user, say.ref
        )
        await self._delivered(message)

    def _next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def _hand_out_message(
        self,
        id: int,
        ts: float,
        room_name: str,
        sender: str,
        text: str,
        origin: User | None,
        ref: str | int | None,
    ) -> Message:
        """Record a room message and deliver it to this node's members of
        the room; ``origin`` (the sender, if a member here) gets ``ref``."""
        message = Message(id=id, ts=ts, room=room_name, sender=sender, text=text)
        self.history.append(message)
        room = self._rooms.get(room_name)
        if room is not None:
            if origin not in room.members:
                origin = None  # it left the room meanwhile (or is elsewhere)
            self._broadcast(room, message, origin=origin, ref=ref)
        return message

    def _hand_out_dm(
        self,
        id: int,
        ts: float,
        sender: str,
        to: str,
        text: str,
        origin: User | None,
        ref: str | int | None,
    ) -> DirectMessage:
        """Deliver a direct message to its recipient and to ``origin`` (the
        sender, with ``ref``), as far as they are on this node."""
        dm = DirectMessage(id=id, ts=ts, sender=sender, to=to, text=text)
        if self._note_id is not None:
            self._note_id(id)  # not stored, but its id is not to be reused
        recipient = self.get_user(to)
        if recipient is not None and recipient is not origin:
            recipient._send(dm)
        if origin is not None:
            origin._send(msgspec.structs.replace(dm, ref=ref))
        return dm

    @property
    def _cluster(self) -> RedisBackplane | None:
        """The backplane while it reaches Redis; None when serving alone."""
        backplane = self.backplane
        return backplane if backplane is not None and backplane.available else None

    def _publish(
        self,
        kind: str,
        *,
        origin: User | None = None,
        ref: str | int | None = None,
        **fields: Any,
    ) -> Publication | None:
        """Publish an event to the cluster; None when there is none to
        publish to (no backplane, or it lost Redis): deliver it here."""
        cluster = self._cluster
        if cluster is None:
            return None
        return cluster.publish(
            Envelope(kind, ts=time.time(), **fields), user=origin, ref=ref
        )

    def _broadcast(
        self,
        room: _Room,
        event: Message | Joined | Left,
        *,
        origin: User | None = None,
        ref: str | int | None = None,
    ) -> None:
        """Deliver ``event`` to every member of ``room``: encoded once per
        mode, appended to each buffer. A line-mode ``origin`` gets no copy
        (as in the original program); a JSON one gets its ``ref`` back.

        Inside a read batch, consecutive broadcasts to one room (from any
        origins: readers woken together add to one batch) are held back and
        delivered together (:meth:`_flush_room`), so each member gets one
        append per batch, not one per message.
        Anything else that sends, and any change of membership, delivers
        them first: every member still sees everything in the same order.
        """
        data = encode_json(event)
        own = data
        if ref is not None and origin is not None:
            own = encode_json(msgspec.structs.replace(event, ref=ref))
        owner = self._batch_owner
        if owner is not None and owner is trio.lowlevel.current_task():
            if self._pending_room is not room:
                if self._pending_room is not None:
                    self._flush_room()
                self._pending_room = room
            runs = self._pending_runs
            if not runs or runs[-1].origin is not origin:
                runs.append(_Run(origin))
            runs[-1].add(event, data, own)
            # Many readers woken together can hold back more than a
            # member's buffer may take at once (max_queued_*): deliver such
            # a burst in parts, so that no part alone overflows a buffer.
            self._held_bytes += len(data)
            self._held_frames += 1
            if (
                self._held_bytes > self.max_queued_bytes // _HELD_SHARE
                or self._held_frames > self.max_queued_messages // _HELD_SHARE
            ):
                self._flush_room()
            return
        run = _Run(origin)
        run.add(event, data, own)
        self._deliver(room, (run,))

    def _write_room_now(self) -> bool:
        """Write the broadcasts held back straight to every member's socket,
        if every member is an idle JSON connection on a plain socket (the
        usual case at light load); False, having done nothing, otherwise.
        Each origin among the members gets its own copy, with its refs.

        Called only when no user is dirty, so a member has output pending
        only if it is in ``_busy``: the check looks at those few, not at
        every member. The writes are one C-level loop (``map``), not a
        Python statement per member: at light load this is the whole cost
        of a message, and Python-level work per member was most of it (see
        docs/performance.md). What a socket does not take goes to that
        connection's buffer and writer, as in :meth:`User._write_now`.
        """
        room = self._pending_room
        assert room is not None
        members = room.members
        files = room.files
        frames, size = self._held_frames, self._held_bytes
        busy = self._busy
        if (
            len(files) != len(members)
            or size > self.max_queued_bytes
            or frames > self.max_queued_messages
            or (busy and any(map(members.__contains__, busy)))
        ):
            return False
        runs = self._take_held()
        payload = b"".join(run.data for run in runs)
        sockets, index = room.sockets()
        origins = [
            origin
            for origin in dict.fromkeys(run.origin for run in runs)
            if origin is not None and origin in index
        ]
        skip = sorted((index[origin] for origin in origins), reverse=True)
        targets = _without(sockets, skip) if skip else sockets
        # A lone message (light load: the other core is likely idle) to a
        # large room is sent from two threads. Under load a batch holds more
        # messages, and a second thread would compete with the busy cores.
        split = self.split_fanout_at
        sent = (
            _send_each_split(targets, payload)
            if frames == 1 and split is not None and len(targets) >= split
            else _send_each(targets, payload)
        )
        if sent.count(size) != len(sent):
            users = _without(list(index), skip)  # in the order of sockets
            for user, count in zip(users, sent, strict=True):
                if count != size:
                    user._keep_unsent(payload, count or 0, frames)
        # The senders' own copies (their acknowledgements) last: a send wakes
        # the reader at the other end, and the others' deliveries need not
        # wait for that.
        for origin in origins:
            origin._enqueue(*_copy_for(origin, runs))
        return True

    def _take_held(self) -> list[_Run]:
        """The broadcasts held back (see :meth:`_broadcast`), no longer
        held."""
        runs = self._pending_runs
        self._pending_room = None
        self._pending_runs = []
        self._held_bytes = self._held_frames = 0
        return runs

    def _flush_room(self) -> None:
        """Deliver the broadcasts held back by :meth:`_broadcast`."""
        room = self._pending_room
        if room is None:
            return
        self._deliver(room, self._take_held())

    def _deliver(self, room: _Room, runs: Sequence[_Run]) -> None:
        """Hand ``runs`` to every member of ``room``: one append each, of
        bytes encoded once per mode (each origin's own, see :func:`_copy_for`).
        """
        origins = dict.fromkeys(run.origin for run in runs)
        frames = sum(len(run.events) for run in runs)
        data = b"".join(run.data for run in runs)
        lines: bytes | None = None
        line_mode = Mode.LINE
        for member in room.members:
            if member in origins:
                own, count = _copy_for(member, runs)
                if count:  # none for a line-mode origin of every run
                    member._enqueue(own, count)
            elif member._proto.mode is line_mode:
                if lines is None:
                    events = (event for run in runs for event in run.events)
                    lines = b"".join(map(encode_line, events))
                member._enqueue(lines, frames)
            else:
                member._enqueue(data, frames)

    async def _on_dm(self, user: User, dm: Dm) -> None:
        if self._too_long(user, dm.text, dm.ref):
            return
        cluster = self._cluster
        recipient: User | RemoteUser | None = self.get_user(dm.to)
        if recipient is None and cluster is not None:
            self._end_batch()  # about to await (see _begin_batch)
            with suppress(OSError):
                if await cluster.holds(dm.to):
                    recipient = RemoteUser(dm.to)
        if recipient is None:
            self._error(
                user, ErrorCode.NO_SUCH_USER, f"nobody is called {dm.to}", dm.ref
            )
            return
        text = dm.text
        if self._hooks.has("chatkit_dm"):
            try:
                text = await self._hooks.rewrite(
                    "chatkit_dm",
                    "text",
                    server=self,
                    user=user,
                    recipient=recipient,
                    text=text,
                )
            except Veto as exc:
                self._error(user, ErrorCode.REJECTED, exc.reason, dm.ref)
                return
            if isinstance(recipient, User) and recipient._detached:
                self._error(user, ErrorCode.NO_SUCH_USER, f"{dm.to} left", dm.ref)
                return
        if self._publish(
            DM, origin=user, ref=dm.ref, sender=user.name, to=recipient.name, text=text
        ):
            return
        if not isinstance(recipient, User):
            self._error(
                user, ErrorCode.UNAVAILABLE, "the cluster is unreachable", dm.ref
            )
            return
        message = self._hand_out_dm(
            self._next_id(), time.time(), user.name, recipient.name, text, user, dm.ref
        )
        await self._hooks.notify("chatkit_dm_delivered", server=self, message=message)

    async def _on_join(self, user: User, join: Join) -> None:
        if not is_valid_room(join.room):
            self._error(
                user,
                ErrorCode.BAD_NAME,
                "room names are 1-64 letters, digits, '_', '-' or '.'",
                join.ref,
            )
            return
        room = self._rooms.get(join.room)
        if room is not None and user in room.members:
            user._send(Joined(room=room.name, name=user.name, ref=join.ref))
            return
        if len(user._rooms) >= self.max_rooms_per_user:
            self._error(
                user,
                ErrorCode.TOO_MANY_ROOMS,
                f"you are in {len(user._rooms)} rooms, the most allowed",
                join.ref,
            )
            return
        if room is None:
            room = self._rooms[join.room] = _Room(join.room)
        self._add_member(user, room, ref=join.ref)
        await self._hooks.notify(
            "chatkit_user_joined", server=self, user=user, room=room.name
        )

    def _add_member(self, user: User, room: _Room, ref: str | int | None) -> None:
        if self._pending_room is not None:
            self._flush_room()  # the newcomer must not get earlier messages
        room.add(user)
        user._rooms[room.name] = None
        limit = self.presence_limit
        announce = limit is None or len(room.members) <= limit
        if self.backplane is not None:
            self.backplane.member(room.name, user.name, present=True)
            if announce:
                self._publish(JOINED, room=room.name, sender=user.name)
        if announce:
            self._broadcast(
                room, Joined(room=room.name, name=user.name), origin=user, ref=ref
            )
        elif user._proto.mode is not Mode.LINE:
            # Too large a room to announce joins: only the joiner's own copy.
            user._send(Joined(room=room.name, name=user.name, ref=ref))

    async def _on_leave(self, user: User, leave: Leave) -> None:
        room = self._member_room(user, leave.room, leave.ref)
        if room is None:
            return
        await self._settle(user)
        self._remove_member(user, room, LeaveReason.LEAVE)
        user._send(
            Left(
                room=room.name, name=user.name, reason=LeaveReason.LEAVE, ref=leave.ref
            )
        )
        await self._hooks.notify(
            "chatkit_user_left",
            server=self,
            user=user,
            room=room.name,
            reason=LeaveReason.LEAVE,
        )

    def _remove_member(
        self, user: User, room: _Room, reason: LeaveReason, *, notify: bool = True
    ) -> None:
        if self._pending_room is not None:
            self._flush_room()  # the leaver still gets earlier messages
        room.remove(user)
        del user._rooms[room.name]
        limit = self.presence_limit
        # The room had len + 1 members: announce only if that is in the limit.
        announce = notify and (limit is None or len(room.members) < limit)
        if self.backplane is not None:
            self.backplane.member(room.name, user.name, present=False)
            if announce:
                self._publish(LEFT, room=room.name, sender=user.name, reason=reason)
        if announce:
            self._broadcast(room, Left(room=room.name, name=user.name, reason=reason))
        if not room.members and room.name != LOBBY:
            del self._rooms[room.name]

    async def _on_nick(self, user: User, nick: Nick) -> None:
        await self._settle(user)
        new = nick.name
        if self._name_refused(user, new, nick.ref):
            return
        if self._hooks.has("chatkit_nick"):
            try:
                await self._hooks.veto("chatkit_nick", server=self, user=user, new=new)
            except Veto as exc:
                self._error(user, ErrorCode.REJECTED, exc.reason, nick.ref)
                return
            # The hooks may have awaited: check the name again.
            if self._name_refused(user, new, nick.ref):
                return
        old = user.name
        bp = self.backplane
        if new.casefold() != old.casefold():
            if not await self._claim(user, new, nick.ref) or self._name_refused(
                user, new, nick.ref
            ):
                return
            if bp is not None:
                bp.release(old)
        del self._names[old.casefold()]
        self._names[new.casefold()] = user
        user._name = new
        event = Renamed(old=old, new=new)
        rooms = [self._rooms[name] for name in user._rooms]
        self._send_to_each(_once(rooms, but=user), event)
        user._send(msgspec.structs.replace(event, ref=nick.ref))
        if bp is not None:
            for room_name in user._rooms:
                bp.member(room_name, old, present=False)
                bp.member(room_name, new, present=True)
            self._publish(RENAMED, old=old, sender=new, rooms=tuple(user._rooms))
        log.info("%s is now known as %s.", old, new)
        await self._hooks.notify(
            "chatkit_user_renamed", server=self, user=user, old=old, new=new
        )

    def _send_to_each(self, users: Iterable[User], event: ServerEvent) -> None:
        """Send ``event`` to ``users``, encoded once per wire mode."""
        json_bytes = encode_json(event)
        line_bytes: bytes | None = None
        for user in users:
            if user._proto.mode is Mode.LINE:
                line_bytes = line_bytes or encode_line(event)
                user._enqueue(line_bytes)
            else:
                user._enqueue(json_bytes)

    async def _on_history(self, user: User, request: History) -> None:
        """Answer a page of history: the newest ``limit`` messages (before
        ``before``), or with ``after``, the oldest ``limit`` after it (a
        client catching up asks again after the last one it got)."""
        room = self._member_room(user, request.room, request.ref)
        if room is None:
            return
        limit = self.max_history_page
        if request.limit is not None:
            limit = min(limit, request.limit)
        before, after = request.before, request.after
        self._end_batch()  # the store may yield (see _begin_batch)
        messages: Sequence[Message] = ()
        if limit == 0:
            pass
        elif after is not None:
            messages = await self.history.after(room.name, after, limit)
            if before is not None:
                messages = [m for m in messages if m.id < before]
        elif before is not None:
            messages = await self.history.before(room.name, before, limit)
        else:
            messages = await self.history.recent(room.name, limit)
        messages = _fit(messages, self.max_queued_bytes // 2, oldest=after is not None)
        user._send(
            HistoryReply(room=room.name, messages=tuple(messages), ref=request.ref)
        )

    # --- cluster (see chatkit.cluster) -----------------------------------

    async def _settle(self, user: User) -> None:
        """In a cluster, wait until what ``user`` said has come back from
        the backplane (delivered here, the sender's copy with its ``ref``):
        a leave, rename or disconnect is applied here at once but reaches
        the other nodes through the stream, after those messages, so it
        must come after them here too. Redis being lost ends the wait
        (RedisBackplane._lost delivers them locally)."""
        bp = self.backplane
        pending = bp.pending(user) if bp is not None else ()
        if pending:
            self._end_batch()  # about to await (see _begin_batch)
            for publication in pending:
                await publication.done.wait()

    def _cluster_event(
        self, id: int, env: Envelope, mine: bool, publication: Publication | None
    ) -> Message | DirectMessage | None:
        """Deliver a cluster event read from the backplane to this node's
        users; return the message or dm this node published (for hooks).

        Called inside a batch (the backplane reader's), so consecutive
        messages to a room reach each member in one write.
        """
        if id > self._last_id:
            self._last_id = id
        origin = publication.user if publication is not None else None
        ref = publication.ref if publication is not None else None
        kind = env.kind
        if kind in (MESSAGE, DM):
            event = self._hand_out(id, env, origin, ref)
            return event if mine else None
        if mine:
            return None  # presence: delivered to this node's users already
        if kind in (JOINED, LEFT):
            room = self._rooms.get(env.room)
            if room is not None:
                presence: Joined | Left = (
                    Joined(room=env.room, name=env.sender)
                    if kind == JOINED
                    else Left(room=env.room, name=env.sender, reason=env.reason or None)
                )
                self._broadcast(room, presence)
        elif kind == RENAMED:
            rooms = [self._rooms[name] for name in env.rooms if name in self._rooms]
            self._send_to_each(_once(rooms), Renamed(old=env.old, new=env.sender))
        return None

    async def _cluster_delivered(self, event: Message | DirectMessage) -> None:
        """Run the delivery hooks for an event this node published."""
        if isinstance(event, Message):
            await self._delivered(event)
        else:
            await self._hooks.notify("chatkit_dm_delivered", server=self, message=event)

    def _cluster_fallback(
        self, publication: Publication
    ) -> Message | DirectMessage | None:
        """Deliver, on this node alone, what was published just before the
        backplane was lost (and return it for the hooks)."""
        env, origin, ref = publication.env, publication.user, publication.ref
        if env.kind == MESSAGE and env.room in self._rooms:
            return self._hand_out(self._next_id(), env, origin, ref)
        if env.kind == DM and origin is not None:
            if self.get_user(env.to) is None:
                self._error(
                    origin, ErrorCode.UNAVAILABLE, "the cluster is unreachable", ref
                )
                return None
            return self._hand_out(self._next_id(), env, origin, ref)
        return None

    def _hand_out(
        self, id: int, env: Envelope, origin: User | None, ref: str | int | None
    ) -> Message | DirectMessage:
        """Deliver a cluster message or dm (``env``) here, with ``id``."""
        if env.kind == MESSAGE:
            return self._hand_out_message(
                id, env.ts, env.room, env.sender, env.text, origin, ref
            )
        return self._hand_out_dm(id, env.ts, env.sender, env.to, env.text, origin, ref)

    # --- leaving ----------------------------------------------------------

    def _detach(self, user: User) -> None:
        """Free the user's name and leave its rooms (once). Synchronous."""
        if user._detached:
            return
        user._detached = True
        if user._name is None:
            return
        reason = user._reason or LeaveReason.DISCONNECT
        # No per-user notices while the whole server shuts down.
        notify = not self._closing
        for name in list(user._rooms):
            user._left_rooms.append(name)
            self._remove_member(user, self._rooms[name], reason, notify=notify)
        del self._names[user._name.casefold()]
        del self._users[user]
        if self.backplane is not None:
            self.backplane.release(user._name)
        log.info("%s has left the chat.", user._name)

    async def _after_detach(self, user: User) -> None:
        if user._name is None:
            return
        reason = user._reason or LeaveReason.DISCONNECT
        for room in user._left_rooms:
            await self._hooks.notify(
                "chatkit_user_left", server=self, user=user, room=room, reason=reason
            )
        await self._hooks.notify(
            "chatkit_user_disconnected", server=self, user=user, reason=reason
        )


def _once(rooms: Iterable[_Room], but: User | None = None) -> Iterator[User]:
    """The members of ``rooms``, each once, except ``but``."""
    seen = {but}
    for room in rooms:
        for member in room.members:
            if member not in seen:
                seen.add(member)
                yield member


def _plain_socket(sock: trio.socket.SocketType) -> socket.socket | None:
    """The standard-library socket a trio socket wraps, or None.

    trio keeps it in a private attribute (``_sock``, there since trio's
    first releases); if a trio release renames it, the room fast path is
    simply not taken (rooms fall back to the buffered path), nothing breaks.
    """
    inner = getattr(sock, "_sock", None)
    return inner if isinstance(inner, socket.socket) else None


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType:
    """The TCP socket under a plain or TLS stream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        raise TypeError(f"not a socket stream: {stream!r}")
    return stream.socket


def _enable_keepalive(stream: trio.abc.Stream) -> None:
    # The kernel probes an idle peer and resets the connection if it is gone,
    # so half-open connections (a vanished laptop) are reaped in ~90 s even
    # with no idle_timeout.
    try:
        sock = _socket_of(stream)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", 60),
            ("TCP_KEEPINTVL", 10),
            ("TCP_KEEPCNT", 3),
        ):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except (OSError, TypeError):
        log.debug("could not enable TCP keepalive", exc_info=True)


@asynccontextmanager
async def open_server(
    host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> AsyncIterator[ChatServer]:
    """Run a :class:`ChatServer` for the duration of an ``async with`` block.

    Takes :class:`ChatServer`'s arguments; the server is listening on entry
    (read ``server.port``) and shut down gracefully on exit. An exception
    raised in the block propagates unchanged (not wrapped in an
    ``ExceptionGroup`` by the server's nursery).
    """
    server = ChatServer(host, port, **kwargs)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        except BaseException as exc:
            # Re-raised below, outside the nursery, so it is not grouped.
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await server.aclose()
    if body_error is not None:
        raise body_error
