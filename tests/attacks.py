"""The attack harness: a bystander that measures the server while a test
attacks it, and helpers for attackers.

The server is the CLI (``start_server`` of tests/programs.py), as a user
starts it; the bystander is tests/bystander.py in a process of its own, so
its round trips measure the server and not the test's own event loop,
which is busy running the attack.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from tests.programs import ROOT, child_environment

#: A bystander round trip slower than this fails the test (seconds).
LATENCY_LIMIT: Final = 1.0
#: The bystander says a line this often (seconds).
INTERVAL: Final = 0.2


class Bystander:
    """What the bystander process reported: its round trips, the errors the
    server sent it, lost round trips and how its connection ended."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rtts: list[float] = []
        self.errors: list[dict[str, Any]] = []
        self.lost: list[int] = []
        self.closed: str | None = None
        self.welcomed = trio.Event()
        self.ended = trio.Event()

    async def pump(self, stdout: trio.abc.ReceiveStream) -> None:
        """Read the process's reports until it ends."""
        buf = b""
        try:
            while data := await stdout.receive_some(65536):
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._report(json.loads(line))
        finally:
            self.ended.set()
            self.welcomed.set()  # whatever happened, stop waiting for it

    def _report(self, report: dict[str, Any]) -> None:
        if "rtt" in report:
            self.rtts.append(report["rtt"])
        elif "error" in report:
            self.errors.append(report["error"])
        elif "lost" in report:
            self.lost.append(report["lost"])
        elif "closed" in report:
            self.closed = report["closed"]
        elif "welcome" in report:
            self.welcomed.set()

    async def round_trips(self, count: int, within: float = 30.0) -> None:
        """Wait until ``count`` more round trips were completed."""
        goal = len(self.rtts) + count
        with trio.fail_after(within):
            while len(self.rtts) < goal:
                if self.closed is not None:
                    raise AssertionError(f"{self.name} was disconnected: {self.closed}")
                await trio.sleep(0.05)

    def check(self, *, at_least: int = 5, limit: float = LATENCY_LIMIT) -> None:
        """The bystander was unharmed: at least ``at_least`` round trips,
        each under ``limit`` seconds, no error, none lost, still connected."""
        assert self.closed is None, f"{self.name} was disconnected: {self.closed}"
        assert not self.errors, f"{self.name} got errors: {self.errors[:3]}"
        assert not self.lost, f"{self.name} lost round trips {self.lost}"
        assert len(self.rtts) >= at_least, f"only {len(self.rtts)} round trips"
        worst = max(self.rtts)
        assert worst < limit, (
            f"{self.name}'s slowest round trip took {worst:.3f} s "
            f"(limit {limit} s; {len(self.rtts)} round trips)"
        )

    @property
    def worst(self) -> float:
        """The slowest round trip so far (seconds)."""
        return max(self.rtts, default=0.0)


@asynccontextmanager
async def bystander(
    port: int,
    name: str = "bystander",
    *,
    interval: float = INTERVAL,
    hello: dict[str, Any] | None = None,
) -> AsyncIterator[Bystander]:
    """Run a bystander against the server on ``port`` for the block: it is
    logged in when the block starts (``hello``: more hello fields), and
    stopped, its reports all read, when the block ends."""
    result = Bystander(name)
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            str(ROOT / "tests" / "bystander.py"),
            str(port),
            name,
            str(interval),
            json.dumps(hello or {}),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_environment(),
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(result.pump, process.stdout)
            with trio.fail_after(10):
                await result.welcomed.wait()
            if result.closed is not None:
                raise AssertionError(f"{name} could not log in: {result.closed}")
            yield result
            await process.stdin.aclose()
            with trio.fail_after(15):
                await result.ended.wait()
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        await process.stdout.aclose()


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def address(index: int) -> str:
    """The ``index``-th attacker address: 127.1.x.y, apart from the
    bystander's 127.0.0.1 (Linux answers all of 127.0.0.0/8 on loopback).
    Attacks spread over many addresses test a defence other than the
    per-address connection limit."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


async def connect_from(
    port: int, source: str = "127.0.0.2", within: float = 5.0
) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` from the loopback address
    ``source`` (see :func:`address`)."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        with trio.fail_after(within):
            await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)
