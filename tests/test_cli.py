"""End to end: the real command-line programs, run as a user would."""

from __future__ import annotations

import io
import os
import pty
import signal
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

import chatkit
from chatkit._console import Console
from chatkit.auth import TokenAuth
from chatkit.client.__main__ import ChatShell, build_parser, run_client
from tests.helpers import HoldLogin, RawClient, next_event
from tests.programs import Launch, start_client, start_server

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
# What /history used wrongly prints: its lines of /help.
HISTORY_USAGE = [
    "Usage:",
    "  /history [ROOM] [N] [before ID | after ID]",
    "                    N messages (default 20) of ROOM (default: the current",
    "                    room): the last ones, or those before / after message ID",
]


async def test_two_clients_chat_and_enter_stops_everything(launch: Launch) -> None:
    server, port = await start_server(launch, "--interactive")
    await server.expect(r"^Press Enter to stop the server\.$")
    alice = await start_client(launch, port, "alice")
    await server.expect(r"^New connection from \('127\.0\.0\.1', \d+\)$")
    await server.expect(r"^alice has joined the chat\.$")
    bob = await start_client(launch, port, "bob")
    await server.expect(r"^bob has joined the chat\.$")
    await alice.expect(r"^bob has joined the chat\.$")

    await alice.send("hello bob\n")
    await bob.expect(r"^alice: hello bob$")
    await bob.send("hi alice\n")
    await alice.expect(r"^bob: hi alice$")

    # A slash command: who is here, in login order.
    await bob.send("/who\n")
    await bob.expect(r"^In lobby: alice, bob$")
    await alice.send("/msg bob just you\n")
    await bob.expect(r"^alice \(private\): just you$")

    # `exit` leaves cleanly and the other side sees the notice.
    await alice.send("exit\n")
    await alice.expect(r"^Exiting chat\.\.\.$")
    assert await alice.wait() == 0
    await bob.expect(r"^alice has left the chat\.$")
    await server.expect(r"^alice has left the chat\.$")

    # Enter on the server's stdin: a graceful stop, everyone exits 0 in 2 s.
    start = trio.current_time()
    await server.send("\n")
    assert await server.wait(within=2) == 0
    assert await bob.wait(within=2) == 0
    assert trio.current_time() - start < 2
    assert "Server has shut down." in await server.rest()
    bob_rest = await bob.rest()
    assert bob_rest[0] == "*** Server is shutting down."
    assert bob_rest[-1] == "Disconnected."


async def test_sigterm_stops_server_and_clients_gracefully(launch: Launch) -> None:
    # No terminal on stdin and stdin at EOF: the server must keep running.
    server, port = await start_server(launch, stdin=subprocess.DEVNULL)
    await trio.sleep(0.3)
    alice = await start_client(launch, port, "alice")
    await alice.send("still here\n")
    await alice.expect(r"^alice: still here$")
    assert server.process.returncode is None

    start = trio.current_time()
    server.process.send_signal(signal.SIGTERM)
    assert await server.wait(within=2) == 0
    assert await alice.wait(within=2) == 0
    assert trio.current_time() - start < 2
    assert (await server.rest())[-1] == "Server has shut down."
    assert "*** Server is shutting down." in await alice.rest()


async def test_a_server_with_standard_input_closed_runs_until_a_signal(
    launch: Launch,
) -> None:
    server, port = await start_server(launch, stdin_closed=True)
    alice = await start_client(launch, port, "alice")
    await trio.sleep(0.3)
    assert server.process.returncode is None
    server.process.send_signal(signal.SIGTERM)
    assert await server.wait(within=2) == 0
    assert await alice.wait(within=2) == 0
    assert (await server.rest())[-1] == "Server has shut down."


@pytest.mark.parametrize("stdin", ["dev-null", "closed"])
async def test_interactive_server_with_no_input_stops_at_once(
    launch: Launch, stdin: str
) -> None:
    # End of input stops an --interactive server, as Ctrl-D does: gracefully,
    # and not as a failure to listen (epoll refuses /dev/null).
    server, _port = await start_server(
        launch,
        "--interactive",
        stdin=subprocess.DEVNULL if stdin == "dev-null" else None,
        stdin_closed=stdin == "closed",
    )
    assert await server.wait() == 0
    rest = await server.rest()
    assert rest == ["Press Enter to stop the server.", "Server has shut down."], rest


async def test_sigint_stops_the_server_gracefully(launch: Launch) -> None:
    server, port = await start_server(launch, "--no-interactive")
    alice = await start_client(launch, port, "alice")
    server.process.send_signal(signal.SIGINT)
    assert await server.wait(within=2) == 0
    assert await alice.wait(within=2) == 0


