"""The server's limits and timeouts: one validated, immutable object."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..protocol import DEFAULT_MAX_LINE_LENGTH

__all__ = ["Limits"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """What a :class:`~chatkit.ChatServer` allows each client, and how long
    it waits. Every field has a default; pass the ones to change::

        ChatServer(limits=chatkit.Limits(rate_limit=None, max_connections=100))

    Built once and validated then; :meth:`replace` makes a changed copy.
    docs/security.md explains the defaults.

    Raises:
        ValueError: a limit is out of range (named in the message).
    """

    max_connections: int = 10_000
    """Connections beyond this get ``error server_full`` and are closed."""
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH
    """Longest accepted line, in bytes (``error too_large``)."""
    max_hello_length: int = 8192
    """Longest line, in bytes, before the handshake completes (at most
    ``max_line_length``): a longer one gets ``error too_large`` and is
    discarded, as any line over ``max_line_length``. A hello with a long
    token fits; a connection that has not said hello holds at most about
    this much of a line."""
    max_message_length: int = 4096
    """Longest ``say``/``dm`` text, in characters (``error too_large``)."""
    max_rooms_per_user: int = 50
    """A ``join`` beyond this gets ``error too_many_rooms``."""
    max_history_page: int = 500
    """Most messages one ``history`` reply carries (a larger or missing
    ``limit`` is capped to it); a reply is also cut to half of
    ``max_queued_bytes`` (at least one message)."""
    max_queued_bytes: int = 1024 * 1024
    """Bound, in bytes, of each connection's outgoing buffer: a client that
    lets it fill is disconnected with ``error too_slow``."""
    max_queued_messages: int = 10_000
    """The same bound, in frames."""
    presence_limit: int | None = 1000
    """In a room with more members than this, joins and leaves are not
    announced to the other members (the joiner still gets its own
    ``joined``, the leaver its own ``left``): every join to a room of N
    costs N deliveries, and N joins N²/2. ``None`` always announces."""
    rate_limit: float | None = 20.0
    """Requests per second each connection may make on average (a token
    bucket); excess requests get ``error rate_limited``. ``None``: off."""
    rate_burst: int = 40
    """The bucket's size: how many requests may come at once."""
    flood_limit: int = 20
    """After this many rate-limited requests in a row the connection is
    closed (``left`` reason ``flood``)."""
    handshake_timeout: float = 10.0
    """Seconds a new connection has to be accepted (``hello`` or a
    line-mode name) before ``error timeout`` and close."""
    idle_timeout: float | None = None
    """If set, a connection that sends nothing for this long is closed with
    ``error timeout`` (:class:`~chatkit.ChatClient` pings to stay alive).
    Half-open TCP connections are also reaped by TCP keepalive, always on."""
    close_timeout: float = 2.0
    """Seconds a closing connection gets to flush what it was sent."""
    hook_timeout: float = 5.0
    """Seconds an awaited plugin hook implementation may take."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in _MAY_BE_NONE:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{field.name} must be a number, not {value!r}")
            if field.name in _FLOATS:
                if not value > 0:  # also refuses nan
                    raise ValueError(f"{field.name} must be positive, not {value}")
            elif not isinstance(value, int):
                raise ValueError(f"{field.name} must be an integer, not {value!r}")
            elif value < (least := 0 if field.name == "presence_limit" else 1):
                raise ValueError(f"{field.name} must be at least {least}, not {value}")

    def replace(self, **changes: Any) -> Limits:
        """A copy with ``changes`` (validated the same way)."""
        return dataclasses.replace(self, **changes)


_MAY_BE_NONE = frozenset({"presence_limit", "rate_limit", "idle_timeout"})
_FLOATS = frozenset(
    {"rate_limit", "handshake_timeout", "idle_timeout", "close_timeout", "hook_timeout"}
)
