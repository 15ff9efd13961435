"""What the backplane may ask of a server: :class:`NodePort`, the
server's side of :class:`chatkit.backplane.ClusterPort`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..backplane import MODERATED, MODERATION, Envelope, Publication

if TYPE_CHECKING:
    from .._events import DirectMessage, Message
    from ._limits import Limits
    from ._messages import Messages
    from ._moderation import Moderation
    from ._moderator import Moderator
    from ._session import Directory

__all__ = ["NodePort"]

log = logging.getLogger("chatkit.server")


class NodePort:
    """One server as its backplane sees it (a
    :class:`chatkit.backplane.ClusterPort`): cluster events go to the
    messages' delivery or to moderation, and it answers who is here.

    Args:
        messages: the server's messages (ids, delivery).
        moderation: the roles and restrictions the cluster shares.
        moderator: carries out the other nodes' moderation actions.
        directory: who is logged in here.
        limits: the server's limits.
    """

    def __init__(
        self,
        messages: Messages,
        moderation: Moderation,
        moderator: Moderator,
        directory: Directory,
        limits: Limits,
    ) -> None:
        self._messages = messages
        self._moderation = moderation
        self._moderator = moderator
        self._directory = directory
        self._limits = limits

    @property
    def last_id(self) -> int:
        """The highest message id handed out or seen."""
        return self._messages.last_id

    def see_id(self, id: int) -> None:
        """Ids from now on are above ``id``."""
        self._messages.see_id(id)

    @property
    def close_timeout(self) -> float:
        """How long closing may take (the limits')."""
        return self._limits.close_timeout

    def memberships(self) -> list[tuple[str, tuple[str, ...]]]:
        """Each local user's name and rooms, in login order."""
        return [(session.name, session.rooms) for session in self._directory.users]

    def has_user(self, name: str) -> bool:
        """Whether a local user is called ``name``."""
        return self._directory.get(name) is not None

    def kick(self, name: str, reason: str) -> bool:
        """Put user ``name`` of this node off it (``error kicked``), its
        name another node's now; True if found."""
        return self._moderator.kick_here(name, reason)

    def deliver(
        self, id: int, env: Envelope, publication: Publication | None
    ) -> Message | DirectMessage | None:
        """See :meth:`chatkit.backplane.ClusterPort.deliver`."""
        if env.kind == MODERATION:  # every node's, this one's too
            if self._moderation.shared_change(env.version, env.text):
                spawn = self._moderator.spawn
                if spawn is not None:
                    spawn(self._reload)
            return None
        if env.kind == MODERATED:
            if publication is None:  # another node's: its part here
                self._moderator.announcer.told(env)
            return None
        return self._messages.deliver(id, env, publication)

    def deliver_here(self, publication: Publication) -> Message | DirectMessage | None:
        """See :meth:`chatkit.backplane.ClusterPort.deliver_here`."""
        return self._messages.deliver_here(publication)

    async def delivered(self, event: Message | DirectMessage) -> None:
        """See :meth:`chatkit.backplane.ClusterPort.delivered`."""
        await self._messages.delivered(event)

    async def rejoined(self) -> None:
        """See :meth:`chatkit.backplane.ClusterPort.rejoined`: the
        moderation state is loaded (or, if the cluster lost it, given
        back, in a task: the backplane does not send yet).

        Raises:
            OSError: the cluster is unreachable.
        """
        if await self._moderation.reload():
            spawn = self._moderator.spawn
            if spawn is not None:
                spawn(self._restore)

    async def _reload(self) -> None:
        """Load the moderation state again, changes having been missed."""
        try:
            await self._moderation.reload(newer_only=True)
        except OSError as exc:  # loaded when the node rejoins, then
            log.warning("could not load the moderation state: %s", exc)

    async def _restore(self) -> None:
        try:
            await self._moderation.restore()
        except OSError as exc:
            log.warning("could not give the cluster its moderation state: %s", exc)