async def test_line_mode_socket_chats_with_a_cli_client(launch: Launch) -> None:
    _server, port = await start_server(launch)
    alice = await start_client(launch, port, "alice")
    nc = await RawClient.open(port)  # what `nc 127.0.0.1 PORT` does
    try:
        await nc.send_line("carol")
        await alice.expect(r"^carol has joined the chat\.$")
        await nc.send_line("hi from nc")
        await alice.expect(r"^carol: hi from nc$")
        await alice.send("hello carol\n")
        assert await nc.receive_line() == "alice: hello carol"
        await nc.send_line("exit")
        await alice.expect(r"^carol has left the chat\.$")
        assert await nc.assert_closed() == []
    finally:
        await nc.aclose()


async def test_client_prompts_for_a_name_and_asks_again_when_taken(
    launch: Launch,
) -> None:
    _server, port = await start_server(launch)
    await start_client(launch, port, "alice")
    client = await launch("client", "--port", str(port))
    await client.expect(r"^Welcome to the chat client!$")
    await client.send("Alice\n")  # taken, case-insensitively
    await client.expect(r"^Enter your username: Error: Alice is taken$")
    await client.send("bob\n")
    await client.expect(r"^Enter your username: Hello, bob! Type 'exit' to leave")
    await client.close_stdin()  # end of input leaves cleanly
    assert await client.wait() == 0


async def test_scripted_client_lines_in_transcript_out(launch: Launch) -> None:
    _server, port = await start_server(launch)
    client = await launch("client", "--port", str(port), "--name", "script")
    await client.send("/join dev\nfirst\n/history\n/rooms\n/nick scripted\n/bogus\n")
    await client.close_stdin()
    assert await client.wait() == 0
    transcript = await client.rest()
    # Events (joins, messages, renames) and command replies are printed by
    # two tasks, so only the order within each is fixed.
    assert sorted(transcript) == sorted(
        [
            "Welcome to the chat client!",
            "Hello, script! Type 'exit' to leave the chat.",
            "Type /help for commands.",
            "You joined dev.",
            "[dev] script: first",
            "--- last 1 in dev ---",
            "script: first",
            "Rooms: dev (1), lobby (1)",
            "You are now known as scripted.",
            "Unknown command /bogus. Type /help for commands.",
            "Exiting chat...",
            "Disconnected.",
        ]
    )
    assert transcript.index("You joined dev.") < transcript.index("[dev] script: first")
    assert transcript.index("--- last 1 in dev ---") < transcript.index("script: first")
    assert transcript[-2:] == ["Exiting chat...", "Disconnected."]


async def test_client_reports_an_unreachable_server(launch: Launch) -> None:
    with trio.socket.socket() as sock:  # a port with nobody listening
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = await launch("client", "--port", str(port), "--name", "alice")
    assert await client.wait() == 1
    assert any(
        "Error: cannot connect to 127.0.0.1:" in line for line in await client.rest()
    )


