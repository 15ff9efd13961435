"""``python -m chatkit.client``: chat from a terminal (or a script).

Behaves like the original line-based chat program's client: it asks
``Enter your username: `` (unless ``--name`` is given), prints what others
say as ``user: text`` with join and leave notices, sends each typed line,
and leaves on ``exit``. On top of that it speaks slash commands (``/help``
lists them), keeps the line being typed intact while messages arrive,
works with piped input (lines in, transcript out, exit at end of input),
and gets a lost connection back by itself (``--reconnect``), showing the
messages said meanwhile.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from types import MappingProxyType

import trio

from .._argtypes import port
from .._console import Console
from .._events import (
    LOBBY,
    MAX_INT,
    DirectMessage,
    ErrorReply,
    Joined,
    Left,
    Message,
    Moderated,
    ModesReply,
    Renamed,
    ServerEvent,
    Shutdown,
    TopicReply,
)
from .._exceptions import (
    BadName,
    BadRequest,
    ConnectionClosed,
    NameTaken,
    RequestError,
)
from ..protocol import is_valid_name
from ._client import DEFAULT_PORT, ChatClient, open_client
from ._connection import describe_error, open_stream
from ._moderating import COMMANDS as MODERATION_COMMANDS
from ._moderating import (
    describe_moderated,
    describe_modes,
    describe_topic,
    moderate,
)
from ._reconnect import (
    ClientEvent,
    Interrupted,
    Reconnect,
    Reconnected,
    Reconnecting,
)
from ._terminal import Theme, chat

__all__ = ["HELP", "ChatShell", "build_parser", "main", "run_client"]

_Printer = Callable[[str], None]
CONNECT_TIMEOUT = 10.0  # seconds, as ChatClient's connect_timeout

HELP = """\
Type a line to send it to the current room. Commands (any other /COMMAND
[ARGS] goes to the server's plugins, e.g. /roll 2d6):
  /join ROOM        join ROOM (created if needed) and talk there
  /leave [ROOM]     leave ROOM (default: the current room)
  /room ROOM        talk in ROOM from now on (a room you are in)
  /msg USER TEXT    send TEXT privately to USER
  /nick NAME        change your name
  /who [ROOM]       who is in ROOM (default: the current room)
  /rooms            list the rooms and how many are in each
  /history [ROOM] [N] [before ID | after ID]
                    N messages (default 20) of ROOM (default: the current
                    room): the last ones, or those before / after message ID
  /kick [-s] NAME [REASON]
                    put NAME out of the current room (-s: off the server)
  /ban [-s] NAME|ADDRESS [DURATION] [REASON]
                    ban NAME (or an address, a network) from the current
                    room (-s: the server), for DURATION (30s, 10m, 2h, 1d)
                    or until unbanned
  /unban [-s] NAME|ADDRESS
                    lift a ban in the current room (-s: on the server)
  /mute [-s] NAME [DURATION] [REASON]
                    keep NAME from speaking in the current room (-s:
                    anywhere), for DURATION or until unmuted
  /unmute [-s] NAME let NAME speak again
  /op NAME          make NAME an operator of the current room
  /deop NAME        take the current room's operator role from NAME
  /bans [-s]        the bans, mutes and operators of the current room
                    (-s: of the server)
  /topic [TEXT]     show the current room's topic, or set it to TEXT
  /mode [+i|-i|+m|-m|+s|-s|limit=N|slow=N ...]
                    show the current room's modes, or change them: invite
                    only (i), moderated (m), secret (s), at most N members,
                    N seconds between a member's messages (0: no limit)
  /invite NAME      let NAME join the current room (invite-only) once
  /voice NAME       let NAME speak in the current room (moderated)
  /devoice NAME     take NAME's voice in the current room
  /help             this help
  /quit or exit     leave the chat"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m chatkit.client``."""
    parser = argparse.ArgumentParser(
        prog="python -m chatkit.client",
        description="Chat on a chatkit server from the terminal.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="server address (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=port(1),
        default=DEFAULT_PORT,
        help="server port (default: %(default)s)",
    )
    parser.add_argument("--name", help="your user name (asked for when not given)")
    parser.add_argument(
        "--token", help="token (or password) for servers that require one"
    )
    parser.add_argument(
        "--reconnect",
        choices=("lost", "always", "never"),
        default="lost",
        metavar="WHEN",
        help="get the connection back, and show what was said meanwhile: "
        "'lost' when the connection is lost (the default), 'always' also "
        "after the server announced a shutdown (a planned restart), 'never'",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument(
        "--cafile",
        metavar="PEM",
        help="trust the CA certificates in this file (implies --tls; "
        "default: the system's trusted CAs)",
    )
    parser.add_argument(
        "--timestamps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show the local time before each chat line, [12:04] (default: "
        "on a terminal, not when the output goes to a pipe or a file)",
    )
    return parser


def _reconnect_policy(args: argparse.Namespace) -> Reconnect | None:
    if args.reconnect == "never":
        return None
    # A line typed while reconnecting waits for the connection (it is
    # queued: reading input goes on), however long that takes.
    return Reconnect(after_shutdown=args.reconnect == "always", request_timeout=None)


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.cafile):
        return None
    return ssl.create_default_context(cafile=args.cafile)


class ChatShell:
    """Turns typed lines into client calls and events into text lines.

    Args:
        client: a connected client.
        print_line: where text for the user goes.
    """

    def __init__(self, client: ChatClient, print_line: _Printer) -> None:
        self.client = client
        self.room = LOBBY
        """The room typed lines go to."""
        self._print = print_line
        self._greeted = False
        self._lost: str | None = None  # why, while reconnecting
        # The room we just joined: the topic that may come next (the
        # server's, without a ref) is its topic to show, not a change.
        self._joining: str | None = None

    def describe(self, event: ServerEvent | ClientEvent) -> str | None:
        """The text shown for ``event`` (``None`` to show nothing)."""
        me = self.client.name
        joining, self._joining = self._joining, None
        match event:
            case Interrupted(reason=reason):
                self._lost = _said_once(reason)
                return None  # said with the first Reconnecting
            case Reconnecting(attempt=1, delay=delay):
                return (
                    f"*** connection lost ({self._lost}),"
                    f" reconnecting in {delay:.1f}s..."
                )
            case Reconnecting(delay=delay, error=error):
                return f"*** reconnect failed ({error}), retrying in {delay:.1f}s..."
            case Reconnected(missed=missed):
                self._lost = None
                plural = "" if missed == 1 else "s"
                return f"*** reconnected; {missed or 'no'} missed message{plural}"
            case Message(room=room, sender=sender, text=text):
                prefix = "" if room == LOBBY else f"[{room}] "
                return f"{prefix}{sender}: {text}"
            case DirectMessage(sender=sender, to=to, text=text):
                if sender == me and to != me:
                    return f"(private to {to}) {sender}: {text}"
                return f"{sender} (private): {text}"
            case Joined(room=room, name=name):
                if name == me:
                    self._joining = room
                    if room == LOBBY and not self._greeted:
                        self._greeted = True  # the welcome banner said it
                        return None
                    return f"You joined {room}."
                return f"{name} has joined {_where(room)}."
            case Left(room=room, name=name, reason=reason):
                if name == me:
                    return f"You left {room}."
                return f"{name} has left {_where(room, reason)}."
            case Renamed(old=old, new=new):
                if new == me:
                    return f"You are now known as {new}."
                return f"{old} is now known as {new}."
            case Moderated():
                rooms = self.client.joined_rooms
                if self.room not in rooms and LOBBY in rooms:
                    self.room = LOBBY  # put out of the room we talked in
                return describe_moderated(event, me)
            case TopicReply(room=room, text=text, ref=None) if room == joining:
                return f"Topic of {room}: {text}"
            case TopicReply():
                return describe_topic(event, me)
            case ModesReply(room=room, by=by):
                who = "You" if by == me else by
                modes = describe_modes(event)
                if who is None:
                    return f"Modes of {room}: {modes}"
                return f"* {who} set modes of {room}: {modes}"
            case ErrorReply(message=message, code=code):
                return f"Error: {message} ({code})"
            case Shutdown(reason=reason):
                return _shutting_down(reason)
        return None

    def farewell(self) -> str | None:
        """What to show when the client ended by itself, not closed by the
        user: why reconnecting failed, if it did."""
        if self._lost is None:
            return None
        return f"*** {self.client.close_reason}"

    async def handle(self, line: str) -> bool:
        """Act on one typed line; False when the user wants to leave."""
        if line.strip() in ("exit", "/quit"):
            return False
        await self.send(line)
        return True

    async def send(self, line: str) -> bool:
        """Act on one typed line (a message or a command); False when the
        server refused it (the error is shown).

        Raises:
            ConnectionClosed: the connection is gone for good.
        """
        text = line.strip()
        if not text:
            return True
        try:
            if text.startswith("/"):
                await self._command(text)
            else:
                await self.client.say(line, room=self.room)
        except RequestError as exc:
            # Lost for good ends the chat; lost for a while is an error.
            if isinstance(exc, ConnectionClosed) and not self.client.reconnecting:
                raise
            self._print(f"Error: {exc.message} ({exc.code})")
            return False
        return True

    async def _command(self, text: str) -> None:
        command, _, rest = text.partition(" ")
        rest = rest.strip()
        client = self.client
        match command, rest.split():
            case "/join", [room]:
                await client.join(room)
                self.room = room
            case "/leave", [] | [_]:
                room = rest or self.room
                await client.leave(room)
                if room == self.room:
                    self.room = LOBBY if LOBBY in client.joined_rooms else room
            case "/room", [room]:
                if room not in client.joined_rooms:
                    self._print(f"You are not in {room}; /join {room} first.")
                else:
                    self.room = room
                    self._print(f"Talking in {room}.")
            case "/msg", [to, _, *_]:
                await client.dm(to, rest.partition(" ")[2].strip())
            case "/nick", [name]:
                await client.nick(name)
            case "/who", [] | [_]:
                room = rest or self.room
                names = await client.who(room)
                self._print(f"In {room}: {', '.join(names) or 'nobody'}")
            case "/rooms", []:
                rooms = await client.rooms()
                listing = ", ".join(
                    f"{name} ({count})" for name, count in rooms.items()
                )
                self._print(f"Rooms: {listing}")
            case "/history", words:
                await self._history(words)
            case "/help", []:
                self._print(HELP)
            case _ if command in MODERATION_COMMANDS:
                if not await moderate(client, self.room, command, rest, self._print):
                    self._print(_usage(command))
            case _ if command in _USAGE:
                self._print(_usage(command))
            case _:
                await self._plugin_command(command, rest)

    async def _plugin_command(self, command: str, args: str) -> None:
        # Not ours: a command of the server's plugins, about this room.
        unknown = f"Unknown command {command}. Type /help for commands."
        name = command[1:]
        if not is_valid_name(name):  # the server's rule for command names
            self._print(unknown)
            return
        try:
            reply = await self.client.command(name, args, room=self.room)
        except BadRequest:  # no plugin knows it
            self._print(unknown)
            return
        self._print(reply.text)

    async def _history(self, words: list[str]) -> None:
        # /history [ROOM] [N] [before ID | after ID], read from the right.
        room, count, page = self.room, 20, None
        if len(words) >= 2 and words[-2] in ("before", "after"):
            number = words[-1].removeprefix("#")
            if not _is_number(number):
                self._print(_usage("/history"))
                return
            page, words = (words[-2], int(number)), words[:-2]
        if words and _is_number(words[-1]):
            count, words = int(words[-1]), words[:-1]
        if len(words) > 1 or count < 1:
            self._print(_usage("/history"))
            return
        if words:
            room = words[0]
        direction, pivot = page if page is not None else ("last", 0)
        forward = direction == "after"
        client = self.client
        # One more than is shown: if it comes, there is more to page to.
        found = await client.history(
            room,
            min(count + 1, MAX_INT),
            before=pivot if direction == "before" else None,
            after=pivot if forward else None,
        )
        shown = found[:count] if forward else found[max(0, len(found) - count) :]
        if not shown:
            where = "" if page is None else f" {direction} #{pivot}"
            self._print(f"No messages{where} in {room}.")
            return
        if len(found) > count:
            more = True
        else:
            # A short page is the end, unless the server cut it (its page
            # size, or a page of long messages): only an empty page says
            # for sure that there is no more.
            beyond = await client.history(
                room,
                1,
                before=None if forward else shown[0].id,
                after=shown[-1].id if forward else None,
            )
            more = bool(beyond)
        if page is None:
            self._print(f"--- last {len(shown)} in {room} ---")
        else:
            self._print(f"--- {len(shown)} {direction} #{pivot} in {room} ---")
        for message in shown:
            self._print(f"{message.sender}: {message.text}")
        if more:
            # How to get the next page.
            edge = f"after {shown[-1].id}" if forward else f"before {shown[0].id}"
            self._print(f"(more: /history {room} {count} {edge})")


def _command_usages(help_text: str) -> dict[str, str]:
    """Each command's lines of ``help_text``, by command (``"/join"``)."""
    usages: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for line in help_text.splitlines()[1:]:
        if line.startswith("  /"):
            lines = usages.setdefault(line.split()[0], [])
        if lines is not None:
            lines.append(line)
    return {command: "\n".join(lines) for command, lines in usages.items()}


# What a command used wrongly shows: its lines of HELP.
_USAGE = MappingProxyType(_command_usages(HELP))


def _usage(command: str) -> str:
    return f"Usage:\n{_USAGE[command]}"


def _is_number(word: str) -> bool:
    # ASCII digits only: str.isdigit() also accepts "²" or "①", which int()
    # refuses. And a number a request can carry (a count or a message id):
    # 0 to MAX_INT (int() also refuses more than 4,300 digits).
    if not (word.isascii() and word.isdigit()) or len(word.lstrip("0")) > 19:
        return False
    return int(word) <= MAX_INT


def _where(room: str, reason: str | None = None) -> str:
    # "the chat" is the server (as in the original program): lobby, unless
    # someone left lobby alone (a leave request) and is still connected.
    return "the chat" if room == LOBBY and reason != "leave" else room


def _shutting_down(reason: str) -> str:
    if _says_nothing_more(reason):
        return "*** Server is shutting down."
    return f"*** Server is shutting down: {reason}"


def _said_once(reason: str) -> str:
    """``reason`` without a repeat: the client words a shutdown as
    ``server shutting down: REASON``, and the server's default reason is
    ``server shutting down``."""
    head, colon, rest = reason.partition(": ")
    return head if colon and _says_nothing_more(rest) else reason


def _says_nothing_more(reason: str) -> bool:
    # The server's default reason only says "shutting down" again.
    return reason.strip().rstrip(".").lower() in _SAYS_NOTHING_MORE


_SAYS_NOTHING_MORE = frozenset(
    ("", "shutdown", "shutting down", "server shutting down", "server is shutting down")
)


async def run_client(args: argparse.Namespace, console: Console) -> int:
    """Run the chat client; returns the exit status."""
    console.print("Welcome to the chat client!")
    name: str | None = args.name
    where = f"{args.host}:{args.port}"
    ssl_context = _tls_context(args)
    theme = Theme(
        timestamps=console.interactive if args.timestamps is None else args.timestamps,
        colour=console.interactive and not os.environ.get("NO_COLOR"),
    )
    while True:
        stream: trio.abc.Stream | None = None
        try:
            if name is None:
                # Connect first: no name asked of a person for nothing.
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await open_stream(
                        args.host, args.port, ssl_context=ssl_context
                    )
                name = await console.read_line("Enter your username: ", keep=True)
                if name is None:
                    await stream.aclose()
                    return 0
                name = name.strip()
            async with open_client(
                args.host,
                args.port,
                name=name,
                token=args.token,
                ssl_context=ssl_context,
                reconnect=_reconnect_policy(args),
                stream=stream,
            ) as client:
                shell = ChatShell(
                    client, lambda text: console.print(theme.answer(text))
                )
                return await chat(client, console, shell, theme, commands=tuple(_USAGE))
        except (NameTaken, BadName) as exc:
            console.print(f"Error: {exc.message}")
            if args.name is not None:
                return 1
            name = None  # ask again, as for a fresh start
        except RequestError as exc:
            console.print(f"Error: {exc.message} ({exc.code})")
            return 1
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            # BrokenResourceError: the TLS handshake failed (e.g. wrong CA);
            # TooSlowError: no welcome within the connect timeout (a hung
            # server, or another service on that port).
            console.print(f"Error: cannot connect to {where}: {describe_error(exc)}")
            return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m chatkit.client``; returns the exit status."""
    args = build_parser().parse_args(argv)
    # Standard input closed (sys.stdin is None) reads as end of input; its
    # number is not ours to read once trio runs (trio may reuse it).
    console = Console(stdin_fd=-1 if sys.stdin is None else 0, prompt="")
    try:
        with console.raw_mode():
            return trio.run(run_client, args, console)
    except KeyboardInterrupt:  # Ctrl-C before we were connected
        return 130


if __name__ == "__main__":
    sys.exit(main())
