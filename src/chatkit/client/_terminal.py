"""The command-line client's chat loop: typed lines out, events in.

Reading what is typed never waits on the network: each line goes to a
queue that one task sends, in order. A line typed while the connection is
back to being established is shown as waiting (above the prompt) and sent
once it is back; a line typed while connected is shown at once, as sent,
and the server's copy of it is not shown again. On a terminal, lines carry
local time stamps (``[12:04]``) and, unless ``NO_COLOR`` is set, a little
colour: notices dimmed, errors red, your name highlighted where others
mention it. Piped, the transcript is plain text, as it always was.
"""

from __future__ import annotations

import collections
import math
import re
import signal
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import trio

from .._console import Console
from .._events import (
    LOBBY,
    DirectMessage,
    ErrorReply,
    Joined,
    Message,
    Moderated,
    Renamed,
    ServerEvent,
)
from .._exceptions import ConnectionClosed, RequestError
from ..protocol import replace_controls
from ._client import ChatClient
from ._reconnect import ClientEvent, Interrupted, Reconnected

__all__ = ["Shell", "Theme", "chat"]


class Shell(Protocol):
    """What the chat loop needs of :class:`~chatkit.client.__main__.ChatShell`."""

    room: str

    def describe(self, event: ServerEvent | ClientEvent) -> str | None:
        """The text shown for ``event``."""

    async def send(self, line: str) -> bool:
        """Act on a typed line; False if the server refused it."""

    def farewell(self) -> str | None:
        """Why reconnecting gave up, if it did."""


_BOLD, _DIM, _RED, _MENTION, _RESET = (
    "\x1b[1m",
    "\x1b[2m",
    "\x1b[31m",
    "\x1b[1;33m",
    "\x1b[0m",
)


class Theme:
    """How chat lines look: time stamps and colours, each optional.

    Args:
        timestamps: prefix chat lines with the local time, ``[12:04]``.
        colour: use colours (only for a terminal, and not with ``NO_COLOR``).
    """

    def __init__(self, *, timestamps: bool, colour: bool) -> None:
        self.timestamps = timestamps
        self.colour = colour
        self._mention: tuple[str, re.Pattern[str]] | None = None

    def line(
        self, text: str, *, when: float | None = None, kind: str = "chat", me: str = ""
    ) -> str:
        """``text`` as shown: stamped with ``when`` (default now) and
        coloured by ``kind`` (``chat``, ``notice`` or ``error``); in a chat
        line, ``me`` is highlighted after the sender's name."""
        stamp = ""
        if self.timestamps:
            clock = time.strftime("%H:%M", time.localtime(when))
            stamp = f"{_DIM}[{clock}]{_RESET} " if self.colour else f"[{clock}] "
        if not self.colour:
            return stamp + text
        if kind == "notice":
            return f"{stamp}{_DIM}{text}{_RESET}"
        if kind == "error":
            return f"{stamp}{_RED}{text}{_RESET}"
        head, colon, body = text.partition(": ")
        if not colon:
            return stamp + text
        if me:
            if self._mention is None or self._mention[0] != me:
                self._mention = (me, _mention_pattern(me))  # names change
            body = self._mention[1].sub(lambda m: _MENTION + m[0] + _RESET, body)
        return f"{stamp}{_BOLD}{head}{_RESET}: {body}"

    def answer(self, text: str) -> str:
        """A command's answer (``/who``, ``/help``...): an error in red,
        anything else as it is; no time stamp."""
        if self.colour and text.startswith("Error: "):
            return f"{_RED}{text}{_RESET}"
        return text

    def pending(self, line: str) -> str:
        """A typed line waiting for the connection, above the prompt."""
        text = f"(waiting to send) {line}"
        return f"{_DIM}{text}{_RESET}" if self.colour else text


def _mention_pattern(name: str) -> re.Pattern[str]:
    # The name as a word of its own (names are letters, digits, _ - .).
    return re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", re.IGNORECASE)


class _Names:
    """The user and room names seen so far, for Tab."""

    def __init__(self, client: ChatClient, commands: Sequence[str]) -> None:
        self._client = client
        self._commands = (*commands, "exit")
        self.users: set[str] = set()
        self.rooms: set[str] = set()

    def see(self, event: ServerEvent | ClientEvent) -> None:
        match event:
            case Message(sender=sender, room=room):
                self.users.add(sender)
                self.rooms.add(room)
            case DirectMessage(sender=sender, to=to):
                self.users.update((sender, to))
            case Joined(room=room, name=name):
                self.users.add(name)
                self.rooms.add(room)
            case Renamed(old=old, new=new):
                self.users.discard(old)
                self.users.add(new)

    async def learn(self) -> None:
        """Ask the server who is in the lobby and which rooms exist (for
        names of people who have said nothing yet); quietly, within a few
        seconds, once."""
        with trio.move_on_after(5):
            try:
                self.users.update(await self._client.who(LOBBY))
                self.rooms.update(await self._client.rooms())
            except RequestError:
                pass  # not connected, refused: what events bring will do

    def complete(self, word: str, first: bool) -> list[str]:
        if first and word.startswith("/"):
            candidates: Iterable[str] = self._commands
        else:
            me = self._client.name
            candidates = (self.users - {me}) | self.rooms | self._client.joined_rooms
        folded = word.casefold()
        return [name for name in candidates if name.casefold().startswith(folded)]


