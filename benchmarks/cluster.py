"""Cluster benchmark: fan-out through Redis on 1, 2 and 3 chatkit nodes.

One command measures every configuration in one run, on loopback only:

    python benchmarks/cluster.py                # the full run (minutes)
    python benchmarks/cluster.py --smoke        # a few seconds, tiny N
    python benchmarks/cluster.py --help         # every knob

Configurations (``--configs``):

- ``single``: one chatkit node, no Redis: the baseline;
- ``redis-1``, ``redis-2``, ``redis-3``: 1, 2 and 3 nodes, each its own
  process (benchmarks/chatkit_server.py ``--redis``), sharing one
  ``redis-server`` that this script starts on a free 127.0.0.1 port
  (no persistence) for each configuration and stops after it.

For each configuration and each N, the load generator of
benchmarks/fanout.py (benchmarks/loadgen.py, ``--workers`` processes)
connects N clients round-robin over the nodes (client ``i`` to node
``i % nodes``), so the S senders (clients ``0..S-1``) are spread too, and
measures, as fanout.py does, with everything in one room:

- throughput: as fast as possible with at most ``S * window`` messages in
  flight (sent, not yet received by every recipient on every node);
- latency: a fixed offered rate of deliveries per second; p50/p90/p99/max.
  The difference to ``single`` is the latency the backplane adds.

Every delivery is counted (``loss`` must be 0: the run fails otherwise).
CPU is read from /proc for each node, for redis-server and for the
generator; "per busy core" is deliveries/s divided by the summed CPU of the
nodes and redis-server. The machine's cores are shared by all of them and
the generator: with 2 cores, more nodes cannot add CPU. Redis's own
``INFO commandstats`` (reset before each phase) shows what the backplane
asks of it. Results are printed as tables with ratios to ``single`` from
the same run and written as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fanout  # noqa: E402
from fanout import BenchError, fmt, ratio  # noqa: E402
from loadgen import raise_file_limit  # noqa: E402


@dataclass(frozen=True)
class Config:
    """One configuration under test."""

    key: str
    nodes: int
    redis: bool

    @property
    def label(self) -> str:
        if not self.redis:
            return "single"
        return f"{self.nodes} node{'s' if self.nodes > 1 else ''} + redis"


CONFIGS = {
    c.key: c
    for c in [
        Config("single", 1, redis=False),
        Config("redis-1", 1, redis=True),
        Config("redis-2", 2, redis=True),
        Config("redis-3", 3, redis=True),
    ]
}
DEFAULT_JSON = HERE / "cluster_results.json"


# --- the processes under test -----------------------------------------------


def redis_binary(name: str = "redis-server") -> str:
    """The path of ``name`` (redis-server or redis-cli, its companion)."""
    binary = shutil.which(name)
    if binary is None:
        raise BenchError(
            f"{name} is not installed: run scripts/install-test-deps.sh "
            "(apt-get install redis-server)"
        )
    return binary


@dataclass
class RedisServer(fanout.Server):
    """A throwaway redis-server: loopback, no RDB, no AOF."""

    @property
    def dialect(self) -> str:
        return "redis"  # not driven by the load generator; no chatkit on its path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, args: argparse.Namespace) -> tuple[list[str], int | None]:
        port = fanout.free_port()
        cmd = [
            redis_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.tmp),
            "--save", "",
            "--appendonly", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        return cmd, port

    def call(self, *words: str) -> str:
        """One command through redis-cli; the reply as text (an error raises)."""
        # --no-raw: an error reply reads "(error) ..." (-e, which makes it the
        # exit status, needs Redis 6.2); INFO's text is printed as it is.
        cli = [redis_binary("redis-cli"), "--no-raw", "-p", str(self.port)]
        try:
            done = subprocess.run(
                [*cli, *words], capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"redis {' '.join(words)}: {exc}") from None
        if done.returncode or done.stdout.startswith("(error)"):
            error = (done.stderr or done.stdout).strip()
            raise BenchError(f"redis {' '.join(words)}: {error}")
        return done.stdout

    def commandstats(self) -> dict[str, dict[str, float]]:
        """``INFO commandstats``: calls, usec and usec_per_call by command."""
        stats: dict[str, dict[str, float]] = {}
        for line in self.call("INFO", "commandstats").splitlines():
            name, _, values = line.partition(":")
            if not name.startswith("cmdstat_"):
                continue
            fields = dict(item.split("=", 1) for item in values.split(","))
            stats[name.removeprefix("cmdstat_")] = {
                k: float(fields[k]) for k in ("calls", "usec", "usec_per_call")
            }
        return stats


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat):
    what other processes use shows as the rest."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / fanout.CLK_TCK


@dataclass
class Node(fanout.Server):
    """One chatkit node (benchmarks/chatkit_server.py), maybe on Redis."""

    redis_url: str | None = None

    def command(self, args: argparse.Namespace) -> tuple[list[str], int | None]:
        cmd = fanout.chatkit_command(args)
        if self.redis_url is not None:
            cmd += ["--redis", self.redis_url]
        return cmd, None


@dataclass
class Cluster:
    """The processes of one configuration, which fanout.py's ``register``,
    ``phase`` and ``profile`` take for one server: ``cpu()`` is their summed
    CPU seconds, and each call also records every process's own figure
    (``split`` gives the cores each used between the last two calls)."""

    config: Config
    tmp: Path
    redis: RedisServer | None = None
    nodes: list[Node] = field(default_factory=list)
    readings: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    dialect = "chatkit"

    @property
    def name(self) -> str:
        return self.config.key

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The first node's process (what ``--profile`` samples)."""
        return self.nodes[0].proc if self.nodes else None

    @property
    def processes(self) -> list[fanout.Server]:
        redis: list[fanout.Server] = [self.redis] if self.redis else []
        return [*self.nodes, *redis]

    def start(self, args: argparse.Namespace) -> None:
        url = None
        if self.config.redis:
            self.redis = RedisServer("redis", self.tmp)
            self.redis.start(args)
            url = self.redis.url
        for k in range(self.config.nodes):
            node = Node(f"{self.config.key}-node{k + 1}", self.tmp, redis_url=url)
            self.nodes.append(node)  # before start: stop() must see it
            node.start(args)

    def cpu(self) -> float:
        per = {p.name: p.cpu() for p in self.processes}
        self.readings.append((time.monotonic(), {**per, "machine": machine_busy()}))
        return sum(per.values())

    def split(self) -> dict[str, float]:
        (t0, cpu0), (t1, cpu1) = self.readings[-2:]
        return {name: (cpu1[name] - cpu0[name]) / (t1 - t0) for name in cpu1}

    def stop(self) -> None:
        """Stop every process, even if stopping one fails: nodes first (on
        SIGTERM they flush what they still owe Redis), then Redis."""
        with contextlib.ExitStack() as stack:
            for proc in reversed(self.processes):  # callbacks run last first
                stack.callback(proc.stop)


