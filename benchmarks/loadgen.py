"""The load generator of benchmarks/fanout.py: one worker process.

A worker holds a share of the N clients (asyncio protocols, on uvloop when
it is installed), registers them, and on command sends from its share of the
S senders, counting every message it receives. Workers are started and
driven by fanout.py over a multiprocessing pipe; they share two counters per
worker (sent, received) in shared memory, so that the throughput mode's
in-flight window is global: at most ``S * window`` messages sent and not yet
received by every recipient.

The spec may name several ``ports`` (the nodes of a cluster, for
benchmarks/cluster.py): client ``i`` then connects to ``ports[i % len]``.

Every message text carries a marker (``~q``), the sender's index, a sequence
number and the monotonic send time in ns, padded to 64 bytes. Deliveries are
counted by marker; latency is the receive time minus the send time (the
clock is the machine's CLOCK_MONOTONIC, shared by all processes).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import re
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

MARK = b"~q"
MARK_RE = re.compile(rb"~q(\d+)\.(\d+)\.(\d+)\.")
TEXT_SIZE = 64
ROOM = "bench"


def raise_file_limit(needed: int | None = None) -> int:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (default: the hard limit),
    never past the hard limit; children inherit it. Returns the soft limit."""
    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed is None:
        target = hard
    else:
        target = needed if hard == infinity else min(needed, hard)
    if soft != infinity and target != infinity and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class Dialect:
    """How one kind of server is spoken to."""

    #: A line that confirms a client's registration (None: none is sent).
    registered: bytes | None = None
    #: A line that announces a join.
    joined = b""

    def register(self, name: str) -> bytes:
        raise NotImplementedError

    def after_line(self, conn: Conn, line: bytes) -> None:
        """React to a line during registration (IRC: JOIN after 001)."""

    def message(self, text: bytes) -> bytes:
        raise NotImplementedError


class ChatkitDialect(Dialect):
    registered = b'"type":"welcome"'
    joined = b'"type":"joined"'

    def register(self, name: str) -> bytes:
        return b'{"type":"hello","name":"%s","protocol":1}\n' % name.encode()

    def message(self, text: bytes) -> bytes:
        return b'{"type":"say","text":"' + text + b'"}\n'


class LineDialect(Dialect):
    """The original program's protocol (the threaded baseline)."""

    registered = None
    joined = b" has joined the chat."

    def register(self, name: str) -> bytes:
        return name.encode() + b"\n"

    def message(self, text: bytes) -> bytes:
        return text + b"\n"


class IrcDialect(Dialect):
    registered = b" 366 "  # end of NAMES, after our own JOIN
    joined = b" JOIN "

    def register(self, name: str) -> bytes:
        return f"NICK {name}\r\nUSER {name} 0 * :{name}\r\n".encode()

    def after_line(self, conn: Conn, line: bytes) -> None:
        if b" 001 " in line:
            conn.transport.write(f"JOIN #{ROOM}\r\n".encode())

    def message(self, text: bytes) -> bytes:
        return b"PRIVMSG #" + ROOM.encode() + b" :" + text + b"\r\n"


DIALECTS: dict[str, type[Dialect]] = {
    "chatkit": ChatkitDialect,
    "line": LineDialect,
    "irc": IrcDialect,
}


def make_text(sender: int, seq: int) -> bytes:
    text = b"~q%d.%d.%d." % (sender, seq, time.monotonic_ns())
    return text + b"x" * (TEXT_SIZE - len(text))


