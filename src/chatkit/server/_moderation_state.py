"""The moderation state's parts (:class:`Restriction`, :class:`RoomSettings`),
the document they are saved in, a :class:`Change` of it, and where it is
kept: a history store (:class:`ModerationStore`) or a cluster
(:class:`SharedModeration`). :class:`~chatkit.server._moderation.Moderation`
holds it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec

from .._events import BanInfo

__all__ = [
    "Change",
    "Document",
    "ModerationStore",
    "Restriction",
    "RoomSettings",
    "SharedModeration",
    "decode",
    "decode_change",
    "decode_document",
]


@runtime_checkable
class ModerationStore(Protocol):
    """A history store that also keeps the moderation state (one document,
    saved whole): :class:`~chatkit.SqliteHistory` and
    :class:`~chatkit.MemoryHistory` do."""

    async def load_moderation(self) -> bytes | None:
        """The document saved last, or None."""
        ...

    async def save_moderation(self, document: bytes) -> None:
        """Keep ``document`` (durably, before returning)."""
        ...


class Restriction(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A ban or a mute.

    Attributes:
        kind: ``"ban"`` or ``"mute"``.
        name: the user's name, casefolded (or ``address``).
        address: a network in CIDR form (bans only).
        room: the room, or None: the whole server.
        by: who imposed it.
        until: when it ends (Unix time), or None: when lifted.
    """

    kind: str
    by: str
    name: str | None = None
    address: str | None = None
    room: str | None = None
    reason: str = ""
    until: float | None = None

    def refusal(self, where: str) -> str:
        """What the user it concerns is told when it keeps them out or
        quiet: ``you are banned from dev: spam`` (``where``: ``from
        dev``), ``you are muted in lobby``."""
        text = f"you are {'banned' if self.kind == 'ban' else 'muted'} {where}"
        return f"{text}: {self.reason}" if self.reason else text

    def info(self) -> BanInfo:
        """As the ``bans`` reply lists it."""
        return BanInfo(
            name=self.name,
            address=self.address,
            by=self.by,
            reason=self.reason,
            until=self.until,
        )


class RoomSettings(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A room's topic and modes (see :class:`chatkit.protocol.Mode`), and
    who it lets in or speak."""

    topic: str = ""
    topic_by: str | None = None
    invite_only: bool = False
    moderated: bool = False
    secret: bool = False
    limit: int = 0
    slow: int = 0
    invited: list[str] = msgspec.field(default_factory=list)  # casefolded
    voiced: list[str] = msgspec.field(default_factory=list)  # casefolded


class Document(msgspec.Struct, kw_only=True):
    """What is saved: restrictions, room roles, room settings."""

    restrictions: list[Restriction] = msgspec.field(default_factory=list)
    # room -> its owner's casefolded name
    owners: dict[str, str] = msgspec.field(default_factory=dict)
    # room -> its operators' casefolded names
    operators: dict[str, list[str]] = msgspec.field(default_factory=dict)
    rooms: dict[str, RoomSettings] = msgspec.field(default_factory=dict)


class Change(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One change of the state: each part given replaces that part. In a
    cluster every node applies it, in the order the cluster committed
    them, so it names the parts' new values, never a step to take."""

    restrictions: list[Restriction] | None = None
    owners: dict[str, str] = msgspec.field(default_factory=dict)
    # room -> its operators (none: empty)
    operators: dict[str, list[str]] = msgspec.field(default_factory=dict)
    # room -> its settings (the defaults: none kept)
    rooms: dict[str, RoomSettings] = msgspec.field(default_factory=dict)

    def apply(self, doc: Document) -> None:
        """Make it so in ``doc``."""
        if self.restrictions is not None:
            doc.restrictions = list(self.restrictions)
        doc.owners.update(self.owners)
        for room, operators in self.operators.items():
            if operators:
                doc.operators[room] = list(operators)
            else:
                doc.operators.pop(room, None)
        for room, settings in self.rooms.items():
            if settings == RoomSettings():
                doc.rooms.pop(room, None)
            else:
                doc.rooms[room] = settings


decode_document = msgspec.json.Decoder(Document).decode
decode_change = msgspec.json.Decoder(Change).decode


def decode(document: bytes | None) -> Document:
    """A saved document (None: none was saved: an empty one)."""
    return decode_document(document) if document else Document()


class SharedModeration(Protocol):
    """Where a cluster keeps the state every node shares (a
    :class:`chatkit.backplane.Backplane`): a version and a document, each
    change committed only on top of the version it was made on."""

    async def load_moderation(self) -> tuple[int, bytes | None]:
        """The version and document (None: none yet)."""
        ...

    async def commit_moderation(
        self, version: int, document: bytes, change: bytes
    ) -> bool:
        """Store ``document`` if the state is at ``version`` and tell every
        node ``change``; False if it is not."""
        ...
