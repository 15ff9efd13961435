"""chatkit._lineedit: the line editor's keys and the wrapping of long lines,
without a terminal (tests/test_terminal.py drives the real client)."""

from __future__ import annotations

import pytest

from chatkit._lineedit import END_OF_INPUT, Candidates, LineEditor, layout


def typed(keys: str) -> LineEditor:
    editor = LineEditor()
    assert editor.feed(keys) == []
    return editor


@pytest.mark.parametrize(
    ("keys", "text", "cursor"),
    [
        ("abc", "abc", 3),
        ("abc\x1b[D\x1b[DX", "aXbc", 2),  # left, left, insert
        ("abc\x01X", "Xabc", 1),  # Ctrl-A
        ("abc\x01\x05X", "abcX", 4),  # Ctrl-E
        ("abc\x1b[H\x1b[FX", "abcX", 4),  # Home, End
        ("abc\x1bOH\x1b[CX", "aXbc", 2),  # Home (SS3), right
        ("abc\x02\x02\x06X", "abXc", 3),  # Ctrl-B, Ctrl-B, Ctrl-F
        ("abc\x7f", "ab", 2),  # Backspace
        ("abc\x01\x7f", "abc", 0),  # Backspace at the start: nothing
        ("abc\x01\x1b[3~", "bc", 0),  # Delete
        ("abc\x01\x04", "bc", 0),  # Ctrl-D on a line: delete
        ("one two\x1b[D\x15", "o", 0),  # Ctrl-U: what is left of the cursor
        ("one two\x01\x06\x06\x0b", "on", 2),  # Ctrl-K: the rest
        ("one two  \x17", "one ", 4),  # Ctrl-W: the word before
        ("one two\x1b[1;5D\x1b[1;5DX", "Xone two", 1),  # Ctrl-Left by words
        ("one two\x01\x1bfX", "oneX two", 4),  # Alt-f
        ("a\x1b[99;99Zb", "ab", 2),  # an unknown sequence is ignored
        ("a\tb", "ab", 2),  # Tab without a completer
    ],
)
def test_keys(keys: str, text: str, cursor: int) -> None:
    editor = typed(keys)
    assert (editor.text, editor.cursor) == (text, cursor)


def test_an_escape_sequence_split_across_reads() -> None:
    editor = typed("ab\x1b")
    assert editor.feed("[") == []
    assert editor.feed("DX") == []
    assert editor.text == "aXb"


def test_enter_returns_lines_and_pasted_lines_come_in_order() -> None:
    editor = LineEditor()
    assert editor.feed("one\r\ntwo\nthree\rfour") == ["one", "two", "three"]
    assert editor.text == "four"
    assert editor.feed("\r") == ["four"]
    assert (editor.text, editor.cursor) == ("", 0)


def test_ctrl_d_on_an_empty_line_ends_input() -> None:
    assert LineEditor().feed("\x04") == [END_OF_INPUT]


def test_history_up_and_down_keep_the_draft() -> None:
    editor = LineEditor()
    editor.feed("first\rsecond\rsecond\r   \rdraft")
    editor.feed("\x1b[A")
    assert editor.text == "second"  # repeats and blank lines are not kept
    editor.feed("\x10")  # Ctrl-P
    assert editor.text == "first"
    editor.feed("\x1b[A")  # the oldest: stays
    assert (editor.text, editor.cursor) == ("first", 5)
    editor.feed("\x1b[B\x0e")  # Down, Ctrl-N: back to the draft
    assert editor.text == "draft"
    editor.feed("\x1b[B")
    assert editor.text == "draft"


def test_history_is_bounded() -> None:
    editor = LineEditor(history_size=2)
    editor.feed("a\rb\rc\r")
    editor.feed("\x1b[A\x1b[A\x1b[A")
    assert editor.text == "b"


def test_tab_completes_as_far_as_the_candidates_agree() -> None:
    words = ["/join", "/room", "/rooms", "bob", "bobby"]
    asked: list[tuple[str, bool]] = []

    def completer(word: str, first: bool) -> list[str]:
        asked.append((word, first))
        return [w for w in words if w.startswith(word)]

    editor = LineEditor(completer)
    assert editor.feed("/j\t") == []
    assert editor.text == "/join "  # one candidate: completed, and a space
    assert editor.feed("/r\t") == []
    assert editor.text == "/join /room"  # two: as far as they agree
    assert editor.feed("\t") == [Candidates(("/room", "/rooms"))]
    editor.feed("\x15hi b\t")
    assert editor.text == "hi bob"
    assert asked[0] == ("/j", True) and asked[-1] == ("b", False)
    editor.feed("\x15x\t")
    assert editor.text == "x"  # nothing matches: nothing happens


@pytest.mark.parametrize(
    ("prompt", "text", "cursor", "width", "rows", "at"),
    [
        ("> ", "", 0, 10, ("> ",), (0, 2)),
        ("> ", "abcdefgh", 8, 10, ("> abcdefgh", ""), (1, 0)),  # row full
        ("> ", "abcdefghi", 9, 10, ("> abcdefgh", "i"), (1, 1)),
        ("> ", "abcdefghi", 0, 10, ("> abcdefgh", "i"), (0, 2)),
        ("> ", "abcdefghi", 8, 10, ("> abcdefgh", "i"), (1, 0)),
        ("> ", "a" * 25, 25, 10, ("> aaaaaaaa", "a" * 10, "a" * 7), (2, 7)),
        # A wide character that does not fit goes to the next row whole.
        ("> ", "abcdefg語", 8, 10, ("> abcdefg", "語"), (1, 2)),
        ("> ", "e\u0301", 2, 10, ("> e\u0301",), (0, 3)),  # combining: no cell
    ],
)
def test_layout(
    prompt: str,
    text: str,
    cursor: int,
    width: int,
    rows: tuple[str, ...],
    at: tuple[int, int],
) -> None:
    wrapped = layout(prompt, text, cursor, width)
    assert wrapped.rows == rows
    assert (wrapped.cursor_row, wrapped.cursor_column) == at
