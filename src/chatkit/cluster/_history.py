"""RedisHistory: the room history a cluster shares."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import coredis

from .._events import Message
from ..backplane import decode_envelope
from ._redis import OUTAGE, Keys

__all__ = ["RedisHistory"]

log = logging.getLogger("chatkit.cluster")


class RedisHistory:
    """Room history shared by every node of a cluster: a capped sorted set
    per room in Redis, scored by message id. Written by the publishing
    script, so :meth:`append` only keeps what a node says during a Redis
    outage out of it (those messages are not shared).

    A :class:`RedisBackplane` makes one, its ``history``.

    Args:
        redis: the cluster's Redis.
        prefix: the cluster's key prefix (``RedisBackplane(prefix=...)``).
    """

    def __init__(self, redis: coredis.Redis[bytes], prefix: str) -> None:
        self._redis = redis
        self._keys = Keys(prefix)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[int]:
        """The backplane opens Redis: yields 0 (the counter lives in Redis)."""
        yield 0

    def append(self, message: Message) -> None:
        """Nothing to do: the publishing script stored the message."""

    def note_id(self, id: int) -> None:
        """Nothing to do: ids come from Redis's counter."""

    async def flush(self) -> None:
        """Nothing to do: a message is in Redis before it comes back from
        the stream, which is when it is delivered."""

    async def recent(self, room: str, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room``, oldest first."""
        return await self._range(room, "+inf", "-inf", limit, newest=True)

    async def before(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The newest ``limit`` messages of ``room`` with an id below ``id``."""
        return await self._range(room, f"({id}", "-inf", limit, newest=True)

    async def after(self, room: str, id: int, limit: int) -> Sequence[Message]:
        """The oldest ``limit`` messages of ``room`` with an id above ``id``."""
        return await self._range(room, f"({id}", "+inf", limit, newest=False)

    async def _range(
        self, room: str, start: Any, stop: Any, limit: int, *, newest: bool
    ) -> Sequence[Message]:
        # start/stop are scores or ranges like "(12" (exclusive), which
        # Redis takes although coredis's annotations say numbers.
        try:
            # With rev, ZRANGE BYSCORE takes the high end first.
            raw = await self._redis.zrange(
                self._keys.history(room),
                start,
                stop,
                sortby=coredis.PureToken.BYSCORE,
                rev=newest or None,  # False would still send REV
                offset=0,
                count=limit,
            )
        except OUTAGE as exc:
            log.warning("history of %s unavailable: %s", room, exc)
            return ()
        messages = [
            _history_message(member) for member in raw if isinstance(member, bytes)
        ]
        if newest:
            messages.reverse()
        return messages


def _history_message(member: bytes) -> Message:
    id_text, _, body = member.partition(b" ")
    env = decode_envelope(body)
    return Message(
        id=int(id_text), ts=env.ts, room=env.room, sender=env.sender, text=env.text
    )
