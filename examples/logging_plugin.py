"""A server plugin that observes: it logs who comes and goes and what is said.

Every hook it implements returns ``None``, so it changes nothing; it only
writes one line per event, for example::

    server started on 127.0.0.1:12345
    alice connected from 127.0.0.1:50312
    alice joined lobby
    [lobby] alice: hello
    alice sent a private message to bob
    alice is now alicia
    alicia left lobby (bye)
    alicia disconnected (bye)
    server stopping

The lines go to the ``chatlog`` logger (at INFO level), or, when a path is
given, are appended to that file with a UTC timestamp. Private messages are
logged without their text.

With the chatkit CLI, from the repository root (``examples`` must be
importable), to the log or to a file::

    python -m chatkit.server --log-level INFO --plugin $PLUGIN
    CHATKIT_CHATLOG=chat.log python -m chatkit.server --plugin $PLUGIN

where ``PLUGIN=examples.logging_plugin:ChatLog``.

In a program: ``chatkit.ChatServer(plugins=[ChatLog("chat.log")])``.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Final

import chatkit

#: The environment variable naming the log file when none is passed.
PATH_VARIABLE: Final = "CHATKIT_CHATLOG"


class ChatLog:
    """Logs joins, leaves, renames and messages; observes only.

    Args:
        path: a file to append lines to; by default the value of
            ``CHATKIT_CHATLOG``, and when that is unset too, lines go to
            ``logger`` instead.
        logger: where lines go without a file; the ``chatlog`` logger by
            default.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, logger: str = "chatlog"
    ) -> None:
        if path is None:
            path = os.environ.get(PATH_VARIABLE) or None
        self.path = None if path is None else Path(path)
        self.logger = logging.getLogger(logger)

    def write(self, line: str) -> None:
        """Log ``line``: to the file (timestamped), or to the logger."""
        if self.path is None:
            self.logger.info("%s", line)
            return
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        # Opened per line, so a crash loses nothing and logrotate can move the
        # file at any time. A short synchronous write: hooks run in the
        # server's event loop, and a plain ``def`` hook must stay quick.
        with self.path.open("a", encoding="utf-8") as file:
            file.write(f"{stamp} {line}\n")

    @chatkit.hookimpl
    def chatkit_server_started(self, server: chatkit.ChatServer) -> None:
        """Log that the server listens."""
        self.write(f"server started on {server.host}:{server.port}")

    @chatkit.hookimpl
    def chatkit_server_stopping(self) -> None:
        """Log that the server shuts down."""
        self.write("server stopping")

    @chatkit.hookimpl
    def chatkit_user_connected(self, user: chatkit.User) -> None:
        """Log a login."""
        self.write(f"{user.name} connected from {user.address}")

    @chatkit.hookimpl
    def chatkit_user_disconnected(
        self, user: chatkit.User, reason: chatkit.LeaveReason
    ) -> None:
        """Log a user leaving the server."""
        self.write(f"{user.name} disconnected ({reason})")

    @chatkit.hookimpl
    def chatkit_user_joined(self, user: chatkit.User, room: str) -> None:
        """Log a user joining a room."""
        self.write(f"{user.name} joined {room}")

    @chatkit.hookimpl
    def chatkit_user_left(
        self, user: chatkit.User, room: str, reason: chatkit.LeaveReason
    ) -> None:
        """Log a user leaving a room."""
        self.write(f"{user.name} left {room} ({reason})")

    @chatkit.hookimpl
    def chatkit_user_renamed(self, old: str, new: str) -> None:
        """Log a change of name."""
        self.write(f"{old} is now {new}")

    @chatkit.hookimpl
    def chatkit_message_delivered(self, message: chatkit.Message) -> None:
        """Log a room message, as delivered (after any rewriting plugin)."""
        self.write(f"[{message.room}] {message.sender}: {message.text}")

    @chatkit.hookimpl
    def chatkit_dm_delivered(self, message: chatkit.DirectMessage) -> None:
        """Log that a private message was sent, but not what it said."""
        self.write(f"{message.sender} sent a private message to {message.to}")
