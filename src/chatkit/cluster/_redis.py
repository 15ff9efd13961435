"""Redis as the cluster uses it: a client, the keys under a prefix, and
which errors mean Redis is out of reach."""

from __future__ import annotations

from typing import Final

import coredis
import coredis.exceptions

__all__ = ["OUTAGE", "Keys", "connect"]

# Errors that mean "Redis is unreachable": the node carries on alone.
OUTAGE: Final = (coredis.exceptions.RedisError, OSError, TimeoutError)


def connect(url: str) -> coredis.Redis[bytes]:
    """A client for the Redis at ``url`` (it connects when first used)."""
    return coredis.Redis.from_url(
        url, decode_responses=False, stream_timeout=5.0, connect_timeout=2.0
    )


class Keys:
    """The names of a cluster's keys and stream, all under ``prefix``.

    A ``*_prefix`` is the start of a family of keys, for the Lua scripts
    that name members of it themselves.
    """

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}{name}"

    @property
    def events(self) -> str:
        """The stream every room event goes through."""
        return self._key("events")

    @property
    def last_id(self) -> str:
        """The message id counter."""
        return self._key("last_id")

    @property
    def rooms(self) -> str:
        """The set of rooms that have (or had) members."""
        return self._key("rooms")

    @property
    def moderation(self) -> str:
        """The moderation state: ``VERSION DOCUMENT``."""
        return self._key("moderation")

    def history(self, room: str = "") -> str:
        """``room``'s history: a sorted set of messages, scored by id."""
        return self._key("history:", room)

    def members(self, room: str = "") -> str:
        """``room``'s members: a hash, name -> node."""
        return self._key("members:", room)

    def name(self, name: str = "") -> str:
        """The claim on ``name`` (casefolded): the node holding it."""
        return self._key("name:", name.casefold())

    def node(self, node_id: str = "") -> str:
        """A node's liveness key (it expires unless the node renews it)."""
        return self._key("node:", node_id)
