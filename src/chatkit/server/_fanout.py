"""The fan-out: every event the server sends goes through one :class:`Fanout`.

Handlers say what to send (:meth:`Fanout.publish` to a room,
:meth:`Fanout.send` to one connection, :meth:`Fanout.send_each`,
:meth:`Fanout.close`); the fan-out collects it, in order, into the open
*batch*, and one task of its own (:meth:`Fanout.run`) releases the batches,
oldest first::

    handlers --publish/send--> open batch --(sealed)--> run():
        await store.flush()          if the batch carries messages
        release: encode once per wire format, append to each outbox,
                 then one write per outbox (or the room fast path)

* **Stored before seen.** A batch that carries a room message or a direct
  message is released only once the history store has flushed it, so that
  no one, its sender included, sees a message that a crash could lose. The
  messages of one read round share one flush (group commit). If the store
  cannot store them, they are shown to nobody and their senders get ``error
  unavailable``.
* **One write per connection per batch.** Consecutive broadcasts to one
  room are kept as *runs* (by sender) and reach each member in one append.
  A batch that is a single room's broadcasts, all of whose members are idle
  on plain sockets, is written by one C-level loop over the room's cached
  socket list (the room fast path) instead of through the buffers.
* **Handlers never see batches.** Nothing they await holds output back: the
  batches belong to the fan-out's task, not to a reader.
* **Bounded.** A batch is sealed once it holds a quarter of a connection's
  buffer bounds (it cannot overflow anyone's outbox by itself), and readers
  wait (:meth:`Fanout.wait_ready`) while sealed batches queue up behind a
  slow store.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import trio

from .._events import (
    DirectMessage,
    ErrorReply,
    Message,
    ServerEvent,
)
from .._exceptions import ErrorCode
from ..protocol import encode_json
from ._batch import (
    Broadcast,
    Close,
    Direct,
    Each,
    Item,
    RoomEvent,
    Run,
    encode_or_nothing,
    hand_over,
    others_copy,
    own_copy,
    with_ref,
)
from ._transport import send_each

if TYPE_CHECKING:
    from ..history import HistoryStore
    from ._limits import Limits
    from ._outbox import Outbox, Stats
    from ._rooms import Member, Room

__all__ = ["Fanout"]

log = logging.getLogger("chatkit.server")

# A batch is sealed past this share of a connection's buffer bounds.
_SEAL_SHARE: Final = 4
_T = TypeVar("_T")


class _Batch:
    __slots__ = ("frames", "items", "seq", "size", "stored")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.items: list[Item] = []
        self.stored = False  # carries messages: flush the store first
        self.frames = 0
        self.size = 0


class Fanout:
    """Collects a server's output in batches and releases them (see the
    module's docs).

    Args:
        store: flushed before a batch with messages is released.
        limits: the connections' buffer bounds.
        stats: the server's counters.
    """

    def __init__(self, store: HistoryStore, limits: Limits, stats: Stats) -> None:
        self._store = store
        self._limits = limits
        self._stats = stats
        self.busy: set[Any] = set()
        """The members whose outbox is not idle (see :class:`Outbox`)."""
        self._queue: deque[_Batch] = deque()
        self._open: _Batch | None = None  # output goes here; the queue's tail
        self._seq = 0  # the newest batch's
        self._released = 0  # the newest released batch's
        self._refused: set[int] = set()  # batches whose messages were refused
        self._wake = trio.Event()
        self._moved = trio.lowlevel.ParkingLot()  # a batch was released
        # Rooms with broadcasts not released yet: a change of membership
        # freezes those first.
        self._pending: dict[Room, list[Broadcast]] = {}

    # --- what handlers call -----------------------------------------------

    def publish(
        self,
        room: Room,
        event: RoomEvent,
        *,
        origin: Member | None = None,
        ref: Any = None,
    ) -> None:
        """Send ``event`` to every member of ``room``: encoded once per
        wire format; ``origin`` (a member: the sender) gets its copy with
        ``ref``, or none in a format without echo."""
        batch = self._batch()
        items = batch.items
        item = items[-1] if items else None
        if (
            not isinstance(item, Broadcast)
            or item.room is not room
            or item.version != room.version  # the members it had then
        ):
            item = Broadcast(room)
            items.append(item)
            self._pending.setdefault(room, []).append(item)
        runs = item.runs
        if not runs or runs[-1].origin is not origin:
            runs.append(Run(origin))
        run = runs[-1]
        data = encode_json(event)
        run.events.append(event)
        run.refs.append(ref)
        run.data += data
        run.own += (
            data
            if ref is None or origin is None
            else encode_json(msgspec.structs.replace(event, ref=ref))
        )
        item.frames += 1
        if isinstance(event, Message):
            batch.stored = True
        self._grew(batch, 1, len(data))

    def send(self, outbox: Outbox, event: ServerEvent, *, echo: bool = False) -> None:
        """Send ``event`` to one connection; ``echo``: it is the sender's own
        copy of its direct message (its acknowledgement)."""
        batch = self._batch()
        items = batch.items
        item = items[-1] if items else None
        if not isinstance(item, Direct) or item.outbox is not outbox:
            item = Direct(outbox)
            items.append(item)
        if echo:
            if item.echoes is None:
                item.echoes = []
            item.echoes.append(len(item.events))
        item.events.append(event)
        if isinstance(event, DirectMessage):
            batch.stored = True
        self._grew(batch, 1, 256)

    def send_each(self, members: Iterable[Member], event: ServerEvent) -> None:
        """Send ``event`` to each of ``members`` (encoded once per format)."""
        members = list(members)
        if members:
            batch = self._batch()
            batch.items.append(Each(members, event))
            self._grew(batch, 1, 256)

    def close(
        self,
        outbox: Outbox,
        farewell: ServerEvent | None = None,
        *,
        discard: bool = False,
    ) -> None:
        """End the connection's output, after what was sent to it before:
        ``farewell`` last (``discard``: instead of what is still pending)."""
        if discard:
            # Now, not in turn: it is what the client is too slow to read.
            outbox.finish(encode_or_nothing(outbox.wire, farewell), discard=True)
            return
        self._batch().items.append(Close(outbox, farewell))

    def owes(self, room: Room) -> bool:
        """Whether broadcasts to ``room`` wait to be released (a member who
        leaves now still gets them)."""
        return room in self._pending

    def mark(self) -> int:
        """A mark for everything sent so far (see :meth:`settled`)."""
        return self._seq

    async def settled(self, mark: int) -> bool:
        """Wait until everything sent before ``mark`` was released; False
        if messages among it were refused by the store."""
        while self._released < mark:
            await self._moved.park()
        return mark not in self._refused

    @property
    def released(self) -> int:
        """The mark of the newest batch released (see :meth:`mark`)."""
        return self._released

    @property
    def backlogged(self) -> bool:
        """Sealed batches queue up (see :meth:`wait_ready`)."""
        return len(self._queue) > 2

    async def wait_ready(self) -> None:
        """Wait while sealed batches queue up (a slow store): readers call
        it before reading more."""
        # One batch released (or storing), one open, one sealed waiting.
        while len(self._queue) > 2:
            await self._moved.park()

    # --- the task that releases -------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Release batches as they come, until cancelled."""
        task_status.started()
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            batch = self._queue[0]
            if batch is self._open:
                self._open = None  # sealed: new output opens a new batch
            if batch.stored:
                await self._store_first(batch)
            self._queue.popleft()
            self._release(batch)
            self._released = batch.seq
            self._moved.unpark_all()
            del batch  # not held while waiting for the next

    async def _store_first(self, batch: _Batch) -> None:
        self._stats.store_flushes += 1
        try:
            await self._store.flush()
        except Exception:
            log.exception(
                "the history store could not store messages; they are shown to "
                "nobody and their senders get error unavailable"
            )
            self._refuse(batch)

    # --- batches ----------------------------------------------------------

    def _batch(self) -> _Batch:
        batch = self._open
        if batch is None:
            self._seq += 1
            batch = self._open = _Batch(self._seq)
            self._queue.append(batch)
            self._wake.set()
        return batch

    def _grew(self, batch: _Batch, frames: int, size: int) -> None:
        batch.frames += frames
        batch.size += size
        limits = self._limits
        if (
            batch.size > limits.max_queued_bytes // _SEAL_SHARE
            or batch.frames > limits.max_queued_messages // _SEAL_SHARE
        ):
            self._open = None  # sealed: the next output opens a new batch

    def _release(self, batch: _Batch) -> None:
        """Hand ``batch`` to the outboxes: one append per connection per
        item, then one write per connection (or the room fast path)."""
        self._stats.batches += 1
        items = batch.items
        if not (
            len(items) == 1
            and isinstance(items[0], Broadcast)
            and self._write_room_now(items[0])
        ):
            hand_over(items)
        for item in items:
            if isinstance(item, Broadcast):
                self._done_with(item)  # after: it may have owed leavers

    def _done_with(self, item: Broadcast) -> None:
        room = item.room
        pending = self._pending[room]
        pending.remove(item)  # the first of them: batches go in order
        if not pending:
            del self._pending[room]
            room.forget_departed()

    def _write_room_now(self, item: Broadcast) -> bool:
        """Write ``item`` straight to every member's socket, if every member
        is idle on a plain socket (the usual case at light load); False,
        having done nothing, otherwise. Members who joined since are left
        out, members who left since get theirs through their outbox; each
        origin gets its own copy, with its refs, last.

        A member has output pending only if it is busy (a writer runs), so
        the check looks at the few busy ones, not at every member. The
        writes are one C-level loop (``map``), not a Python statement per
        member: at light load this is the whole cost of a message (see
        docs/performance.md). What a socket does not take goes to that
        member's outbox and writer.
        """
        room = item.room
        members = room.members
        busy = self.busy
        limits = self._limits
        if (
            not room.plain
            or item.frames > limits.max_queued_messages
            or (busy and any(map(members.__contains__, busy)))
        ):
            return False
        runs = item.runs
        groups = room.groups()
        payloads = {wire: others_copy(wire, runs) for wire, _, _ in groups}
        if any(len(payload) > limits.max_queued_bytes for payload in payloads.values()):
            return False
        changed = item.version != room.version
        gone = room.departed_since(item.version) if changed else ()
        origins = [
            origin
            for origin in dict.fromkeys(run.origin for run in runs)
            if origin is not None and (origin in members or origin in gone)
        ]
        # Not written here: the origins (their own copies come last) and
        # who joined since (it is not theirs).
        apart = [*origins, *room.joined_since(item.version)] if changed else origins
        stats = self._stats
        stats.room_sends += 1
        frames = item.frames
        for wire, sockets, index in groups:
            payload = payloads[wire]
            skip = sorted(
                (index[member] for member in apart if member in index), reverse=True
            )
            targets = _without(sockets, skip) if skip else sockets
            sent = send_each(targets, payload)
            stats.sends += len(sent)
            size = len(payload)
            if sent.count(size) != len(sent):
                others = _without(list(index), skip)  # in the order of sockets
                for member, count in zip(others, sent, strict=True):
                    if count != size:
                        member.outbox.keep_unsent(payload, count or 0, frames)
        for member in gone:
            if member not in origins:
                outbox = member.outbox
                payload = payloads.get(outbox.wire) or others_copy(outbox.wire, runs)
                outbox.deliver(payload, frames)
        # The senders' own copies (their acknowledgements) last: a send wakes
        # the reader at the other end, and the others' deliveries need not
        # wait for that.
        for origin in origins:
            data, count = own_copy(origin, runs)
            if count:
                origin.outbox.deliver(data, count)
        return True

    def _refuse(self, batch: _Batch) -> None:
        """The store did not take ``batch``'s messages: take them out, and
        tell each sender, in turn (``error unavailable``, with the ref)."""
        self._refused.add(batch.seq)
        error = ErrorReply(
            code=ErrorCode.UNAVAILABLE,
            message="your message could not be stored; it was not delivered",
        )
        items: list[Item] = []
        for item in batch.items:
            items.append(item)
            if isinstance(item, Broadcast):
                for run in item.runs:
                    refused = [
                        ref
                        for event, ref in zip(run.events, run.refs, strict=True)
                        if isinstance(event, Message)
                    ]
                    if not refused:
                        continue
                    if run.origin is not None:
                        # Right after the broadcast, where its ack would be.
                        refusal = Direct(run.origin.outbox)
                        refusal.events = [
                            msgspec.structs.replace(error, ref=ref) for ref in refused
                        ]
                        items.append(refusal)
                    kept = [
                        (event, ref)
                        for event, ref in zip(run.events, run.refs, strict=True)
                        if not isinstance(event, Message)
                    ]
                    run.events = [event for event, _ in kept]
                    run.refs = [ref for _, ref in kept]
                    run.data = bytearray(b"".join(map(encode_json, run.events)))
                    run.own = bytearray(b"".join(with_ref(e, r) for e, r in kept))
                    run.reframed = None
                item.frames = sum(len(run.events) for run in item.runs)
            elif isinstance(item, Direct):
                echoes = set(item.echoes or ())
                item.events = [
                    msgspec.structs.replace(error, ref=event.ref)
                    if isinstance(event, DirectMessage)
                    else event
                    for position, event in enumerate(item.events)
                    if position in echoes or not isinstance(event, DirectMessage)
                ]
        batch.items = items


def _without(items: list[_T], positions: Sequence[int]) -> list[_T]:
    """A copy of ``items`` without the items at ``positions`` (descending)."""
    kept = items.copy()
    for position in positions:
        del kept[position]
    return kept
