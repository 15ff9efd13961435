"""Terminal I/O for the command-line programs, without threads.

Standard input is read with ``trio.lowlevel.wait_readable`` followed by one
``os.read``: readiness means the read cannot block, so the descriptor stays
in blocking mode. (``trio.lowlevel.FdStream`` would switch it to
non-blocking, and on a terminal that flag is shared with standard output,
so an ordinary ``print`` could then fail with ``BlockingIOError``.)

On a terminal, :class:`Console` runs a line editor (:mod:`chatkit._lineedit`)
in cbreak mode: the input area (lines waiting to be sent, then the prompt
and the line being typed, every wrapped row of it) stays at the bottom; a
line printed goes above it, and the area is redrawn whole after it, so
output and input never garble each other. Anywhere else (a pipe, a file) it
reads plain lines and prints plain lines.
"""

from __future__ import annotations

import codecs
import collections
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

import trio

from ._lineedit import (
    END_OF_INPUT,
    Candidates,
    Completer,
    Layout,
    LineEditor,
    cell_width,
    layout,
)

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
        completer: what Tab completes (interactive only).
    """

    def __init__(
        self,
        *,
        interactive: bool | None = None,
        prompt: str = "> ",
        stdin_fd: int = 0,
        stdout: TextIO | None = None,
        completer: Completer | None = None,
    ) -> None:
        self._out = stdout or sys.stdout
        self._stdin = StdinReader(stdin_fd)
        if interactive is None:
            interactive = os.isatty(stdin_fd) and self._out.isatty()
        self.interactive = interactive
        self._prompt = prompt
        self.editor = LineEditor(completer)
        """The line being typed (interactive)."""
        self._pending: tuple[str, ...] = ()  # rows shown above the prompt
        self._shown = False  # the input area is on the screen
        self._cursor_row = 0  # the cursor's row within the input area
        self._layout: tuple[tuple[str, str, int, int], Layout] | None = None
        # Input read but not returned yet: bytes up to a line's end (plain),
        # or lines entered after the one just returned (interactive: pasted
        # or typed ahead).
        self._buf = bytearray()
        self._lines: collections.deque[str | None] = collections.deque()
        self._eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    # --- output -------------------------------------------------------------

    def print(self, text: str) -> None:
        """Write ``text`` as a line above the input area, which is redrawn
        after it."""
        if self.interactive and self._shown:
            self._write(self._erase() + text + "\n" + self._draw())
        else:
            self._write(text + "\n")

    @property
    def prompt(self) -> str:
        """Shown before the line being typed (interactive)."""
        return self._prompt

    @prompt.setter
    def prompt(self, prompt: str) -> None:
        self._prompt = prompt
        self._redraw()

    def set_pending(self, lines: Sequence[str]) -> None:
        """Show ``lines`` (each cut to one row) between the output and the
        prompt, until set again: what was typed but is not sent yet."""
        self._pending = tuple(lines)
        self._redraw()

    def refresh(self) -> None:
        """Draw the input area again (the terminal was resized)."""
        self._redraw()

    def close(self) -> None:
        """Take the input area off the screen (at exit: what follows starts
        on a clean line)."""
        if self._shown:
            self._write(self._erase())
            self._shown = False

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    def _redraw(self) -> None:
        if self.interactive and self._shown:
            self._write(self._erase() + self._draw())

    def _erase(self) -> str:
        """Escape codes that clear the input area, leaving the cursor where
        its first row began."""
        up = f"\x1b[{self._cursor_row}A" if self._cursor_row else ""
        self._cursor_row = 0
        return f"\r{up}\x1b[J"

    def _draw(self) -> str:
        """The input area, from the cursor's row and column 0, leaving the
        cursor where the next character typed goes."""
        columns, lines = self._size()
        editor = self.editor
        key = (self._prompt, editor.text, editor.cursor, columns)
        if self._layout is None or self._layout[0] != key:
            # Wrapping a long line costs its length: once per change of the
            # line, not once per message printed above it.
            self._layout = (key, layout(*key))
        wrapped = self._layout[1]
        pending = [_cut(line, columns) for line in self._pending]
        rows = [*pending, *wrapped.rows]
        cursor_row = len(pending) + wrapped.cursor_row
        room = max(1, lines - 1)  # keep a row of output in sight
        if len(rows) > room:  # a very long line: the rows around the cursor
            first = min(max(0, cursor_row - room + 1), len(rows) - room)
            rows = rows[first : first + room]
            cursor_row -= first
        up = len(rows) - 1 - cursor_row
        self._cursor_row = cursor_row
        self._shown = True
        return (
            "\r\n".join(rows)
            + (f"\x1b[{up}A" if up else "")
            + "\r"
            + (f"\x1b[{wrapped.cursor_column}C" if wrapped.cursor_column else "")
        )

    def _size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self._out.fileno())
        except (OSError, ValueError, AttributeError):
            return 80, 24
        return size.columns or 80, size.lines or 24

    # --- input --------------------------------------------------------------

    async def read_line(
        self, prompt: str | None = None, *, keep: bool = False
    ) -> str | None:
        """The next line typed, or ``None`` at end of input.

        Args:
            prompt: instead of :attr:`prompt`, for this line.
            keep: leave the prompt and the line on the screen once entered
                (an answer, such as a name); otherwise the input area is
                emptied for the next line.
        """
        if not self.interactive:
            if prompt:
                self._write(prompt)
            return await self._read_plain_line()
        saved = self._prompt
        if prompt is not None:
            self._prompt = prompt
        try:
            line = await self._edit()
            if keep and line is not None:
                self.editor.text = line  # shown as entered, cursor at its end
                self.editor.cursor = len(line)
                self._write(self._erase() + self._draw() + "\r\n")
                self._shown = False
                self._cursor_row = 0
                self.editor.clear()
            return line
        finally:
            if prompt is not None:
                self._prompt = saved
                self._redraw()

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

    async def _edit(self) -> str | None:
        if not self._shown:
            self._write(self._draw())
        while not self._lines:
            data = await self._stdin.read()
            if not data:
                self._lines.append(None)
                break
            above: list[str] = []
            for item in self.editor.feed(self._decoder.decode(data)):
                if isinstance(item, Candidates):
                    above.append("  ".join(item.words))
                elif item is END_OF_INPUT:
                    self._lines.append(None)
                elif isinstance(item, str):
                    self._lines.append(item)
            text = "".join(f"{line}\n" for line in above)
            self._write(self._erase() + text + self._draw())
        return self._lines.popleft()

    @contextmanager
    def raw_mode(self) -> Iterator[None]:
        """Put the terminal in cbreak mode for the line editor, and restore it
        (with the input area taken off the screen) on exit; does nothing
        when not interactive."""
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
            self.close()
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _cut(text: str, columns: int) -> str:
    """``text`` on one row of ``columns``: cut with an ellipsis if longer."""
    if sum(map(cell_width, text)) < columns:
        return text
    cells, kept = 0, []
    for char in text:
        cells += cell_width(char)
        if cells > columns - 2:
            break
        kept.append(char)
    return "".join(kept) + "…"
