"""The server as one node of a cluster: :class:`Node`, the chat rules' one
way to the backplane (and nothing at all without one)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._exceptions import ErrorCode
from ..backplane import Envelope, Publication

if TYPE_CHECKING:
    from ..backplane import Backplane
    from ._session import Session

__all__ = ["Node"]


class Node:
    """What the chat rules ask of the cluster, if there is one.

    Args:
        backplane: the cluster's backplane, or None for a server alone.
    """

    def __init__(self, backplane: Backplane | None) -> None:
        self.backplane = backplane

    @property
    def cluster(self) -> Backplane | None:
        """The backplane while it reaches the cluster; None when alone."""
        bp = self.backplane
        return bp if bp is not None and bp.available else None

    def publish(
        self,
        kind: str,
        *,
        origin: Session | None = None,
        ref: Any = None,
        **fields: Any,
    ) -> Publication | None:
        """Publish an event to the cluster; None when there is none to
        publish to (no backplane, or it lost Redis): deliver it here."""
        cluster = self.cluster
        if cluster is None:
            return None
        return cluster.publish(
            Envelope(kind, ts=time.time(), **fields), user=origin, ref=ref
        )

    async def settle(self, session: Session) -> None:
        """In a cluster, wait until what ``session`` said has come back from
        the backplane (delivered here, the sender's copy with its ``ref``):
        a leave, rename or disconnect is applied here at once but reaches
        the other nodes through the stream, after those messages, so it
        must come after them here too. Losing the backplane ends the wait."""
        bp = self.backplane
        if bp is not None:
            for publication in bp.pending(session):
                await publication.done.wait()

    async def claim(self, session: Session, name: str, ref: Any) -> bool:
        """Claim ``name`` across the cluster, if there is one; tell
        ``session`` if it cannot be."""
        bp = self.backplane
        if bp is None:
            return True
        try:
            claimed = await bp.claim(name)
        except OSError:
            session.error(
                ErrorCode.UNAVAILABLE,
                "the cluster is unreachable; try again later",
                ref,
            )
            return False
        if not claimed:
            session.error(ErrorCode.NAME_TAKEN, f"{name} is taken", ref)
        return claimed

    def member(self, room: str, name: str, *, present: bool) -> None:
        """Record that local user ``name`` joined or left ``room``."""
        if self.backplane is not None:
            self.backplane.member(room, name, present=present)

    def release(self, name: str) -> None:
        """Give ``name`` up."""
        if self.backplane is not None:
            self.backplane.release(name)
