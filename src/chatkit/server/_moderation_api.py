"""The moderation half of :class:`~chatkit.ChatServer`'s public API: the
server's own kicks, bans, mutes, roles, topics and modes (docs/moderation.md),
done by the moderator as an operator's requests are, on behalf of
``*server*``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from .._moderation_events import Modes
from ._moderation import api_target

if TYPE_CHECKING:
    from ._rules import ChatRules

__all__ = ["ModerationAPI"]


class ModerationAPI:
    """Moderation methods of :class:`~chatkit.ChatServer` (a base class of
    it: use them on the server)."""

    _rules: ChatRules

    def kick(
        self, name: str, reason: str = "kicked", *, room: str | None = None
    ) -> bool:
        """Put user ``name`` out of ``room`` (its members are told, and it
        gets ``left`` with reason ``kicked``), or with no ``room`` off the
        server (``error kicked``); True if found. In a cluster, a user of
        another node is kicked there, in a task: True means asked (nothing
        happens if there is no such user)."""
        return self._rules.moderator.kick_soon(name, room, reason)

    async def ban(
        self,
        name: str | None = None,
        *,
        address: str | None = None,
        room: str | None = None,
        reason: str = "",
        duration: float | None = None,
    ) -> None:
        """Ban ``name`` or ``address`` (an IP address or a CIDR network)
        from ``room`` (None: the server) for ``duration`` seconds (None:
        until :meth:`unban`); whoever it keeps out is put out now. Saved in
        the history store, when it keeps moderation (docs/moderation.md).

        Raises:
            ValueError: not exactly one of ``name`` and ``address``, or a
                bad address or duration.
        """
        network = api_target(name, address, duration)
        await self._rules.moderator.ban(name, network, room, reason, duration)

    async def unban(
        self,
        name: str | None = None,
        *,
        address: str | None = None,
        room: str | None = None,
    ) -> bool:
        """Lift a ban; False if there was none."""
        network = api_target(name, address, None)
        return await self._rules.moderator.unban(name, network, room)

    async def mute(
        self,
        name: str,
        *,
        room: str | None = None,
        reason: str = "",
        duration: float | None = None,
    ) -> None:
        """Keep ``name`` from speaking in ``room`` (None: anywhere, direct
        messages included) for ``duration`` seconds (None: until
        :meth:`unmute`)."""
        api_target(name, None, duration)
        await self._rules.moderator.mute(name, room, reason, duration)

    async def unmute(self, name: str, *, room: str | None = None) -> bool:
        """Let ``name`` speak again; False if it was not muted."""
        return await self._rules.moderator.unmute(name, room)

    async def op(self, room: str, name: str) -> None:
        """Make ``name`` an operator of ``room``."""
        await self._rules.moderator.set_operator(room, name, True)

    async def deop(self, room: str, name: str) -> None:
        """Take ``room``'s operator role from ``name``."""
        await self._rules.moderator.set_operator(room, name, False)

    async def owner(self, room: str, name: str) -> None:
        """Hand ``room`` over to ``name``, its new owner."""
        await self._rules.moderator.set_owner(room, name)

    async def set_topic(self, room: str, text: str) -> None:
        """Set ``room``'s topic (``""``: none); its members are told."""
        await self._rules.moderator.set_topic(room, text)

    async def set_modes(
        self,
        room: str,
        *,
        invite_only: bool | None = None,
        moderated: bool | None = None,
        secret: bool | None = None,
        limit: int | None = None,
        slow: int | None = None,
    ) -> None:
        """Change ``room``'s modes (those given; see docs/moderation.md);
        its members are told.

        Raises:
            ValueError: ``limit`` or ``slow`` out of range.
        """
        given = {
            "room": room,
            "invite_only": invite_only,
            "moderated": moderated,
            "secret": secret,
            "limit": limit,
            "slow": slow,
        }
        try:  # the protocol's own bounds, as for a client's request
            request = msgspec.convert(given, Modes)  # None: left as it is
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None
        await self._rules.moderator.set_modes(request)

    async def invite(self, room: str, name: str) -> None:
        """Let ``name`` join invite-only ``room`` once (it is told)."""
        await self._rules.moderator.invite(room, name)

    async def voice(self, room: str, name: str, *, on: bool = True) -> None:
        """Let ``name`` speak in moderated ``room`` (``on=False``: no
        longer)."""
        await self._rules.moderator.set_voice(room, name, on)
