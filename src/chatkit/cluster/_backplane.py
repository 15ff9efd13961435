"""RedisBackplane: a server's node of the cluster, tying the parts together."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio

from .._events import LOBBY
from .._exceptions import StartupError
from ..backplane import (
    MESSAGE,
    MODERATION,
    ClusterPort,
    Envelope,
    Publication,
    encode_envelope,
)
from ._history import RedisHistory
from ._redis import OUTAGE, Keys, connect
from ._scripts import Arg, Scripts
from ._stream import EventStream
from ._writer import Dropped, Writer

__all__ = ["BackplaneError", "RedisBackplane"]

log = logging.getLogger("chatkit.cluster")


class BackplaneError(StartupError):
    """The backplane cannot start (Redis unreachable at start-up, bad URL)."""


class RedisBackplane:
    """Connects a :class:`~chatkit.ChatServer` to the other nodes of a
    cluster through Redis (pass it as ``ChatServer(backplane=...)``).

    Args:
        url: the Redis server, ``redis://host:port/db``.
        prefix: prefix of every key and stream, to share a Redis.
        name_ttl: seconds a crashed node's names stay claimed (renewed
            every third of it while the node lives).
        history_size: messages kept per room in the shared history.
        events_maxlen: entries kept in the events stream: how far behind a
            node may fall (or how long it may lose Redis) and still catch up.
        reconnect_delay: first wait, in seconds, before reconnecting after
            an outage; doubles (with jitter) up to ``max_reconnect_delay``.
        max_reconnect_delay: longest wait between reconnection attempts.
        node_id: this node's id in Redis (a random one by default).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "chatkit:",
        name_ttl: float = 15.0,
        history_size: int = 1000,
        events_maxlen: int = 100_000,
        reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 5.0,
        node_id: str | None = None,
    ) -> None:
        if name_ttl <= 0 or reconnect_delay <= 0 or max_reconnect_delay <= 0:
            raise ValueError("name_ttl and the reconnect delays must be positive")
        if history_size < 1 or events_maxlen < 1:
            raise ValueError("history_size and events_maxlen must be at least 1")
        self.url = url
        self.prefix = prefix
        self.name_ttl = name_ttl
        self.history_size = history_size
        self.events_maxlen = events_maxlen
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.node_id = node_id or uuid.uuid4().hex[:12]
        """This node's id in Redis."""
        self._redis = connect(url)
        self.history = RedisHistory(self._redis, prefix)
        """The shared history, the server's store when it has a backplane."""
        self.available = False
        """True while Redis is reachable (and this node is part of the cluster)."""
        self.outages = 0
        """How many times Redis was lost since start."""
        self._keys = Keys(prefix)
        self._scripts = Scripts(self._redis, self._keys)
        self._writer = Writer(self._redis, self._publish_run)
        self._stream = EventStream(self._redis, self._keys.events, self.node_id)
        self._server: ClusterPort | None = None

    @property
    def _ttl_ms(self) -> int:
        """``name_ttl`` in milliseconds, as Redis takes expiries."""
        return int(self.name_ttl * 1000)

    # --- lifetime ---------------------------------------------------------

    @asynccontextmanager
    async def attach(self, server: ClusterPort) -> AsyncIterator[None]:
        """Join the cluster for the duration of an ``async with`` block
        (:meth:`~chatkit.ChatServer.serve` does it, handing its
        :class:`~chatkit.backplane.ClusterPort`): check Redis, then read events
        and renew claims in tasks of its own nursery.

        Raises:
            BackplaneError: Redis is unreachable, or not a Redis.
        """
        if self._server is not None:
            raise RuntimeError("this RedisBackplane is already attached")
        self._server = server
        try:
            async with self._redis:
                try:
                    with trio.fail_after(5):
                        await self._redis.ping()
                        await self._join_cluster(first=True)
                except (*OUTAGE, trio.TooSlowError) as exc:
                    raise BackplaneError(
                        f"cannot reach Redis at {self.url}: {exc}"
                    ) from exc
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._run)
                    try:
                        yield
                    finally:
                        # Send what the node's last moments published.
                        with trio.move_on_after(server.close_timeout):
                            await self._flush()
                        nursery.cancel_scope.cancel()
                with trio.move_on_after(1) as scope, suppress(*OUTAGE):
                    scope.shield = True
                    await self._redis.delete([self._keys.node(self.node_id)])
        finally:
            self.available = False
            self._server = None

    async def _join_cluster(self, *, first: bool = False) -> None:
        """(Re)register this node: its liveness key, its users' names and
        memberships, and an id counter past every id it has seen."""
        server = self._server
        assert server is not None
        redis, keys = self._redis, self._keys
        if first:
            # Read from the current end of the stream; ids continue from
            # the counter.
            await self._stream.skip_to_end()
            counter = await redis.get(keys.last_id)
            server.see_id(int(counter or 0))
        await self._scripts.load()
        users = server.memberships()
        rooms = {LOBBY}.union(*(user_rooms for _, user_rooms in users))
        listed = _memberships(users)
        async with redis.pipeline(transaction=False) as pipe:
            renewed = self._renewal(pipe, [name for name, _ in users])
            if not first:
                # Who left while Redis was away is still listed: start over.
                self._scripts.forget(pipe, self.node_id)
            for name, user_rooms in users:
                for room in user_rooms:
                    pipe.hset(keys.members(room), {name: self.node_id})
            pipe.sadd(keys.rooms, list(rooms))
            # A Redis that restarted empty must not hand out ids already used.
            self._scripts.floor(pipe, server.last_id)
        self.available = True
        # member() and release() did nothing while this awaited: whoever
        # left, joined or went since ``users`` was taken is set right now.
        memberships = server.memberships()
        now = _memberships(memberships)
        for room, name in listed - now:
            self.member(room, name, present=False)
        for room, name in now - listed:
            self.member(room, name, present=True)
        present = {name.casefold() for name, _ in memberships}
        for name, _ in users:
            if name.casefold() not in present:
                self.release(name)
        for name in self._lost_names(await renewed):
            log.warning("%s was claimed by another node during the outage", name)
            server.kick(name, f"the name {name} was taken during an outage")
        # Read after the stream's position was taken: what changes it from
        # here on comes through the stream.
        await server.rejoined()

    def _renewal(self, pipe: Any, names: list[str]) -> Any:
        """Queue on ``pipe`` the renewal of this node's liveness key and of
        its claims on ``names``; the result lists the names held elsewhere
        (see :meth:`_lost_names`)."""
        pipe.set(self._keys.node(self.node_id), b"1", px=self._ttl_ms)
        return self._scripts.renew(pipe, names, self.node_id, self._ttl_ms)

    def _lost_names(self, held_elsewhere: list[bytes]) -> list[str]:
        """This node's users whose names another node holds."""
        server = self._server
        assert server is not None
        lost = {name.decode() for name in held_elsewhere}
        return [name for name, _ in server.memberships() if name.casefold() in lost]

    async def _run(self) -> None:
        """Serve the cluster; on losing Redis, carry on alone and reconnect."""
        server = self._server
        assert server is not None
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer.run)
                    nursery.start_soon(self._stream.read, server)
                    nursery.start_soon(self._heartbeat)
            except* OUTAGE as group:
                await self._lost(group.exceptions[0])
            await self._reconnect()

    async def _reconnect(self) -> None:
        """Try again, with jittered exponential backoff, until Redis answers."""
        delay = self.reconnect_delay
        while True:
            await trio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, self.max_reconnect_delay)
            try:
                with trio.fail_after(5):
                    await self._redis.ping()
                    await self._join_cluster()
            except (*OUTAGE, trio.TooSlowError) as exc:
                log.info("Redis still unreachable: %s", exc)
                continue
            log.warning("Redis is back; node %s rejoined the cluster", self.node_id)
            return

    async def _lost(self, exc: BaseException) -> None:
        self.available = False
        self.outages += 1
        log.warning(
            "lost Redis at %s (%s); serving local users alone until it is back",
            self.url,
            exc,
        )
        server = self._server
        assert server is not None
        # Whatever waited for Redis gets an answer now: queries fail, and
        # this node's publications are delivered to its members alone.
        self._writer.drop()
        await self._stream.deliver_here(server)

    async def _heartbeat(self) -> None:
        """Renew this node's key and its users' names every third of the ttl."""
        server = self._server
        assert server is not None
        while True:
            await trio.sleep(self.name_ttl / 3)
            names = [name for name, _ in server.memberships()]
            async with self._redis.pipeline(transaction=False) as pipe:
                renewed = self._renewal(pipe, names)
            held_elsewhere = await renewed
            for name in names:
                if not server.has_user(name):
                    self.release(name)  # renamed or gone while we renewed it
            for name in self._lost_names(held_elsewhere):
                log.warning("%s is claimed by another node; disconnecting", name)
                server.kick(name, f"the name {name} is in use elsewhere")

    # --- the writer -------------------------------------------------------

    def _publish_run(self, pipe: Any, pairs: Sequence[Arg]) -> Any:
        server = self._server
        assert server is not None
        return self._scripts.publish(
            pipe,
            pairs,
            floor=server.last_id,  # every id this node has seen stays behind
            events_maxlen=self.events_maxlen,
            history_size=self.history_size,
        )

    async def _flush(self) -> None:
        if self.available:
            await self._writer.flushed()

    async def _query(self, build: Callable[[Any], Any]) -> Any:
        """Run a command after everything this node sent before it.

        Raises:
            ConnectionError: Redis is unreachable.
        """
        if not self.available:
            raise ConnectionError(f"Redis at {self.url} is unreachable")
        try:
            return await self._writer.query(build)
        except Dropped:
            raise ConnectionError(f"lost Redis at {self.url}") from None

    # --- what the server calls --------------------------------------------

    async def claim(self, name: str) -> bool:
        """Claim ``name`` for this node; False if another node holds it."""
        scripts, node, ttl = self._scripts, self.node_id, self._ttl_ms
        result = await self._query(lambda pipe: scripts.claim(pipe, name, node, ttl))
        return bool(result)

    def release(self, name: str) -> None:
        """Give ``name`` up (when its user leaves or renames)."""
        if self.available:
            scripts, node = self._scripts, self.node_id
            self._writer.send(lambda pipe: scripts.release(pipe, name, node))

    async def holds(self, name: str) -> bool:
        """Whether some node of the cluster has a user called ``name``."""
        key = self._keys.name(name)
        return bool(await self._query(lambda pipe: pipe.exists([key])))

    def publish(
        self, env: Envelope, *, user: Any = None, ref: str | int | None = None
    ) -> Publication:
        """Publish a cluster event; this node sees it come back through the
        stream like every other node, and then answers ``user`` (the local
        sender, if any) with ``ref`` and sets the publication's ``done``."""
        assert self._server is not None
        publication = self._stream.expect(env, user, ref)
        room = env.room if env.kind == MESSAGE else ""
        self._writer.publish(room, encode_envelope(publication.env))
        return publication

    def pending(self, user: Any) -> list[Publication]:
        """The publications of ``user`` (a local sender) that have not come
        back from the stream yet: the server waits for them before a leave,
        rename or disconnect, so that every node sees them first."""
        return self._stream.pending(user)

    def member(self, room: str, name: str, *, present: bool) -> None:
        """Record that ``name`` (of this node) joined or left ``room``."""
        if not self.available:
            return
        key, rooms, node = self._keys.members(room), self._keys.rooms, self.node_id
        if present:
            self._writer.send(lambda pipe: pipe.hset(key, {name: node}))
            self._writer.send(lambda pipe: pipe.sadd(rooms, [room]))
        else:
            self._writer.send(lambda pipe: pipe.hdel(key, [name]))

    async def who(self, room: str) -> tuple[str, ...]:
        """The names in ``room`` on every live node."""
        scripts = self._scripts
        names = await self._query(lambda pipe: scripts.who(pipe, room))
        return tuple(sorted(n.decode() for n in names))

    async def rooms(self) -> dict[str, int]:
        """Every room of the cluster and its number of members."""
        scripts = self._scripts
        flat = await self._query(lambda pipe: scripts.rooms(pipe, LOBBY))
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def locate(self, name: str) -> tuple[str, tuple[str, ...]] | None:
        """User ``name`` as spelt by its node, and the rooms it is in;
        None if no live node has it."""
        scripts = self._scripts
        found = await self._query(lambda pipe: scripts.locate(pipe, name))
        if found is None:
            return None
        spelt = found[0].decode() or name
        return spelt, tuple(sorted(room.decode() for room in found[1:]))

    # --- the moderation state ---------------------------------------------

    async def load_moderation(self) -> tuple[int, bytes | None]:
        """The moderation state kept in Redis: its version and document
        (None: there is none yet).

        Raises:
            OSError: Redis is unreachable.
        """
        try:
            raw = await self._redis.get(self._keys.moderation)
        except OUTAGE as exc:
            raise ConnectionError(f"cannot reach Redis at {self.url}: {exc}") from exc
        if raw is None:
            return 0, None
        version, _, document = raw.partition(b" ")
        return int(version), document

    async def commit_moderation(
        self, version: int, document: bytes, change: bytes
    ) -> bool:
        """Make ``document`` the moderation state if it is at ``version``,
        publishing ``change`` to every node in the same step; False if
        another node changed the state first.

        Raises:
            OSError: Redis is unreachable.
        """
        # Its node is this one's, its seq none of this node's publications:
        # this node's reader passes it by (the state changed here already).
        event = encode_envelope(
            Envelope(
                MODERATION, node=self.node_id, version=version + 1, text=change.decode()
            )
        )
        scripts, maxlen = self._scripts, self.events_maxlen
        done = await self._query(
            lambda pipe: scripts.moderate(
                pipe, version, document, event, events_maxlen=maxlen
            )
        )
        return bool(done)


def _memberships(
    users: Iterable[tuple[str, Iterable[str]]],
) -> set[tuple[str, str]]:
    """The (room, name) of every room each of ``users`` (names and rooms)
    is in."""
    return {(room, name) for name, rooms in users for room in rooms}