async def test_client_reports_a_server_that_never_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A port that accepts connections but never says welcome (a hung server,
    # another service): a one-line error and status 1, not a traceback.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    args = build_parser().parse_args(["--port", str(port), "--name", "alice"])
    output = io.StringIO()
    read_fd, write_fd = os.pipe()
    try:
        async with listeners[0], trio.open_nursery() as nursery:
            accepted: list[trio.SocketStream] = []

            async def accept_and_say_nothing() -> None:
                while True:
                    accepted.append(await listeners[0].accept())

            nursery.start_soon(accept_and_say_nothing)
            console = Console(interactive=False, stdin_fd=read_fd, stdout=output)
            with trio.fail_after(60):  # virtual seconds: connect_timeout is 10
                assert await run_client(args, console) == 1
            nursery.cancel_scope.cancel()
            for stream in accepted:
                await stream.aclose()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert output.getvalue().splitlines()[-1] == (
        f"Error: cannot connect to 127.0.0.1:{port}: timed out"
    )


@pytest.mark.parametrize("stdin", ["dev-null", "closed"])
async def test_client_with_no_standard_input_leaves_at_once(
    launch: Launch, server: chatkit.ChatServer, stdin: str
) -> None:
    # `< /dev/null` (cron, nohup) and `<&-` are an empty input: the client
    # logs in and leaves, as at the end of a script.
    client = await launch(
        "client",
        "--port",
        str(server.port),
        "--name",
        "alice",
        stdin=subprocess.DEVNULL if stdin == "dev-null" else None,
        stdin_closed=stdin == "closed",
    )
    assert await client.wait() == 0
    transcript = await client.rest()
    assert transcript[:2] == [
        "Welcome to the chat client!",
        "Hello, alice! Type 'exit' to leave the chat.",
    ]
    assert transcript[-2:] == ["Exiting chat...", "Disconnected."]
    # And without --name there is no name to read: it ends there.
    client = await launch(
        "client",
        "--port",
        str(server.port),
        stdin=subprocess.DEVNULL if stdin == "dev-null" else None,
        stdin_closed=stdin == "closed",
    )
    assert await client.wait() == 0
    assert await client.rest() == ["Welcome to the chat client!"]


async def test_server_reports_a_port_in_use(launch: Launch) -> None:
    _first, port = await start_server(launch)
    # Its own database: the first server holds the default one's lock.
    second = await launch("server", "--port", str(port), "--db", "second.sqlite3")
    assert await second.wait() == 1
    assert any("cannot listen on 127.0.0.1" in line for line in await second.rest())


async def test_a_second_server_on_one_database_is_refused(launch: Launch) -> None:
    await start_server(launch)
    second = await launch("server", "--port", "0")
    assert await second.wait() == 1
    assert await second.rest() == [
        "error: cannot open history database chatkit.sqlite3: another server "
        "is using it"
    ]


async def test_presence_limit_option(launch: Launch) -> None:
    _server, port = await start_server(launch, "--no-db", "--presence-limit", "1")
    alice = await start_client(launch, port, "alice")
    bob = await start_client(launch, port, "bob")  # lobby now has 2 > 1
    await bob.send("hi\n")
    await alice.expect(r"^bob: hi$")
    assert not [line for line in alice.output if "bob has joined" in line]


async def test_server_plugin_option(launch: Launch) -> None:
    _server, port = await start_server(
        launch, "--plugin", "examples.profanity_filter:ProfanityFilter"
    )
    alice = await start_client(launch, port, "alice")
    await alice.send("darn it\n")
    await alice.expect(r"^alice: d\*\*n it$")
    bad = await launch("server", "--port", "0", "--plugin", "no_such_module:X")
    assert await bad.wait() == 2


async def test_enter_on_a_terminal_stops_the_server(launch: Launch) -> None:
    # A real pty as stdin: the server treats it as a terminal by default.
    master, slave = pty.openpty()
    try:
        server, port = await start_server(launch, stdin=slave)
        await server.expect(r"^Press Enter to stop the server\.$")
        alice = await start_client(launch, port, "alice")
        os.write(master, b"\n")
        assert await server.wait(within=2) == 0
        assert await alice.wait(within=2) == 0
    finally:
        os.close(slave)
        os.close(master)


async def test_example_wrappers_run_the_same_programs(launch: Launch) -> None:
    server = await launch("examples/chat_server.py", "--port", "0", "--no-interactive")
    match = await server.expect(r"^Server started on 127\.0\.0\.1:(\d+)$")
    client = await launch(
        "examples/chat_client.py", "--port", match.group(1), "--name", "alice"
    )
    await client.send("hello from the example\n")
    await client.expect(r"^alice: hello from the example$")
    await client.close_stdin()
    assert await client.wait() == 0
    server.process.send_signal(signal.SIGTERM)
    assert await server.wait(within=2) == 0
    assert (await server.rest())[-1] == "Server has shut down."


# --- history across restarts (SQLite, the default) ---------------------------


async def history_seen_by(launch: Launch, port: int, name: str) -> list[str]:
    """What ``/history`` shows a client that has just logged in."""
    client = await launch("client", "--port", str(port), "--name", name)
    await client.send("/history\n")
    await client.close_stdin()
    assert await client.wait() == 0
    return await client.rest()


async def test_history_survives_a_restart(launch: Launch, tmp_path: Path) -> None:
    server, port = await start_server(launch, "--no-interactive")
    alice = await start_client(launch, port, "alice")
    await alice.send("remember me\n")
    await alice.expect(r"^alice: remember me$")
    server.process.send_signal(signal.SIGINT)
    assert await server.wait() == 0
    assert await alice.wait() == 0
    assert (tmp_path / "chatkit.sqlite3").is_file()  # the default --db

    _server, port = await start_server(launch, "--no-interactive")
    seen = await history_seen_by(launch, port, "bob")
    assert seen[seen.index("--- last 1 in lobby ---") + 1] == "alice: remember me"


async def test_no_db_keeps_history_in_memory_only(
    launch: Launch, tmp_path: Path
) -> None:
    server, port = await start_server(launch, "--no-db", "--history", "1")
    alice = await start_client(launch, port, "alice")
    await alice.send("one\ntwo\n")
    await alice.expect(r"^alice: two$")
    seen = await history_seen_by(launch, port, "bob")
    assert seen[seen.index("--- last 1 in lobby ---") + 1] == "alice: two"
    server.process.send_signal(signal.SIGTERM)
    assert await server.wait() == 0
    assert not (tmp_path / "chatkit.sqlite3").exists()


@pytest.mark.parametrize(
    ("db", "error"),
    [
        (
            "bad.sqlite3",
            "error: cannot open history database bad.sqlite3: file is not a database",
        ),
        (".", "error: cannot open history database .: it is a directory"),
        (
            "nowhere/chat.sqlite3",
            "error: cannot open history database nowhere/chat.sqlite3: "
            "no such directory {tmp}/nowhere",
        ),
    ],
    ids=["corrupt", "directory", "no-directory"],
)
async def test_a_bad_database_is_one_line_and_status_1(
    launch: Launch, tmp_path: Path, db: str, error: str
) -> None:
    (tmp_path / "bad.sqlite3").write_bytes(b"\x00garbage" * 1000)
    server = await launch("server", "--port", "0", "--db", db)
    assert await server.wait() == 1
    assert await server.rest() == [error.format(tmp=tmp_path)]


# --- reconnecting and paging -------------------------------------------------


async def crashable_server(
    nursery: trio.Nursery, **options: Any
) -> tuple[int, trio.CancelScope]:
    """Start a ChatServer (``options``) in ``nursery``; return its port and a
    scope whose ``cancel()`` crashes it: every connection drops at once,
    without a ``shutdown``."""
    crash = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[int]) -> None:
        with crash:
            await chatkit.ChatServer(port=0, **options).serve(task_status=task_status)

    port: int = await nursery.start(serve)
    return port, crash