async def chat(
    client: ChatClient,
    console: Console,
    shell: Shell,
    theme: Theme,
    *,
    commands: Sequence[str] = (),
) -> int:
    """Chat until the person leaves or the connection ends for good; returns
    the exit status: 1 if reconnecting gave up, else 0."""
    names = _Names(client, commands)
    console.editor.completer = names.complete
    show_sent = console.interactive  # piped: the server's copy shows it
    echoes: collections.deque[tuple[str, str]] = collections.deque(maxlen=64)
    queued: collections.deque[str] = collections.deque()  # not yet handled
    waiting: list[str] = []  # typed while not connected: shown as waiting
    send, receive = trio.open_memory_channel[str](math.inf)
    sent_all = trio.Event()
    on_loss: list[trio.Event] = []  # set when the connection goes
    status = 0
    leaving = False

    def show(event: ServerEvent | ClientEvent) -> None:
        text = shell.describe(event)
        if text is None:
            return
        text = replace_controls(text, "\ufffd")  # no escape codes
        if isinstance(event, Message | DirectMessage):
            console.print(theme.line(text, when=event.ts, me=client.name))
        elif isinstance(event, ErrorReply):
            console.print(theme.line(text, kind="error"))
        else:
            console.print(theme.line(text, kind="notice"))

    def set_prompt() -> None:
        console.prompt = f"[{shell.room}]> "

    def set_waiting() -> None:
        console.set_pending([theme.pending(line) for line in waiting])

    console.print(f"Hello, {client.name}! Type 'exit' to leave the chat.")
    console.print("Type /help for commands.")
    set_prompt()

    async with trio.open_nursery() as nursery:

        async def show_events() -> None:
            nonlocal status
            async for event in client:
                names.see(event)
                if isinstance(event, Interrupted):
                    for waiter in on_loss:
                        waiter.set()
                if isinstance(event, Reconnected):
                    set_prompt()
                if (
                    isinstance(event, Message)
                    and event.sender == client.name
                    and (event.room, event.text) in echoes
                ):
                    echoes.remove((event.room, event.text))
                    continue  # shown as sent already
                show(event)
                if isinstance(event, Moderated):
                    set_prompt()  # put out of the room we talked in: moved
            # The connection ended for good: stop reading input.
            for waiter in on_loss:
                waiter.set()
            farewell = shell.farewell()
            if farewell is not None and not leaving:
                status = 1  # reconnecting gave up
                console.print(theme.line(farewell, kind="notice"))
            nursery.cancel_scope.cancel()

        async def send_lines() -> None:
            async for line in receive:
                try:
                    await shell.send(line)
                except ConnectionClosed:
                    return  # closed for good; show_events ends the chat
                finally:
                    if queued:  # (leave() empties it)
                        queued.popleft()
                    if line in waiting:
                        waiting.remove(line)
                        set_waiting()
                set_prompt()
            sent_all.set()

        async def redraw_on_resize() -> None:
            with trio.open_signal_receiver(signal.SIGWINCH) as resizes:
                async for _ in resizes:
                    console.refresh()

        async def leave_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            await leave()

        async def leave() -> None:
            nonlocal leaving
            leaving = True
            for line in queued:
                console.print(theme.line(f"Not sent: {line}", kind="error"))
            queued.clear()
            console.print("Exiting chat...")
            await client.aclose()
            nursery.cancel_scope.cancel()

        nursery.start_soon(show_events)
        nursery.start_soon(leave_on_signal)
        nursery.start_soon(send_lines)
        if console.interactive:
            nursery.start_soon(redraw_on_resize)
            nursery.start_soon(names.learn)
        while True:
            line = await console.read_line()
            if line is None or line.strip() in ("exit", "/quit"):
                break
            if not line.strip():
                continue
            if not client.connected or queued:
                waiting.append(line)
                set_waiting()
            elif show_sent and not line.lstrip().startswith("/"):
                room = shell.room
                echoes.append((room, line))
                own = Message(
                    id=0, ts=time.time(), room=room, sender=client.name, text=line
                )
                show(own)
            queued.append(line)
            send.send_nowait(line)
        # Lines typed before leaving go first, unless the connection is
        # gone: then they are listed as not sent.
        send.close()
        if queued and client.connected:
            lost = trio.Event()
            on_loss.append(lost)
            async with trio.open_nursery() as waiter:

                async def until(event: trio.Event) -> None:
                    await event.wait()
                    waiter.cancel_scope.cancel()

                waiter.start_soon(until, sent_all)
                waiter.start_soon(until, lost)
        await leave()
    console.print("Disconnected.")
    return status
