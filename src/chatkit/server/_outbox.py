"""One connection's outgoing bytes: the :class:`Outbox`.

Every byte the server sends a connection goes through its outbox: a bounded
buffer that is written straight to the socket, without blocking, whenever
the socket takes it, and by a writer task (started on demand, in the
server's connections nursery, in a cancel scope of its own that the
connection cancels when it ends) for what it does not. An idle connection
has no writer task, nor a nursery of its own: it costs memory, and most
connections are idle most of the time. The fan-out appends to it and
flushes it once per batch; the room fast path (see ``_fanout``) writes to
the sockets of idle outboxes directly and hands back what a socket refused.

Overflow policy: a client that lets its outbox pass ``max_queued_bytes`` or
``max_queued_messages`` is too slow; its owner is told (and closes it with
``error too_slow``), and nobody else ever waits for it. Others' direct
messages cannot make it so: each sender may have at most
``max_dm_queued_bytes`` of them waiting in it, all senders together half of
``max_queued_bytes`` (:meth:`Outbox.admit_dm`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..protocol import WireFormat
from ._dmledger import DmLedger

if TYPE_CHECKING:
    from ._limits import Limits
    from ._transport import Link

__all__ = ["Outbox", "Stats"]


class Stats:
    """Counters of a server's output, for monitoring and tests
    (:attr:`chatkit.ChatServer.stats`)."""

    __slots__ = ("batches", "room_sends", "sends", "store_flushes")

    def __init__(self) -> None:
        self.sends = 0
        """Writes to a socket or stream (direct sends, and the writer tasks'
        ``send_all`` rounds), the room fast path's included."""
        self.room_sends = 0
        """Fan-outs done by the room fast path: one C-level loop of sends
        over a room's sockets."""
        self.batches = 0
        """Batches of output released (each one write per connection)."""
        self.store_flushes = 0
        """History flushes awaited before a batch was released."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self.__slots__)
        return f"Stats({fields})"


class Owner(Protocol):
    """Who an outbox tells about trouble (its connection's session)."""

    def overflowed(self) -> None:
        """The client is too slow: the outbox would pass its bounds."""
        ...

    def broken(self) -> None:
        """Writing failed: the peer is gone."""
        ...


class Outbox:
    """A connection's bounded outgoing buffer and its writes.

    Args:
        link: the connection.
        owner: told when the buffer overflows or a write fails.
        limits: ``max_queued_bytes`` and ``max_queued_messages`` bound it.
        busy: the server's set of connections (owners) whose outbox is not
            idle (a writer task runs, or output ended); this one adds and
            removes its owner, so that a room's fan-out learns whether all
            its members are idle by looking at the few busy ones.
        stats: the server's counters.
        nursery: where writer tasks run (the server's connections nursery).
    """

    __slots__ = (
        "_buf",
        "_busy",
        "_dms",
        "_done",
        "_ended",
        "_frames",
        "_in",
        "_limits",
        "_link",
        "_nursery",
        "_out",
        "_owner",
        "_scope",
        "_stats",
        "_torn",
        "_writing",
        "wire",
    )

    def __init__(
        self,
        link: Link,
        owner: Owner,
        limits: Limits,
        busy: set[Any],
        stats: Stats,
        nursery: trio.Nursery,
    ) -> None:
        self._link = link
        self._owner = owner
        self._limits = limits
        self._busy = busy
        self._stats = stats
        self.wire: WireFormat = link.wire(link.mode)
        """How this connection's output is encoded (set once its mode is
        known)."""
        self._buf = bytearray()
        self._frames = 0  # frames in _buf
        # Once a write stopped partway through a frame: how many bytes at
        # the head of _buf are the rest of that frame on the wire, which
        # discarding the buffer (finish) keeps, or the frame would be torn.
        self._torn = 0
        self._nursery = nursery  # where the writer task is started, on demand
        # True while a writer task exists: it alone writes then.
        self._writing = False
        self._scope: trio.CancelScope | None = None  # the writer's
        # finish() was called, or a write failed: nothing more is taken, and
        # only a running writer writes.
        self._ended = False
        self._done: trio.Event | None = None  # set when the last byte is out
        # Bytes ever put in _buf, and ever taken from it by the socket (what
        # goes straight to the socket counts in neither): their difference
        # is what waits, and a position in it is passed once _out reaches it.
        self._in = 0
        self._out = 0
        # Others' direct messages not yet written (from the first one on:
        # an idle connection does not pay for it).
        self._dms: DmLedger | None = None
        link.attach(self.deliver)

    @property
    def sock(self) -> object | None:
        """The socket the room fast path may write to (see :class:`Link`)."""
        return self._link.sock

    @property
    def ended(self) -> bool:
        """True once the connection's last output was given (:meth:`finish`)."""
        return self._ended

    # --- taking output ----------------------------------------------------

    def append(self, data: bytes, frames: int = 1) -> None:
        """Add ``frames`` encoded frames, to be written at the next
        :meth:`flush`; past the bounds, tell the owner (too slow)."""
        if self._ended or not data:
            return
        limits = self._limits
        if (
            len(self._buf) + len(data) > limits.max_queued_bytes
            or self._frames + frames > limits.max_queued_messages
        ) and not self._make_room(len(data), frames):
            self._owner.overflowed()
            return
        self._buf += data
        self._frames += frames
        self._in += len(data)

    def deliver(self, data: bytes, frames: int = 1) -> None:
        """:meth:`append` and :meth:`flush`; with nothing pending, the bytes
        go straight to the socket without a copy into the buffer."""
        if self._buf or self._writing or self._ended or self._link.sock is None:
            self.append(data, frames)
            self.flush()
            return
        sent = self._link.try_send(data)
        self._stats.sends += 1
        if sent < len(data):
            self.keep_unsent(data, sent, frames)

    def keep_unsent(self, data: bytes, sent: int, frames: int) -> None:
        """After a direct write of ``data`` (``frames`` frames, nothing
        pending before it) of which the socket took ``sent`` bytes: keep the
        rest, for a writer started now."""
        if self._ended:
            return
        self._buf += memoryview(data)[sent:]
        self._frames += frames
        self._in += len(data) - sent
        self._torn = self._rest_of_frame(data, sent)
        self._start_writer()

    def flush(self) -> None:
        """Write what is pending without blocking, if no writer task runs;
        start one for what the socket does not take (and to report an
        error)."""
        buf = self._buf
        if not buf or self._writing or self._ended:
            return
        if self._link.sock is None:  # no direct writes (TLS): the writer's
            self._start_writer()
            return
        sent = self._link.try_send(buf)
        self._stats.sends += 1
        self._out += sent
        if sent == len(buf):
            buf.clear()
            self._frames = 0
            return
        if sent:
            self._torn = self._rest_of_frame(buf, sent)
            del buf[:sent]
        self._start_writer()

    def _rest_of_frame(self, data: bytes | bytearray, sent: int) -> int:
        """How much of ``data`` after its first ``sent`` bytes (written) is
        the rest of a frame begun on the wire (``data`` begins with a
        frame)."""
        if not sent:
            return 0
        return self.wire.frame_end(data, sent - 1) - sent

    def finish(self, farewell: bytes = b"", *, discard: bool = False) -> None:
        """The connection's last output: what is pending (unless
        ``discard``), then ``farewell``; nothing is taken after this."""
        if self._ended:
            return
        if discard:
            if self._torn:  # keep the rest of the frame on the wire
                del self._buf[self._torn :]
            else:
                self._buf = bytearray()
        self._buf += farewell
        self._ended = True
        self._busy.add(self._owner)
        if self._buf:
            self._start_writer()

    async def wait_written(self) -> None:
        """Wait until the writer task (if any) has written everything."""
        if self._writing:
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()

    # --- others' direct messages -----------------------------------------

    def admit_dm(self, sender: str, size: int, batch: int, released: int) -> bool:
        """Whether a direct message from ``sender`` (``size`` bytes, to be
        released in fan-out batch ``batch`` or before) may be queued here:
        ``sender``'s direct messages admitted before and not yet written
        (released or not) leave room for it within ``max_dm_queued_bytes``,
        and everyone's within half of ``max_queued_bytes`` (and of
        ``max_queued_messages``). If so, it is counted until written. A
        sender with nothing waiting here may send one within the bound of
        all, and with nothing waiting at all, anyone may. ``released``: the
        newest batch released."""
        if self._dms is None:
            self._dms = DmLedger()
        return self._dms.admit(
            sender,
            size,
            batch,
            released=released,
            queued=self._in,
            written=self._out,
            limits=self._limits,
        )

    # --- writing ----------------------------------------------------------

    def _make_room(self, size: int, frames: int) -> bool:
        """Whether ``size`` more bytes in ``frames`` fit once what is pending
        is written now: output held for a batch is the server's doing, not
        the client's, so the socket takes it first (what the kernel refuses
        counts towards the bounds)."""
        if not self._buf or self._writing:
            return False
        self.flush()
        limits = self._limits
        return (
            len(self._buf) + size <= limits.max_queued_bytes
            and self._frames + frames <= limits.max_queued_messages
        )

    def _start_writer(self) -> None:
        if self._writing:
            return
        self._writing = True
        self._busy.add(self._owner)
        self._scope = trio.CancelScope()
        try:
            self._nursery.start_soon(self._write_loop, self._scope)
        except RuntimeError:
            # The server's nursery has closed: the server is over.
            self._writing = False
            self._buf = bytearray()

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        # Sends everything pending, in one send_all per round (so writes
        # coalesce under load), and ends when none is left.
        link = self._link
        try:
            with scope:
                while self._buf:
                    data, self._buf, self._frames = self._buf, bytearray(), 0
                    self._torn = 0
                    self._stats.sends += 1
                    await link.send_all(data)
                    self._out += len(data)
            if scope.cancelled_caught:
                self._ended = True  # cut short: the link is unusable
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The peer went away: no write may follow a failed send_all.
            self._buf = bytearray()
            self._ended = True
            self._owner.broken()
        except BaseException:
            self._ended = True  # cancelled mid-write: the link is unusable
            raise
        finally:
            self._writing = False
            self._scope = None
            if not self._ended:
                self._busy.discard(self._owner)
            if self._done is not None:
                self._done.set()

    def release(self) -> None:
        """The connection is over: nothing more is written (a writer still
        at it is cancelled)."""
        self._ended = True
        self._busy.discard(self._owner)
        self._buf = bytearray()
        if self._scope is not None:
            self._scope.cancel()