async def test_the_client_reconnects_across_a_server_crash(launch: Launch) -> None:
    history = chatkit.MemoryHistory()  # kept by the server "process" restarted
    hold = HoldLogin("alice")
    async with trio.open_nursery() as nursery:
        port, crash = await crashable_server(nursery, history=history)
        alice = await start_client(launch, port, "alice")
        async with chatkit.open_client("127.0.0.1", port, name="bob") as bob:
            await bob.say("before the crash")
            await alice.expect(r"^bob: before the crash$")
        # Cancelling serve drops every connection at once, no `shutdown`.
        crash.cancel()
        await alice.expect(
            r"^\*\*\* connection lost \(server closed the connection\),"
            r" reconnecting in \d+\.\ds\.\.\.$"
        )
        second = chatkit.ChatServer(
            port=port,
            history=history,
            plugins=[hold],
            limits=chatkit.Limits(hook_timeout=30),
        )
        await nursery.start(second.serve)
        async with chatkit.open_client("127.0.0.1", port, name="bob") as bob:
            await bob.say("while you were away")
            hold.opened.set()  # let alice back in
            await alice.expect(r"^bob: while you were away$")
            await alice.expect(r"^\*\*\* reconnected; 1 missed message$")
            await bob.say("welcome back")
            await alice.expect(r"^bob: welcome back$")
            await alice.send("thanks\n")
            reply = await next_event(bob, chatkit.Message, TIMEOUT, sender="alice")
            assert reply.text == "thanks"
        await alice.close_stdin()
        assert await alice.wait() == 0
        transcript = alice.output + await alice.rest()
        for line in ("bob: before the crash", "bob: while you were away"):
            assert transcript.count(line) == 1
        assert transcript[-1] == "Disconnected."
        await second.aclose()


async def test_reconnect_always_rides_out_a_shutdown_and_exit_still_works(
    launch: Launch,
) -> None:
    async with chatkit.open_server() as server:
        alice = await launch(
            "client",
            "--port",
            str(server.port),
            "--name",
            "alice",
            "--reconnect",
            "always",
        )
        await alice.expect(r"^Hello, alice!")
        await server.aclose()
        await alice.expect(r"^\*\*\* Server is shutting down\.$")
        await alice.expect(
            r"^\*\*\* connection lost \(server shutting down\), reconnecting in"
        )
        assert alice.process.returncode is None  # still trying
        await alice.send("exit\n")  # leaving works while reconnecting
        assert await alice.wait() == 0
        assert (await alice.rest())[-2:] == ["Exiting chat...", "Disconnected."]


