"""What others' direct messages hold of one connection's outgoing buffer:
the :class:`DmLedger` (see :meth:`Outbox.admit_dm`)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._limits import Limits

__all__ = ["DmLedger"]


class _Entry:
    """One direct message admitted and not yet written."""

    __slots__ = ("batch", "end", "sender", "size")

    def __init__(self, sender: str, size: int, batch: int) -> None:
        self.sender = sender
        self.size = size
        self.batch = batch  # released in this fan-out batch, or before
        self.end: int | None = None  # its end in the buffer, once released


class DmLedger:
    """The direct messages admitted to one connection and not yet written,
    oldest first, and their sizes by sender.

    Positions are counts of bytes ever put in the connection's buffer
    (``queued``) and ever taken from it by the socket (``written``): a
    message whose batch was released ends at most where the buffer ended
    when that was noticed, and is written once ``written`` reaches that.
    """

    __slots__ = ("_by_sender", "_entries", "_total")

    def __init__(self) -> None:
        self._entries: deque[_Entry] = deque()
        self._total = 0
        self._by_sender: dict[str, int] = {}

    def admit(
        self,
        sender: str,
        size: int,
        batch: int,
        *,
        released: int,
        queued: int,
        written: int,
        limits: Limits,
    ) -> bool:
        """Whether a direct message from ``sender`` (``size`` bytes, in
        fan-out ``batch`` or before) fits: ``sender``'s waiting ones within
        ``max_dm_queued_bytes`` (unless it has none), everyone's within
        half of ``max_queued_bytes`` and of ``max_queued_messages`` (unless
        there are none). If so it is counted until written.
        ``released``: the newest batch released."""
        entries = self._entries
        for entry in entries:
            if entry.end is not None:
                continue
            if entry.batch > released:
                break
            entry.end = queued
        while entries and (end := entries[0].end) is not None and end <= written:
            self._forget(entries.popleft())
        mine = self._by_sender.get(sender, 0)
        if (mine and mine + size > limits.max_dm_queued_bytes) or (
            entries
            and (
                self._total + size > limits.max_queued_bytes // 2
                or len(entries) >= limits.max_queued_messages // 2
            )
        ):
            return False
        entries.append(_Entry(sender, size, batch))
        self._total += size
        self._by_sender[sender] = mine + size
        return True

    def _forget(self, entry: _Entry) -> None:
        self._total -= entry.size
        left = self._by_sender[entry.sender] - entry.size
        if left:
            self._by_sender[entry.sender] = left
        else:
            del self._by_sender[entry.sender]
