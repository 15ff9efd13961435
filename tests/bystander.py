"""An innocent bystander, in a process of its own: ``python tests/bystander.py
PORT NAME INTERVAL [HELLO_JSON]``.

It logs in (JSON mode) as NAME, then every INTERVAL seconds says a line in
``lobby`` and waits for the server's acknowledgement (its own copy), while
reading everything else it is sent. Each round trip is printed as a JSON
line on standard output (``{"rtt": seconds, "t": its end, "id": the
message's}``, ``t`` on CLOCK_MONOTONIC), and so is every error the server sends
(``{"error": {...}}``) and the end of the connection
(``{"closed": "..."}``). It stops when its standard input closes, after
printing ``{"done": round_trips}``.

Blocking sockets and no event loop: the figures measure the server, not
the test process that runs the attack (see tests/attacks.py).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from typing import Any

#: A round trip not complete after this long is reported as lost.
LOST_AFTER = 10.0


def emit(**fields: Any) -> None:
    """One report line on standard output."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class Connection:
    """A blocking JSON-lines connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=LOST_AFTER)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, **fields: Any) -> None:
        self.sock.sendall(json.dumps(fields).encode() + b"\n")

    def receive(self, until: float) -> dict[str, Any] | None:
        """The next event, or None if none came before ``until``."""
        while b"\n" not in self.buf:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if ready:
                self.read()
        line, _, self.buf = self.buf.partition(b"\n")
        event: dict[str, Any] = json.loads(line)
        if event.get("type") == "error":
            emit(error=event)
        return event

    def read(self) -> None:
        """Take what the socket has (it is readable)."""
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buf += data

    def drain(self) -> None:
        """Read what the socket has and handle every complete event."""
        self.read()
        while self.receive(0.0) is not None:
            pass


def main() -> None:
    port, name, interval = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    try:
        conn = Connection(port)
        conn.send(type="hello", name=name, protocol=1, **extra)
        deadline = time.monotonic() + LOST_AFTER
        while (event := conn.receive(deadline)) is None or event["type"] != "welcome":
            if event is None or event["type"] == "error":
                emit(closed=f"not welcomed: {event}")
                return
        emit(welcome=event)
        count = 0
        stdin = sys.stdin.fileno()
        while True:
            count += 1
            sent_at = time.monotonic()
            conn.send(type="say", room="lobby", text=f"{name} {count}", ref=count)
            lost_at = sent_at + LOST_AFTER
            while True:
                event = conn.receive(lost_at)
                if event is None:
                    emit(lost=count)
                    break
                if event.get("type") == "message" and event.get("ref") == count:
                    now = time.monotonic()
                    emit(rtt=now - sent_at, t=now, id=event["id"])
                    break
            # Read (and drop) whatever else comes until the next round trip;
            # stop when the test closes our standard input.
            next_at = sent_at + interval
            while (remaining := next_at - time.monotonic()) > 0:
                ready, _, _ = select.select([conn.sock, stdin], [], [], remaining)
                if stdin in ready:
                    emit(done=count)
                    return
                if ready:
                    conn.drain()
    except (OSError, EOFError) as exc:
        emit(closed=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
