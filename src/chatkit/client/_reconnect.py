"""Getting a lost connection back: the policy, the backoff, the events.

:class:`Reconnect` is the policy; :func:`reconnect` follows it, attempt
after attempt. None of this is wire protocol: :class:`ClientEvent` and its
subclasses are made by :class:`chatkit.ChatClient` itself, to tell the
application that its connection was lost and resumed, and travel next to
the server's events in ``async for event in client`` and the client hooks.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

import trio

from .._events import ServerEvent
from .._exceptions import (
    BadName,
    BadRequest,
    Banned,
    ConnectionClosed,
    NameTaken,
    Rejected,
    RequestError,
    TooLarge,
    Unauthorized,
)
from ._connection import describe_error

__all__ = [
    "ClientEvent",
    "ClientItem",
    "Interrupted",
    "Reconnect",
    "Reconnected",
    "Reconnecting",
    "reconnect",
]

log = logging.getLogger("chatkit.client")

# Refusals a reconnect cannot get past by waiting: the client gives up.
_PERMANENT: Final = (Unauthorized, BadName, BadRequest, Banned, Rejected, TooLarge)


@dataclass(frozen=True, kw_only=True)
class Reconnect:
    """How a :class:`~chatkit.ChatClient` gets its connection back.

    Pass one as ``open_client(..., reconnect=Reconnect(...))`` (``reconnect=True``
    takes these defaults). After losing an established connection the
    client waits :meth:`delay` seconds before each attempt: the delay
    starts at ``initial_delay``, grows by ``multiplier`` each attempt up to
    ``max_delay``, and is jittered so that many clients dropped at once do
    not come back in lockstep.

    Args:
        initial_delay: seconds before the first attempt (before jitter).
        max_delay: the longest pause between two attempts.
        multiplier: how much the delay grows after each failed attempt.
        jitter: the random fraction of each delay: it is drawn uniformly
            from ``[d * (1 - jitter), d]``; ``0`` for none, ``1`` for
            "full jitter".
        max_attempts: give up after this many failed attempts in a row;
            ``None`` keeps trying.
        give_up_after: give up when the next attempt would start more than
            this many seconds after the connection was lost; ``None`` never.
        max_name_taken: give up after this many attempts in a row refused
            with ``name_taken``. The server may still hold the old
            connection (it has not noticed that it is dead): the client
            takes that session over with the ``resume`` secret of its last
            ``welcome``, but a server without that (or the old session on
            another node of a cluster) keeps the name until it lets go, so
            the client keeps its name and waits rather than pick another.
        after_shutdown: also reconnect when the server announced
            ``shutdown`` (a planned restart); ``False`` ends the client then.
        request_timeout: seconds a request made while the client is
            reconnecting waits for the connection before it raises
            :class:`~chatkit.ConnectionClosed`; ``None`` waits as long as
            the client keeps trying.
        ping_timeout: with keepalive pings on, a connection that answers
            nothing within this many seconds of a ping counts as lost (a
            network gone silent); ``None`` never gives up on it.
        max_held: while a room catches up after a reconnect, its live
            messages are held back (to be delivered after the missed ones);
            past this many, the newer ones are dropped and fetched again
            from history afterwards, so that a busy room cannot grow the
            client's memory without bound. ``0`` holds none.
        rng: the source of jitter, returning floats in ``[0, 1)``; pass
            ``random.Random(seed).random`` for repeatable delays.

    Raises:
        ValueError: a delay, factor or count out of range.
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None
    give_up_after: float | None = None
    max_name_taken: int = 10
    after_shutdown: bool = True
    request_timeout: float | None = 10.0
    ping_timeout: float | None = 10.0
    max_held: int = 1000
    rng: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        if not 0 < self.initial_delay <= self.max_delay:
            raise ValueError("need 0 < initial_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None)")
        if self.max_name_taken < 1:
            raise ValueError("max_name_taken must be at least 1")
        if self.max_held < 0:
            raise ValueError("max_held must be at least 0")
        for name in ("give_up_after", "request_timeout", "ping_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (or None)")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1 for the first).

        ``min(max_delay, initial_delay * multiplier ** (attempt - 1))``, less
        a random part of up to ``jitter`` of it.
        """
        if attempt < 1:
            raise ValueError("attempts are numbered from 1")
        # In logarithms, so that a long outage cannot overflow the power.
        steps = attempt - 1
        ceiling = math.log(self.max_delay / self.initial_delay)
        if self.multiplier > 1 and steps * math.log(self.multiplier) >= ceiling:
            base = self.max_delay
        else:
            base = self.initial_delay * self.multiplier**steps
        return base * (1 - self.jitter * self.rng())


@dataclass(frozen=True)
class ClientEvent:
    """Base class of the events a client makes itself (not wire protocol)."""


@dataclass(frozen=True)
class Interrupted(ClientEvent):
    """The connection ended and the client is going to reconnect.

    Requests in flight raised :class:`~chatkit.ConnectionClosed` (a ``say``
    may or may not have been delivered); new ones wait for the connection
    (see :attr:`Reconnect.request_timeout`).
    """

    reason: str
    """Why the connection ended (``server closed the connection``...)."""


@dataclass(frozen=True)
class Reconnecting(ClientEvent):
    """The client will try to connect again in :attr:`delay` seconds."""

    attempt: int
    """1 for the first attempt after the connection was lost."""
    delay: float
    """Seconds until the attempt."""
    error: str | None = None
    """Why the previous attempt failed (``None`` before the first)."""


@dataclass(frozen=True)
class Reconnected(ClientEvent):
    """The client is back: logged in with the same name, in the same rooms,
    and the messages said while it was away have been delivered (as
    ordinary :class:`~chatkit.Message` events, before this one)."""

    missed: int
    """How many messages were fetched from the rooms' history."""


