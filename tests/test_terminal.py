"""The terminal client as a person sees it: ``python -m chatkit.client`` on a
pseudo-terminal, its screen rendered by pyte (tests/terminal.py).

Each test types as a person would and asserts the screen: the name prompt,
one prompt after each line, the lines you sent, a clean screen after exit,
a line wider than the terminal while messages arrive, lines typed while
reconnecting, the keys of the line editor, time stamps and colours.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from .programs import Launch, Program, start_client, start_server
from .terminal import NAME_ROW, OpenTerminal, Terminal, open_chat


async def alice_with_bob(
    launch: Launch, terminal: OpenTerminal, *, columns: int = 80, lines: int = 24
) -> tuple[Terminal, Program]:
    """alice on a terminal (no time stamps), then bob, piped, whom she sees
    join."""
    _server, port = await start_server(launch)
    term = await open_chat(
        terminal, port, "alice", "--no-timestamps", columns=columns, lines=lines
    )
    bob = await start_client(launch, port, "bob")
    await term.wait_for("bob has joined the chat.")
    return term, bob


def prompt_row(term: Terminal) -> str:
    """The row the cursor is on: the prompt and what is being typed."""
    return term.rows()[term.cursor[0]]


def count_rows(term: Terminal, text: str) -> int:
    return sum(text in row for row in term.rows())


async def test_the_name_is_asked_once_and_stays_on_the_screen(
    launch: Launch, terminal: OpenTerminal
) -> None:
    # Items 1 and 3: no stray prompt before the question; the answer stays.
    _server, port = await start_server(launch)
    term = await terminal("client", "--port", str(port))
    await term.wait_for(NAME_ROW)
    assert term.rows()[:2] == ["Welcome to the chat client!", NAME_ROW]
    assert term.cursor == (1, len(NAME_ROW) + 1)
    term.type("alice\r")
    await term.wait_for("Hello, alice!")
    rows = term.rows()
    assert rows[:3] == [
        "Welcome to the chat client!",
        "Enter your username: alice",
        "Hello, alice! Type 'exit' to leave the chat.",
    ]
    assert ">" not in "".join(rows[:3])


async def test_one_prompt_after_every_line_and_your_lines_shown_as_sent(
    launch: Launch, terminal: OpenTerminal
) -> None:
    # Items 2 and 3: six sends, each leaves one empty prompt (never "> >"),
    # and each line shows once, as sent (the server's copy is not shown
    # again), in the order sent.
    _server, port = await start_server(launch)
    bob = await start_client(launch, port, "bob")
    term = await open_chat(terminal, port, "alice", "--no-timestamps")
    for number in range(6):
        term.type(f"line {number}\r")
        await bob.expect(rf"^alice: line {number}$")
        await term.settle(0.2)
        assert "> >" not in term.text()
        assert prompt_row(term) == "[lobby]>"
        assert term.cursor[1] == len("[lobby]> ")
    rows = term.rows()
    sent = [row for row in rows if row.startswith("alice: line")]
    assert sent == [f"alice: line {number}" for number in range(6)]


async def test_a_line_typed_while_messages_arrive_is_redrawn_below_them(
    launch: Launch, terminal: OpenTerminal
) -> None:
    # Item 5: a line wider than the terminal (three rows of 40 columns):
    # each message arrives above it, the line is redrawn whole below, no
    # row of it is left behind; Enter sends it whole.
    term, bob = await alice_with_bob(launch, terminal, columns=40)
    typed = "".join(f"{i:02d}." for i in range(34))[:100]  # no row repeats
    term.type(typed)
    await term.settle(0.2)
    for number in range(3):
        await bob.send(f"message {number}\n")
        await term.wait_for(f"bob: message {number}")
    await term.settle(0.2)
    rows = term.rows()
    assert sum(row.count(typed[:9]) for row in rows) == 1  # no leftover rows
    last = max(i for i, row in enumerate(rows) if row)
    expected = "[lobby]> " + typed
    assert rows[last - 2 : last + 1] == [expected[:40], expected[40:80], expected[80:]]
    assert [row for row in rows if row.startswith("bob: message")] == [
        "bob: message 0",
        "bob: message 1",
        "bob: message 2",
    ]
    assert rows.index("bob: message 2") == last - 3  # right above the input
    for piece in (expected[:40], expected[40:80], expected[80:]):
        assert rows.count(piece) == 1  # no leftover rows
    assert term.cursor == (last, len(expected) - 80)
    term.type("\r")
    await bob.expect(rf"^alice: {typed}$")


async def test_a_huge_paste_keeps_the_screen_clean(
    launch: Launch, terminal: OpenTerminal
) -> None:
    # Item 5: 100 KB typed at once shows as the rows around the cursor (the
    # screen less a row), messages still arrive above it; Ctrl-U leaves no
    # trace of it.
    term, bob = await alice_with_bob(launch, terminal, lines=24)
    await term.paste("x" * 100_000)
    await term.settle(0.3)
    await bob.send("still here\n")
    await term.wait_for("bob: still here")
    await term.settle(0.3)
    rows = term.rows()
    assert rows[0] == "bob: still here"
    # The input area: the screen's 24 rows less one, the cursor's last.
    assert rows[1:24] == ["x" * 80] * 22 + ["x" * (100_009 % 80)]
    assert term.cursor == (23, 100_009 % 80)
    term.type("\x15")  # Ctrl-U: the line is gone, and so are its rows
    await term.settle(0.3)
    assert "x" not in term.text().replace("Exiting", "")
    assert prompt_row(term) == "[lobby]>"


@pytest.mark.parametrize("how", ["exit", "ctrl-c", "server-shutdown"])
async def test_after_exit_the_screen_is_clean(
    launch: Launch, terminal: OpenTerminal, how: str
) -> None:
    # Item 4: no prompt, no half-typed text left; the cursor at the start
    # of an empty row, where the shell's prompt goes.
    server, port = await start_server(launch)
    term = await open_chat(terminal, port, "alice", "--no-timestamps")
    term.type("half typed")
    await term.wait_for("half typed")
    if how == "exit":
        term.type("\x15exit\r")
    elif how == "ctrl-c":
        term.type("\x03")
    else:
        server.process.send_signal(signal.SIGINT)
    assert await term.wait_exit() == 0
    rows = term.rows()
    assert "half typed" not in term.text()
    assert "[lobby]>" not in term.text()
    row, column = term.cursor
    assert column == 0 and rows[row] == ""
    assert rows[row - 1] == "Disconnected."


async def test_lines_typed_while_reconnecting_are_sent_once_back(
    launch: Launch, terminal: OpenTerminal
) -> None:
    # Item 6: while the server is away, typing echoes at once, each line
    # entered is shown as waiting; once the connection is back they are
    # sent in order, shown once each, and the waiting rows go.
    server, port = await start_server(launch)
    term = await open_chat(terminal, port, "alice", "--no-timestamps")
    server.process.kill()
    await server.wait()
    await term.wait_for("connection lost")
    for line in ("first", "second", "third"):
        with trio.fail_after(1):  # never blocked: the echo comes at once
            term.type(line)
            await term.wait_for(lambda t, line=line: prompt_row(t).endswith(line))
        term.type("\r")
        await term.wait_for(f"(waiting to send) {line}")
    assert prompt_row(term) == "[lobby]>"
    _server2, _ = await start_server_on(launch, port)
    # The client's next attempt may be up to ~8 s away (its backoff).
    await term.wait_for("*** reconnected", within=30)
    await term.wait_for(re_row("alice: third"))
    # Stored, in order: the server's history has them.
    bob = await start_client(launch, port, "bob")
    await bob.send("/history lobby 3\n")
    await bob.expect(r"^--- last 3 in lobby ---$")
    assert [await bob.read_line() for _ in range(3)] == [
        "alice: first",
        "alice: second",
        "alice: third",
    ]
    await term.wait_for(lambda t: "waiting to send" not in t.text())
    await term.settle(0.2)
    sent = [row for row in term.rows() if re.fullmatch(r"alice: \w+", row)]
    assert sent == ["alice: first", "alice: second", "alice: third"]
    assert prompt_row(term) == "[lobby]>"


async def start_server_on(launch: Launch, port: int) -> tuple[Program, int]:
    """The server again on ``port`` (the first one's), once it is free."""
    with trio.fail_after(10):
        while True:
            server = await launch("server", "--port", str(port))
            line = await server.read_line()
            if line.startswith("Server started"):
                return server, port
            await server.wait()
            await trio.sleep(0.2)


async def test_no_server_is_said_before_any_name_is_asked(
    terminal: OpenTerminal,
) -> None:
    # Item 8: connect first; a refused connection says what it means.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there
    term = await terminal("client", "--port", str(port), columns=120)
    assert await term.wait_exit() == 1
    assert term.rows()[:2] == [
        "Welcome to the chat client!",
        f"Error: cannot connect to 127.0.0.1:{port}: connection refused: "
        "is the server running?",
    ]
    assert NAME_ROW not in term.text()


async def test_the_original_programs_transcript_line_for_line(
    launch: Launch, terminal: OpenTerminal
) -> None:
    # ../shared/original/README-original-chat.md, "Client Output": every
    # line chatkit keeps, on the screen in that order, each a row of its own.
    _server, port = await start_server(launch)
    term = await terminal("client", "--port", str(port), "--no-timestamps")
    await term.wait_for(NAME_ROW)
    term.type("user1\r")
    await term.wait_for("Hello, user1!")
    term.type("Hello, world!\r")
    await term.wait_for("user1: Hello, world!")
    term.type("exit\r")
    assert await term.wait_exit() == 0
    original = [
        "Welcome to the chat client!",
        "Enter your username: user1",
        "Hello, user1! Type 'exit' to leave the chat.",
        "user1: Hello, world!",
        "Exiting chat...",
    ]
    rows = [row for row in term.rows() if row]
    assert [row for row in rows if row in original] == original
    assert rows == [
        *original[:3],
        "Type /help for commands.",
        *original[3:],
        "Disconnected.",
    ]


async def test_editing_keys_history_and_tab(
    launch: Launch, terminal: OpenTerminal
) -> None:
    _server, port = await start_server(launch)
    bob = await start_client(launch, port, "bob")
    carol = await start_client(launch, port, "carol")
    await carol.send("/join kitchen\n")
    await carol.expect("You joined kitchen")
    term = await open_chat(terminal, port, "alice", "--no-timestamps")
    # Names of people and rooms there before alice came, silent so far.
    term.type("c\t")
    await term.wait_for(lambda t: prompt_row(t) == "[lobby]> carol")
    term.type("\x15k\t")
    await term.wait_for(lambda t: prompt_row(t) == "[lobby]> kitchen")
    term.type("\x15")
    # Left/right, Ctrl-A/E: "world" becomes "hello world!".
    term.type("world\x01hello \x05!\r")
    await bob.expect(r"^alice: hello world!$")
    # Ctrl-W erases a word, Ctrl-K the rest of the line, arrows move.
    term.type("one two three\x17\x1b[D\x1b[D\x0b\r")  # "one two " -> "one tw"
    await bob.expect(r"^alice: one tw$")
    # Up brings back earlier lines, Down returns to what was being typed.
    term.type("draft\x1b[A")
    await term.wait_for(lambda t: prompt_row(t) == "[lobby]> one tw")
    term.type("\x1b[A")
    await term.wait_for(lambda t: prompt_row(t) == "[lobby]> hello world!")
    term.type("\x1b[B\x1b[B")
    await term.wait_for(lambda t: prompt_row(t) == "[lobby]> draft")
    term.type("\x15")
    # Tab completes commands, then names seen and rooms.
    await bob.send("hi\n")
    await term.wait_for("bob: hi")
    term.type("/jo\t")
    await term.wait_for(lambda t: prompt_row(t) == "[lobby]> /join")
    term.type("dev\r")
    await term.wait_for(lambda t: prompt_row(t) == "[dev]>")  # the room shown
    term.type("thanks b\t")
    await term.wait_for(lambda t: prompt_row(t) == "[dev]> thanks bob")
    term.type("\x15/r\t")  # several: as far as they agree...
    await term.wait_for(lambda t: prompt_row(t) == "[dev]> /room")
    term.type("\t")  # ...then listed above the prompt
    await term.wait_for("/room  /rooms")
    assert prompt_row(term) == "[dev]> /room"


async def test_time_stamps_and_colours_on_a_terminal(
    launch: Launch, terminal: OpenTerminal
) -> None:
    _server, port = await start_server(launch)
    bob = await start_client(launch, port, "bob")
    term = await open_chat(terminal, port, "alice")
    await bob.send("hey alice, look\n")
    await term.wait_for("bob: hey alice, look")
    row = next(r for r, text in enumerate(term.rows()) if "bob: hey" in text)
    text = term.rows()[row]
    assert re.fullmatch(r"\[\d\d:\d\d\] bob: hey alice, look", text)
    line = term.screen.buffer[row]
    at = text.index("alice")
    assert line[at].bold and line[at].fg == "brown"  # the mention: bold yellow
    assert not line[text.index("hey")].bold  # the rest: plain
    assert line[text.index("bob")].bold  # the sender's name
    term.type("mine\r")
    await term.wait_for(re_row(r"\[\d\d:\d\d\] alice: mine"))


async def test_no_color_and_no_timestamps(
    launch: Launch, terminal: OpenTerminal
) -> None:
    _server, port = await start_server(launch)
    bob = await start_client(launch, port, "bob")
    term = await open_chat(
        terminal, port, "alice", "--no-timestamps", env={"NO_COLOR": "1"}
    )
    await bob.send("hey alice\n")
    await term.wait_for("bob: hey alice")
    assert b"\x1b[1m" not in term.raw and b"\x1b[2m" not in term.raw
    assert "bob: hey alice" in term.rows()


async def test_piped_input_gives_a_plain_transcript(launch: Launch) -> None:
    # Scripted use: lines in, a transcript out, exit at the end of input;
    # no time stamps and not one escape code.
    _server, port = await start_server(launch)
    alice = await launch("client", "--port", str(port))
    await alice.send("alice\nhello\n/join dev\nin dev\n")
    await alice.close_stdin()
    assert await alice.wait() == 0
    await alice.rest()
    transcript = alice.output
    assert "\x1b" not in "".join(transcript)
    assert transcript == [
        "Welcome to the chat client!",
        "Enter your username: Hello, alice! Type 'exit' to leave the chat.",
        "Type /help for commands.",
        "alice: hello",
        "You joined dev.",
        "[dev] alice: in dev",
        "Exiting chat...",
        "Disconnected.",
    ]


def re_row(pattern: str) -> Callable[[Terminal], bool]:
    """A condition: some row of the screen matches ``pattern`` whole."""
    return lambda t: any(re.fullmatch(pattern, row) for row in t.rows())


CLI_DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
SCREEN_BLOCK = re.compile(
    r"(<!-- screen: captured by tests/test_terminal.py -->\n```\n)(.*?)(```\n)",
    re.DOTALL,
)


async def test_the_screen_shown_in_the_cli_docs(
    launch: Launch, terminal: OpenTerminal
) -> None:
    """docs/cli.md shows a screen this test captures (time stamps set to
    12:04); run with CHATKIT_WRITE_DOCS=1 to write it there."""
    _server, port = await start_server(launch)
    term = await terminal("client", "--port", str(port), columns=80, lines=16)
    await term.wait_for(NAME_ROW)
    term.type("alice\r")
    await term.wait_for("Type /help for commands.")
    bob = await start_client(launch, port, "bob")
    await term.wait_for("bob has joined the chat.")
    term.type("hello everyone\r")
    await bob.expect(r"^alice: hello everyone$")
    await bob.send("hi alice\n/msg alice psst\n")
    await term.wait_for("bob (private): psst")
    term.type("/join kitchen\r")
    await term.wait_for("[kitchen]>")
    carol = await start_client(launch, port, "carol")
    await carol.send("/join kitchen\nthe kettle is on\n")
    await term.wait_for("[kitchen] carol: the kettle is on")
    await bob.send("exit\n")
    await term.wait_for("bob has left the chat.")
    term.type("see you")
    await term.wait_for("[kitchen]> see you")
    await term.settle(0.2)
    screen = re.sub(r"^\[\d\d:\d\d\]", "[12:04]", term.text(), flags=re.MULTILINE)
    text = CLI_DOC.read_text()
    match = SCREEN_BLOCK.search(text)
    assert match, "docs/cli.md has no captured screen block"
    if os.environ.get("CHATKIT_WRITE_DOCS"):
        CLI_DOC.write_text(
            text[: match.start(2)] + screen + "\n" + text[match.end(2) :]
        )
    else:
        assert match.group(2) == screen + "\n", (
            "the screen in docs/cli.md is out of date: "
            "CHATKIT_WRITE_DOCS=1 pytest tests/test_terminal.py -k docs"
        )


async def test_escape_codes_from_a_server_never_reach_the_terminal(
    terminal: OpenTerminal,
) -> None:
    # chatkit's server replaces control characters; a hostile server may
    # not. The client shows them as U+FFFD: no title set, no screen wiped.
    hostile = "\x1b]0;owned\x07\x1b[2J\x1b[Hgotcha"

    async def serve(stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                ref = request.get("ref")
                if request["type"] == "hello":
                    reply = {
                        "type": "welcome",
                        "name": request["name"],
                        "protocol": 1,
                        "server": "hostile",
                        "rooms": ["lobby"],
                        "ref": ref,
                    }
                    news = {
                        "type": "message",
                        "id": 1,
                        "ts": 0.0,
                        "room": "lobby",
                        "from": "mallory",
                        "text": hostile,
                    }
                    await stream.send_all(
                        (json.dumps(reply) + "\n" + json.dumps(news) + "\n").encode()
                    )
                elif request["type"] == "history":
                    room = request["room"]
                    reply = {
                        "type": "history",
                        "room": room,
                        "messages": [],
                        "ref": ref,
                    }
                    await stream.send_all((json.dumps(reply) + "\n").encode())

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, serve, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        term = await open_chat(terminal, port, "alice", "--no-timestamps")
        await term.wait_for("mallory:")
        assert "Welcome to the chat client!" in term.text()  # not wiped
        assert term.rows()[4] == "mallory: \ufffd]0;owned\ufffd\ufffd[2J\ufffd[Hgotcha"
        assert b"\x1b]0;" not in term.raw and b"\x1b[2J" not in term.raw
        nursery.cancel_scope.cancel()


async def test_the_line_being_typed_is_redrawn_when_the_terminal_is_resized(
    launch: Launch, terminal: OpenTerminal
) -> None:
    _server, port = await start_server(launch)
    term = await open_chat(terminal, port, "alice", "--no-timestamps", columns=80)
    typed = "".join(f"{i:02d}." for i in range(30))  # 90 characters
    term.type(typed)
    await term.wait_for(typed[-9:])
    term.resize(40, 24)
    expected = "[lobby]> " + typed
    rows = [expected[i : i + 40] for i in range(0, len(expected), 40)]
    await term.wait_for(lambda t: t.rows()[t.cursor[0] - 2 : t.cursor[0] + 1] == rows)
    assert sum(row.count(typed[:9]) for row in term.rows()) == 1
    assert term.cursor[1] == len(expected) % 40
