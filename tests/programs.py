"""The command-line programs as subprocesses, as a user runs them: the
``launch`` fixture (loaded by conftest.py) and helpers around it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


class Program:
    """A CLI subprocess with piped stdin and a line reader on its stdout."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output: list[str] = []  # every line read so far
        self._buf = b""

    async def send(self, text: str) -> None:
        assert self.process.stdin is not None
        with trio.fail_after(TIMEOUT):
            await self.process.stdin.send_all(text.encode())

    async def close_stdin(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()

    async def read_line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buf:
            data = await self.process.stdout.receive_some(65536)
            if not data:
                raise EOFError(f"program ended; output so far: {self.output}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        text = line.decode()
        self.output.append(text)
        return text

    async def expect(self, pattern: str, within: float = TIMEOUT) -> re.Match[str]:
        """Read lines until one matches ``pattern`` (a regex, searched)."""
        try:
            with trio.fail_after(within):
                while True:
                    match = re.search(pattern, await self.read_line())
                    if match:
                        return match
        except trio.TooSlowError:
            raise AssertionError(
                f"no line matching {pattern!r} in {self.output}"
            ) from None

    async def rest(self, within: float = TIMEOUT) -> list[str]:
        """Every remaining line until the program closes its output."""
        lines = []
        with trio.fail_after(within):
            while True:
                try:
                    lines.append(await self.read_line())
                except EOFError:
                    return lines

    async def wait(self, within: float = TIMEOUT) -> int:
        with trio.fail_after(within):
            return await self.process.wait()


Launch = Callable[..., Awaitable[Program]]


def child_environment() -> dict[str, str]:
    """The environment with PYTHONPATH made absolute (a relative entry, as in
    PYTHONPATH=src, would point elsewhere from another directory) and the
    repository added, for ``--plugin examples.x``."""
    path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    absolute = [os.path.abspath(entry) for entry in path if entry]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*absolute, str(ROOT)])}


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """``await launch("server", "--port", "0")`` starts ``python -m
    chatkit.server`` (``launch("examples/x.py")`` a script); every program is
    killed at teardown if still running.

    Programs run in ``tmp_path``, where the server's default history
    database goes, with the repository (``examples``) importable.
    """
    programs: list[Program] = []
    env = child_environment()

    async def launch_(
        program: str, *args: str, stdin: int | None = None, stdin_closed: bool = False
    ) -> Program:
        # stdin_closed: start with standard input closed, as with ``<&-``.
        # "server" / "client" run the modules; "examples/x.py" a script.
        target = (
            [str(ROOT / program)]
            if program.endswith(".py")
            else ["-m", f"chatkit.{program}"]
        )
        process = await trio.lowlevel.open_process(
            [sys.executable, *target, *args],
            stdin=subprocess.PIPE if stdin is None else stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
            preexec_fn=(lambda: os.close(0)) if stdin_closed else None,
        )
        started = Program(process)
        programs.append(started)
        return started

    yield launch_
    for program in programs:
        if program.process.returncode is None:
            program.process.kill()
        with trio.CancelScope(shield=True):
            await program.process.wait()
        for stream in (program.process.stdin, program.process.stdout):
            if stream is not None:
                await stream.aclose()


async def start_server(
    launch: Launch, *args: str, stdin: int | None = None, stdin_closed: bool = False
) -> tuple[Program, int]:
    server = await launch(
        "server", "--port", "0", *args, stdin=stdin, stdin_closed=stdin_closed
    )
    match = await server.expect(r"^Server started on 127\.0\.0\.1:(\d+)$")
    return server, int(match.group(1))


async def start_client(launch: Launch, port: int, name: str) -> Program:
    client = await launch("client", "--port", str(port), "--name", name)
    await client.expect(rf"^Hello, {name}! Type 'exit' to leave the chat\.$")
    return client
