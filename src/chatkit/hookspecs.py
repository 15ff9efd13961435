"""The hooks chatkit calls, for plugin authors.

A plugin is any object or module with functions named after these hooks and
marked with :data:`chatkit.hookimpl`::

    import chatkit

    class Shout:
        @chatkit.hookimpl
        def chatkit_message(self, text):
            return text.upper()

    server = chatkit.ChatServer(plugins=[Shout()])

Rules that hold for every hook:

* Arguments are passed by keyword; an implementation may accept only the
  ones it needs (``def chatkit_message(self, text)`` above).
* An implementation may be a plain function or ``async def``; chatkit awaits
  what it returns. An awaited implementation is cancelled after the server's
  ``hook_timeout`` seconds and counts as having returned ``None``.
* Implementations run one after another, in the order the plugins were
  given to ``plugins=[...]``, then entry-point plugins; ``tryfirst=True`` /
  ``trylast=True`` on :data:`~chatkit.hookimpl` move one to the front or the
  back. Hook wrappers are not supported.
* An implementation that raises is logged with its plugin's name and
  skipped; the other implementations, the user and the server carry on.
  The one deliberate exception is :class:`chatkit.Veto` from a hook that
  says it can veto.

Server hooks are the methods of :class:`ServerSpec`; client hooks (for bots)
those of :class:`ClientSpec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._hooks import PROJECT_NAME as PROJECT_NAME
from ._hooks import hookimpl as hookimpl
from ._hooks import hookspec as hookspec
from .client._client import ClientSpec as ClientSpec

if TYPE_CHECKING:
    from ._events import DirectMessage, Message
    from ._server import ChatServer, LeaveReason, RemoteUser, User

__all__ = ["PROJECT_NAME", "ClientSpec", "ServerSpec", "hookimpl", "hookspec"]


class ServerSpec:
    """Hooks a :class:`chatkit.ChatServer` calls."""

    @hookspec
    def chatkit_server_started(self, server: ChatServer) -> None:
        """The server is listening; ``server.port`` is the bound port.

        Fires once, before ``nursery.start(server.serve)`` returns.
        """

    @hookspec
    def chatkit_server_stopping(self, server: ChatServer) -> None:
        """Graceful shutdown began (``server.aclose()``).

        Fires once, before clients are sent ``shutdown``: a plugin can still
        post a last message with ``server.post(...)``.
        """

    @hookspec
    def chatkit_authenticate(
        self, server: ChatServer, name: str, token: str | None, address: str
    ) -> None:
        """A client asks to log in as ``name`` (valid and free).

        Can veto: raise :class:`chatkit.Veto` with a reason to refuse; the
        client gets ``error unauthorized`` with that reason and is
        disconnected. ``token`` is the ``hello`` message's token (``None`` in
        line mode). Returning normally lets the user in unless another
        plugin refuses. Fails closed: an implementation that raises anything
        else, or times out, refuses the user too.
        """

    @hookspec
    def chatkit_user_connected(self, server: ChatServer, user: User) -> None:
        """``user`` completed the handshake (and has joined ``lobby``)."""

    @hookspec
    def chatkit_user_disconnected(
        self, server: ChatServer, user: User, reason: LeaveReason
    ) -> None:
        """``user`` is gone; ``reason`` says why (``bye``, ``exit``,
        ``disconnect``, ``kicked``, ``shutdown``, ``too_slow``)."""

    @hookspec
    def chatkit_user_joined(self, server: ChatServer, user: User, room: str) -> None:
        """``user`` joined ``room`` (``lobby`` included, right after login)."""

    @hookspec
    def chatkit_user_left(
        self, server: ChatServer, user: User, room: str, reason: LeaveReason
    ) -> None:
        """``user`` left ``room``; ``reason`` is ``leave`` for a ``leave``
        request, or why the user left the server."""

    @hookspec
    def chatkit_nick(self, server: ChatServer, user: User, new: str) -> None:
        """``user`` asks to be renamed to ``new`` (valid and free); runs
        before the rename.

        Can veto: raise :class:`chatkit.Veto`; the user gets ``error
        rejected`` with the reason and keeps the old name. Fails closed: an
        implementation that raises anything else, or times out, refuses too.
        """

    @hookspec
    def chatkit_user_renamed(
        self, server: ChatServer, user: User, old: str, new: str
    ) -> None:
        """``user`` changed name from ``old`` to ``new`` (``user.name == new``)."""

    @hookspec
    def chatkit_message(
        self, server: ChatServer, user: User, room: str, text: str
    ) -> str | None:
        """``user`` says ``text`` in ``room``; runs before delivery.

        Can rewrite: return a new ``str`` and later plugins and the room see
        that instead; return ``None`` to leave it unchanged. Can veto: raise
        :class:`chatkit.Veto`; the sender alone gets ``error rejected``
        and nobody sees the message.
        """

    @hookspec
    def chatkit_dm(
        self, server: ChatServer, user: User, recipient: User | RemoteUser, text: str
    ) -> str | None:
        """``user`` sends ``text`` privately to ``recipient``; runs before
        delivery. Rewrite and veto work as in :meth:`chatkit_message`.
        In a cluster, a recipient on another node is a
        :class:`~chatkit.RemoteUser` (a name only)."""

    @hookspec
    def chatkit_message_delivered(self, server: ChatServer, message: Message) -> None:
        """``message`` (final text, with ``id`` and ``ts``) was handed to every
        member of its room. Also fires for :meth:`ChatServer.post`."""

    @hookspec
    def chatkit_dm_delivered(self, server: ChatServer, message: DirectMessage) -> None:
        """A private ``message`` was handed to its recipient."""
