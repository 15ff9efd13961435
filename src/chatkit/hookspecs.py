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
those of :class:`ClientSpec`. Each is defined beside the class that calls
it (``chatkit.server`` and ``chatkit.client``) and gathered here.
"""

from __future__ import annotations

from ._hooks import PROJECT_NAME as PROJECT_NAME
from ._hooks import hookimpl as hookimpl
from ._hooks import hookspec as hookspec
from .client._client import ClientSpec as ClientSpec
from .server._server import ServerSpec as ServerSpec

__all__ = ["PROJECT_NAME", "ClientSpec", "ServerSpec", "hookimpl", "hookspec"]
