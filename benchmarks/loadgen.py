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

The ``ws`` dialect speaks chatkit's protocol v1 over WebSocket (RFC 6455:
one JSON object per text frame, the client's frames masked; the framing is
benchmarks/wsframes.py): :class:`WsConn` does the opening handshake on the
spec's ``path`` (default ``/ws``), answers pings and closes, and counts
deliveries by marker over whole buffers of frames, as the JSON-lines client
does over whole buffers of lines.

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

import wsframes

MARK = b"~q"
#: The marker as it opens a JSON string: what a WebSocket client counts
#: (a frame's length bytes can spell ``~q``, never ``"~q``).
WS_MARK = b'"~q'
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
    #: Spoken over WebSocket (:class:`WsConn`), one message per text frame.
    websocket = False

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


class WsDialect(ChatkitDialect):
    """Protocol v1 over WebSocket: the same JSON objects, without the
    newline (one per text frame; :class:`WsConn` frames them)."""

    websocket = True

    def register(self, name: str) -> bytes:
        return b'{"type":"hello","name":"%s","protocol":1}' % name.encode()

    def message(self, text: bytes) -> bytes:
        return b'{"type":"say","text":"' + text + b'"}'


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
    "ws": WsDialect,
    "line": LineDialect,
    "irc": IrcDialect,
}


def make_text(sender: int, seq: int) -> bytes:
    text = b"~q%d.%d.%d." % (sender, seq, time.monotonic_ns())
    return text + b"x" * (TEXT_SIZE - len(text))


class Conn(asyncio.Protocol):
    """One benchmark client."""

    #: What each delivery holds once, and nothing else does.
    mark = MARK

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

    def start(self, registration: bytes) -> None:
        """Send the registration (the dialect's ``register``)."""
        self.transport.write(registration)

    def data_received(self, data: bytes) -> None:
        w = self.w
        buf = self.tail + data if self.tail else data
        end = buf.rfind(b"\n") + 1
        if end == 0:
            self.tail = buf
            return
        self.tail = buf[end:]
        self.delivered(buf, end)
        if w.registering:
            self.registration_lines(buf[:end])
        elif w.irc and b"PING" in buf[:end]:
            self.answer_pings(buf[:end])

    def delivered(self, chunk: bytes | bytearray, end: int) -> None:
        """Count the deliveries in ``chunk[:end]`` (whole messages)."""
        w = self.w
        n = chunk.count(self.mark, 0, end)
        if n:
            w.received += n
            w.shared[w.recv_slot] = w.received
            if w.parse_latency or self.observer:
                w.record_latency(self, chunk[:end])
            if self.is_sender and w.pumping:
                w.pump()

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
        self.transport.write(self.pack(parts))

    def pack(self, messages: list[bytes]) -> bytes:
        """``messages`` (the dialect's) as the bytes to send."""
        return b"".join(messages)