# --- one measurement --------------------------------------------------------


def measure(
    config: Config, n: int, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    cluster = Cluster(config, tmp)
    senders = min(args.senders, n)
    result: dict[str, Any] = {
        "config": config.key,
        "label": config.label,
        "nodes": config.nodes,
        "redis": config.redis,
        "clients": n,
        "senders": senders,
        "clients_per_node": [
            len(range(k, n, config.nodes)) for k in range(config.nodes)
        ],
        "senders_per_node": [
            len(range(k, senders, config.nodes)) for k in range(config.nodes)
        ],
    }
    gen: fanout.Generator | None = None
    try:
        cluster.start(args)
        time.sleep(0.3)
        ports = [node.port for node in cluster.nodes]
        gen = fanout.Generator(args.workers, "chatkit", ports[0], ports=ports)
        # In a cluster a join can also reach members that joined just after
        # it (another node reads it later): fanout's count is a lower bound.
        result.update(fanout.register(gen, cluster, n, args))
        time.sleep(0.5)
        gen.ask({"op": "senders", "senders": list(range(senders))})
        for mode in args.modes:
            if cluster.redis is not None:
                cluster.redis.call("CONFIG", "RESETSTAT")
            m = fanout.phase(gen, cluster, n, mode, args)
            split = cluster.split()
            nodes_cpu = sum(split[node.name] for node in cluster.nodes)
            redis_cpu = split.get("redis", 0.0)
            m["cpu"] = split
            m["nodes_cpu"] = nodes_cpu
            m["redis_cpu"] = redis_cpu
            m["all_cpu"] = m["server_cpu"] + m["generator_cpu"]
            # Busy cores of the machine not ours: other work disturbing the run.
            m["other_cpu"] = max(0.0, split.pop("machine") - m["all_cpu"])
            dps = m["deliveries_per_s"]
            # CPU is counted in clock ticks: a short phase may show none.
            busy = m["server_cpu"]
            m["deliveries_per_busy_core"] = dps / busy if busy else None
            m["node_us_per_delivery"] = 1e6 * nodes_cpu / dps if dps else None
            mps = m["messages_per_s"]
            m["node_us_per_message"] = 1e6 * nodes_cpu / mps if mps else None
            m["redis_us_per_message"] = (
                1e6 * redis_cpu / mps if cluster.redis and mps else None
            )
            if cluster.redis is not None:
                m["redis_commands"] = cluster.redis.commandstats()
            result[mode] = m
        if config.key in args.profile:
            result["profile"] = fanout.profile(gen, cluster, n, args)
    finally:
        try:
            if gen is not None:
                gen.close()
        finally:
            cluster.stop()
    return result


# --- report -----------------------------------------------------------------


def added(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return "-"
    return f"{value - reference:+.2f}"


def cores(m: dict[str, Any], result: dict[str, Any]) -> str:
    """Nodes' CPU, with each node's share when there are several."""
    total = fmt(m.get("nodes_cpu"), ".2f")
    if result["nodes"] < 2 or "cpu" not in m:
        return total
    each = [m["cpu"][f"{result['config']}-node{k + 1}"] for k in range(result["nodes"])]
    return f"{total} ({'+'.join(f'{c:.2f}' for c in each)})"


def tables(results: list[dict[str, Any]]) -> str:
    by_key = {(r["config"], r["clients"]): r for r in results}
    out = [
        "Throughput (as fast as possible)",
        "",
        "| config | N | deliveries/s | vs single | messages/s | node CPU |"
        " redis CPU | generator CPU | all CPU | other CPU |"
        " deliveries/s per busy core | vs single | node µs/message |"
        " redis µs/message | loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r.get("throughput")
        if not m:
            continue
        base = by_key.get(("single", r["clients"]), {}).get("throughput", {})
        dps, per_core = m["deliveries_per_s"], m["deliveries_per_busy_core"]
        out.append(
            f"| {r['label']} | {r['clients']} | {dps:,.0f} "
            f"| {ratio(dps, base.get('deliveries_per_s'))} "
            f"| {m['messages_per_s']:,.0f} | {cores(m, r)} "
            f"| {fmt(m['redis_cpu'] if r['redis'] else None, '.2f')} "
            f"| {m['generator_cpu']:.2f} | {m['all_cpu']:.2f} "
            f"| {m['other_cpu']:.2f} | {fmt(per_core, ',.0f')} "
            f"| {ratio(per_core, base.get('deliveries_per_busy_core'))} "
            f"| {fmt(m['node_us_per_message'], '.1f')} "
            f"| {fmt(m['redis_us_per_message'], '.1f')} | {m['loss']} |"
        )
    out += [
        "",
        "Latency (fixed offered rate; 'added' is the difference to single, ms)",
        "",
        "| config | N | p50 ms | p90 ms | p99 ms | max ms | p50 added |"
        " p99 added | p99 vs single | node CPU | redis CPU | other CPU |"
        " node µs/message | loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r.get("latency")
        if not m:
            continue
        base = by_key.get(("single", r["clients"]), {}).get("latency", {})
        out.append(
            f"| {r['label']} | {r['clients']} | {fmt(m.get('p50_ms'), '.2f')} "
            f"| {fmt(m.get('p90_ms'), '.2f')} | {fmt(m.get('p99_ms'), '.2f')} "
            f"| {fmt(m.get('max_ms'), '.2f')} "
            f"| {added(m.get('p50_ms'), base.get('p50_ms'))} "
            f"| {added(m.get('p99_ms'), base.get('p99_ms'))} "
            f"| {ratio(m.get('p99_ms'), base.get('p99_ms'))} "
            f"| {cores(m, r)} "
            f"| {fmt(m['redis_cpu'] if r['redis'] else None, '.2f')} "
            f"| {m['other_cpu']:.2f} | {fmt(m['node_us_per_message'], '.0f')} "
            f"| {m['loss']} |"
        )
    out += [
        "",
        "Redis during the throughput phase (INFO commandstats, reset before it;",
        "EVALSHA also counts the heartbeat's name claims: N every 5 s)",
        "",
        "| config | N | messages (XADD) | µs per EVALSHA | µs per XADD |"
        " redis CPU µs/message | SCRIPT EXISTS | XREAD calls | µs per XREAD |"
        " messages per XREAD |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r.get("throughput", {})
        stats = m.get("redis_commands")
        if not stats:
            continue
        empty: dict[str, float] = {}
        evalsha = stats.get("evalsha", empty)
        xadd = stats.get("xadd", empty)
        xread = stats.get("xread", empty)
        # Each node reads every message once (idle XREADs time out at 1 s).
        per_read = (
            xadd.get("calls", 0) * r["nodes"] / xread["calls"]
            if xread.get("calls")
            else None
        )
        out.append(
            f"| {r['label']} | {r['clients']} | {xadd.get('calls', 0):,.0f} "
            f"| {fmt(evalsha.get('usec_per_call'), '.1f')} "
            f"| {fmt(xadd.get('usec_per_call'), '.1f')} "
            f"| {fmt(m['redis_us_per_message'], '.1f')} "
            f"| {stats.get('script|exists', empty).get('calls', 0):,.0f} "
            f"| {xread.get('calls', 0):,.0f} "
            f"| {fmt(xread.get('usec_per_call'), '.1f')} | {fmt(per_read, '.1f')} |"
        )
    for r in results:
        if r.get("profile"):
            out += [
                "",
                f"Profile of {r['label']}'s first node, N={r['clients']} (py-spy)",
                "",
                "| own % | total % | function |",
                "|---:|---:|---|",
            ]
            out += [
                f"| {p['own_pct']:.1f} | {p['total_pct']:.1f} | `{p['function']}` |"
                for p in r["profile"]
            ]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    """fanout.py's, with coredis's and redis-server's versions, not ngircd's."""
    info = fanout.machine(("trio", "msgspec", "uvloop", "coredis"), ngircd=False)
    with contextlib.suppress(OSError, subprocess.SubprocessError, BenchError):
        out = subprocess.run(
            [redis_binary(), "--version"], capture_output=True, text=True, timeout=5
        ).stdout
        # "Redis server v=7.0.15 sha=... malloc=... bits=64 build=..."
        info["redis"] = out.split("v=", 1)[1].split()[0] if "v=" in out else "?"
    return info


# --- command line -----------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Cluster benchmark: fan-out on 1, 2 and 3 chatkit nodes "
        "through Redis against one node alone.",
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated, from: %(default)s",
    )
    fanout.add_load_arguments(parser)
    parser.add_argument(
        "--presence-limit",
        type=int,
        default=1000,
        help="ChatServer(presence_limit=...) of every node; -1 for None. "
        "N may not exceed it (joins above it are counted per node)",
    )
    fanout.add_run_arguments(
        parser,
        json_help=f"write results (default: {DEFAULT_JSON.relative_to(HERE.parent)}; "
        "none with --smoke)",
        smoke_help="tiny and quick: every configuration, N=10, S=3, a fraction "
        "of a second per phase",
        profile_help="comma-separated configurations whose first node py-spy "
        "samples in one extra phase (e.g. redis-1)",
    )
    args = parser.parse_args(argv)
    if not args.smoke and args.json is None:
        args.json = DEFAULT_JSON
    fanout.finish_args(args, parser)
    args.config_list = [c for c in args.configs.split(",") if c]
    for key in args.config_list + args.profile:
        if key not in CONFIGS:
            parser.error(f"unknown configuration {key!r}")
    if args.presence_limit >= 0 and any(
        n > args.presence_limit for n in args.client_list
    ):
        parser.error("N may not exceed --presence-limit")
    return args


def stop_on_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C: every process started is stopped."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let cleanup run
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    raise_file_limit()
    if any(CONFIGS[key].redis for key in args.config_list):
        try:
            redis_binary()
            redis_binary("redis-cli")
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    run = fanout.Run()
    with tempfile.TemporaryDirectory(prefix="chatkit-cluster-bench-") as tmp:
        for n in args.client_list:
            for key in args.config_list:
                config = CONFIGS[key]
                job = partial(measure, config, n, args, Path(tmp))
                run.measure(config.label, n, job, args.modes)
    return run.finish("cluster.py", argv, args, machine, tables)


if __name__ == "__main__":
    sys.exit(main())
