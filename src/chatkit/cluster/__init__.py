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
* Moderation's state (bans, mutes, roles, topics, modes) is one document
  with a version, ``{prefix}moderation``: a node commits a change only on
  top of the version it made it on, and the same script publishes the
  change on the stream, which every node applies in order; what an
  operator did is published too, and each node carries it out on its own
  users (docs/moderation.md, "In a cluster").
* When Redis is unreachable, the node keeps serving its own users alone
  (messages reach local members only, with node-local ids that may repeat
  ids the rest of the cluster hands out meanwhile, and are not kept in the
  shared history), refuses new logins with ``error
  unavailable``, logs the outage, and reconnects with jittered exponential
  backoff; then it claims its users' names and memberships again and
  carries on reading the stream where it left off.

The parts, each in a module of its own and importing only the ones listed
after it:

* ``_backplane``: :class:`RedisBackplane`, a server's node of the cluster
  (joining, the heartbeat, outages, what the server asks);
* ``_stream``: ``EventStream``, the events stream as one node reads it and
  its own publications waiting to come back;
* ``_writer``: ``Writer``, the one task sending the node's commands,
  pipelined;
* ``_history``: :class:`RedisHistory`;
* ``_scripts``: the Lua scripts;
* ``_redis``: the client, the key names, what counts as an outage.

It sees the server only as a :class:`chatkit.backplane.ClusterPort`.
"""

try:
    import coredis  # noqa: F401  (the extra is missing without it)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "chatkit.cluster needs the 'redis' extra: pip install 'chatkit[redis]'"
    ) from exc

from ._backplane import BackplaneError as BackplaneError
from ._backplane import RedisBackplane as RedisBackplane
from ._history import RedisHistory as RedisHistory

__all__ = ["BackplaneError", "RedisBackplane", "RedisHistory"]
