"""Plugin commands: the ``command`` request, answered by the first plugin
whose ``chatkit_command`` returns text (docs/plugins.md)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .._events import Command, CommandReply
from .._exceptions import ErrorCode, Veto
from ..protocol import is_valid_name

if TYPE_CHECKING:
    from .._hooks import HookDispatcher
    from ._limits import Limits
    from ._messages import Messages
    from ._session import Session

__all__ = ["run_command"]

log = logging.getLogger("chatkit.server")

_COMMAND_RULE = "command names are 1-32 letters, digits, '_', '-' or '.'"


async def run_command(
    session: Session,
    request: Command,
    hooks: HookDispatcher,
    messages: Messages,
    limits: Limits,
) -> None:
    """Answer ``request``: the first plugin answer, privately, as
    :class:`CommandReply`; ``error bad_request`` if no plugin knows the
    command, ``error rejected`` if one refused it (:class:`~chatkit.Veto`)
    or failed before any answered."""
    name, ref = request.name, request.ref
    if not is_valid_name(name):
        session.error(ErrorCode.BAD_REQUEST, _COMMAND_RULE, ref)
        return
    limit = limits.max_message_length
    if len(request.args) > limit:
        session.error(
            ErrorCode.TOO_LARGE,
            f"command arguments are at most {limit} characters",
            ref,
        )
        return
    room = request.room
    if room is not None and messages.member_room(session, room, ref) is None:
        return
    answer, failed = None, False
    if hooks.has("chatkit_command"):
        try:
            answer, failed = await hooks.first(
                "chatkit_command",
                user=session.user,
                name=name,
                args=request.args,
                room=room,
            )
        except Veto as exc:
            session.error(ErrorCode.REJECTED, exc.reason, ref)
            return
    if answer is None:
        if failed:  # the log names the plugin; the user learns nothing internal
            session.error(ErrorCode.REJECTED, f"/{name} failed on the server", ref)
        else:
            session.error(ErrorCode.BAD_REQUEST, f"no command /{name}", ref)
        return
    if len(answer) > limit:
        log.warning("the answer to /%s was cut to %d characters", name, limit)
        answer = answer[:limit]
    session.send(CommandReply(name=name, text=answer, room=room, ref=ref))
