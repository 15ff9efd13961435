"""The line being typed, without I/O: keys in, edits and lines out.

:class:`LineEditor` keeps the text and the cursor, a history of the lines
entered, and the readline keys people expect (arrows, Home/End, Ctrl-A/E/
B/F/U/K/W/D, Up/Down or Ctrl-P/N for history, Tab to complete). It is fed
decoded text as it arrives, escape sequences split across reads included.

:func:`layout` wraps a prompt and a line to a terminal's width, so that
the console can redraw the whole input area (every wrapped row) and put
the cursor where it belongs. Both are pure and tested without a terminal.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "END_OF_INPUT",
    "Candidates",
    "EndOfInput",
    "Layout",
    "LineEditor",
    "cell_width",
    "layout",
]

Completer = Callable[[str, bool], Sequence[str]]
"""``completer(word, first)``: the completions of ``word`` (the text from
the last space to the cursor); ``first`` when it is the line's first word."""


class EndOfInput(enum.Enum):
    """Ctrl-D on an empty line: the person is done typing."""

    END_OF_INPUT = "end of input"


END_OF_INPUT = EndOfInput.END_OF_INPUT


@dataclass(frozen=True)
class Candidates:
    """Tab found several completions and could not extend the word: show
    them."""

    words: tuple[str, ...]


Output = str | Candidates | EndOfInput
"""What :meth:`LineEditor.feed` returns: lines entered (``str``), lists of
completions to show, and :data:`END_OF_INPUT`."""

# Escape sequences (CSI and SS3) for the keys we know; the rest are ignored.
_KEYS = MappingProxyType(
    {
        "[A": "up",
        "[B": "down",
        "[C": "right",
        "[D": "left",
        "[H": "home",
        "[F": "end",
        "OA": "up",
        "OB": "down",
        "OC": "right",
        "OD": "left",
        "OH": "home",
        "OF": "end",
        "[1~": "home",
        "[7~": "home",
        "[4~": "end",
        "[8~": "end",
        "[3~": "delete",
        "[1;5C": "word-right",
        "[1;5D": "word-left",
        "f": "word-right",  # Alt-f
        "b": "word-left",  # Alt-b
    }
)
_CONTROL_KEYS = MappingProxyType(
    {
        "\x01": "home",  # Ctrl-A
        "\x02": "left",  # Ctrl-B
        "\x05": "end",  # Ctrl-E
        "\x06": "right",  # Ctrl-F
        "\x08": "backspace",  # Ctrl-H
        "\x7f": "backspace",
        "\x09": "complete",  # Tab
        "\x0b": "kill-end",  # Ctrl-K
        "\x0e": "down",  # Ctrl-N
        "\x10": "up",  # Ctrl-P
        "\x15": "kill-start",  # Ctrl-U
        "\x17": "kill-word",  # Ctrl-W
    }
)