#: What ``async for event in client`` yields.
ClientItem: TypeAlias = ServerEvent | ClientEvent


async def reconnect(
    policy: Reconnect,
    lost: str,
    connect: Callable[[], Awaitable[object]],
    announce: Callable[[ClientEvent], Awaitable[object]],
) -> str | None:
    """Get a lost connection back, as ``policy`` says.

    Announces :class:`Interrupted` (``lost`` says why), then, before each
    attempt, :class:`Reconnecting`; waits the policy's delay and calls
    ``connect``, until it returns or the policy gives up.

    Returns:
        ``None`` once ``connect`` returned; otherwise why it gave up.
    """
    log.info("connection lost (%s); reconnecting", lost)
    lost_at = trio.current_time()
    error: str | None = None
    failures = name_taken = 0
    await announce(Interrupted(reason=lost))
    while policy.max_attempts is None or failures < policy.max_attempts:
        delay = policy.delay(failures + 1)
        if (
            policy.give_up_after is not None
            and trio.current_time() + delay - lost_at > policy.give_up_after
        ):
            break
        await announce(Reconnecting(attempt=failures + 1, delay=delay, error=error))
        await trio.sleep(delay)
        try:
            await connect()
        except NameTaken as exc:
            # Perhaps our old connection, not yet reaped by the server.
            failures, name_taken, error = failures + 1, name_taken + 1, str(exc)
            if name_taken >= policy.max_name_taken:
                break
        except _PERMANENT as exc:
            failures, error = failures + 1, str(exc)
            break
        except ConnectionClosed as exc:  # e.g. a shutdown under way
            failures, name_taken, error = failures + 1, 0, exc.message
        except RequestError as exc:  # server_full, rate_limited...
            failures, name_taken, error = failures + 1, 0, str(exc)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            failures, name_taken, error = failures + 1, 0, describe_error(exc)
        else:
            return None
        log.info("reconnect attempt %d failed: %s", failures, error)
    gave_up = f"gave up reconnecting after {failures} attempts" + (
        f": {error}" if error else ""
    )
    log.warning("%s (connection lost: %s)", gave_up, lost)
    return gave_up
