"""Several chatkit servers acting as one, through Redis (``chatkit[redis]``).

Give each :class:`~chatkit.ChatServer` a :class:`RedisBackplane` on the same
Redis (``python -m chatkit.server --redis redis://127.0.0.1:6379/0``) and
put them behind a load balancer: rooms, names, ``who``/``rooms``, message
ids and history are shared. See docs/deployment.md for the guarantees.

How it works::

    node A                         Redis                          node B
    say -> outbox --pipeline--> publish.lua: INCR id,     XREAD <- reader
           (one writer task)     XADD events stream,      deliver to local
                                 ZADD room history        members, A's too

* Every room event (message, dm, join, leave, rename) is appended by one
  Lua script to one capped Redis stream, ``{prefix}events``; every node
  reads that stream (``XREAD BLOCK``) and delivers each event to its own
  members. One stream means one order: every member on every node sees a
  room's messages in the same order. A node reads from the last entry it
  saw, so a dropped connection to Redis loses nothing that stayed in the
  stream. The script also takes the message id (``INCR``, never below the
  highest id the publishing node has seen) and keeps the room's history (a
  capped sorted set, scored by id).
* The sender's own copy of its message comes back through the stream like
  everyone else's: it is the acknowledgement, and it carries the cluster id.
* Names are claimed in Redis (``SET`` if absent or already this node's,
  with an expiry a heartbeat renews), so they are unique across the cluster
  and a crashed node's users are released within ``name_ttl``.
* Room membership for ``who``/``rooms`` is a hash per room (name -> node),
  filtered by the nodes still alive (each renews a ``{prefix}node:ID`` key).
* Hooks run on the node where the event originated, once per event.
* When Redis is unreachable, the node keeps serving its own users alone
  (messages reach local members only, with node-local ids that may repeat
  ids the rest of the cluster hands out meanwhile, and are not kept in the
  shared history), refuses new logins with ``error
  unavailable``, logs the outage, and reconnects with jittered exponential
  backoff; then it claims its users' names and memberships again and
  carries on reading the stream where it left off.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

try:
    import coredis
    import coredis.exceptions
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "chatkit.cluster needs the 'redis' extra: pip install 'chatkit[redis]'"
    ) from exc

from ._events import LOBBY, DirectMessage, Message
from ._exceptions import StartupError
from .backplane import (
    MESSAGE,
    Envelope,
    Publication,
    decode_envelope,
    encode_envelope,
)

if TYPE_CHECKING:
    from .backplane import ClusterPort

__all__ = ["BackplaneError", "RedisBackplane", "RedisHistory"]

log = logging.getLogger("chatkit.cluster")

# Errors that mean "Redis is unreachable": the node carries on alone.
_OUTAGE: Final = (coredis.exceptions.RedisError, OSError, TimeoutError)

_PUBLISH: Final = """
-- Publish a batch of events, in order, each with the next id.
-- KEYS: id counter, events stream
-- ARGV: floor, events cap, history cap, history key prefix, then pairs of
-- (room, body): a message's room (kept in its history), or '' (not kept).
local id = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if id < floor then
  id = floor
end
local cap = tonumber(ARGV[3])
for i = 5, #ARGV, 2 do
  id = id + 1
  local room, body = ARGV[i], ARGV[i + 1]
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'i', id, 'e', body)
  if room ~= '' then
    local key = ARGV[4] .. room
    redis.call('ZADD', key, id, id .. ' ' .. body)
    local extra = redis.call('ZCARD', key) - cap
    if extra > 0 then
      redis.call('ZREMRANGEBYRANK', key, 0, extra - 1)
    end
  end
end
redis.call('SET', KEYS[1], id)
return id
"""

_RENEW: Final = """
-- KEYS: none; ARGV: node, expiry (ms), name key prefix, casefolded names.
-- Renews this node's claims; returns the names another node holds.
local lost = {}
for i = 4, #ARGV do
  local key = ARGV[3] .. ARGV[i]
  local holder = redis.call('GET', key)
  if holder == false or holder == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

