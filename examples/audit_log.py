"""A server plugin that keeps an audit log of moderation: one JSON line per
kick, ban, unban, mute, unmute, op and deop, appended to a file::

    {"time": "2026-05-01T12:00:00.123+00:00", "action": "ban", "by": "alice",
     "name": "eve", "room": "dev", "reason": "spam", "until": 1777640400.1}

(one line each; fields that do not apply are left out: ``address`` for an
address ban instead of ``name``, no ``room`` for a server-wide action, no
``until`` for a ban or mute until lifted.) ``by`` is ``*server*`` for the
server's own code (``server.kick(...)``). The hook is ``chatkit_moderated``:
it observes, it changes nothing.

With the chatkit CLI, from the repository root (``examples`` must be
importable)::

    CHATKIT_AUDIT_LOG=audit.jsonl python -m chatkit.server --operator alice \\
        --plugin examples.audit_log:AuditLog

In a program: ``chatkit.ChatServer(plugins=[AuditLog("audit.jsonl")])``.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Final

import msgspec

import chatkit

#: The environment variable naming the file when none is passed.
PATH_VARIABLE: Final = "CHATKIT_AUDIT_LOG"


class AuditLog:
    """Appends each moderation action to ``path`` as a JSON line.

    Args:
        path: the file; by default the value of ``CHATKIT_AUDIT_LOG``.

    Raises:
        ValueError: no path, and the variable is unset or empty.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is None:
            path = os.environ.get(PATH_VARIABLE) or None
        if path is None:
            raise ValueError(f"give AuditLog a path, or set {PATH_VARIABLE}")
        self.path = Path(path)

    @chatkit.hookimpl
    def chatkit_moderated(self, event: chatkit.Moderated) -> None:
        """Append ``event`` (without ``type`` and ``ref``), with the time."""
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        fields = msgspec.to_builtins(event)  # omits unset fields, as the wire does
        fields.pop("type", None)
        fields.pop("ref", None)
        line = json.dumps({"time": stamp, **fields}, ensure_ascii=False)
        # Opened per line, so a crash loses nothing and logrotate can move
        # the file at any time. A short synchronous write: keep hooks quick.
        with self.path.open("a", encoding="utf-8") as file:
            file.write(line + "\n")
