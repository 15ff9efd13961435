"""Fan-out benchmark: chatkit against a thread-per-client baseline, ngircd
and, over WebSocket, a server built on the ``websockets`` library.

One command measures every server in one run, on loopback only:

    python benchmarks/fanout.py                 # the full run (minutes)
    python benchmarks/fanout.py --smoke         # ~15 s, tiny N: CI's check
    python benchmarks/fanout.py --help          # every knob

Each server under test runs in its own process on a free 127.0.0.1 port:
chatkit in JSON mode (benchmarks/chatkit_server.py, rate limiting off;
``chatkit-before`` is the same runner on the source of ``--before-rev``, for
before/after ratios from the same run; the ``-sqlite`` rows keep history in
a ``chatkit.SqliteHistory``, the others in memory), the thread-per-client
baseline written like the original program (benchmarks/threaded_server.py)
and ngircd, Debian's C IRC server, with a generated configuration (flood
penalties off), driven over IRC. Over WebSocket (issue 20): ``chatkit-ws``
is the chatkit runner with a web port, its clients on ``ws://.../ws``;
``websockets`` is benchmarks/ws_reference_server.py, a chat server written
as a user of the ``websockets`` library would (asyncio on uvloop, its
``broadcast()``). The load generator (benchmarks/loadgen.py) runs in
``--workers`` processes.

For each server and each N: N clients register in one room (timed, presence
notices included), the server's RSS per idle connection is measured, then
S of the clients send 64-byte messages:

- throughput: as fast as possible with at most ``S * window`` messages in
  flight (sent, not yet received by every recipient);
- latency: a fixed offered rate of deliveries per second, the messages
  evenly spaced (the generator processes take turns); p50/p90/p99/max
  from the send time carried in each message.

Every delivery is counted (``loss`` must be 0: the run fails otherwise);
server and generator CPU are read from /proc. Results are printed as a
table with ratios to the baseline and to ngircd and written as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
from loadgen import raise_file_limit  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

ALL_SERVERS = [
    "threaded",
    "ngircd",
    "chatkit",
    "chatkit-before",
    "chatkit-sqlite",
    "chatkit-before-sqlite",
    "chatkit-ws",
    "websockets",
]
#: The servers spoken to over WebSocket (the load generator's ``ws`` dialect).
WS_SERVERS = ("chatkit-ws", "websockets")
#: Not in the default run: the baseline with TCP_NODELAY, as chatkit has it,
#: the baseline's protocol served by a minimal trio server (the floor for
#: chatkit's single event-loop thread: benchmarks/trio_minimal_server.py),
#: and chatkit-before with its two-thread fan-out of lone messages off.
EXTRA_SERVERS = ["threaded-nodelay", "trio-minimal", "chatkit-before-nosplit"]
#: The chatkit before issue 17's rebuild of the server core, measured from
#: git for before/after figures (``81bce0d`` was the one before issue 5's
#: fan-out work).
BEFORE_REV = "33f5bcf"
#: The smoke run (CI) covers every server implementation in this directory.
SMOKE_SERVERS = [
    "threaded",
    "ngircd",
    "chatkit",
    "chatkit-sqlite",
    "trio-minimal",
    "chatkit-ws",
    "websockets",
]
#: Issue 17's performance targets: chatkit against chatkit-before, with
#: history in memory (``off``) and in SQLite (``on``).
TARGET_PAIRS = (
    ("off", "chatkit", "chatkit-before"),
    ("on", "chatkit-sqlite", "chatkit-before-sqlite"),
    # Not a target: the same, against the revision before without the
    # two-thread split fan-out that issue 17 removed (when measured).
    ("off, before's split off", "chatkit", "chatkit-before-nosplit"),
)
MIN_DELIVERIES_RATIO = 0.95
MAX_P99_RATIO = 1.05
MAX_RSS_KIB = 6.0
#: Issue 20's targets: chatkit over WebSocket (chatkit-ws) against chatkit's
#: TCP JSON and against the websockets reference, in the same run.
WS_MIN_VS_TCP = 0.8
WS_MIN_VS_REFERENCE = 2.0
WS_MAX_P99_VS_REFERENCE = 1.0


class BenchError(Exception):
    """The benchmark could not run or found a wrong result."""


# --- servers under test -----------------------------------------------------


def _die_with_parent() -> None:
    """In a server's process before exec: SIGTERM it when the benchmark
    ends, even killed (Linux; elsewhere, only a clean end stops it)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