_CLAIM: Final = """
-- KEYS: the name's key; ARGV: node, expiry (ms). 1 if this node holds it.
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_WHO: Final = """
-- KEYS: the room's members hash; ARGV: node key prefix.
-- Members whose node is gone (its key expired) are dropped on the way.
local all = redis.call('HGETALL', KEYS[1])
local names = {}
for i = 1, #all, 2 do
  if redis.call('EXISTS', ARGV[1] .. all[i + 1]) == 1 then
    names[#names + 1] = all[i]
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return names
"""

_ROOMS: Final = """
-- KEYS: the rooms set; ARGV: members hash prefix, node key prefix, lobby.
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. room
  local all = redis.call('HGETALL', key)
  local count = 0
  for i = 1, #all, 2 do
    if redis.call('EXISTS', ARGV[2] .. all[i + 1]) == 1 then
      count = count + 1
    else
      redis.call('HDEL', key, all[i])
    end
  end
  if count > 0 or room == ARGV[3] then
    out[#out + 1] = room
    out[#out + 1] = count
  else
    redis.call('SREM', KEYS[1], room)
  end
end
return out
"""


_FORGET: Final = """
-- KEYS: the rooms set; ARGV: members hash prefix, node. Drop the node's
-- members from every room.
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. room
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if all[i + 1] == ARGV[2] then
      redis.call('HDEL', key, all[i])
    end
  end
end
return 0
"""

_FLOOR: Final = """
-- KEYS: the id counter; ARGV: an id already used. Raise the counter to it.
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 0
"""


class BackplaneError(StartupError):
    """The backplane cannot start (Redis unreachable at start-up, bad URL)."""


class RedisHistory:
    """Room history shared by every node of a cluster: a capped sorted set
    per room in Redis, scored by message id. Written by the publishing
    script, so :meth:`append` only keeps what a node says during a Redis
    outage out of it (those messages are not shared)."""

    def __init__(self, backplane: RedisBackplane) -> None:
        self._backplane = backplane

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
        bp = self._backplane
        key = bp._key("history:", room)
        try:
            # With rev, ZRANGE BYSCORE takes the high end first.
            raw = await bp._redis.zrange(
                key,
                start,
                stop,
                sortby=coredis.PureToken.BYSCORE,
                rev=newest or None,  # False would still send REV
                offset=0,
                count=limit,
            )
        except _OUTAGE as exc:
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
        self.history = RedisHistory(self)
        """The shared history, the server's store when it has a backplane."""
        self.available = False
        """True while Redis is reachable (and this node is part of the cluster)."""
        self.outages = 0
        """How many times Redis was lost since start."""
        self._redis: coredis.Redis[bytes] = coredis.Redis.from_url(
            url, decode_responses=False, stream_timeout=5.0, connect_timeout=2.0
        )
        self._publish = self._redis.register_script(_PUBLISH)
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        self._who = self._redis.register_script(_WHO)
        self._rooms = self._redis.register_script(_ROOMS)
        self._forget = self._redis.register_script(_FORGET)
        self._floor = self._redis.register_script(_FLOOR)
        self._renew = self._redis.register_script(_RENEW)
        self._scripts = (
            self._publish,
            self._claim,
            self._release,
            self._who,
            self._rooms,
            self._forget,
            self._floor,
            self._renew,
        )
        self._server: ClusterPort | None = None
        # The outbox: commands for the writer task, sent in order, pipelined.
        # Each is (build, on_result): build queues the command on a pipeline.
        self._outbox: list[_Entry] = []
        self._in_flight: list[_Entry] = []
        self._outbox_ready = trio.Event()
        self._flushed = trio.Event()  # set while nothing is left to send
        self._flushed.set()
        self._seq = 0
        # Publications not seen back from the stream yet, by seq.
        self._waiting: dict[int, Publication] = {}
        self._last_entry: str | bytes = b"0-0"  # the last events-stream entry read
        # This node's events whose delivery hooks have not run yet.
        self._hooks_due: deque[Message | DirectMessage] = deque()

    # --- keys -------------------------------------------------------------

    @property
    def _ttl_ms(self) -> int:
        """``name_ttl`` in milliseconds, as Redis takes expiries."""
        return int(self.name_ttl * 1000)

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}{name}"

    def _call(
        self,
        script: Any,
        client: Any,
        keys: list[str],
        args: list[str | bytes | int | float],
    ) -> Any:
        """Run a script loaded by :meth:`_join_cluster` on ``client`` (a
        pipeline, usually): a bare EVALSHA, where coredis's own script call
        would add a SCRIPT EXISTS round trip to every pipeline."""
        return client.evalsha(script.sha, keys=keys, args=args)

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
                except (*_OUTAGE, trio.TooSlowError) as exc:
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
                with trio.move_on_after(1) as scope, suppress(*_OUTAGE):
                    scope.shield = True
                    await self._redis.delete([self._key("node:", self.node_id)])
        finally:
            self.available = False
            self._server = None

    async def _join_cluster(self, *, first: bool = False) -> None:
        """(Re)register this node: its liveness key, its users' names and
        memberships, and an id counter past every id it has seen."""
        server = self._server
        assert server is not None
        redis = self._redis
        if first:
            # Read from the current end of the stream; ids continue from
            # the counter.
            last = await redis.xrevrange(self._key("events"), count=1)
            self._last_entry = last[0].identifier if last else b"0-0"
            counter = await redis.get(self._key("last_id"))
            server.see_id(int(counter or 0))
        # Scripts are loaded on every (re)connection: a Redis that restarted
        # has forgotten them.
        for script in self._scripts:
            await redis.script_load(script.script)
        users = server.memberships()
        rooms = {LOBBY}.union(*(user_rooms for _, user_rooms in users))
        listed = _memberships(users)
        async with redis.pipeline(transaction=False) as pipe:
            renewed = self._renewal(pipe, [name for name, _ in users])
            if not first:
                # Who left while Redis was away is still listed: start over.
                self._call(
                    self._forget,
                    pipe,
                    [self._key("rooms")],
                    [self._key("members:"), self.node_id],
                )
            for name, user_rooms in users:
                for room in user_rooms:
                    pipe.hset(self._key("members:", room), {name: self.node_id})
            pipe.sadd(self._key("rooms"), list(rooms))
            # A Redis that restarted empty must not hand out ids already used.
            self._call(self._floor, pipe, [self._key("last_id")], [server.last_id])
        self.available = True
        # member() and release() did nothing while this awaited: whoever
        # left, joined or went since ``users`` was taken is set right now.
        now = _memberships(server.memberships())
        for room, name in listed - now:
            self.member(room, name, present=False)
        for room, name in now - listed:
            self.member(room, name, present=True)
        present = {name.casefold() for name, _ in server.memberships()}
        for name, _ in users:
            if name.casefold() not in present:
                self.release(name)
        for name in self._lost_names(await renewed):
            log.warning("%s was claimed by another node during the outage", name)
            server.kick(name, f"the name {name} was taken during an outage")

    def _renewal(self, pipe: Any, names: list[str]) -> Any:
        """Queue on ``pipe`` the renewal of this node's liveness key and of
        its claims on ``names``; the result lists the names held elsewhere
        (see :meth:`_lost_names`)."""
        pipe.set(self._key("node:", self.node_id), b"1", px=self._ttl_ms)
        casefolded = [name.casefold() for name in names]
        args: list[str | bytes | int | float] = [
            self.node_id,
            self._ttl_ms,
            self._key("name:"),
            *casefolded,
        ]
        return self._call(self._renew, pipe, [], args)

    def _lost_names(self, held_elsewhere: list[bytes]) -> list[str]:
        """This node's users whose names another node holds."""
        server = self._server
        assert server is not None
        lost = {name.decode() for name in held_elsewhere}
        return [name for name, _ in server.memberships() if name.casefold() in lost]

    async def _run(self) -> None:
        """Serve the cluster; on losing Redis, carry on alone and reconnect."""
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._heartbeat)
            except* _OUTAGE as group:
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
            except (*_OUTAGE, trio.TooSlowError) as exc:
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
        # messages not seen back yet go to local members instead (if Redis
        # kept them, the other nodes still get them from the stream, and
        # this node skips them there: they are no longer in _waiting).
        pending = self._in_flight + self._outbox
        self._in_flight, self._outbox = [], []
        self._flushed.set()
        for _build, on_result in pending:
            on_result(_LOST)
        waiting, self._waiting = self._waiting, {}
        for publication in waiting.values():
            event = server.deliver_here(publication)
            publication.result = event
            publication.done.set()
            if event is not None:
                self._hooks_due.append(event)
        # After the hooks the reader had still to run.
        await self._run_hooks()

    async def _run_hooks(self) -> None:
        """Run the delivery hooks of the events in ``_hooks_due``, in order.
        Losing Redis cancels the reader: an event's hooks run shielded (the
        dispatcher bounds each by the server's ``hook_timeout``) so they are
        not cut short, and the events left are :meth:`_lost`'s to run."""
        server = self._server
        assert server is not None
        while self._hooks_due:
            await trio.lowlevel.checkpoint_if_cancelled()
            event = self._hooks_due.popleft()
            with trio.CancelScope(shield=True):
                await server.delivered(event)

    # --- the writer -------------------------------------------------------

    def _send(
        self, build: Callable[[Any], Any] | _Publish, on_result: Callable[[Any], None]
    ) -> None:
        self._outbox.append((build, on_result))
        if self._flushed.is_set():
            self._flushed = trio.Event()
        self._outbox_ready.set()

    async def _writer(self) -> None:
        """Send the outbox in order, everything pending in one pipeline;
        consecutive publications go in one script call."""
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
                run: list[str | bytes | int | float] = []
                for build, _ in batch:
                    if isinstance(build, _Publish):
                        run += (build.room, build.body)
                        requests.append(None)
                        continue
                    if run:
                        self._publish_run(pipe, run)
                        run = []
                    requests.append(build(pipe))
                if run:
                    self._publish_run(pipe, run)
            self._in_flight = []
            for request, (_build, on_result) in zip(requests, batch, strict=True):
                if request is not None:
                    on_result(await request)

    def _publish_run(self, pipe: Any, pairs: list[str | bytes | int | float]) -> None:
        server = self._server
        assert server is not None
        head: list[str | bytes | int | float] = [
            server.last_id,  # every id this node has seen stays behind
            self.events_maxlen,
            self.history_size,
            self._key("history:"),
        ]
        keys = [self._key("last_id"), self._key("events")]
        self._call(self._publish, pipe, keys, head + pairs)

    async def _flush(self) -> None:
        if self.available:
            await self._flushed.wait()

    async def _query(self, build: Callable[[Any], Any]) -> Any:
        """Run a command after everything this node sent before it.

        Raises:
            ConnectionError: Redis is unreachable.
        """
        if not self.available:
            raise ConnectionError(f"Redis at {self.url} is unreachable")
        done = trio.Event()
        box: list[Any] = []

        def on_result(result: Any) -> None:
            box.append(result)
            done.set()

        self._send(build, on_result)
        await done.wait()
        if box[0] is _LOST:
            raise ConnectionError(f"lost Redis at {self.url}")
        return box[0]

    # --- the reader -------------------------------------------------------

    async def _reader(self) -> None:
        """Read the events stream from where this node left off."""
        server = self._server
        assert server is not None
        key = self._key("events")
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
            after: list[tuple[Any, Publication | None]] = []
            for entry in entries:
                fields = entry.field_values
                try:
                    id = int(fields[b"i"])
                    env = decode_envelope(fields[b"e"])
                except (KeyError, ValueError, msgspec.DecodeError):
                    log.error("bad entry %r in %s", entry.identifier, key)
                    continue
                mine = env.node == self.node_id
                publication = None
                if mine:
                    publication = self._waiting.pop(env.seq, None)
                    if publication is None:
                        # Delivered locally when Redis was lost (_lost).
                        continue
                event = server.deliver(id, env, publication)
                if mine and event is not None:
                    after.append((event, publication))
            # Every publication is answered before any hook is awaited.
            for event, publication in after:
                if publication is not None:
                    publication.result = event
                    publication.done.set()
                self._hooks_due.append(event)
            await self._run_hooks()

    # --- the heartbeat ----------------------------------------------------

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

    # --- what the server calls --------------------------------------------

    async def claim(self, name: str) -> bool:
        """Claim ``name`` for this node; False if another node holds it."""
        key = self._key("name:", name.casefold())
        args: list[str | bytes | int | float] = [self.node_id, self._ttl_ms]
        result = await self._query(
            lambda pipe: self._call(self._claim, pipe, [key], args)
        )
        return bool(result)

    def release(self, name: str) -> None:
        """Give ``name`` up (when its user leaves or renames)."""
        key = self._key("name:", name.casefold())
        if self.available:
            self._send(
                lambda pipe: self._call(self._release, pipe, [key], [self.node_id]),
                _ignore,
            )

    async def holds(self, name: str) -> bool:
        """Whether some node of the cluster has a user called ``name``."""
        key = self._key("name:", name.casefold())
        return bool(await self._query(lambda pipe: pipe.exists([key])))

    def publish(
        self, env: Envelope, *, user: Any = None, ref: str | int | None = None
    ) -> Publication:
        """Publish a cluster event; this node sees it come back through the
        stream like every other node, and then answers ``user`` (the local
        sender, if any) with ``ref`` and sets the publication's ``done``."""
        server = self._server
        assert server is not None
        self._seq += 1
        env = msgspec.structs.replace(env, node=self.node_id, seq=self._seq)
        publication = self._waiting[self._seq] = Publication(env, user, ref)
        room = env.room if env.kind == MESSAGE else ""
        self._send(_Publish(room, encode_envelope(env)), _ignore)
        return publication

    def pending(self, user: Any) -> list[Publication]:
        """The publications of ``user`` (a local sender) that have not come
        back from the stream yet: the server waits for them before a leave,
        rename or disconnect, so that every node sees them first."""
        return [p for p in self._waiting.values() if p.user is user]

    def member(self, room: str, name: str, *, present: bool) -> None:
        """Record that ``name`` (of this node) joined or left ``room``."""
        if not self.available:
            return
        key = self._key("members:", room)
        rooms = self._key("rooms")
        if present:
            self._send(lambda pipe: pipe.hset(key, {name: self.node_id}), _ignore)
            self._send(lambda pipe: pipe.sadd(rooms, [room]), _ignore)
        else:
            self._send(lambda pipe: pipe.hdel(key, [name]), _ignore)

    async def who(self, room: str) -> tuple[str, ...]:
        """The names in ``room`` on every live node."""
        key = self._key("members:", room)
        prefix = self._key("node:")
        names = await self._query(
            lambda pipe: self._call(self._who, pipe, [key], [prefix])
        )
        return tuple(sorted(n.decode() for n in names))

    async def rooms(self) -> dict[str, int]:
        """Every room of the cluster and its number of members."""
        flat = await self._query(
            lambda pipe: self._call(
                self._rooms,
                pipe,
                [self._key("rooms")],
                [self._key("members:"), self._key("node:"), LOBBY],
            )
        )
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _ignore(result: Any) -> None:
    pass


def _memberships(
    users: Iterable[tuple[str, Iterable[str]]],
) -> set[tuple[str, str]]:
    """The (room, name) of every room each of ``users`` (names and rooms)
    is in."""
    return {(room, name) for name, rooms in users for room in rooms}


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
