"""The cluster event that travels through a backplane (internal).

Kept apart from :mod:`chatkit.cluster` so that the server can build one
without importing the Redis client.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import trio

__all__ = ["Envelope", "Publication", "decode_envelope", "encode_envelope"]

#: Envelope kinds.
MESSAGE: Final = "m"
DM: Final = "d"
JOINED: Final = "j"
LEFT: Final = "l"
RENAMED: Final = "n"


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    """One cluster event: ``kind`` is one of the constants above. ``node``
    and ``seq`` identify the publishing node and its publication, so that
    node can answer the sender (with its ``ref``) and run the hooks."""

    kind: str
    node: str = ""  # set by RedisBackplane.publish
    seq: int = 0
    ts: float = 0.0
    room: str = ""
    sender: str = ""
    to: str = ""
    text: str = ""
    reason: str = ""
    old: str = ""
    rooms: tuple[str, ...] = ()


encode_envelope = msgspec.json.Encoder().encode
decode_envelope = msgspec.json.Decoder(Envelope).decode


class Publication:
    """A published event its node waits to see come back from the backplane:
    ``user`` (the local sender, or None for ChatServer.post) gets its copy
    with ``ref``; ``done`` is set, with ``result`` the delivered event."""

    __slots__ = ("done", "env", "ref", "result", "user")

    def __init__(self, env: Envelope, user: Any, ref: str | int | None) -> None:
        self.env = env
        self.user = user
        self.ref = ref
        self.done = trio.Event()
        self.result: Any = None
