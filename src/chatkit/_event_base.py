"""The base of every protocol message: :class:`Event`, and the field types
and constants the messages share (one module below both message modules,
:mod:`._events` and :mod:`._moderation_events`)."""

from __future__ import annotations

from typing import Annotated, Final, TypeAlias

import msgspec

__all__ = ["LOBBY", "MAX_INT", "PROTOCOL_VERSION", "Count", "Event", "Ref"]

#: The room every user is in on login (part of the protocol: ``say`` and
#: ``who`` default to it).
LOBBY: Final = "lobby"

PROTOCOL_VERSION = 1

#: The largest message id, ``limit`` or ``ref`` a request may carry: ids are
#: 64-bit signed integers (SQLite's INTEGER), so anything above is refused by
#: the protocol layer (``bad_request``) before it reaches a store.
MAX_INT: Final = 2**63 - 1

#: A message id or a count in a request: 0 to :data:`MAX_INT`.
Count: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]

#: A client-chosen correlation value, echoed back by the server: a string or
#: a 64-bit signed integer.
Ref: TypeAlias = str | Annotated[int, msgspec.Meta(ge=-MAX_INT - 1, le=MAX_INT)] | None


# ``omit_defaults``: optional fields (``ref``, ``reason``, ...) are left out of
# the wire form when unset, so every field the protocol requires has no default.
class Event(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    tag_field="type",
):
    """Base class of every protocol message, in either direction."""