async def test_reconnect_never_exits_when_the_connection_is_lost(
    launch: Launch,
) -> None:
    async with trio.open_nursery() as nursery:
        port, crash = await crashable_server(nursery)
        alice = await launch(
            "client", "--port", str(port), "--name", "alice", "--reconnect", "never"
        )
        await alice.expect(r"^Hello, alice!")
        crash.cancel()
        assert await alice.wait() == 0
        rest = await alice.rest()
        assert rest[-1] == "Disconnected."
        assert not [line for line in rest if line.startswith("***")]


async def test_a_client_that_gives_up_reconnecting_exits_1(launch: Launch) -> None:
    async with trio.open_nursery() as nursery:
        port, crash = await crashable_server(nursery)
        alice = await start_client(launch, port, "alice")
        crash.cancel()
        await alice.expect(r"^\*\*\* connection lost")
        # Back on the same port, but admitting only holders of a token:
        # a refusal no waiting gets past.
        second = chatkit.ChatServer(port=port, plugins=[TokenAuth("sesame")])
        await nursery.start(second.serve)
        assert await alice.wait() == 1
        rest = await alice.rest()
        assert rest[-2].startswith("*** gave up reconnecting after 1 attempts: ")
        assert rest[-1] == "Disconnected."
        await second.aclose()


async def test_history_pages_before_and_after_an_id(launch: Launch) -> None:
    async with chatkit.open_server() as server:
        async with chatkit.open_client("127.0.0.1", server.port, name="bob") as bob:
            ids = [(await bob.say(f"m{n}")).id for n in range(1, 6)]
        client = await launch("client", "--port", str(server.port), "--name", "s")
        await client.send(
            "/history 2\n"
            f"/history lobby 2 before {ids[3]}\n"
            f"/history 2 after #{ids[0]}\n"
            f"/history 10 before {ids[1]}\n"
            "/history lobby 2 before x\n"
            "/history a b\n"
            "/history nowhere\n"
        )
        await client.close_stdin()
        assert await client.wait() == 0
        transcript = await client.rest()
    assert transcript[3:-2] == [
        "--- last 2 in lobby ---",
        "bob: m4",
        "bob: m5",
        f"(more: /history lobby 2 before {ids[3]})",
        f"--- 2 before #{ids[3]} in lobby ---",
        "bob: m2",
        "bob: m3",
        f"(more: /history lobby 2 before {ids[1]})",
        f"--- 2 after #{ids[0]} in lobby ---",
        "bob: m2",
        "bob: m3",
        f"(more: /history lobby 2 after {ids[2]})",
        f"--- 1 before #{ids[1]} in lobby ---",
        "bob: m1",
        *HISTORY_USAGE,
        *HISTORY_USAGE,
        "Error: you are not in nowhere (not_in_room)",
    ]


async def test_history_numbers_are_ascii_digits(server: chatkit.ChatServer) -> None:
    # str.isdigit() also accepts "²", which int() refuses: a usage error (or
    # a room name), never a crash of the shell.
    async with chatkit.open_client("127.0.0.1", server.port, name="alice") as alice:
        printed: list[str] = []
        shell = ChatShell(alice, printed.append)
        with trio.fail_after(5):
            for line in ["/history lobby before \u00b2", "/history lobby \u2460"]:
                assert await shell.handle(line) is True
            usage = "\n".join(HISTORY_USAGE)
            assert printed == [usage, usage]
            assert await shell.handle("/history \u00b2") is True
        assert printed[2] == "Error: you are not in \u00b2 (not_in_room)"


class GaveUp:
    """What ChatShell reads of a client that gave up reconnecting."""

    name = "alice"
    close_reason = "gave up reconnecting after 2 attempts: Connection refused"


def test_the_shell_describes_reconnecting() -> None:
    printed: list[str] = []
    client = GaveUp()
    shell = ChatShell(cast(chatkit.ChatClient, client), printed.append)
    assert shell.describe(chatkit.Interrupted(reason="connection lost")) is None
    assert shell.describe(chatkit.Reconnecting(attempt=1, delay=0.42)) == (
        "*** connection lost (connection lost), reconnecting in 0.4s..."
    )
    assert shell.describe(
        chatkit.Reconnecting(attempt=2, delay=1.0, error="Connection refused")
    ) == ("*** reconnect failed (Connection refused), retrying in 1.0s...")
    assert shell.farewell() == f"*** {client.close_reason}"
    for missed, text in [(0, "no missed messages"), (1, "1 missed message")]:
        assert shell.describe(chatkit.Reconnected(missed=missed)) == (
            f"*** reconnected; {text}"
        )
    assert shell.describe(chatkit.Reconnected(missed=7)) == (
        "*** reconnected; 7 missed messages"
    )
    assert shell.farewell() is None  # back: nothing to explain
    assert printed == []
