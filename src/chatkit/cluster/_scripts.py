"""The cluster's Lua scripts: what must happen in Redis in one step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import coredis

from ._redis import Keys

__all__ = ["Arg", "Scripts"]

#: A script argument, as coredis takes them.
Arg = str | bytes | int | float

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

_LOCATE: Final = """
-- KEYS: the name's claim, the rooms set; ARGV: members hash prefix, node
-- key prefix, the name lowercased (names are ASCII). Nothing if no node
-- holds the name; else the name as its user spells it (as given if it is
-- in no room), then the rooms it is in.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local out = {''}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local all = redis.call('HGETALL', ARGV[1] .. room)
  for i = 1, #all, 2 do
    if string.lower(all[i]) == ARGV[3]
        and redis.call('EXISTS', ARGV[2] .. all[i + 1]) == 1 then
      out[1] = all[i]
      out[#out + 1] = room
      break
    end
  end
end
return out
"""

_MODERATE: Final = """
-- KEYS: the moderation state, the id counter, the events stream.
-- ARGV: the version expected, the new document, the change's event,
-- events cap. 1 if the state was at that version (and is now the new
-- document, one version on, the event published); 0 if not (nothing done).
local current = redis.call('GET', KEYS[1])
local version = 0
if current then
  version = tonumber(string.match(current, '^(%d+) '))
end
if version ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], (version + 1) .. ' ' .. ARGV[2])
local id = redis.call('GET', KEYS[2]) or '0'
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'i', id, 'e', ARGV[3])
return 1
"""


class Scripts:
    """The scripts, on the keys of ``keys``, registered on ``redis``.

    :meth:`load` them on every (re)connection: a Redis that restarted has
    forgotten them. Each other method queues one call on ``client`` (a
    pipeline, usually) and returns what the client returns for it: a bare
    EVALSHA, where coredis's own script call would add a SCRIPT EXISTS
    round trip to every pipeline.
    """

    def __init__(self, redis: coredis.Redis[bytes], keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._publish = redis.register_script(_PUBLISH)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._who = redis.register_script(_WHO)
        self._rooms = redis.register_script(_ROOMS)
        self._forget = redis.register_script(_FORGET)
        self._floor = redis.register_script(_FLOOR)
        self._renew = redis.register_script(_RENEW)
        self._locate = redis.register_script(_LOCATE)
        self._moderate = redis.register_script(_MODERATE)
        self._all = (
            self._publish,
            self._claim,
            self._release,
            self._who,
            self._rooms,
            self._forget,
            self._floor,
            self._renew,
            self._locate,
            self._moderate,
        )

    async def load(self) -> None:
        for script in self._all:
            await self._redis.script_load(script.script)

    def _call(
        self, script: Any, client: Any, keys: list[str], args: Sequence[Arg]
    ) -> Any:
        return client.evalsha(script.sha, keys=keys, args=list(args))

    def publish(
        self,
        client: Any,
        pairs: Sequence[Arg],
        *,
        floor: int,
        events_maxlen: int,
        history_size: int,
    ) -> Any:
        """Publish events, ``pairs`` of (room, body): a message's room, or
        ``""`` for an event no history keeps. Ids continue from the counter,
        or from ``floor`` if that is higher; returns the last id."""
        keys = self._keys
        head: list[Arg] = [floor, events_maxlen, history_size, keys.history()]
        return self._call(
            self._publish, client, [keys.last_id, keys.events], [*head, *pairs]
        )

    def claim(self, client: Any, name: str, node: str, ttl_ms: int) -> Any:
        """Claim ``name`` for ``node`` for ``ttl_ms``: 1 if it holds it now,
        0 if another node does."""
        return self._call(self._claim, client, [self._keys.name(name)], [node, ttl_ms])

    def release(self, client: Any, name: str, node: str) -> Any:
        """Give ``name`` up, if ``node`` holds it."""
        return self._call(self._release, client, [self._keys.name(name)], [node])

    def renew(self, client: Any, names: Sequence[str], node: str, ttl_ms: int) -> Any:
        """Renew ``node``'s claims on ``names`` for ``ttl_ms``; returns the
        names (casefolded) another node holds."""
        args: list[Arg] = [node, ttl_ms, self._keys.name()]
        args += [name.casefold() for name in names]
        return self._call(self._renew, client, [], args)

    def who(self, client: Any, room: str) -> Any:
        """The names in ``room`` whose node is alive."""
        keys = self._keys
        return self._call(self._who, client, [keys.members(room)], [keys.node()])

    def rooms(self, client: Any, lobby: str) -> Any:
        """Every room with a member on a live node, and ``lobby``: a flat
        list of room, number of members."""
        keys = self._keys
        args = [keys.members(), keys.node(), lobby]
        return self._call(self._rooms, client, [keys.rooms], args)

    def forget(self, client: Any, node: str) -> Any:
        """Drop ``node``'s members from every room."""
        keys = self._keys
        return self._call(self._forget, client, [keys.rooms], [keys.members(), node])

    def floor(self, client: Any, id: int) -> Any:
        """Raise the id counter to ``id``, an id already used."""
        return self._call(self._floor, client, [self._keys.last_id], [id])

    def locate(self, client: Any, name: str) -> Any:
        """Where user ``name`` is: None if no node holds it; else its name
        as spelt (``""`` if it is in no room), then its rooms."""
        keys = self._keys
        args = [keys.members(), keys.node(), name.lower()]
        return self._call(self._locate, client, [keys.name(name), keys.rooms], args)

    def moderate(
        self,
        client: Any,
        version: int,
        document: bytes,
        event: bytes,
        *,
        events_maxlen: int,
    ) -> Any:
        """Replace the moderation state at ``version`` by ``document`` and
        publish ``event``: 1; 0 if the state is at another version."""
        keys = self._keys
        return self._call(
            self._moderate,
            client,
            [keys.moderation, keys.last_id, keys.events],
            [version, document, event, events_maxlen],
        )
