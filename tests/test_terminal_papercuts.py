"""Issue 19's papercuts, as a person meets them: the terminal client on a
pty (what the screen shows) and the command-line programs' errors."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest

import chatkit
from chatkit.client.__main__ import HELP
from tests.programs import Launch, start_server
from tests.terminal import OpenTerminal, Terminal, open_chat

# Lines of chat may start with a time stamp, "[12:04] ".
STAMP = re.compile(r"^\[\d\d:\d\d\] ")
# The line being typed: "> text", or "[lobby]> text".
PROMPT = re.compile(r"^(\[[\w.-]+\])?>( |$)")

_marks = itertools.count()


def printed(term: Terminal) -> list[str]:
    """Every line the program printed (the scrollback, then the screen),
    time stamps removed, the line being typed left out."""
    return [STAMP.sub("", line) for line in term.transcript() if not PROMPT.match(line)]


async def open_client(terminal: OpenTerminal, port: int, name: str) -> Terminal:
    return await open_chat(terminal, port, name, type_name=False, columns=110, lines=40)


async def mark(term: Terminal) -> str:
    """Print a line of our own (a refused /room): everything printed
    before it was printed for what was typed before it."""
    room = f"mark{next(_marks)}"
    line = f"You are not in {room}; /join {room} first."
    term.type(f"/room {room}\r")
    await term.wait_for(lambda term: line in printed(term))
    return line


async def output_of(term: Terminal, typed: str) -> list[str]:
    """The lines the client prints for the line ``typed``."""
    start = await mark(term)
    term.type(typed + "\r")
    end = await mark(term)
    lines = printed(term)
    return lines[lines.index(start) + 1 : lines.index(end)]


# --- numbers on the command line ---------------------------------------------


@pytest.mark.parametrize(
    ("program", "argv", "error"),
    [
        (
            "server",
            ["--port", "99999"],
            "argument --port: must be from 0 to 65535 (0: a free one), not 99999",
        ),
        (
            "server",
            ["--port", "-1"],
            "argument --port: must be from 0 to 65535 (0: a free one), not -1",
        ),
        (
            "server",
            ["--port", "http"],
            "argument --port: must be an integer, not 'http'",
        ),
        (
            "client",
            ["--port", "-5"],
            "argument --port: must be from 1 to 65535, not -5",
        ),
        (
            "client",
            ["--port", "0"],
            "argument --port: must be from 1 to 65535, not 0",
        ),
        (
            "client",
            ["--port", "65536"],
            "argument --port: must be from 1 to 65535, not 65536",
        ),
        (
            "server",
            ["--max-connections-per-address", "-1"],
            "argument --max-connections-per-address: must be at least 0, not -1",
        ),
        (
            "server",
            ["--presence-limit", "-2"],
            "argument --presence-limit: must be at least -1, not -2",
        ),
        ("server", ["--rate-limit", "-1"], "argument --rate-limit: must be 0 or more"),
        (
            "server",
            ["--idle-timeout", "nan"],
            "argument --idle-timeout: must be 0 or more, not nan",
        ),
        (
            "server",
            ["--tcp-user-timeout", "-5"],
            "argument --tcp-user-timeout: must be 0 or more, not -5",
        ),
        (
            "server",
            ["--rename-interval", "-1"],
            "argument --rename-interval: must be 0 or more, not -1",
        ),
        (
            "server",
            ["--name-ttl", "0"],
            "argument --name-ttl: must be positive, not 0",
        ),
        (
            "server",
            ["--db", "chat.sqlite3", "--history-max-age", "nan"],
            "error: --history-max-age must be positive, not nan",
        ),
    ],
)
async def test_numbers_out_of_range_are_usage_errors(
    launch: Launch, tmp_path: Path, program: str, argv: list[str], error: str
) -> None:
    # The server used to listen on 34463 for 99999 (the number wrapped), the
    # client to say "Servname not supported for ai_socktype" for -5.
    extra = ["--no-interactive"] if program == "server" else ["--name", "alice"]
    if program == "server" and "--port" not in argv:
        extra += ["--port", "0"]
    if program == "server" and "--db" not in argv:
        extra += ["--no-db"]
    process = await launch(program, *argv, *extra)
    assert await process.wait() == 2
    output = await process.rest()
    assert output[-1].startswith(f"python -m chatkit.{program}: error: "), output
    assert error in output[-1]
    assert os.listdir(tmp_path) == []  # and no database


def test_a_server_refuses_a_port_out_of_range() -> None:
    with pytest.raises(ValueError, match="port must be from 0 to 65535, not 65536"):
        chatkit.ChatServer(port=65536)


# --- a server that cannot listen ---------------------------------------------


async def test_a_server_that_cannot_listen_creates_no_database(
    launch: Launch, tmp_path: Path
) -> None:
    _first, port = await start_server(launch, "--no-db")
    second = await launch("server", "--port", str(port), "--no-interactive")
    assert await second.wait() == 1
    assert (await second.rest())[-1].startswith(
        f"error: cannot listen on 127.0.0.1:{port}: "
    )
    assert os.listdir(tmp_path) == []


# --- /history ----------------------------------------------------------------


async def say(server: chatkit.ChatServer, *texts: str) -> list[int]:
    """bob says ``texts`` in lobby (and leaves); their ids."""
    async with chatkit.open_client("127.0.0.1", server.port, name="bob") as bob:
        return [(await bob.say(text)).id for text in texts]


async def test_history_offers_more_only_when_there_is_more(
    server: chatkit.ChatServer, terminal: OpenTerminal
) -> None:
    m1, m2, m3 = await say(server, "m1", "m2", "m3")
    term = await open_client(terminal, server.port, "alice")
    # Exactly the whole history: nothing more to offer.
    assert await output_of(term, "/history lobby 3") == [
        "--- last 3 in lobby ---",
        "bob: m1",
        "bob: m2",
        "bob: m3",
    ]
    assert await output_of(term, "/history lobby 2") == [
        "--- last 2 in lobby ---",
        "bob: m2",
        "bob: m3",
        f"(more: /history lobby 2 before {m2})",
    ]
    assert await output_of(term, f"/history lobby 2 before {m2}") == [
        f"--- 1 before #{m2} in lobby ---",
        "bob: m1",
    ]
    assert await output_of(term, f"/history lobby 2 after {m1}") == [
        f"--- 2 after #{m1} in lobby ---",
        "bob: m2",
        "bob: m3",
    ]
    assert await output_of(term, f"/history lobby 1 after #{m1}") == [
        f"--- 1 after #{m1} in lobby ---",
        "bob: m2",
        f"(more: /history lobby 1 after {m2})",
    ]
    # An empty page is a sentence.
    assert await output_of(term, f"/history lobby 3 before {m1}") == [
        f"No messages before #{m1} in lobby."
    ]
    assert await output_of(term, f"/history after {m3}") == [
        f"No messages after #{m3} in lobby."
    ]


async def test_history_in_an_empty_room(
    server: chatkit.ChatServer, terminal: OpenTerminal
) -> None:
    term = await open_client(terminal, server.port, "alice")
    assert await output_of(term, "/history") == ["No messages in lobby."]


async def test_history_offers_more_past_the_servers_page_size(
    terminal: OpenTerminal,
) -> None:
    # The server sends at most 2 messages a page, whatever is asked: a short
    # page is not the end.
    limits = chatkit.Limits(max_history_page=2)
    async with chatkit.open_server(limits=limits) as server:
        _m1, m2, _m3 = await say(server, "m1", "m2", "m3")
        term = await open_client(terminal, server.port, "alice")
        assert await output_of(term, "/history lobby 5") == [
            "--- last 2 in lobby ---",
            "bob: m2",
            "bob: m3",
            f"(more: /history lobby 5 before {m2})",
        ]
        assert await output_of(term, "/history lobby 2") == [
            "--- last 2 in lobby ---",
            "bob: m2",
            "bob: m3",
            f"(more: /history lobby 2 before {m2})",
        ]
        assert await output_of(term, f"/history lobby 2 before {m2}") == [
            f"--- 1 before #{m2} in lobby ---",
            "bob: m1",
        ]


# --- a command used wrongly ----------------------------------------------------


def help_about(command: str) -> list[str]:
    """The lines of /help about ``command``."""
    lines = HELP.splitlines()
    start = next(n for n, line in enumerate(lines) if line.split()[:1] == [command])
    end = start + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    return lines[start:end]


async def test_a_command_used_wrongly_shows_its_usage(
    server: chatkit.ChatServer, terminal: OpenTerminal
) -> None:
    # It used to say "Usage: see /help for /join" (and "Unknown command
    # /leave" for /leave used wrongly).
    term = await open_client(terminal, server.port, "alice")
    assert help_about("/join") == [
        "  /join ROOM        join ROOM (created if needed) and talk there"
    ]
    assert len(help_about("/history")) == 3
    for typed, command in [
        ("/join", "/join"),
        ("/join a b", "/join"),
        ("/leave a b", "/leave"),
        ("/room", "/room"),
        ("/msg bob", "/msg"),
        ("/nick", "/nick"),
        ("/who a b", "/who"),
        ("/rooms all", "/rooms"),
        ("/help me", "/help"),
        ("/quit now", "/quit"),
        ("/history a b", "/history"),
        ("/history 0", "/history"),
        ("/history lobby 2 before me", "/history"),
    ]:
        assert await output_of(term, typed) == ["Usage:", *help_about(command)], typed
    assert await output_of(term, "/bogus") == [
        "Unknown command /bogus. Type /help for commands."
    ]


# --- what others' comings and goings, and the server's, read -----------------


async def test_leaving_lobby_is_not_leaving_the_chat(
    server: chatkit.ChatServer, terminal: OpenTerminal
) -> None:
    term = await open_client(terminal, server.port, "alice")
    async with chatkit.open_client("127.0.0.1", server.port, name="bob") as bob:
        await term.wait_for(lambda term: "bob has joined the chat." in printed(term))
        await bob.leave("lobby")  # bob is still connected
        await term.wait_for(lambda term: "bob has left lobby." in printed(term))
        await bob.join("lobby")
        await term.wait_for(
            lambda term: printed(term).count("bob has joined the chat.") == 2
        )
    # Now bob is gone: from the chat, as the original program says it.
    await term.wait_for(lambda term: "bob has left the chat." in printed(term))
    assert [line for line in printed(term) if line.startswith("bob has left")] == [
        "bob has left lobby.",
        "bob has left the chat.",
    ]


@pytest.mark.parametrize(
    ("reason", "shown"),
    [
        (None, "*** Server is shutting down."),
        ("back in 5 minutes", "*** Server is shutting down: back in 5 minutes"),
    ],
)
async def test_the_shutdown_notice_says_the_reason_once(
    terminal: OpenTerminal, reason: str | None, shown: str
) -> None:
    async with chatkit.open_server() as server:
        term = await open_client(terminal, server.port, "alice")
        if reason is None:
            await server.aclose()  # the default reason: "server shutting down"
        else:
            await server.aclose(reason=reason)
        assert await term.wait_exit() == 0
    lines = printed(term)
    assert shown in lines, lines
    assert not [line for line in lines if "shutting down: server shutting" in line]