class Conn(asyncio.Protocol):
    """One benchmark client."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.w = worker
        self.index = index
        self.transport: Any = None
        self.tail = b""
        self.registered = False
        self.is_sender = False
        self.observer = False
        self.seq = 0
        self.closed = False
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.w.lost += 1
        if not self.ready.done():
            self.ready.cancel()  # registration fails: "connection lost"

    def data_received(self, data: bytes) -> None:
        w = self.w
        buf = self.tail + data if self.tail else data
        end = buf.rfind(b"\n") + 1
        if end == 0:
            self.tail = buf
            return
        self.tail = buf[end:]
        n = buf.count(MARK, 0, end)
        if n:
            w.received += n
            w.shared[w.recv_slot] = w.received
            if w.parse_latency or self.observer:
                w.record_latency(self, buf[:end])
            if self.is_sender and w.pumping:
                w.pump()
        if w.registering:
            self.registration_lines(buf[:end])
        elif w.irc and b"PING" in buf[:end]:
            self.answer_pings(buf[:end])

    def registration_lines(self, chunk: bytes) -> None:
        w = self.w
        dialect = w.dialect
        for line in chunk.split(b"\n"):
            if dialect.joined in line:
                w.joins += 1
                w.last_event = time.monotonic()
            if not self.registered:
                dialect.after_line(self, line)
                if dialect.registered is not None and dialect.registered in line:
                    self.registered = True
                    w.last_event = time.monotonic()
                    if not self.ready.done():
                        self.ready.set_result(None)
            self.pong(line)

    def answer_pings(self, chunk: bytes) -> None:
        for line in chunk.split(b"\n"):
            self.pong(line)

    def pong(self, line: bytes) -> None:
        """Answer an IRC PING."""
        if line.startswith(b"PING"):
            self.transport.write(b"PONG" + line[4:].rstrip(b"\r") + b"\r\n")

    def send_messages(self, count: int) -> None:
        message = self.w.dialect.message
        parts = []
        for _ in range(count):
            parts.append(message(make_text(self.index, self.seq)))
            self.seq += 1
        self.transport.write(b"".join(parts))


class Worker:
    """One load-generator process's share of the clients, and its counters."""

    def __init__(self, slot: int, workers: int, shared: Any, args: dict[str, Any]):
        self.workers = workers
        self.shared = shared
        self.slot = slot
        self.recv_slot = workers + slot
        self.dialect = DIALECTS[args["dialect"]]()
        self.irc = args["dialect"] == "irc"
        self.host = args["host"]
        self.ports: list[int] = args.get("ports") or [args["port"]]
        self.conns: list[Conn] = []
        self.senders: list[Conn] = []
        self.registering = False
        self.parse_latency = False
        self.pumping = False
        self.received = 0
        self.sent = 0
        self.joins = 0
        self.lost = 0
        self.last_event = 0.0
        self.latencies = array.array("q")
        self.measure_from = 0
        self.measure_to = 0
        # throughput window
        self.limit = 0
        self.share = 1.0
        self.per_message = 1
        self.next_sender = 0

    # --- registration -------------------------------------------------

    async def register(self, indexes: list[int], concurrency: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self.registering = True
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            async with gate:
                port = self.ports[index % len(self.ports)]
                _, conn = await loop.create_connection(
                    lambda: Conn(self, index), self.host, port
                )
                self.conns.append(conn)
                conn.transport.write(self.dialect.register(f"c{index}"))
                if self.dialect.registered is None:
                    conn.registered = True
                    self.last_event = time.monotonic()
                else:
                    await asyncio.wait_for(conn.ready, 60)

        await asyncio.gather(*(one(i) for i in indexes))
        self.conns.sort(key=lambda c: c.index)
        return {"registered": time.monotonic()}

    # --- throughput -----------------------------------------------------

    def set_senders(self, senders: list[int]) -> None:
        wanted = set(senders)
        self.senders = [c for c in self.conns if c.index in wanted]
        for conn in self.senders:
            conn.is_sender = True
        if self.conns:
            self.conns[0].observer = True

    def pump(self) -> None:
        """Send as much as the global window allows (our share of it)."""
        shared = self.shared
        p = self.workers
        sent = sum(shared[0:p])
        received = sum(shared[p : 2 * p])
        in_flight = sent - received / self.per_message
        budget = int((self.limit - in_flight) * self.share)
        senders = self.senders
        if budget <= 0 or not senders:
            return
        each, extra = divmod(budget, len(senders))
        start = self.next_sender
        for k in range(len(senders)):
            conn = senders[(start + k) % len(senders)]
            count = each + (1 if k < extra else 0)
            if count:
                conn.send_messages(count)
                self.sent += count
        self.next_sender = (start + extra) % len(senders)
        shared[self.slot] = self.sent

    def poll(self) -> None:
        if not self.pumping:
            return
        self.pump()
        asyncio.get_running_loop().call_later(0.001, self.poll)

    # --- latency ----------------------------------------------------------

    def record_latency(self, conn: Conn, chunk: bytes) -> None:
        now = time.monotonic_ns()
        lo, hi = self.measure_from, self.measure_to
        own = conn.index
        append = self.latencies.append
        for match in MARK_RE.finditer(chunk):
            sent = int(match.group(3))
            if lo <= sent < hi and int(match.group(1)) != own:
                append(now - sent)

    async def fixed_rate(self, start: float, end: float, rate: float) -> None:
        """Send ``rate`` messages per second, round robin over our senders.

        The workers interleave: worker ``k`` of ``W`` starts ``k / W`` of an
        interval late, so that together they offer one message every
        ``interval / W`` rather than ``W`` messages at once every
        ``interval``.
        """
        senders = self.senders
        if not senders or rate <= 0:
            return
        interval = 1.0 / rate
        due = start + interval * self.slot / self.workers
        i = 0
        while True:
            now = time.monotonic()
            if due >= end:
                return
            if due > now:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            while due <= now and due < end:
                senders[i % len(senders)].send_messages(1)
                i += 1
                self.sent += 1
                due += interval
            self.shared[self.slot] = self.sent

    # --- commands -------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "sent": self.sent,
            "received": self.received,
            "cpu": time.process_time(),
            "joins": self.joins,
            "lost": self.lost,
            "last_event": self.last_event,
        }

    async def run_phase(self, spec: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start, warmup, duration = spec["start"], spec["warmup"], spec["duration"]
        measure_start = start + warmup
        end = measure_start + duration
        self.measure_from = int(measure_start * 1e9)
        self.measure_to = int(end * 1e9)
        self.latencies = array.array("q")
        self.per_message = spec["per_message"]
        self.parse_latency = spec["mode"] == "latency"
        snaps: dict[str, Any] = {}

        def take(name: str) -> None:
            snaps[name] = self.snapshot()

        await asyncio.sleep(max(0.0, start - time.monotonic()))
        loop.call_later(max(0.0, measure_start - time.monotonic()), take, "begin")
        loop.call_later(max(0.0, end - time.monotonic()), take, "end")
        if spec["mode"] == "throughput":
            self.limit = spec["window"] * spec["senders"]
            self.share = len(self.senders) / max(1, spec["senders"])
            self.pumping = True
            self.poll()
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            self.pumping = False
        else:
            rate = spec["rate"] * len(self.senders) / max(1, spec["senders"])
            await self.fixed_rate(start, end, rate)
            await asyncio.sleep(max(0.0, end - time.monotonic()))
        await asyncio.sleep(0.01)
        return snaps

    def probe(self, sender: int) -> None:
        """Send one message from client ``sender``, if it is one of ours."""
        for conn in self.conns:
            if conn.index == sender:
                conn.send_messages(1)
                self.sent += 1
                self.shared[self.slot] = self.sent

    def close_all(self) -> None:
        for conn in self.conns:
            transport = conn.transport
            if transport is None or conn.closed:
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Reset rather than FIN: thousands of runs' worth of
                # TIME_WAIT sockets would use up the ephemeral ports.
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
            transport.abort()


async def serve(pipe: Any, worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[Any] = asyncio.Queue()

    def read_command() -> None:
        try:
            commands.put_nowait(pipe.recv())
        except EOFError:
            # The benchmark is gone (killed): close and end, rather than
            # spin on a pipe that stays readable at end of file.
            loop.remove_reader(pipe.fileno())
            commands.put_nowait({"op": "close", "orphaned": True})

    loop.add_reader(pipe.fileno(), read_command)
    # add_reader made the pipe non-blocking; a large reply (the latencies)
    # must not fail with EAGAIN, and the pipe is only read when readable.
    os.set_blocking(pipe.fileno(), True)
    tasks: set[asyncio.Task[Any]] = set()

    def reply_when_done(name: str, make: Callable[[], Any]) -> None:
        async def run() -> None:
            try:
                result = await make()
            except Exception as exc:
                pipe.send({"error": f"{name}: {type(exc).__name__}: {exc}"})
                return
            pipe.send(result)

        task = asyncio.ensure_future(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    while True:
        cmd = await commands.get()
        op = cmd["op"]
        if op == "register":
            reply_when_done(
                "register",
                lambda cmd=cmd: worker.register(cmd["indexes"], cmd["concurrency"]),
            )
        elif op == "senders":
            worker.set_senders(cmd["senders"])
            pipe.send({"ok": True})
        elif op == "registering":
            worker.registering = cmd["on"]
            pipe.send({"ok": True})
        elif op == "snapshot":
            pipe.send(worker.snapshot())
        elif op == "phase":
            reply_when_done("phase", lambda cmd=cmd: worker.run_phase(cmd))
        elif op == "latencies":
            pipe.send(worker.latencies.tobytes())
        elif op == "probe":
            worker.parse_latency = True
            worker.measure_from, worker.measure_to = 0, 2**62
            worker.latencies = array.array("q")
            worker.probe(cmd["sender"])
            pipe.send({"ok": True})
        elif op == "close":
            worker.close_all()
            if cmd.get("orphaned"):
                return
            await asyncio.sleep(0.05)
            pipe.send({"ok": True})
            return


def worker_main(
    slot: int, workers: int, shared: Any, args: dict[str, Any], pipe: Any
) -> None:
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run
    worker = Worker(slot, workers, shared, args)
    try:
        runner(serve(pipe, worker))
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(1)