class WsConn(Conn):
    """One benchmark client over WebSocket (the ``ws`` dialect).

    Like :class:`Conn` with lines, each time bytes arrive, the complete
    frames among them (and the part of a frame kept from before) are
    handled at once: when they are all text frames of JSON
    (:func:`wsframes.fast_end`, the traffic of every phase), their markers
    are counted with one ``count`` over the buffer; otherwise (registration,
    a ping, a close, a fragment) they are parsed one by one
    (:func:`wsframes.walk`).
    """

    mark = WS_MARK

    def __init__(self, worker: Worker, index: int) -> None:
        super().__init__(worker, index)
        self.open = False
        self.accept = b""
        self.pending: bytes | None = None
        self.fragments: list[bytes] | None = None
        self.closing = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        port = transport.get_extra_info("peername")[1]
        request, self.accept = wsframes.handshake_request(
            self.w.host, port, self.w.ws_path
        )
        transport.write(request)

    def start(self, registration: bytes) -> None:
        """Send the registration once the handshake is done."""
        if self.open:
            self.transport.write(wsframes.client_frames([registration]))
        else:
            self.pending = registration

    def fail(self, exc: Exception) -> None:
        """Registration fails with ``exc``; the connection is dropped."""
        if not self.ready.done():
            self.ready.set_exception(exc)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        if not self.open:
            buf = self.handshake(buf)
            if not buf:
                return
        if not self.w.registering and self.fragments is None:
            end = wsframes.fast_end(buf)
            if end >= 0:
                self.tail = buf[end:]
                if end:
                    self.delivered(buf, end)
                return
        self.frames(buf)

    def handshake(self, buf: bytes) -> bytes:
        """Read the server's answer to the opening handshake, if it is all
        here, then send the registration; the bytes after the answer."""
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            self.tail = buf
            if len(buf) > 65536:
                self.fail(wsframes.ProtocolError("handshake: no end of headers"))
            return b""
        self.tail = b""
        try:
            wsframes.check_response(buf[:head_end], self.accept)
        except wsframes.ProtocolError as exc:
            self.fail(exc)
            return b""
        self.open = True
        if self.pending is not None:
            self.transport.write(wsframes.client_frames([self.pending]))
            self.pending = None
        return buf[head_end + 4 :]

    def frames(self, buf: bytes) -> None:
        """Handle the complete frames at the start of ``buf`` one by one."""
        try:
            end, frames = wsframes.walk(buf)
        except wsframes.ProtocolError as exc:
            self.fail(exc)
            return
        self.tail = buf[end:]
        texts = []
        for opcode, fin, payload in frames:
            if opcode == wsframes.OP_TEXT or opcode == wsframes.OP_CONTINUATION:
                if opcode == wsframes.OP_TEXT:
                    self.fragments = [payload]
                elif self.fragments is not None:
                    self.fragments.append(payload)
                else:
                    self.fail(wsframes.ProtocolError("a continuation of nothing"))
                    return
                if fin:
                    texts.append(b"".join(self.fragments))
                    self.fragments = None
            elif opcode == wsframes.OP_PING:
                key = os.urandom(4)
                self.transport.write(
                    wsframes.client_frame(payload, key, wsframes.OP_PONG)
                )
            elif opcode == wsframes.OP_CLOSE:
                # Answer with the same status code; the server then closes
                # the connection (connection_lost).
                if not self.closing:
                    self.closing = True
                    key = os.urandom(4)
                    self.transport.write(
                        wsframes.client_frame(payload[:2], key, wsframes.OP_CLOSE)
                    )
            elif opcode == wsframes.OP_BINARY:
                self.fail(wsframes.ProtocolError("a binary frame: v1 is text"))
                return
        if texts:
            blob = b"\n".join(texts)
            self.delivered(blob, len(blob))
            if self.w.registering:
                self.registration_messages(texts)

    def registration_messages(self, texts: list[bytes]) -> None:
        w = self.w
        joined, registered = w.dialect.joined, w.dialect.registered or b"\0"
        for text in texts:
            if joined in text:
                w.joins += 1
                w.last_event = time.monotonic()
            if not self.registered and registered in text:
                self.registered = True
                w.last_event = time.monotonic()
                if not self.ready.done():
                    self.ready.set_result(None)

    def pack(self, messages: list[bytes]) -> bytes:
        """``messages`` as masked text frames."""
        return wsframes.client_frames(messages)


class Worker:
    """One load-generator process's share of the clients, and its counters."""

    def __init__(self, slot: int, workers: int, shared: Any, args: dict[str, Any]):
        self.workers = workers
        self.shared = shared
        self.slot = slot
        self.recv_slot = workers + slot
        self.dialect = DIALECTS[args["dialect"]]()
        self.conn_class = WsConn if self.dialect.websocket else Conn
        self.ws_path: str = args.get("path", "/ws")
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
                    lambda: self.conn_class(self, index), self.host, port
                )
                self.conns.append(conn)
                conn.start(self.dialect.register(f"c{index}"))
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
