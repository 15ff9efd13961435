"""How a :class:`~chatkit.ChatServer` joins a cluster: the seam between the
server and a backplane (:class:`chatkit.cluster.RedisBackplane` is one).

The server talks to its backplane through :class:`Backplane` alone, and
hands it a :class:`ClusterPort`: the few things a backplane may ask of the
server (deliver what the cluster says, name its users, kick one). Neither
side reaches into the other. A cluster event travels as an
:class:`Envelope`; one a node published and waits to see come back is a
:class:`Publication`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Final, Protocol

import msgspec
import trio

if TYPE_CHECKING:
    from ._events import DirectMessage, Message
    from .history import HistoryStore

__all__ = [
    "DM",
    "JOINED",
    "LEFT",
    "MESSAGE",
    "MODERATED",
    "MODERATION",
    "RENAMED",
    "Backplane",
    "ClusterPort",
    "Envelope",
    "Publication",
    "decode_envelope",
    "encode_envelope",
]

#: Envelope kinds.
MESSAGE: Final = "m"
DM: Final = "d"
JOINED: Final = "j"
LEFT: Final = "l"
RENAMED: Final = "n"
#: A moderation action, told on every node (``text``: the event told;
#: ``rooms``: whose members hear it; ``to``: the one user who does).
MODERATED: Final = "o"
#: A change of the moderation state (``text``: the change; ``version``:
#: the state's version after it), published by the commit itself.
MODERATION: Final = "s"


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    """One cluster event: ``kind`` is one of the constants above. ``node``
    and ``seq`` identify the publishing node and its publication, so that
    node can answer the sender (with its ``ref``) and run the hooks."""

    kind: str
    node: str = ""  # the publishing node's, set by the backplane
    seq: int = 0
    ts: float = 0.0
    room: str = ""
    sender: str = ""
    to: str = ""
    text: str = ""
    reason: str = ""
    old: str = ""
    rooms: tuple[str, ...] = ()
    version: int = 0


encode_envelope = msgspec.json.Encoder().encode
decode_envelope = msgspec.json.Decoder(Envelope).decode


class Publication:
    """A published event its node waits to see come back from the backplane:
    ``user`` (the local sender, opaque to the backplane; None for
    ``ChatServer.post``) gets its copy with ``ref``; ``done`` is set, with
    ``result`` the delivered event."""

    __slots__ = ("done", "env", "ref", "result", "user")

    def __init__(self, env: Envelope, user: object, ref: str | int | None) -> None:
        self.env = env
        self.user = user
        self.ref = ref
        self.done = trio.Event()
        self.result: Message | DirectMessage | None = None


class ClusterPort(Protocol):
    """What a backplane may ask of the server it serves (the server hands it
    one in :meth:`Backplane.attach`)."""

    @property
    def last_id(self) -> int:
        """The highest message id this node has handed out or seen."""
        ...

    def see_id(self, id: int) -> None:
        """Ids from now on are above ``id`` (one the cluster handed out)."""
        ...

    @property
    def close_timeout(self) -> float:
        """How long the node's last publications may take to go out."""
        ...

    def memberships(self) -> Sequence[tuple[str, Sequence[str]]]:
        """Each local user's name and rooms, in login order."""
        ...

    def has_user(self, name: str) -> bool:
        """Whether a local user is called ``name`` (case-insensitively)."""
        ...

    def kick(self, name: str, reason: str) -> bool:
        """Disconnect the local user ``name`` (its name is someone else's);
        False if there is none."""
        ...

    def deliver(
        self, id: int, env: Envelope, publication: Publication | None
    ) -> Message | DirectMessage | None:
        """Deliver a cluster event to this node's users. ``publication`` is
        this node's own, come back (its sender gets its copy with the ref);
        None for another node's. Returns the message or dm delivered, if
        it is this node's own (the backplane runs its hooks later)."""
        ...

    def deliver_here(self, publication: Publication) -> Message | DirectMessage | None:
        """Deliver, on this node alone, what was published just before the
        backplane was lost; returns the message or dm delivered."""
        ...

    async def delivered(self, event: Message | DirectMessage) -> None:
        """Run the delivery hooks of this node's own message or dm."""
        ...

    async def rejoined(self) -> None:
        """The node (re)joined the cluster and reads its events from now
        on: load what the cluster keeps for every node (the moderation
        state), which the events that follow change.

        Raises:
            OSError: the cluster is unreachable (the backplane tries again).
        """
        ...


class Backplane(Protocol):
    """A cluster of servers sharing rooms, names and history
    (``ChatServer(backplane=...)``)."""

    @property
    def history(self) -> HistoryStore:
        """The shared history: the server's store by default."""
        ...

    @property
    def available(self) -> bool:
        """True while the cluster is reachable; the server serves its own
        users alone otherwise."""
        ...

    def attach(self, port: ClusterPort) -> AbstractAsyncContextManager[None]:
        """Be the cluster for the duration of an ``async with`` block.

        Raises:
            chatkit.StartupError: the cluster cannot be reached.
        """
        ...

    async def claim(self, name: str) -> bool:
        """Claim ``name`` for this node; False if another node holds it.

        Raises:
            OSError: the cluster is unreachable.
        """
        ...

    def release(self, name: str) -> None:
        """Give ``name`` up."""
        ...

    async def holds(self, name: str) -> bool:
        """Whether some node has a user called ``name``."""
        ...

    def publish(
        self, env: Envelope, *, user: object = None, ref: str | int | None = None
    ) -> Publication:
        """Publish a cluster event; it comes back to :meth:`ClusterPort.deliver`."""
        ...

    def pending(self, user: object) -> Sequence[Publication]:
        """``user``'s publications that have not come back yet."""
        ...

    def member(self, room: str, name: str, *, present: bool) -> None:
        """Record that local user ``name`` joined (or left) ``room``."""
        ...

    async def who(self, room: str) -> tuple[str, ...]:
        """The names in ``room`` on every node."""
        ...

    async def rooms(self) -> dict[str, int]:
        """Every room of the cluster and its number of members."""
        ...

    async def locate(self, name: str) -> tuple[str, tuple[str, ...]] | None:
        """User ``name`` (on any node), as its node spells it, and the
        rooms it is in; None if there is none.

        Raises:
            OSError: the cluster is unreachable.
        """
        ...

    async def load_moderation(self) -> tuple[int, bytes | None]:
        """The cluster's moderation state: its version and document (None
        if it has none yet).

        Raises:
            OSError: the cluster is unreachable.
        """
        ...

    async def commit_moderation(
        self, version: int, document: bytes, change: bytes
    ) -> bool:
        """Make ``document`` the moderation state, if it is still at
        ``version``, and publish ``change`` (an :data:`MODERATION` event
        at ``version + 1``) in the same step; False (nothing done) if
        another node changed it first.

        Raises:
            OSError: the cluster is unreachable.
        """
        ...
