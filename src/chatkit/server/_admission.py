"""Who may connect: the per-address connection limit, the bound on
connections that have not logged in yet, and ``max_connections``.

A connection is counted from the moment it is accepted until its session
is gone. Until it logs in (an accepted ``hello``, or a line-mode name) it
is *unauthenticated*, and those are counted apart from the logged-in ones:
when the server is full, or holds ``max_unauthenticated`` of them, a
newcomer takes the slot of the oldest one. Connections that never log in
can therefore never keep out a client that does; only logged-in users can
fill the server.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

from .._events import ErrorReply
from .._exceptions import ErrorCode
from ._session import LeaveReason

if TYPE_CHECKING:
    from ._limits import Limits
    from ._session import Session

__all__ = ["Admission", "address_key"]

log = logging.getLogger("chatkit.server")

#: IPv6 peers are counted per /64 (its first 8 bytes): one host usually
#: has a whole /64, and can pick any of its 2^64 addresses for each
#: connection.
IPV6_PREFIX_BYTES = 8
_IPV4_MAPPED = bytes(10) + b"\xff\xff"


def address_key(host: str) -> str:
    """What the per-address limit counts ``host`` (a peer's IP address, as
    the socket gives it) as: the address itself for IPv4 (an IPv4-mapped
    IPv6 address is its IPv4 address), its /64 network for IPv6. Anything
    else (no address known) is its own key. In C mostly: it runs for
    every connection."""
    if ":" not in host:  # IPv4: the socket gives it in canonical form
        return host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return host
    if packed[:12] == _IPV4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    prefix = packed[:IPV6_PREFIX_BYTES] + bytes(16 - IPV6_PREFIX_BYTES)
    return f"{socket.inet_ntop(socket.AF_INET6, prefix)}/{IPV6_PREFIX_BYTES * 8}"


def _host(address: str) -> str:
    """The host of a ``host:port`` address (IPv6 hosts contain colons)."""
    return address.rpartition(":")[0]


class Admission:
    """Decides whether a new connection is served, and keeps the counts
    that decision needs.

    The server asks :meth:`refusal` for every accepted connection, tells
    :meth:`opened` of the session it serves it with, and the chat rules
    tell :meth:`logged_in` and :meth:`gone`. A connection's slot is
    counted from :meth:`refusal` on: a burst of connections accepted in
    one go is counted before any of their sessions runs.
    """

    __slots__ = ("_evicted", "_exempt", "_limits", "_logged_in", "_pending", "_per_key")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._exempt = tuple(ipaddress.ip_network(n) for n in limits.exempt_networks)
        self._per_key: dict[str, int] = {}  # address key -> connections open
        # Unauthenticated sessions, oldest first (a dict keeps the order).
        self._pending: dict[Session, None] = {}
        # Sessions that made way for a newcomer and are closing: they hold
        # no slot, but still count for their address until gone.
        self._evicted: set[Session] = set()
        self._logged_in = 0  # logged-in sessions not gone

    def exempt(self, host: str) -> bool:
        """True if ``host`` is in a network of ``exempt_networks``."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._exempt)

    def refusal(self, host: str) -> str | None:
        """Why a new connection from ``host`` is refused, or None: then it
        is served, and makes room for itself if it must (the oldest
        unauthenticated connection is sent ``error server_full`` and
        closed). Call :meth:`opened` next with its session."""
        limits = self._limits
        per_address = limits.max_connections_per_address
        key = address_key(host)
        count = self._per_key.get(key, 0)
        if per_address is not None and count >= per_address and not self.exempt(host):
            return f"too many connections from {key}"
        pending = len(self._pending)
        if pending + self._logged_in >= limits.max_connections or (
            pending >= limits.max_unauthenticated
        ):
            if not pending:
                return "the server is full"
            self._evict_oldest()
        self._per_key[key] = count + 1
        return None

    def opened(self, session: Session) -> None:
        """``session`` serves the connection just admitted."""
        self._pending[session] = None

    def logged_in(self, session: Session) -> None:
        """``session`` logged in: it holds its slot until it is gone (one
        that made way for a newcomer meanwhile holds none)."""
        if session in self._pending:
            del self._pending[session]
            self._logged_in += 1

    def gone(self, session: Session) -> None:
        """``session`` is over: its slot and its address's count are free."""
        if session in self._pending:
            del self._pending[session]
        elif session in self._evicted:
            self._evicted.discard(session)
        else:
            self._logged_in -= 1
        key = address_key(_host(session.address))
        count = self._per_key.get(key, 0) - 1
        if count > 0:
            self._per_key[key] = count
        else:
            self._per_key.pop(key, None)

    def _evict_oldest(self) -> None:
        session = next(iter(self._pending))
        del self._pending[session]
        self._evicted.add(session)
        log.info("%s makes way for a new connection: no hello yet", session)
        farewell = ErrorReply(
            code=ErrorCode.SERVER_FULL,
            message="the server is full: a connection that has not said hello "
            "makes way for a new one",
        )
        session.close(LeaveReason.TIMEOUT, farewell)
