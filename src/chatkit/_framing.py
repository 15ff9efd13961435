"""Line framing for chatkit's wire protocol, sans-IO: received bytes in,
lines out (:class:`LineFramer`). Public as part of :mod:`chatkit.protocol`,
which re-exports everything here."""

from __future__ import annotations

import enum
from typing import Final

from ._exceptions import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = ["DEFAULT_MAX_LINE_LENGTH", "EOF", "NEED_DATA", "LineFramer", "Status"]

#: Longest line (in bytes, without its ``\n``) accepted by default: 64 KiB.
DEFAULT_MAX_LINE_LENGTH: Final = 64 * 1024


class Status(enum.Enum):
    """What :meth:`chatkit.protocol.ServerConnection.next_event` (and
    :meth:`LineFramer.next_line`) returns when it has no event."""

    NEED_DATA = "NEED_DATA"
    """Every complete line was consumed: feed more bytes."""
    EOF = "EOF"
    """The peer sent end of file and every complete line was consumed."""


NEED_DATA: Final = Status.NEED_DATA
EOF: Final = Status.EOF


_CR: Final = 0x0D  # b"\r"[0]
# The start of an incomplete line is kept as the pieces it came in, each one
# exactly as large as its bytes: no growing buffer to over-allocate and
# reallocate. So that a line sent a byte at a time does not cost an object
# per byte, a run of this many small pieces at the end is joined into one.
_SMALL_RUN: Final = 8
_SMALL: Final = 4096


class LineFramer:
    """Incremental ``\\n`` framing with a bound on the line length.

    A line longer than ``max_line_length`` bytes (not counting the ``\\r``
    of a ``\\r\\n``) is discarded up to its end and reported once by
    raising :class:`RemoteProtocolError` (``too_large``); the lines after it
    are unaffected. Bytes after the last ``\\n`` at end of
    file are an incomplete line and are dropped.

    ``max_line_length`` may be changed between calls; it applies from the
    next call of :meth:`next_line`.

    Memory: received bytes are split into lines where they are, without
    being copied into a buffer first; once every complete line was taken
    (:meth:`next_line` returned :data:`NEED_DATA`), only the incomplete line
    at the end is kept, at most ``max_line_length`` + 1 bytes and not much
    more in memory.
    """

    # One per connection: no instance dict.
    __slots__ = (
        "_buf",
        "_discarding",
        "_eof",
        "_head",
        "_head_length",
        "_scanned",
        "_start",
        "max_line_length",
    )

    def __init__(self, max_line_length: int = DEFAULT_MAX_LINE_LENGTH) -> None:
        if max_line_length < 1:
            raise ValueError("max_line_length must be at least 1")
        self.max_line_length = max_line_length
        # The received bytes being split: lines before _start are consumed.
        # Empty whenever next_line has returned a Status.
        self._buf = b""
        self._start = 0
        self._scanned = 0  # no b"\n" in _buf[_start:_scanned]
        # The start of the current line, from earlier pieces (no b"\n" in
        # them), or None; and its length.
        self._head: list[bytes] | None = None
        self._head_length = 0
        self._discarding = False
        self._eof = False

    @property
    def eof(self) -> bool:
        """True once end of file was received."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as lines."""
        return self._head_length + len(self._buf) - self._start

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("received data after end of file")
            return
        if not data:
            self._eof = True
            return
        if not self._buf:
            self._buf = bytes(data)  # no copy of bytes: kept as received
            return
        # More data before every line was taken: join the rest to it.
        start = self._start
        self._buf = self._buf[start:] + data
        self._scanned -= start
        self._start = 0

    def next_line(self) -> bytes | Status:
        """Return the next complete line (without ``\\n``), or a :class:`Status`."""
        while True:
            buf = self._buf
            end = buf.find(b"\n", self._scanned)
            if end < 0:
                start = self._start
                pending = self._head_length + len(buf) - start
                # One byte more may be the \r of a \r\n, not counted.
                if pending > self.max_line_length + 1 and not self._discarding:
                    self._begin_discard()
                    raise RemoteProtocolError(
                        ErrorCode.TOO_LARGE,
                        f"line longer than {self.max_line_length} bytes",
                    )
                if self._discarding:
                    self._head = None
                    self._head_length = 0
                elif start < len(buf):
                    self._keep(buf[start:] if start else buf)
                self._buf = b""
                self._start = self._scanned = 0
                return EOF if self._eof else NEED_DATA
            start = self._start
            self._start = self._scanned = end + 1
            if self._discarding:
                self._discarding = False
                continue
            if self._head is None:
                line = buf[start:end]
            else:
                line = b"".join((*self._head, buf[start:end]))
                self._head = None
                self._head_length = 0
            length = len(line)
            if length and line[-1] == _CR:
                length -= 1  # a \r\n ends the line: the \r is not in it
            if length > self.max_line_length:
                raise RemoteProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"line longer than {self.max_line_length} bytes",
                )
            return line

    def peek_first_byte(self) -> int | None:
        """The first unconsumed byte, if any (used for mode detection)."""
        if self._head is not None:
            return self._head[0][0]
        return self._buf[self._start] if self._start < len(self._buf) else None

    def _keep(self, piece: bytes) -> None:
        # Keep the start of an incomplete line until the rest comes.
        head = self._head
        if head is None:
            self._head = [piece]
        else:
            head.append(piece)
            run = head[-_SMALL_RUN:]
            if len(run) == _SMALL_RUN and max(map(len, run)) < _SMALL:
                head[-_SMALL_RUN:] = [b"".join(run)]
        self._head_length += len(piece)

    def _begin_discard(self) -> None:
        self._discarding = True
        self._buf = b""
        self._head = None
        self._head_length = 0
        self._start = self._scanned = 0
