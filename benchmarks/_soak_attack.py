"""The attacker of ``benchmarks/soak.py --attacks``: runs issue 18's attacks
on the server one after the other, from loopback addresses of their own
(127.1.x.y). Started by soak.py (``python _soak_attack.py CONFIG.json``),
not by hand.

Each attack runs for ``seconds`` and is then stopped (its connections
closed, any firewall rule removed); between two attacks the server gets
``pause`` seconds of ordinary chat. For each attack one JSON line goes to
standard output: its name, when it started and ended (CLOCK_MONOTONIC, the
clock every process of the run shares) and what the attacker saw (how its
connections ended, the errors it was sent).

- ``blank_lines``: 48 connections send newlines without end, half before
  any hello, half after a line-mode name.
- ``renames``: 200 users in ``lobby`` each send three ``nick``s a second.
- ``dm_burst``: 30 users send bursts of 38 dms of 16 KiB (4,096 emoji)
  to one victim,
  which reads all the time; the victim must stay connected.
- ``half_open``: 20 users in ``lobby`` vanish without a FIN (an iptables
  rule drops what the server sends them) while room traffic flows to them;
  the attacker then asks who is left.
- ``partial_lines``: 300 connections that never say hello each send 65,000
  bytes without a newline, and come back when reaped.
- ``address_hold``: one address keeps up to 400 idle connections open.
"""

from __future__ import annotations

import collections
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

Outcome = collections.Counter[str]


