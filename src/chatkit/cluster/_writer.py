"""Writer: the one task that sends a node's commands to Redis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import coredis
import trio

from ._scripts import Arg

__all__ = ["Dropped", "Writer"]


class Dropped(Exception):
    """Redis was lost before the command was answered."""


def _ignore(result: Any) -> None:
    pass


class Writer:
    """Sends commands to ``redis`` in the order they are queued, everything
    pending in one pipeline, consecutive publications in one script call
    (queued on the pipeline by ``publish``, with a run of (room, body)
    pairs). :meth:`run` is the task; the rest never blocks it.
    """

    def __init__(
        self,
        redis: coredis.Redis[bytes],
        publish: Callable[[Any, Sequence[Arg]], Any],
    ) -> None:
        self._redis = redis
        self._publish = publish
        # The outbox: entries not sent yet, then the ones sent and not
        # answered yet.
        self._outbox: list[_Entry] = []
        self._in_flight: list[_Entry] = []
        self._outbox_ready = trio.Event()
        self._flushed = trio.Event()  # set while nothing is left to send
        self._flushed.set()

    def send(self, build: Callable[[Any], Any]) -> None:
        """Queue a command whose result nobody waits for: ``build`` queues
        it on a pipeline."""
        self._queue((build, _ignore))

    def publish(self, room: str, body: bytes) -> None:
        """Queue an event to publish (``room`` as the publishing script
        takes it)."""
        self._queue((_Publish(room, body), _ignore))

    def _queue(self, entry: _Entry) -> None:
        self._outbox.append(entry)
        if self._flushed.is_set():
            self._flushed = trio.Event()
        self._outbox_ready.set()

    async def query(self, build: Callable[[Any], Any]) -> Any:
        """Run a command (``build`` queues it on a pipeline and returns
        what the pipeline returns for it) after everything queued before
        it; its result.

        Raises:
            Dropped: Redis was lost first (:meth:`drop`).
        """
        done = trio.Event()
        box: list[Any] = []

        def on_result(result: Any) -> None:
            box.append(result)
            done.set()

        self._queue((build, on_result))
        await done.wait()
        if box[0] is _LOST:
            raise Dropped
        return box[0]

    async def flushed(self) -> None:
        """Wait until everything queued has been sent and answered."""
        await self._flushed.wait()

    def drop(self) -> None:
        """Redis was lost: forget every command not answered yet (a query
        raises :class:`Dropped`)."""
        pending = self._in_flight + self._outbox
        self._in_flight, self._outbox = [], []
        self._flushed.set()
        for _build, on_result in pending:
            on_result(_LOST)

    async def run(self) -> None:
        """Send the outbox, until cancelled or Redis fails."""
        while True:
            if not self._outbox:
                self._flushed.set()
                self._outbox_ready = trio.Event()
                await self._outbox_ready.wait()
                continue
            batch = self._in_flight = self._outbox
            self._outbox = []
            async with self._redis.pipeline(transaction=False) as pipe:
                requests: list[Any] = []
                run: list[Arg] = []
                for build, _ in batch:
                    if isinstance(build, _Publish):
                        run += (build.room, build.body)
                        requests.append(None)
                        continue
                    if run:
                        self._publish(pipe, run)
                        run = []
                    requests.append(build(pipe))
                if run:
                    self._publish(pipe, run)
            self._in_flight = []
            for request, (_build, on_result) in zip(requests, batch, strict=True):
                if request is not None:
                    on_result(await request)


class _Publish:
    """An outbox entry: one event to publish (batched by the writer)."""

    __slots__ = ("body", "room")

    def __init__(self, room: str, body: bytes) -> None:
        self.room = room
        self.body = body


#: An outbox entry: what to queue on the writer's pipeline (a command
#: builder, or an event to publish), and what to call with its result.
_Entry = tuple["Callable[[Any], Any] | _Publish", Callable[[Any], None]]

#: What an outbox entry's callback gets when Redis was lost before it ran.
_LOST: Final = object()
