"""Issue 19's papercuts, as a person meets them: the terminal client on a
pty (what the screen shows) and the command-line programs' errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import chatkit
from tests.programs import Launch

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
