"""A program in a pseudo-terminal, and the screen a person would see.

``terminal`` (a fixture, loaded by conftest.py) starts a command with a pty
as its controlling terminal (so Ctrl-C typed is a SIGINT, as in a shell) and
renders everything it writes through pyte, a terminal emulator: tests
assert what is on the screen, not which bytes were written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import sys
import termios
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pyte
import pytest
import trio

from .programs import child_environment

TIMEOUT = 10.0


class Terminal:
    """A running program on a pty of ``columns`` x ``lines``, with a pyte
    screen (and its scrollback) fed from the pty on demand."""

    def __init__(
        self, process: trio.Process, master: int, columns: int, lines: int
    ) -> None:
        self.process = process
        self._master = master
        self.screen = pyte.HistoryScreen(columns, lines, history=10_000)
        self.screen.set_mode(pyte.modes.LNM)  # "\n" as the tty's onlcr makes it
        self._stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()  # every byte the program wrote
        self.closed = False  # the program's side of the pty is gone

    def close(self) -> None:
        """Close our side of the pty."""
        os.close(self._master)

    # --- what a person sees ---------------------------------------------

    def rows(self) -> list[str]:
        """The screen's rows, trailing blanks removed."""
        return [row.rstrip() for row in self.screen.display]

    def text(self) -> str:
        """The screen's rows up to the last one with anything on it."""
        rows = self.rows()
        while rows and not rows[-1]:
            rows.pop()
        return "\n".join(rows)

    def transcript(self) -> list[str]:
        """Every row that scrolled off the top, then the screen's rows."""
        history = [
            "".join(char.data for _, char in sorted(row.items())).rstrip()
            for row in self.screen.history.top
        ]
        rows = [*history, *self.rows()]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    @property
    def cursor(self) -> tuple[int, int]:
        """The cursor as (row, column), from 0."""
        return self.screen.cursor.y, self.screen.cursor.x

    # --- typing ------------------------------------------------------------

    def type(self, text: str) -> None:
        """Type ``text`` (``"\\r"`` is Enter, ``"\\x03"`` Ctrl-C, ...)."""
        data = text.encode()
        while data:
            written = os.write(self._master, data)
            data = data[written:]

    def resize(self, columns: int, lines: int) -> None:
        """Resize the terminal, as a person dragging its window (the
        program gets SIGWINCH)."""
        self.screen.resize(lines, columns)
        fcntl.ioctl(
            self._master, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0)
        )

    async def paste(self, text: str) -> None:
        """Type ``text`` as fast as the program takes it (a paste), rendering
        its output meanwhile (it echoes as it reads)."""
        data = text.encode()
        with trio.fail_after(TIMEOUT * 3):
            while data:
                try:
                    written = os.write(self._master, data[:4096])
                except BlockingIOError:
                    await self.pump(0.01)
                    continue
                data = data[written:]
                await self.pump(0)

    # --- waiting -------------------------------------------------------------

    async def pump(self, within: float) -> bool:
        """Render what the program writes for up to ``within`` seconds (all
        of it, at once, as soon as any arrives); False once it is gone."""
        if self.closed:
            await trio.lowlevel.checkpoint()
            return False
        with trio.move_on_after(within):
            await trio.lowlevel.wait_readable(self._master)
            while True:
                try:
                    data = os.read(self._master, 65536)
                except OSError as exc:  # EIO: the other side closed
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
                if not data:
                    self.closed = True
                    return False
                self.raw += data
                self._stream.feed(data)
                if not _readable(self._master):
                    break
        return True

    async def wait_for(
        self, condition: Callable[[Terminal], bool] | str, within: float = TIMEOUT
    ) -> None:
        """Until ``condition`` holds for the screen (a string: appears on it)."""
        check = (
            (lambda term: condition in term.text())
            if isinstance(condition, str)
            else condition
        )
        deadline = trio.current_time() + within
        while not check(self):
            left = deadline - trio.current_time()
            if left <= 0:
                raise AssertionError(
                    f"waited {within}s for {condition!r}; the screen:\n" + self.text()
                )
            if not await self.pump(min(left, 0.05)) and not check(self):
                raise AssertionError(
                    f"the program ended before {condition!r}; the screen:\n"
                    + self.text()
                )

    async def settle(self, quiet: float = 0.3, within: float = TIMEOUT) -> None:
        """Until the program has written nothing for ``quiet`` seconds."""
        with trio.fail_after(within):
            while True:
                before = len(self.raw)
                await self.pump(quiet)
                if len(self.raw) == before:
                    return

    async def wait_exit(self, within: float = TIMEOUT) -> int:
        """The program's exit status, reading its output until it ends."""
        with trio.fail_after(within):
            while await self.pump(0.1):
                pass
            return await self.process.wait()


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


OpenTerminal = Callable[..., Awaitable[Terminal]]
NAME_ROW = "Enter your username:"  # and a space, for the name


async def open_chat(
    terminal: OpenTerminal,
    port: int,
    name: str,
    *args: str,
    type_name: bool = True,
    columns: int = 80,
    lines: int = 24,
    env: dict[str, str] | None = None,
) -> Terminal:
    """A client on a terminal, logged in as ``name``: typed at the prompt,
    or with ``--name`` when not ``type_name``."""
    if not type_name:
        args = ("--name", name, *args)
    term = await terminal(
        "client", "--port", str(port), *args, columns=columns, lines=lines, env=env
    )
    if type_name:
        await term.wait_for(NAME_ROW)
        term.type(f"{name}\r")
    await term.wait_for("Type /help for commands.")
    await term.settle(0.2)
    return term


@pytest.fixture
async def terminal(tmp_path: Path) -> AsyncIterator[OpenTerminal]:
    """``await terminal("client", "--port", "1234", columns=80, lines=24)``
    runs ``python -m chatkit.client`` (or ``chatkit.server``) on a pty of
    that size; every program is killed at teardown if still running."""
    started: list[Terminal] = []

    async def open_(
        program: str,
        *args: str,
        columns: int = 80,
        lines: int = 24,
        env: dict[str, str] | None = None,
    ) -> Terminal:
        master, slave = os.openpty()
        fcntl.ioctl(
            slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0)
        )
        os.set_blocking(master, False)

        def controlling_terminal() -> None:  # in the child, after setsid
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        environment = {**child_environment(), "TERM": "xterm-256color", **(env or {})}
        for variable in ("COLUMNS", "LINES", "NO_COLOR"):
            if env is None or variable not in env:
                environment.pop(variable, None)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", f"chatkit.{program}", *args],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=tmp_path,
                env=environment,
                start_new_session=True,
                preexec_fn=controlling_terminal,
            )
        finally:
            os.close(slave)
        term = Terminal(process, master, columns, lines)
        started.append(term)
        return term

    yield open_
    for term in started:
        if term.process.returncode is None:
            term.process.send_signal(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await term.process.wait()
        term.close()