NGIRCD_CONF = """\
# Generated by benchmarks/fanout.py: loopback only, limits and flood
# penalties off, no lookups, so that ngircd measures its fan-out.
[Global]
\tName = bench.chatkit.invalid
\tInfo = chatkit fan-out benchmark
\tAdminInfo1 = benchmark
\tAdminInfo2 = loopback
\tAdminEMail = bench@chatkit.invalid
\tListen = 127.0.0.1
\tPorts = {port}
\tMotdPhrase = "benchmark"
[Limits]
\tMaxConnections = 0
\tMaxConnectionsIP = 0
\tMaxJoins = 0
\tMaxNickLength = 30
\tMaxPenaltyTime = 0
\tPingTimeout = 3600
\tPongTimeout = 600
[Options]
\tDNS = no
\tIdent = no
\tPAM = no
"""


def chatkit_command(args: argparse.Namespace) -> list[str]:
    """benchmarks/chatkit_server.py on a port of its choosing."""
    cmd = [sys.executable, str(HERE / "chatkit_server.py"), "--port", "0"]
    cmd += ["--presence-limit", str(args.presence_limit)]
    return cmd


@dataclass
class Server:
    """One server under test, running in its own process."""

    name: str
    tmp: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    log: Path = field(default_factory=Path)
    #: The ``-sqlite`` rows' database directory, fresh for each start.
    db_dir: Path | None = None

    @property
    def dialect(self) -> str:
        if self.name in WS_SERVERS:
            return "ws"
        if self.name.startswith("threaded") or self.name == "trio-minimal":
            return "line"
        if self.name == "ngircd":
            return "irc"
        return "chatkit"

    def command(self, args: argparse.Namespace) -> tuple[list[str], int | None]:
        py = sys.executable
        if self.name.startswith("threaded"):
            cmd = [py, str(HERE / "threaded_server.py"), "--port", "0"]
            if self.name == "threaded-nodelay":
                cmd.append("--nodelay")
            return cmd, None
        if self.name == "trio-minimal":
            return [py, str(HERE / "trio_minimal_server.py"), "--port", "0"], None
        if self.name == "websockets":
            cmd = [py, str(HERE / "ws_reference_server.py"), "--port", "0"]
            return [*cmd, "--presence-limit", str(args.presence_limit)], None
        if self.name == "ngircd":
            binary = shutil.which("ngircd") or (
                "/usr/sbin/ngircd" if os.path.exists("/usr/sbin/ngircd") else None
            )
            if binary is None:
                raise BenchError(
                    "ngircd is not installed: run scripts/install-test-deps.sh "
                    "(apt-get install ngircd)"
                )
            port = free_port()
            conf = self.tmp / "ngircd.conf"
            conf.write_text(NGIRCD_CONF.format(port=port))
            return [binary, "--nodaemon", "--config", str(conf)], port
        cmd = chatkit_command(args)
        if self.name == "chatkit-before-nosplit":
            # Its two-thread fan-out of a lone message to a large room off
            # (issue 17 removed it): what the rest of the code costs.
            cmd.append("--no-split-fanout")
        if self.db_dir is not None:
            cmd += ["--db", str(self.db_dir / "history.sqlite3")]
        if self.name == "chatkit-ws":
            cmd += ["--web-port", "0"]
        return cmd, None

    def environment(self, args: argparse.Namespace) -> dict[str, str] | None:
        """A chatkit server runs the source next to this benchmark, not
        whichever chatkit is installed (a benchmark run from a second
        checkout measures that checkout); chatkit-before(-sqlite), the
        source as of ``--before-rev``."""
        if not self.name.startswith("chatkit"):
            return None
        if not self.name.startswith("chatkit-before"):
            src = HERE.parent / "src"
            if not (src / "chatkit").is_dir():  # benchmarks/ copied on its own
                return None
            return {**os.environ, "PYTHONPATH": str(src)}
        tree = self.tmp / f"chatkit-{args.before_rev}"
        if not tree.exists():
            tree.mkdir()
            try:
                git = ["git", "-C", str(HERE.parent), "archive"]
                archive = subprocess.run(
                    [*git, args.before_rev, "src/chatkit"],
                    capture_output=True,
                    check=True,
                ).stdout
            except (OSError, subprocess.CalledProcessError) as exc:
                raise BenchError(
                    f"chatkit-before needs git and revision {args.before_rev}: {exc}"
                ) from None
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        return {**os.environ, "PYTHONPATH": str(tree / "src")}

    def start(self, args: argparse.Namespace) -> None:
        if self.name.endswith("-sqlite"):
            self.db_dir = Path(tempfile.mkdtemp(prefix="db-", dir=self.tmp))
        cmd, port = self.command(args)
        self.log = self.tmp / f"{self.name}.log"
        env = self.environment(args)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited: {self.tail()}")
            if port is None:
                # chatkit-ws: its clients' port is the web port.
                wanted = (
                    "Web port: " if self.name == "chatkit-ws" else "Server started on "
                )
                for line in self.log.read_text(errors="replace").splitlines():
                    if line.startswith(wanted):
                        self.port = int(line.rsplit(":", 1)[1])
                        return
            else:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=0.5),
                ):
                    self.port = port
                    return
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not start: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def cpu(self) -> float:
        """CPU seconds used so far (user + system, all threads)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss(self) -> int:
        """Resident set size in bytes."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; SIGKILL at once if the graceful
        stop fails (its error is re-raised). The database goes too."""
        try:
            self.stop_process()
        finally:
            if self.db_dir is not None:
                shutil.rmtree(self.db_dir, ignore_errors=True)
                self.db_dir = None

    def stop_process(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        except BaseException:
            proc.kill()
            raise


# --- the load generator's processes ----------------------------------------


class Generator:
    """``workers`` load-generator processes and their shared counters.

    With ``ports`` (benchmarks/cluster.py), client ``i`` connects to
    ``ports[i % len(ports)]`` instead of ``port``.
    """

    def __init__(
        self, workers: int, dialect: str, port: int, ports: list[int] | None = None
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.workers = workers
        self.shared = ctx.RawArray("q", 2 * workers)
        self.pipes = []
        self.procs = []
        spec: dict[str, Any] = {"dialect": dialect, "host": "127.0.0.1", "port": port}
        if ports:
            spec["ports"] = ports
        for slot in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=loadgen.worker_main,
                args=(slot, workers, self.shared, spec, child),
                daemon=True,
            )
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def ask_all(self, commands: list[dict[str, Any]], timeout: float) -> list[Any]:
        for pipe, cmd in zip(self.pipes, commands, strict=True):
            pipe.send(cmd)
        return [self.receive(pipe, timeout) for pipe in self.pipes]

    def ask(self, cmd: dict[str, Any], timeout: float = 30) -> list[Any]:
        return self.ask_all([cmd] * self.workers, timeout)

    def receive(self, pipe: Any, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise BenchError(f"a load generator did not answer in {timeout}s")
        reply = pipe.recv()
        if isinstance(reply, dict) and "error" in reply:
            raise BenchError(f"load generator: {reply['error']}")
        return reply

    def latencies(self) -> array[int]:
        """Every worker's latency samples (ns) of the last phase or probe."""
        samples = array("q")
        for blob in self.ask({"op": "latencies"}):
            samples.frombytes(blob)
        return samples

    def close(self) -> None:
        with contextlib.suppress(BenchError, OSError, EOFError):
            self.ask({"op": "close"}, timeout=10)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# --- one measurement --------------------------------------------------------


