"""Terminal I/O for the command-line programs, without threads.

Standard input is read with ``trio.lowlevel.wait_readable`` followed by one
``os.read``: readiness means the read cannot block, so the descriptor stays
in blocking mode. (``trio.lowlevel.FdStream`` would switch it to
non-blocking, and on a terminal that flag is shared with standard output,
so an ordinary ``print`` could then fail with ``BlockingIOError``.)

On a terminal, :class:`Console` runs a small line editor in cbreak mode: the
line being typed is kept at the bottom and redrawn after every message that
arrives, so output and input never garble each other. Anywhere else (a pipe,
a file) it reads plain lines and prints plain lines.
"""

from __future__ import annotations

import codecs
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import trio

__all__ = ["Console", "StdinReader"]

_CHUNK = 4096


class StdinReader:
    """Reads raw bytes from a file descriptor without blocking trio.

    A descriptor that is not open (standard input closed, as with ``<&-``;
    or ``-1``) reads as end of file, and is never touched again: once trio
    runs, its own descriptors may take that number.
    """

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            self._closed = True
            self._always_ready = False
        else:
            self._closed = False
            # epoll refuses regular files; they are always ready anyway.
            self._always_ready = stat.S_ISREG(mode)

    async def read(self) -> bytes:
        """The next chunk of input; ``b""`` at end of file."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return b""
        if self._always_ready:
            await trio.lowlevel.checkpoint()
        else:
            try:
                await trio.lowlevel.wait_readable(self.fd)
            except PermissionError:
                # epoll refuses files that cannot wait (EPERM), such as
                # /dev/null: like regular files, they are always ready.
                self._always_ready = True
        try:
            return os.read(self.fd, _CHUNK)
        except OSError:
            # A hung-up terminal reads as end of file.
            return b""


class Console:
    """Line input and line output on a terminal or on plain streams.

    Args:
        interactive: use the line editor (standard input and output must be
            terminals); ``None`` decides by ``isatty``.
        prompt: shown before the line being typed (interactive only).
    """

    def __init__(
        self,
        *,
        interactive: bool | None = None,
        prompt: str = "> ",
        stdin_fd: int = 0,
        stdout: TextIO | None = None,
    ) -> None:
        self._out = stdout or sys.stdout
        self._stdin = StdinReader(stdin_fd)
        if interactive is None:
            interactive = os.isatty(stdin_fd) and self._out.isatty()
        self.interactive = interactive
        self.prompt = prompt
        self._typed = ""  # the line being edited (interactive)
        # Input read but not returned yet: bytes up to a line's end (plain),
        # or decoded text after the line just returned (interactive, so
        # that pasted or typed-ahead lines are kept).
        self._buf = bytearray()
        self._eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._unread = ""

    def print(self, text: str) -> None:
        """Write ``text`` as a line, keeping any half-typed input intact."""
        if self.interactive:
            # Erase the input line, write, then redraw the input line.
            self._out.write(f"\r\x1b[K{text}\n{self.prompt}{self._typed}")
        else:
            self._out.write(text + "\n")
        self._out.flush()

    async def read_line(self, prompt: str | None = None) -> str | None:
        """The next line typed, or ``None`` at end of input."""
        if not self.interactive:
            if prompt:
                self._out.write(prompt)
                self._out.flush()
            return await self._read_plain_line()
        saved, self.prompt = self.prompt, prompt if prompt is not None else self.prompt
        try:
            return await self._edit()
        finally:
            self.prompt = saved

    async def _read_plain_line(self) -> str | None:
        while (end := self._buf.find(b"\n")) < 0:
            if self._eof:
                line = bytes(self._buf)
                self._buf.clear()
                return line.decode(errors="replace") if line else None
            data = await self._stdin.read()
            self._eof = not data
            self._buf += data
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line.decode(errors="replace").removesuffix("\r")

    @contextmanager
    def raw_mode(self) -> Iterator[None]:
        """Put the terminal in cbreak mode for the line editor (restored on
        exit); does nothing when not interactive."""
        if not self.interactive:
            yield
            return
        import termios
        import tty

        fd = self._stdin.fd
        saved = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd)
            yield
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    async def _edit(self) -> str | None:
        self._typed = ""
        self._out.write(self.prompt)
        self._out.flush()
        escape = False
        while True:
            text, self._unread = self._unread, ""
            if not text:
                data = await self._stdin.read()
                if not data:
                    return None
                text = self._decoder.decode(data)
            for index, char in enumerate(text):
                if escape:
                    # Skip the rest of an escape sequence (arrow keys...).
                    escape = not (char.isalpha() or char == "~")
                    continue
                if char in "\r\n":
                    rest = text[index + 1 :]
                    if char == "\r" and rest.startswith("\n"):
                        rest = rest[1:]
                    self._unread = rest  # the next lines, typed ahead
                    line, self._typed = self._typed, ""
                    self._out.write("\r\x1b[K")
                    self._out.flush()
                    return line
                if char == "\x04" and not self._typed:  # Ctrl-D
                    return None
                if char in "\x7f\x08":  # Backspace
                    if self._typed:
                        self._typed = self._typed[:-1]
                        self._out.write("\b \b")
                elif char == "\x15":  # Ctrl-U
                    self._typed = ""
                    self._out.write(f"\r\x1b[K{self.prompt}")
                elif char == "\x1b":
                    escape = True
                elif char.isprintable():
                    self._typed += char
                    self._out.write(char)
            self._out.flush()
