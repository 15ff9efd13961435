"""The server's limits and timeouts: one validated, immutable object."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
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
    """Connections at once. When the server is full, a new connection takes
    the slot of the oldest one that has not logged in yet (which gets
    ``error server_full`` and is closed); when every slot is a logged-in
    user's, the new connection gets ``error server_full`` and is closed."""
    max_unauthenticated: int = 1000
    """Connections at once that have not logged in (said an accepted
    ``hello``, or a line-mode name) yet; past this, a new connection takes
    the slot of the oldest of them, as when the server is full. A client
    logs in within a round trip or two, so even a whole server's clients
    reconnecting at once after a restart stay well within it."""
    max_connections_per_address: int | None = 16
    """Connections at once from one IPv4 address, or one IPv6 /64 network
    (a host usually has a whole /64); more get ``error server_full`` and
    are closed. ``None``: no limit. See ``exempt_networks``."""
    exempt_networks: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    """Networks (CIDR, e.g. ``"10.0.0.0/8"``; a bare address is its own
    network) whose addresses ``max_connections_per_address`` does not
    limit: a reverse proxy, a NAT you trust, the machine itself. Kept in
    canonical form (``"10.0.0.0/8"``); host bits set are an error."""
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
    rename_burst: int = 3
    """Renames (``nick``) a user may make at once; each costs its ``renamed``
    to every member of every room it shares with the renamer (rooms within
    ``presence_limit``), so a rename storm is paid by the renamers: past
    this, one more every ``rename_interval`` seconds, and the excess gets
    ``error rate_limited``. Renames also cost their request's token."""
    rename_interval: float | None = 10.0
    """Seconds for each rename regained (see ``rename_burst``); ``None``:
    renames are limited by ``rate_limit`` alone."""
    max_dm_queued_bytes: int = 64 * 1024
    """Bytes of one sender's direct messages that may wait unwritten in one
    recipient's outgoing buffer (all senders' together: half of
    ``max_queued_bytes``). A ``dm`` past this gets ``error rate_limited``
    and is not delivered (a sender with nothing waiting there may always
    send one): others cannot fill a user's buffer and get it disconnected
    as ``too_slow``."""
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
    tcp_user_timeout: float | None = 90.0
    """Seconds data sent to a connection may stay unacknowledged before the
    kernel gives up on the peer and the connection ends (``left`` reason
    ``disconnect``): TCP's ``TCP_USER_TIMEOUT``, on every accepted socket.
    Keepalive probes only an idle connection; this bounds a vanished peer
    that has output in flight, which would otherwise hold its name for the
    kernel's retransmission limit (about 15 minutes on Linux). The default
    matches keepalive (60 s idle, then 3 probes 10 s apart): either way a
    dead peer is gone within about 90 s. ``None`` leaves the kernel's
    default. Where the system has no such option, it is ignored."""
    ws_ping_interval: float | None = 30.0
    """Seconds between the pings the web port sends each WebSocket (which
    keep proxies from closing an idle one); a WebSocket that sent nothing,
    not even the pong, for two intervals is closed. ``None``: no pings."""
    close_timeout: float = 2.0
    """Seconds a closing connection gets to flush what it was sent."""
    hook_timeout: float = 5.0
    """Seconds an awaited plugin hook implementation may take."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _NETWORK_LISTS:
                # Frozen: normalized in place the one way dataclasses allow.
                object.__setattr__(self, field.name, _networks(field.name, value))
            elif value is not None or field.name not in _MAY_BE_NONE:
                _check_number(field.name, value)

    def replace(self, **changes: Any) -> Limits:
        """A copy with ``changes`` (validated the same way)."""
        return dataclasses.replace(self, **changes)


def _check_number(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is a valid value of field ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if name in _FLOATS:
        if not value > 0:  # also refuses nan
            raise ValueError(f"{name} must be positive, not {value}")
    elif not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    elif value < (least := 0 if name == "presence_limit" else 1):
        raise ValueError(f"{name} must be at least {least}, not {value}")


def _networks(name: str, value: object) -> tuple[str, ...]:
    """``value`` (CIDR strings or :mod:`ipaddress` networks) as a tuple of
    canonical CIDR strings; ValueError naming the field and the culprit."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(
            f"{name} must be a list of networks (CIDR strings), not {value!r}"
        )
    networks = []
    for item in value:
        if not isinstance(item, str | ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise ValueError(f"{name}: {item!r} is not a network (a CIDR string)")
        try:
            networks.append(str(ipaddress.ip_network(item)))
        except ValueError as exc:
            if "host bits set" in str(exc):
                wider = ipaddress.ip_network(item, strict=False)
                raise ValueError(
                    f"{name}: {item!r} has host bits set (the network is {wider})"
                ) from None
            raise ValueError(
                f"{name}: {item!r} is not a network (a CIDR string such as "
                "10.0.0.0/8 or 2001:db8::/32)"
            ) from None
    return tuple(networks)


_NETWORK_LISTS = frozenset({"exempt_networks"})
_MAY_BE_NONE = frozenset(
    {
        "presence_limit",
        "rate_limit",
        "rename_interval",
        "idle_timeout",
        "tcp_user_timeout",
        "ws_ping_interval",
        "max_connections_per_address",
    }
)
_FLOATS = frozenset(
    {
        "rate_limit",
        "rename_interval",
        "handshake_timeout",
        "idle_timeout",
        "tcp_user_timeout",
        "ws_ping_interval",
        "close_timeout",
        "hook_timeout",
    }
)
