"""chatkit._console: the CLI programs' line input, on a pipe."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest
import trio

from chatkit._console import Console


async def read_line(console: Console) -> str | None:
    with trio.fail_after(5):  # a line lost would otherwise wait forever
        return await console.read_line()


class Pipe:
    """An OS pipe whose writing end a test may close early."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()

    def write(self, data: bytes) -> None:
        os.write(self._write_fd, data)

    def close_writer(self) -> None:
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    pipe = Pipe()
    yield pipe
    pipe.close_writer()
    os.close(pipe.read_fd)


@pytest.fixture(params=[True, False], ids=["editor", "plain"])
def console(pipe: Pipe, request: pytest.FixtureRequest) -> Console:
    """A console reading ``pipe``, with the line editor and without."""
    return Console(
        interactive=request.param, stdin_fd=pipe.read_fd, stdout=io.StringIO()
    )


async def test_lines_typed_ahead_or_pasted_are_all_read(
    pipe: Pipe, console: Console
) -> None:
    pipe.write(b"first\r\nsecond\nthird\n")
    assert await read_line(console) == "first"
    assert await read_line(console) == "second"
    assert await read_line(console) == "third"
    pipe.close_writer()
    assert await read_line(console) is None


async def test_a_character_split_across_reads_is_whole(
    pipe: Pipe, console: Console
) -> None:
    encoded = "née\n".encode()
    pipe.write(encoded[:2])  # "n" and half of "é"
    pipe.write(encoded[2:])
    assert await read_line(console) == "née"


async def test_plain_input_ending_without_a_newline_is_a_last_line(
    pipe: Pipe,
) -> None:
    console = Console(interactive=False, stdin_fd=pipe.read_fd, stdout=io.StringIO())
    pipe.write(b"only")
    pipe.close_writer()
    assert await read_line(console) == "only"
    assert await read_line(console) is None


@pytest.mark.parametrize("interactive", [True, False], ids=["editor", "plain"])
async def test_dev_null_reads_as_end_of_input(interactive: bool) -> None:
    # `< /dev/null` (cron, nohup, CI): a device epoll refuses (EPERM).
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        console = Console(interactive=interactive, stdin_fd=fd, stdout=io.StringIO())
        assert await read_line(console) is None
        assert await read_line(console) is None
    finally:
        os.close(fd)


async def test_a_closed_descriptor_reads_as_end_of_input(pipe: Pipe) -> None:
    # Standard input closed (`<&-`): nothing to read, and nothing to crash.
    fd = pipe.read_fd
    pipe.read_fd = os.dup(fd)  # the fixture closes this one
    os.close(fd)
    for closed in (fd, -1):
        console = Console(interactive=False, stdin_fd=closed, stdout=io.StringIO())
        assert await read_line(console) is None