class LineEditor:
    """The line being typed, its cursor and the history of entered lines.

    Args:
        completer: what Tab completes (nothing when ``None``).
        history_size: how many entered lines Up can bring back.
    """

    def __init__(
        self, completer: Completer | None = None, *, history_size: int = 500
    ) -> None:
        self.text = ""
        """The line being typed."""
        self.cursor = 0
        """Where the next character goes, as an index into :attr:`text`."""
        self.completer = completer
        self._history: list[str] = []
        self._history_size = history_size
        self._recall: int | None = None  # index into _history while browsing
        self._draft = ""  # the line being typed before browsing began
        self._escape: str | None = None  # an escape sequence read so far
        self._after_cr = False  # "\r\n" is one Enter

    def feed(self, data: str) -> list[Output]:
        """Apply typed (or pasted) ``data``; returns the lines entered, in
        order, and anything else to show."""
        out: list[Output] = []
        for char in data:
            after_cr, self._after_cr = self._after_cr, False
            if self._escape is not None:
                self._feed_escape(char)
            elif char == "\x1b":
                self._escape = ""
            elif char in "\r\n":
                if char == "\n" and after_cr:
                    continue
                self._after_cr = char == "\r"
                out.append(self._enter())
            elif char == "\x04":  # Ctrl-D: end of input, or delete
                if not self.text:
                    out.append(END_OF_INPUT)
                    return out
                self._key("delete")
            elif char in _CONTROL_KEYS:
                shown = self._key(_CONTROL_KEYS[char])
                if shown is not None:
                    out.append(shown)
            elif char.isprintable():
                self.insert(char)
        return out

    def insert(self, text: str) -> None:
        """Insert ``text`` at the cursor."""
        self.text = self.text[: self.cursor] + text + self.text[self.cursor :]
        self.cursor += len(text)

    def clear(self) -> None:
        """Forget the line being typed (the history stays)."""
        self.text, self.cursor = "", 0
        self._recall = None
        self._escape = None

    # --- keys ------------------------------------------------------------

    def _feed_escape(self, char: str) -> None:
        assert self._escape is not None
        sequence = self._escape + char
        if sequence in ("[", "O") or (
            sequence.startswith("[") and not ("@" <= char <= "~")
        ):
            self._escape = sequence  # more to come
            return
        self._escape = None
        key = _KEYS.get(sequence)
        if key is not None:
            self._key(key)

    def _key(self, key: str) -> Candidates | None:
        text, cursor = self.text, self.cursor
        match key:
            case "left":
                self.cursor = max(0, cursor - 1)
            case "right":
                self.cursor = min(len(text), cursor + 1)
            case "home":
                self.cursor = 0
            case "end":
                self.cursor = len(text)
            case "word-left":
                self.cursor = _word_start(text, cursor)
            case "word-right":
                self.cursor = _word_end(text, cursor)
            case "backspace" if cursor:
                self.text = text[: cursor - 1] + text[cursor:]
                self.cursor = cursor - 1
            case "delete":
                self.text = text[:cursor] + text[cursor + 1 :]
            case "kill-start":
                self.text, self.cursor = text[cursor:], 0
            case "kill-end":
                self.text = text[:cursor]
            case "kill-word":
                start = _word_start(text, cursor)
                self.text, self.cursor = text[:start] + text[cursor:], start
            case "up":
                self._browse(-1)
            case "down":
                self._browse(+1)
            case "complete":
                return self._complete()
        return None

    def _enter(self) -> str:
        line = self.text
        if line.strip() and (not self._history or self._history[-1] != line):
            self._history.append(line)
            del self._history[: -self._history_size]
        self.clear()
        return line

    def _browse(self, step: int) -> None:
        history = self._history
        if self._recall is None:
            if step > 0 or not history:
                return
            self._draft = self.text
            index = len(history) - 1
        else:
            index = self._recall + step
            if index < 0:
                return
        if index >= len(history):
            self._recall, self.text = None, self._draft
        else:
            self._recall, self.text = index, history[index]
        self.cursor = len(self.text)

    def _complete(self) -> Candidates | None:
        if self.completer is None:
            return None
        before = self.text[: self.cursor]
        start = before.rfind(" ") + 1
        word = before[start:]
        first = not before[:start].strip()
        matches = sorted(set(self.completer(word, first)))
        if not matches:
            return None
        common = _common_prefix(matches)
        if len(matches) == 1:
            common += " "
        if len(common) > len(word):
            self.insert(common[len(word) :])
            return None
        return Candidates(tuple(matches))


def _common_prefix(words: Sequence[str]) -> str:
    first, last = min(words), max(words)
    for index, char in enumerate(first):
        if index >= len(last) or last[index] != char:
            return first[:index]
    return first


def _word_start(text: str, cursor: int) -> int:
    index = cursor
    while index and text[index - 1] == " ":
        index -= 1
    while index and text[index - 1] != " ":
        index -= 1
    return index


def _word_end(text: str, cursor: int) -> int:
    index = cursor
    while index < len(text) and text[index] == " ":
        index += 1
    while index < len(text) and text[index] != " ":
        index += 1
    return index


# --- layout -------------------------------------------------------------------


def cell_width(char: str) -> int:
    """Columns ``char`` takes on a terminal: 2 for wide (East Asian wide or
    full-width, most emoji), 0 for combining marks, else 1."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


@dataclass(frozen=True)
class Layout:
    """A prompt and a line wrapped to a terminal's width."""

    rows: tuple[str, ...]
    """The rows to write, each at most the width."""
    cursor_row: int
    """The cursor's row, an index into :attr:`rows`."""
    cursor_column: int


def layout(prompt: str, text: str, cursor: int, width: int) -> Layout:
    """Wrap ``prompt + text`` to ``width`` columns (a wide character that
    does not fit goes to the next row), with the cursor at ``cursor`` (an
    index into ``text``). When the cursor is past a full last row, the
    layout ends with an empty row for it."""
    width = max(width, 2)
    rows: list[str] = []
    row: list[str] = []
    column = 0
    cursor_at = (0, 0)
    line = prompt + text
    target = len(prompt) + cursor
    for index, char in enumerate(line):
        cells = cell_width(char)
        if column + cells > width:
            rows.append("".join(row))
            row, column = [], 0
        if index == target:
            cursor_at = (len(rows), column)
        row.append(char)
        column += cells
    if target >= len(line):
        if column >= width:
            rows.append("".join(row))
            row, column = [], 0
        cursor_at = (len(rows), column)
    rows.append("".join(row))
    return Layout(tuple(rows), *cursor_at)
