"""A token bucket: how often something may happen, with a burst."""

from __future__ import annotations

import trio

__all__ = ["Bucket"]


class Bucket:
    """``burst`` tokens at first, one more every ``interval`` seconds (up to
    ``burst``); each :meth:`take` spends one. ``interval`` None: never
    empty.

    Args:
        interval: seconds for each token regained, or None (no limit).
        burst: the most tokens held.
    """

    __slots__ = ("_at", "_burst", "_interval", "_tokens")

    def __init__(self, interval: float | None, burst: int) -> None:
        self._interval = interval
        self._burst = burst
        self._tokens = float(burst)
        self._at = trio.current_time()

    def take(self) -> bool:
        """Spend a token; False (and nothing spent) if there is none."""
        interval = self._interval
        if interval is None:
            return True
        now = trio.current_time()
        self._tokens = min(self._burst, self._tokens + (now - self._at) / interval)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
