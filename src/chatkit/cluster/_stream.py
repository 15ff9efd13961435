"""EventStream: one node's side of the cluster's events stream."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import coredis
import msgspec
import trio

from .._events import DirectMessage, Message
from ..backplane import ClusterPort, Envelope, Publication, decode_envelope

__all__ = ["EventStream"]

log = logging.getLogger("chatkit.cluster")


class EventStream:
    """What node ``node_id`` reads from the events stream ``key`` and
    waits to see come back through it.

    The node's own publications (:meth:`expect`) are answered when they
    come back (:meth:`read`), or delivered on this node alone if Redis is
    lost first (:meth:`deliver_here`); either way, their delivery hooks
    then run once each, in order.
    """

    def __init__(self, redis: coredis.Redis[bytes], key: str, node_id: str) -> None:
        self._redis = redis
        self._key = key
        self._node_id = node_id
        self._seq = 0
        # Publications not seen back from the stream yet, by seq.
        self._waiting: dict[int, Publication] = {}
        self._last_entry: str | bytes = b"0-0"  # the last entry read
        # This node's events whose delivery hooks have not run yet.
        self._hooks_due: deque[Message | DirectMessage] = deque()

    async def skip_to_end(self) -> None:
        """Read from now on only what is added to the stream after now."""
        last = await self._redis.xrevrange(self._key, count=1)
        self._last_entry = last[0].identifier if last else b"0-0"

    def expect(self, env: Envelope, user: Any, ref: str | int | None) -> Publication:
        """A publication of ``env`` (its ``node`` and ``seq`` set) that
        this node will see come back: the one to publish."""
        self._seq += 1
        env = msgspec.structs.replace(env, node=self._node_id, seq=self._seq)
        publication = self._waiting[self._seq] = Publication(env, user, ref)
        return publication

    def pending(self, user: Any) -> list[Publication]:
        """The publications of ``user`` not seen back yet."""
        return [p for p in self._waiting.values() if p.user is user]

    async def read(self, server: ClusterPort) -> None:
        """Deliver to ``server`` what the stream says, from where this node
        left off; runs until cancelled or Redis fails."""
        key = self._key
        while True:
            reply = await self._redis.xread(
                {key: self._last_entry}, count=1000, block=1000
            )
            if not reply:
                continue
            entries = reply.get(key.encode(), ())
            if not entries:
                continue
            self._last_entry = entries[-1].identifier
            after: list[tuple[Message | DirectMessage, Publication]] = []
            for entry in entries:
                fields = entry.field_values
                try:
                    id = int(fields[b"i"])
                    env = decode_envelope(fields[b"e"])
                except (KeyError, ValueError, msgspec.DecodeError):
                    log.error("bad entry %r in %s", entry.identifier, key)
                    continue
                publication = None
                # One of this node's publications (not what the cluster
                # published for it, with no seq: a change of its state).
                if env.node == self._node_id and env.seq:
                    publication = self._waiting.pop(env.seq, None)
                    if publication is None:
                        # Delivered locally when Redis was lost (deliver_here).
                        continue
                # Only this node's publications come back as an event.
                event = server.deliver(id, env, publication)
                if event is not None:
                    assert publication is not None
                    after.append((event, publication))
            # Every publication is answered before any hook is awaited.
            for event, publication in after:
                self._answer(publication, event)
            await self._run_hooks(server)

    async def deliver_here(self, server: ClusterPort) -> None:
        """Redis is lost: whatever waited for it gets an answer now.
        Publications not seen back yet go to ``server``'s members instead
        (if Redis kept them, the other nodes still get them from the
        stream, and this node skips them there: they are no longer
        waited for); then the hooks :meth:`read` had still to run."""
        waiting, self._waiting = self._waiting, {}
        for publication in waiting.values():
            self._answer(publication, server.deliver_here(publication))
        await self._run_hooks(server)

    def _answer(
        self, publication: Publication, event: Message | DirectMessage | None
    ) -> None:
        """``publication`` was delivered as ``event`` (None: it was not):
        its publisher learns it now, the delivery hooks run later."""
        publication.result = event
        publication.done.set()
        if event is not None:
            self._hooks_due.append(event)

    async def _run_hooks(self, server: ClusterPort) -> None:
        """Run the delivery hooks of the events in ``_hooks_due``, in order.
        Losing Redis cancels the reader: an event's hooks run shielded (the
        dispatcher bounds each by the server's ``hook_timeout``) so they are
        not cut short, and the events left are :meth:`deliver_here`'s to
        run."""
        while self._hooks_due:
            await trio.lowlevel.checkpoint_if_cancelled()
            event = self._hooks_due.popleft()
            with trio.CancelScope(shield=True):
                await server.delivered(event)