def address(index: int) -> str:
    """The ``index``-th attacker address (127.1.x.y)."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


class Conn:
    """One attacker connection: a stream and a task reading what it is
    sent (counting the error codes) until the server closes it."""

    def __init__(self, stream: trio.SocketStream, outcome: Outcome) -> None:
        self.stream = stream
        self.outcome = outcome
        self.closed = trio.Event()
        self.ended_by_server = False  # not by our own cancellation
        self.lines: list[dict[str, Any]] = []  # kept only when asked for
        self.keep = False

    @classmethod
    async def open(
        cls, port: int, source: str, outcome: Outcome, nursery: trio.Nursery
    ) -> Conn:
        sock = trio.socket.socket()
        try:
            await sock.bind((source, 0))
            with trio.fail_after(10):
                await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        conn = cls(trio.SocketStream(sock), outcome)
        nursery.start_soon(conn._read)
        return conn

    async def _read(self) -> None:
        buf = b""
        try:
            while data := await self.stream.receive_some(65536):
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    if line.startswith(b'{"type":"error"'):
                        self.outcome["error " + json.loads(line)["code"]] += 1
                    elif line.startswith(b"error ("):  # line mode
                        self.outcome[line.decode().split(")")[0] + ")"] += 1
                    if self.keep:
                        self.lines.append(json.loads(line))
            self.outcome["closed by the server"] += 1
            self.ended_by_server = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.outcome["reset"] += 1
            self.ended_by_server = True
        finally:
            self.closed.set()

    async def send(self, data: bytes) -> bool:
        """Send ``data``; False if the connection is gone."""
        try:
            await self.stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def json(self, **fields: Any) -> bool:
        return await self.send(json.dumps(fields, ensure_ascii=False).encode() + b"\n")

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def again_and_again(
    port: int,
    count: int,
    outcome: Outcome,
    body: Callable[[Conn, int], Awaitable[None]],
) -> None:
    """``count`` connections, each from its own address, each running
    ``body(conn, i)`` and reconnecting when the server closes it (after a
    tenth of a second), until cancelled."""

    async def one(i: int) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn = await Conn.open(port, address(i), outcome, nursery)
                except (OSError, trio.TooSlowError):
                    outcome["connect failed"] += 1
                    await trio.sleep(0.5)
                    continue
                outcome["connections"] += 1
                try:
                    with trio.CancelScope() as scope:
                        nursery.start_soon(_cancel_when, conn.closed, scope)
                        await body(conn, i)
                        await conn.closed.wait()
                finally:
                    await conn.close()
                await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# --- the attacks ------------------------------------------------------------------


async def blank_lines(port: int, outcome: Outcome) -> None:
    async def body(conn: Conn, i: int) -> None:
        if i % 2:  # a line-mode name first
            await conn.send(b"blank%d\n" % conn.stream.socket.getsockname()[1])
        chunk = b"\n" * 65536
        while await conn.send(chunk):
            pass

    await again_and_again(port, 48, outcome, body)


async def renames(port: int, outcome: Outcome) -> None:
    async def body(conn: Conn, i: int) -> None:
        base = f"r{conn.stream.socket.getsockname()[1]}"
        await conn.json(type="hello", name=base, protocol=1)
        n = 0
        while True:
            await trio.sleep(1)
            burst = b"".join(
                json.dumps({"type": "nick", "name": f"{base}x{n + k}"}).encode() + b"\n"
                for k in range(3)
            )
            n += 3
            outcome["nicks"] += 3
            if not await conn.send(burst):
                return

    await again_and_again(port, 200, outcome, body)


async def dm_burst(port: int, outcome: Outcome) -> None:
    victim_outcome: Outcome = collections.Counter()
    async with trio.open_nursery() as nursery:
        victim = await Conn.open(port, address(900), victim_outcome, nursery)
        await victim.json(type="hello", name="victim", protocol=1)
        await trio.sleep(0.5)
        text = "\N{GRINNING FACE}" * 4096  # 16 KiB, within 4,096 characters

        async def body(conn: Conn, i: int) -> None:
            name = f"d{conn.stream.socket.getsockname()[1]}"
            await conn.json(type="hello", name=name, protocol=1)
            while True:
                dm = {"type": "dm", "to": "victim", "text": text}
                burst = (json.dumps(dm, ensure_ascii=False) + "\n").encode() * 38
                outcome["dms"] += 38
                if not await conn.send(burst):
                    return
                await trio.sleep(5)

        try:
            await again_and_again(port, 30, outcome, body)
        finally:
            outcome["victim disconnected"] = int(victim.ended_by_server)
            for key, value in victim_outcome.items():
                outcome["victim: " + key] = value
            await victim.close()
            nursery.cancel_scope.cancel()


async def half_open(port: int, outcome: Outcome) -> None:
    rules: list[list[str]] = []
    names: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            conns = []
            for i in range(20):
                conn = await Conn.open(port, address(i), outcome, nursery)
                name = f"h{conn.stream.socket.getsockname()[1]}"
                await conn.json(type="hello", name=name, protocol=1)
                conns.append(conn)
                names.append(name)
            await trio.sleep(1)
            for conn in conns:
                # Its address and port: other sockets (the soak's clients,
                # on other addresses) may have the same port number.
                host, port_ = conn.stream.socket.getsockname()[:2]
                rule = ["OUTPUT", "-o", "lo", "-p", "tcp", "-d", host]
                rule += ["--dport", str(port_), "-j", "DROP"]
                await trio.run_process(["iptables", "-I", *rule])
                rules.append(rule)
            outcome["vanished"] = len(conns)
            vanished_at = time.monotonic()
            watcher = await Conn.open(port, address(950), outcome, nursery)
            watcher.keep = True
            await watcher.json(type="hello", name="watcher", protocol=1)
            # Until cancelled: every 5 s, who of the vanished is still in?
            while True:
                await trio.sleep(5)
                await watcher.json(type="who", room="lobby", ref="who")
                await trio.sleep(1)
                answers = [x for x in watcher.lines if x.get("ref") == "who"]
                if answers:
                    members = set(answers[-1]["names"])
                    left = sum(name in members for name in names)
                    outcome["vanished still in"] = left
                    if left == 0 and "reaped after s" not in outcome:
                        reaped = time.monotonic() - vanished_at
                        outcome["reaped after s"] = round(reaped)
                watcher.lines.clear()
    finally:
        with trio.CancelScope(shield=True):
            for rule in rules:
                await trio.run_process(["iptables", "-D", *rule], check=False)


async def partial_lines(port: int, outcome: Outcome) -> None:
    async def body(conn: Conn, i: int) -> None:
        await conn.send(b"x" * 65_000)

    await again_and_again(port, 300, outcome, body)


async def address_hold(port: int, outcome: Outcome) -> None:
    async def one(i: int) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn = await Conn.open(port, "127.0.0.2", outcome, nursery)
                except (OSError, trio.TooSlowError):
                    outcome["connect failed"] += 1
                    await trio.sleep(0.5)
                    continue
                outcome["connections"] += 1
                await conn.closed.wait()
                await conn.close()
                await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        for i in range(400):
            nursery.start_soon(one, i)


ATTACKS: dict[str, Callable[[int, Outcome], Awaitable[None]]] = {
    "blank_lines": blank_lines,
    "renames": renames,
    "dm_burst": dm_burst,
    "half_open": half_open,
    "partial_lines": partial_lines,
    "address_hold": address_hold,
}


async def main(config: dict[str, Any]) -> None:
    # soak.py stops us with SIGTERM: end as if cancelled, so that the
    # half-open attack removes its firewall rules on the way out.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_sigterm, nursery.cancel_scope)
        await attack_in_turn(config)
        nursery.cancel_scope.cancel()


async def _cancel_on_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()


async def attack_in_turn(config: dict[str, Any]) -> None:
    port = config["port"]
    await trio.sleep(config["pause"])
    for name in config["attacks"]:
        outcome: Outcome = collections.Counter()
        started = time.monotonic()
        with trio.move_on_after(config["seconds"]):
            await ATTACKS[name](port, outcome)
        ended = time.monotonic()
        report = {"attack": name, "start": started, "end": ended, "outcome": outcome}
        print(json.dumps(report), flush=True)
        await trio.sleep(config["pause"])


if __name__ == "__main__":
    trio.run(main, json.loads(Path(sys.argv[1]).read_text()))
