"""ChatClient's moderation requests (docs/moderation.md): kicks, bans,
mutes and roles; topics and modes; invites and voices; and plugin commands.

A mixin of :class:`~chatkit.ChatClient`, kept apart so that each module
stays short. Each method sends one request through the client's session
and returns the server's answer, or raises the :class:`RequestError` of
its refusal. Answers that only answer (``bans``, a ``topic`` or ``modes``
asked for, a ``command``) stay out of ``async for``; what the room's
members are told (a ``moderated`` event, a topic or modes set) comes
through it as well, as others see it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._events import (
    Ban,
    Bans,
    BansReply,
    Command,
    CommandReply,
    Deop,
    Devoice,
    Invite,
    Kick,
    Moderated,
    Modes,
    ModesReply,
    Mute,
    Op,
    Topic,
    TopicReply,
    Unban,
    Unmute,
    Voice,
)

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["ModerationRequests"]


class ModerationRequests:
    """The moderation methods of :class:`~chatkit.ChatClient`."""

    _session: Session

    # --- moderation (docs/moderation.md) ------------------------------------
    # Each returns the server's acknowledgement: our copy of the `moderated`
    # event (which also comes through ``async for``, as others see it).
    # Without ``room``, an action concerns the whole server. Each raises
    # Forbidden (we lack the role), NoSuchUser, BadRequest (nothing to
    # lift) or ConnectionClosed, as the server answers.

    async def kick(
        self, name: str, *, room: str | None = None, reason: str = ""
    ) -> Moderated:
        """Put ``name`` out of ``room``, or (no ``room``) off the server.

        Raises:
            Forbidden: we are no operator of ``room`` (or the server).
            NoSuchUser: ``name`` is not there.
        """
        request = Kick(name=name, room=room, reason=reason)
        result: Moderated = await self._session.request(request)
        return result

    async def ban(
        self,
        name: str | None = None,
        *,
        address: str | None = None,
        room: str | None = None,
        reason: str = "",
        duration: int | None = None,
    ) -> Moderated:
        """Ban ``name``, or an ``address`` (IP address or CIDR network),
        from ``room`` (or the server) for ``duration`` seconds, or until
        unbanned. A banned member is put out at once.

        Raises:
            ValueError: not exactly one of ``name`` and ``address``.
        """
        _one_target(name, address)
        request = Ban(
            name=name, address=address, room=room, reason=reason, duration=duration
        )
        result: Moderated = await self._session.request(request)
        return result

    async def unban(
        self,
        name: str | None = None,
        *,
        address: str | None = None,
        room: str | None = None,
    ) -> Moderated:
        """Lift the ban of ``name`` or ``address`` from ``room`` (or the
        server).

        Raises:
            ValueError: not exactly one of ``name`` and ``address``.
        """
        _one_target(name, address)
        request = Unban(name=name, address=address, room=room)
        result: Moderated = await self._session.request(request)
        return result

    async def mute(
        self,
        name: str,
        *,
        room: str | None = None,
        reason: str = "",
        duration: int | None = None,
    ) -> Moderated:
        """Keep ``name`` from speaking in ``room`` (or anywhere) for
        ``duration`` seconds, or until unmuted."""
        request = Mute(name=name, room=room, reason=reason, duration=duration)
        result: Moderated = await self._session.request(request)
        return result

    async def unmute(self, name: str, *, room: str | None = None) -> Moderated:
        """Let ``name`` speak in ``room`` (or on the server) again."""
        result: Moderated = await self._session.request(Unmute(name=name, room=room))
        return result

    async def op(self, room: str, name: str) -> Moderated:
        """Make ``name`` an operator of ``room`` (its owner, or a server
        operator, may)."""
        result: Moderated = await self._session.request(Op(room=room, name=name))
        return result

    async def deop(self, room: str, name: str) -> Moderated:
        """Take ``room``'s operator role from ``name``."""
        result: Moderated = await self._session.request(Deop(room=room, name=name))
        return result

    async def bans(self, room: str | None = None) -> BansReply:
        """The bans, mutes and operators of ``room`` (or of the server)."""
        result: BansReply = await self._session.request(Bans(room=room))
        return result

    # --- topics, modes, invites and voices ---------------------------------

    async def topic(self, room: str, text: str | None = None) -> TopicReply:
        """Set ``room``'s topic to ``text`` (its operators may; ``""``
        clears it), or without ``text`` ask for it.

        Returns:
            The topic (``text`` ``""``: none) and who set it. A topic set
            is also told to the room's members, us included, through
            ``async for``; the answer to an ask is not.

        Raises:
            Forbidden: setting it without being an operator of ``room``.
            NotInRoom: a secret room we are not in.
        """
        result: TopicReply = await self._session.request(Topic(room=room, text=text))
        return result

    async def modes(
        self,
        room: str,
        *,
        invite_only: bool | None = None,
        moderated: bool | None = None,
        secret: bool | None = None,
        limit: int | None = None,
        slow: int | None = None,
    ) -> ModesReply:
        """Change ``room``'s modes (its operators may; those not given stay
        as they are), or with none ask for them.

        Args:
            invite_only: only invited users (and operators) may join.
            moderated: only operators and voiced members may speak.
            secret: the room is not listed, nor its members told, to
                others.
            limit: the most members (0: no limit).
            slow: seconds a member waits between messages (0: off).

        Returns:
            Every mode of the room. A change is also told to the room's
            members, us included, through ``async for``; the answer to an
            ask is not.

        Raises:
            Forbidden: changing them without being an operator of ``room``.
        """
        request = Modes(
            room=room,
            invite_only=invite_only,
            moderated=moderated,
            secret=secret,
            limit=limit,
            slow=slow,
        )
        result: ModesReply = await self._session.request(request)
        return result

    async def invite(self, room: str, name: str) -> Moderated:
        """Let ``name`` join invite-only ``room`` (once)."""
        result: Moderated = await self._session.request(Invite(room=room, name=name))
        return result

    async def voice(self, room: str, name: str) -> Moderated:
        """Let ``name`` speak in moderated ``room``."""
        result: Moderated = await self._session.request(Voice(room=room, name=name))
        return result

    async def devoice(self, room: str, name: str) -> Moderated:
        """Take ``name``'s voice in ``room``."""
        result: Moderated = await self._session.request(Devoice(room=room, name=name))
        return result

    # --- plugin commands (docs/protocol.md#plugin-commands) ----------------

    async def command(
        self, name: str, args: str = "", room: str | None = None
    ) -> CommandReply:
        """Run the server plugin command ``name`` (``/roll 2d6``:
        ``command("roll", "2d6")``), about ``room`` if given (a room we are
        in); returns the plugin's answer, which nobody else sees.

        Raises:
            BadRequest: no plugin knows the command.
            Rejected: the plugin refused it (or failed).
        """
        request = Command(name=name, args=args, room=room)
        result: CommandReply = await self._session.request(request)
        return result


def _one_target(name: str | None, address: str | None) -> None:
    if (name is None) == (address is None):
        raise ValueError("give a name or an address (one of them)")