def deliveries_per_message(dialect: str, n: int) -> int:
    """Deliveries of one message in a room of N: chatkit (and protocol v1
    over WebSocket) echoes it to its sender, too."""
    return n if dialect in ("chatkit", "ws") else n - 1


def expected_joins(server: Server, n: int, presence_limit: int) -> int:
    """Join notices the N registrations cause in all (see each dialect)."""
    if server.dialect == "line":
        return n * (n - 1) // 2  # the k-th joiner is announced to k-1 others
    if server.dialect == "irc":
        return n * (n + 1) // 2  # ... to k members, itself included
    limit = n if presence_limit < 0 else min(n, presence_limit)
    return limit * (limit + 1) // 2 + (n - limit)  # beyond: only to itself


def percentiles(values: array[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return {
        "min_ms": ordered[0] / 1e6,
        "p1_ms": at(0.01),
        "p10_ms": at(0.10),
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "max_ms": ordered[-1] / 1e6,
        "samples": len(ordered),
    }


def wait_until_delivered(
    gen: Generator, per_message: int, timeout: float
) -> tuple[int, int, int]:
    """Poll until every sent message reached every recipient (or nothing
    moves for 2 s); returns (sent, received, lost connections)."""
    deadline = time.monotonic() + timeout
    last = (-1, -1)
    still_since = time.monotonic()
    while True:
        snaps = gen.ask({"op": "snapshot"})
        sent = sum(s["sent"] for s in snaps)
        received = sum(s["received"] for s in snaps)
        lost = sum(s["lost"] for s in snaps)
        if received >= sent * per_message or lost:
            return sent, received, lost
        now = time.monotonic()
        if (sent, received) != last:
            last, still_since = (sent, received), now
        elif now - still_since > 2 or now > deadline:
            return sent, received, lost
        time.sleep(0.02)


def register(
    gen: Generator, server: Server, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    per_worker = [list(range(p, n, gen.workers)) for p in range(gen.workers)]
    started = time.monotonic()
    replies = gen.ask_all(
        [
            {"op": "register", "indexes": idx, "concurrency": args.connect_concurrency}
            for idx in per_worker
        ],
        timeout=max(60.0, n / 50),
    )
    want = expected_joins(server, n, args.presence_limit)
    deadline = time.monotonic() + max(30.0, n / 20)
    while True:
        snaps = gen.ask({"op": "snapshot"})
        joins = sum(s["joins"] for s in snaps)
        if joins >= want:
            break
        if time.monotonic() > deadline or any(s["lost"] for s in snaps):
            raise BenchError(
                f"{server.name}: registration of {n} clients incomplete: "
                f"{joins} of {want} join notices, "
                f"{sum(s['lost'] for s in snaps)} connections lost"
            )
        time.sleep(0.01)
    done = max([r["registered"] for r in replies] + [s["last_event"] for s in snaps])
    gen.ask({"op": "registering", "on": False})
    return {"register_s": done - started, "join_notices": joins}


def phase(
    gen: Generator,
    server: Server,
    n: int,
    mode: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    per_message = deliveries_per_message(server.dialect, n)
    senders = min(args.senders, n)
    start = time.monotonic() + 0.2
    spec = {
        "op": "phase",
        "mode": mode,
        "start": start,
        "warmup": args.warmup,
        "duration": args.duration,
        "window": args.window,
        "senders": senders,
        "per_message": per_message,
        "rate": args.rate / (n - 1),
    }
    for pipe in gen.pipes:
        pipe.send(spec)
    begin = start + args.warmup
    end = begin + args.duration
    time.sleep(max(0.0, begin - time.monotonic()))
    cpu0, t0 = server.cpu(), time.monotonic()
    time.sleep(max(0.0, end - time.monotonic()))
    cpu1, t1 = server.cpu(), time.monotonic()
    snaps = [gen.receive(pipe, args.duration + args.warmup + 30) for pipe in gen.pipes]
    sent, received, lost = wait_until_delivered(gen, per_message, timeout=30)
    got = sum(s["end"]["received"] - s["begin"]["received"] for s in snaps)
    gen_cpu = sum(s["end"]["cpu"] - s["begin"]["cpu"] for s in snaps)
    span = sum(s["end"]["t"] - s["begin"]["t"] for s in snaps) / len(snaps)
    latencies = gen.latencies()
    result: dict[str, Any] = {
        "deliveries_per_s": got * (n - 1) / per_message / span,
        "messages_per_s": got / per_message / span,
        "server_cpu": (cpu1 - cpu0) / (t1 - t0),
        "generator_cpu": gen_cpu / span,
        "sent": sent,
        "loss": sent * per_message - received,
        "connections_lost": lost,
    }
    if mode == "latency":
        result["offered_deliveries_per_s"] = args.rate
        result.update(percentiles(latencies))
    else:
        # One observer client per generator parses every message: the
        # latency while saturated.
        result["saturated"] = percentiles(latencies)
    return result


def scale_probe(gen: Generator, server: Server, n: int) -> dict[str, Any]:
    """One message from one client to all the others."""
    per_message = deliveries_per_message(server.dialect, n)
    gen.pipes[1 % gen.workers].send({"op": "probe", "sender": 1})
    for pipe in gen.pipes[: 1 % gen.workers] + gen.pipes[1 % gen.workers + 1 :]:
        pipe.send({"op": "probe", "sender": -1})
    for pipe in gen.pipes:
        gen.receive(pipe, 30)
    sent, received, lost = wait_until_delivered(gen, per_message, timeout=60)
    latencies = gen.latencies()
    return {
        "sent": sent,
        "recipients": len(latencies),
        "loss": sent * per_message - received,
        "connections_lost": lost,
        **percentiles(latencies),
    }


def measure(
    name: str, n: int, args: argparse.Namespace, tmp: Path, scale_only: bool = False
) -> dict[str, Any]:
    """One server, N clients: the phases of ``--modes`` (with ``scale_only``,
    one message to all instead)."""
    server = Server(name, tmp)
    result: dict[str, Any] = {"server": name, "clients": n, "senders": args.senders}
    if name.startswith("chatkit-before"):
        result["revision"] = args.before_rev
    gen: Generator | None = None
    try:
        server.start(args)
        time.sleep(0.3)
        rss0 = server.rss()
        gen = Generator(args.workers, server.dialect, server.port)
        result.update(register(gen, server, n, args))
        time.sleep(0.5)
        result["rss_per_connection_kib"] = (server.rss() - rss0) / n / 1024
        gen.ask({"op": "senders", "senders": list(range(min(args.senders, n)))})
        if scale_only:
            result["probe"] = scale_probe(gen, server, n)
        else:
            for mode in args.modes:
                result[mode] = phase(gen, server, n, mode, args)
            if name in args.profile:
                result["profile"] = profile(gen, server, n, args)
    finally:
        try:
            if gen is not None:
                gen.close()
        finally:
            server.stop()
    return result


def profile(
    gen: Generator, server: Server, n: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """py-spy the server through one more (unreported) phase;
    returns the functions with the most samples, by own time."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    assert server.proc is not None
    out = server.tmp / f"{server.name}-{n}.pyspy.txt"
    seconds = int(args.warmup + args.duration + 1)
    proc = subprocess.Popen(
        [
            *(spy, "record", "--pid", str(server.proc.pid)),
            *("--duration", str(seconds), "--rate", "200", "--format", "raw"),
            *("--nonblocking", "--output", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        phase(gen, server, n, args.profile_mode, args)
        _, err = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not out.exists():
        raise BenchError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        # "func (path/file.py:123)" -> "func (path/file.py)": by function.
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    top = sorted(own, key=own.__getitem__, reverse=True)[: args.profile_top]
    return [
        {
            "function": frame,
            "own_pct": 100 * own[frame] / samples,
            "total_pct": 100 * total[frame] / samples,
        }
        for frame in top
    ]


# --- report -----------------------------------------------------------------


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| server | N | deliveries/s | vs threaded | vs ngircd | server CPU |"
        " generator CPU | p50 ms | p90 ms | p99 ms | max ms | p99 vs threaded |"
        " p99 vs ngircd | RSS/conn KiB | register s | loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {key(r): r for r in results}
    for r in results:
        if "throughput" not in r and "latency" not in r:
            continue
        base = by_key.get(key(r, "threaded"), {})
        irc = by_key.get(key(r, "ngircd"), {})
        tp = r.get("throughput", {})
        lat = r.get("latency", {})
        dps = tp.get("deliveries_per_s")
        p99 = lat.get("p99_ms")
        loss = tp.get("loss", 0) + lat.get("loss", 0)
        rows.append(
            f"| {r['server']} | {r['clients']} | {fmt(dps, ',.0f')} "
            f"| {ratio(dps, base.get('throughput', {}).get('deliveries_per_s'))} "
            f"| {ratio(dps, irc.get('throughput', {}).get('deliveries_per_s'))} "
            f"| {fmt(tp.get('server_cpu'), '.2f')} "
            f"| {fmt(tp.get('generator_cpu'), '.2f')} "
            f"| {fmt(lat.get('p50_ms'), '.2f')} | {fmt(lat.get('p90_ms'), '.2f')} "
            f"| {fmt(p99, '.2f')} | {fmt(lat.get('max_ms'), '.2f')} "
            f"| {ratio(p99, base.get('latency', {}).get('p99_ms'))} "
            f"| {ratio(p99, irc.get('latency', {}).get('p99_ms'))} "
            f"| {fmt(r.get('rss_per_connection_kib'), '.1f')} "
            f"| {fmt(r.get('register_s'), '.3f')} | {loss} |"
        )
    rows.extend(round_summary(results))
    rows.extend(targets(results))
    rows.extend(ws_targets(results))
    for r in results:
        probe = r.get("probe")
        if probe:
            rows.append(
                f"\n{r['server']}, {r['clients']} clients: registered in "
                f"{r['register_s']:.2f} s, {r['rss_per_connection_kib']:.1f} KiB "
                f"per idle connection; one message reached {probe['recipients']} "
                f"others, the last after {probe.get('max_ms', 0):.1f} ms "
                f"(p50 {probe.get('p50_ms', 0):.1f} ms), loss {probe['loss']}"
            )
    return "\n".join(rows)


def key(r: dict[str, Any], server: str | None = None) -> tuple[str, int, int]:
    """A result's server (or ``server``), N and round (``--rounds``)."""
    return (server or r["server"], r["clients"], r.get("round", 0))


def round_summary(results: list[dict[str, Any]]) -> list[str]:
    """With ``--rounds`` above 1: per server and N, the median (and range)
    over the rounds of deliveries/s and p99 as ratios to the threaded
    baseline of the same round."""
    if not any(r.get("round", 0) for r in results):
        return []
    by_key = {key(r): r for r in results}
    ratios: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in results:
        base = by_key.get(key(r, "threaded"))
        if base is None:
            continue
        into = ratios.setdefault((r["server"], r["clients"]), {})
        for mode, figure in (("throughput", "deliveries_per_s"), ("latency", "p99_ms")):
            value = r.get(mode, {}).get(figure)
            reference = base.get(mode, {}).get(figure)
            if value is not None and reference:
                into.setdefault(figure, []).append(value / reference)
    if not ratios:  # no threaded baseline in the run
        return []
    rows = [
        "\nOver the rounds, against the same round's threaded baseline:"
        " median (min-max)\n",
        "| server | N | rounds | deliveries/s vs threaded | p99 vs threaded |",
        "|---|---:|---:|---:|---:|",
    ]

    def spread(values: list[float] | None) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"

    for (server, n), into in ratios.items():
        rounds = max(len(v) for v in into.values()) if into else 0
        rows.append(
            f"| {server} | {n} | {rounds} | {spread(into.get('deliveries_per_s'))} "
            f"| {spread(into.get('p99_ms'))} |"
        )
    return rows


def targets(results: list[dict[str, Any]]) -> list[str]:
    """Issue 17's targets, per history setting and N: chatkit's deliveries/s
    and p99 at the latency load as ratios to chatkit-before's of the same
    round (with ``--rounds``, their medians), and its RSS per idle
    connection (the median over the rounds). Only chatkit-before results
    that name their revision count (not those of reports older than the
    targets)."""
    before = {key(r): r for r in results if "revision" in r}
    rows = []
    for history, new, old in TARGET_PAIRS:
        for n in sorted({r["clients"] for r in results if r["server"] == new}):
            pairs = paired(results, new, n, old, before)
            if not pairs:
                continue
            rss = [r["rss_per_connection_kib"] for r, _ in pairs]
            cells = [
                history,
                str(n),
                str(len(pairs)),
                *check(
                    median_ratio(pairs, "throughput", "deliveries_per_s"),
                    ".3f",
                    at_least=MIN_DELIVERIES_RATIO,
                ),
                *check(
                    median_ratio(pairs, "latency", "p99_ms"),
                    ".3f",
                    at_most=MAX_P99_RATIO,
                ),
                *check(statistics.median(rss), ".1f", at_most=MAX_RSS_KIB),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    revisions = ", ".join(sorted({r["revision"] for r in before.values()}))
    rate = lowest_offered_rate(before.values())
    return [
        f"\nIssue 17 targets: chatkit against chatkit-before ({revisions}) of the"
        " same round, history in memory (off) and in SQLite (on); p99 at"
        f" {rate} deliveries/s offered; over several rounds, the medians\n",
        f"| history | N | rounds | deliveries/s vs before | >= {MIN_DELIVERIES_RATIO}"
        f" | p99 vs before | <= {MAX_P99_RATIO} | RSS per idle connection (KiB)"
        f" | <= {MAX_RSS_KIB:g} |",
        "|---|---:|---:|---:|---|---:|---|---:|---|",
        *rows,
    ]


def ws_targets(results: list[dict[str, Any]]) -> list[str]:
    """Issue 20's targets, per N: chatkit-ws's deliveries/s as ratios to
    chatkit's (TCP JSON) and to the websockets reference's of the same
    round, and its p99 at the latency load as a ratio to the reference's
    (with ``--rounds``, the medians)."""
    by_key = {key(r): r for r in results}
    rows = []
    for n in sorted({r["clients"] for r in results if r["server"] == "chatkit-ws"}):
        tcp = paired(results, "chatkit-ws", n, "chatkit", by_key)
        reference = paired(results, "chatkit-ws", n, "websockets", by_key)
        if not tcp and not reference:
            continue
        cells = [
            str(n),
            str(max(len(tcp), len(reference))),
            *check(
                median_ratio(tcp, "throughput", "deliveries_per_s"),
                ".2f",
                at_least=WS_MIN_VS_TCP,
            ),
            *check(
                median_ratio(reference, "throughput", "deliveries_per_s"),
                ".2f",
                at_least=WS_MIN_VS_REFERENCE,
            ),
            *check(
                median_ratio(reference, "latency", "p99_ms"),
                ".2f",
                at_most=WS_MAX_P99_VS_REFERENCE,
            ),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    rate = lowest_offered_rate(r for r in results if r["server"] == "chatkit-ws")
    return [
        "\nIssue 20 targets: chatkit over WebSocket (chatkit-ws) against chatkit's"
        " TCP JSON (chatkit) and the websockets reference (websockets) of the same"
        f" round; p99 at {rate} deliveries/s offered; over several rounds, the"
        " medians\n",
        f"| N | rounds | deliveries/s vs chatkit | >= {WS_MIN_VS_TCP:g} "
        f"| deliveries/s vs websockets | >= {WS_MIN_VS_REFERENCE:g} "
        f"| p99 vs websockets | <= {WS_MAX_P99_VS_REFERENCE:g} |",
        "|---:|---:|---:|---|---:|---|---:|---|",
        *rows,
    ]


def paired(
    results: list[dict[str, Any]],
    server: str,
    n: int,
    reference: str,
    references: dict[tuple[str, int, int], dict[str, Any]],
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each result of ``server`` at N=``n`` with the same round's result of
    ``reference`` (from ``references``, by :func:`key`), where there is one."""
    return [
        (r, references[key(r, reference)])
        for r in results
        if key(r)[:2] == (server, n) and key(r, reference) in references
    ]


def lowest_offered_rate(results: Iterable[dict[str, Any]]) -> str:
    """The lowest deliveries/s offered in the latency phase of ``results``,
    formatted ("-" without a latency phase)."""
    rates = [
        r["latency"]["offered_deliveries_per_s"] for r in results if "latency" in r
    ]
    return f"{min(rates):,.0f}" if rates else "-"


def median_ratio(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]], mode: str, figure: str
) -> float | None:
    """The median over ``pairs`` (result, reference) of the figure's ratio."""
    ratios = []
    for r, reference in pairs:
        value = r.get(mode, {}).get(figure)
        base = reference.get(mode, {}).get(figure)
        if value is not None and base:
            ratios.append(value / base)
    return statistics.median(ratios) if ratios else None


def check(
    value: float | None,
    spec: str,
    at_least: float | None = None,
    at_most: float | None = None,
) -> list[str]:
    """The value and whether it meets its target: ``met`` or ``not met``."""
    if value is None:
        return ["-", "-"]
    met = (at_least is None or value >= at_least) and (
        at_most is None or value <= at_most
    )
    return [format(value, spec), "met" if met else "not met"]


def source_commit() -> str:
    """The checkout's commit, with ``-dirty`` if chatkit or the benchmarks
    have uncommitted changes other than results (``unknown`` outside a git
    checkout)."""
    git = ["git", "-C", str(HERE.parent)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "src", "benchmarks", ":!*.json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty.strip() else "")


def machine(
    packages: Sequence[str] = ("trio", "msgspec", "uvloop", "wsproto", "websockets"),
    ngircd: bool = True,
) -> dict[str, Any]:
    """The machine, Python and the versions of ``packages`` (and ngircd)."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in packages:
        with contextlib.suppress(Exception):
            versions[package] = version(package)
    if ngircd:
        binary = shutil.which("ngircd") or "/usr/sbin/ngircd"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=5
            ).stdout
            versions["ngircd"] = out.split()[1] if out else "?"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
    }


# --- command line -----------------------------------------------------------


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load's options, shared with benchmarks/cluster.py."""
    parser.add_argument("--clients", default="100,1000", help="N values")
    parser.add_argument("--senders", type=int, default=10, help="S")
    parser.add_argument(
        "--window", type=int, default=64, help="messages in flight per sender"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=50_000,
        help="offered deliveries/s in latency mode",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="s measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="s not measured")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--modes", default="throughput,latency")


def add_run_arguments(
    parser: argparse.ArgumentParser,
    json_help: str = "write results",
    smoke_help: str = "tiny and quick (CI): threaded, ngircd, chatkit, "
    "chatkit-sqlite, trio-minimal, chatkit-ws, websockets; N=10; no scale run",
    profile_help: str = "comma-separated servers to py-spy in one extra "
    "throughput phase (e.g. chatkit)",
) -> None:
    """The run's options, shared with benchmarks/cluster.py (its own help)."""
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help=json_help)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--profile", default="", help=profile_help)
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument(
        "--profile-mode", choices=["throughput", "latency"], default="throughput"
    )


def finish_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The shared options: ``--smoke``'s values, lists from commas, checks."""
    if args.smoke:
        args.clients = "10"
        args.senders = min(args.senders, 3)
        args.duration = 0.3
        args.warmup = 0.1
        args.rate = 2000
        args.workers = 1
    args.client_list = [int(n) for n in args.clients.split(",") if n]
    args.modes = [m for m in args.modes.split(",") if m]
    args.profile = [s for s in args.profile.split(",") if s]
    if any(n < 2 for n in args.client_list):
        parser.error("N must be at least 2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark: chatkit vs a threaded baseline vs ngircd.",
    )
    parser.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated, from: %(default)s",
    )
    add_load_arguments(parser)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every server this many times, alternating; the table "
        "then adds each one's median ratio to the baseline over the rounds",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=10_000,
        help="also register this many chatkit clients and send one message (0: skip)",
    )
    parser.add_argument("--scale-servers", default="chatkit")
    parser.add_argument("--presence-limit", type=int, default=1000)
    parser.add_argument(
        "--before-rev",
        default=BEFORE_REV,
        help="git revision of chatkit-before (default: %(default)s)",
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.servers = ",".join(SMOKE_SERVERS)
        args.scale = 0
    finish_args(args, parser)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.server_list = [s for s in args.servers.split(",") if s]
    for name in args.server_list:
        if name not in ALL_SERVERS + EXTRA_SERVERS:
            parser.error(f"unknown server {name!r}")
    return args


@dataclass
class Run:
    """The results and failures of one run (fanout.py's or cluster.py's)."""

    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def measure(
        self,
        label: str,
        n: int,
        job: Callable[[], dict[str, Any]],
        modes: Sequence[str] = (),
        note: str = "",
    ) -> dict[str, Any] | None:
        """One measurement; a BenchError or a loss in ``modes`` fails the run."""
        print(f"# {label}, N={n}{note} ...", file=sys.stderr, flush=True)
        try:
            result = job()
        except BenchError as exc:
            self.failures.append(f"{label}, N={n}: {exc}")
            print(f"FAILED: {label}, N={n}: {exc}", file=sys.stderr)
            return None
        self.results.append(result)
        for mode in modes:
            m = result.get(mode, {})
            if m.get("loss") or m.get("connections_lost"):
                self.failures.append(
                    f"{label}, N={n}, {mode}: loss {m.get('loss')}, "
                    f"{m.get('connections_lost')} connections lost"
                )
        return result

    def finish(
        self,
        script: str,
        argv: list[str] | None,
        args: argparse.Namespace,
        machine: Callable[[], dict[str, Any]],
        table: Callable[[list[dict[str, Any]]], str],
    ) -> int:
        """Print the table, write the JSON report; the exit status."""
        report = {
            "command": f"python benchmarks/{script} "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(),
            "commit": source_commit(),
            "settings": {
                "senders": args.senders,
                "window": args.window,
                "rate": args.rate,
                "duration": args.duration,
                "warmup": args.warmup,
                "workers": args.workers,
                "presence_limit": args.presence_limit,
                "message_text_bytes": loadgen.TEXT_SIZE,
            },
            "elapsed_s": time.monotonic() - self.started,
            "results": self.results,
            "failures": self.failures,
        }
        print(table(self.results))
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        if self.failures:
            print("\nFAILED:\n  " + "\n  ".join(self.failures), file=sys.stderr)
            return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_file_limit()
    run = Run()
    with tempfile.TemporaryDirectory(prefix="chatkit-bench-") as tmp:
        for n in args.client_list:
            for round_ in range(args.rounds):
                for name in args.server_list:
                    job = partial(measure, name, n, args, Path(tmp))
                    note = f", round {round_ + 1}" if args.rounds > 1 else ""
                    result = run.measure(name, n, job, args.modes, note=note)
                    if result is not None and args.rounds > 1:
                        result["round"] = round_
        if args.scale:
            n = args.scale
            for name in args.scale_servers.split(","):
                job = partial(measure, name, n, args, Path(tmp), scale_only=True)
                result = run.measure(name, n, job, note=" (scale)")
                probe = result["probe"] if result else {}
                if probe.get("loss") or probe.get("connections_lost"):
                    run.failures.append(f"{name}, N={n}: lost deliveries")
    return run.finish("fanout.py", argv, args, machine, table)


if __name__ == "__main__":
    sys.exit(main())
