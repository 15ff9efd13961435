"""Soak test: many clients on one chatkit server for N minutes.

    python benchmarks/soak.py --clients 500 --minutes 10 [--json soak.json]

Starts ``python -m chatkit.server`` on a free loopback port (rate limiting
off, a probe plugin counting its trio tasks), then one or more load-generator
processes (``_soak_load.py``) with the clients: a few *talkers* chat at a
steady rate in a handful of rooms and send some dms, a few *churners* leave
and rejoin rooms, reconnect and drop connections, and the rest listen. While
it runs, the server's RSS, open file descriptors and task count are sampled
every few seconds. At the end every client's record is checked against every
acknowledged message: a message is *lost* if a member of its room (while a
member) or its dm recipient never received it. Prints a summary (memory over
time, growth, deliveries, losses) and optionally writes it all as JSON.

``--attacks all`` also runs issue 18's attacks in turn (``_soak_attack.py``)
on a server with its default limits, while a bystander (tests/bystander.py)
times a round trip every 0.2 s: see docs/reliability.md.

Loopback only, bounded in time (the run's length plus a grace period), and
everything it starts is stopped at the end, or killed. Not run in CI; its
result is recorded in ``docs/reliability.md``. Exit status: 0 when nothing
was lost, duplicated or misdelivered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadgen import raise_file_limit

ATTACKS = (  # in benchmarks/_soak_attack.py, run in this order
    "blank_lines",
    "renames",
    "dm_burst",
    "half_open",
    "partial_lines",
    "address_hold",
)

HERE = Path(__file__).resolve().parent
CONNECT_GRACE = 120.0  # seconds for every client to connect, on top of the run
DRAIN_GRACE = 60.0  # seconds to close windows and say bye at the end


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rooms", type=int, default=4, help="rooms besides lobby")
    parser.add_argument("--talkers", type=int, default=20)
    parser.add_argument(
        "--rate", type=float, default=0.5, help="messages per second per talker"
    )
    parser.add_argument(
        "--lobby-share", type=float, default=0.2, help="share of says in lobby"
    )
    parser.add_argument("--dm-share", type=float, default=0.1, help="share of dms")
    parser.add_argument("--churners", type=int, default=25)
    parser.add_argument(
        "--churn-every",
        type=float,
        nargs=2,
        default=[10.0, 30.0],
        metavar=("MIN", "MAX"),
        help="seconds between a churner's actions (uniform)",
    )
    parser.add_argument("--load-processes", type=int, default=1)
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--attacks",
        default="",
        help="comma-separated attacks to run in turn while the clients chat"
        f" ('all': {','.join(ATTACKS)}); adds a bystander measuring round"
        " trips, and the server keeps its default limits (rate limit on; TCP"
        " user timeout 30 s)",
    )
    parser.add_argument(
        "--attack-seconds", type=float, default=60.0, help="length of each attack"
    )
    parser.add_argument(
        "--attack-pause",
        type=float,
        default=30.0,
        help="ordinary chat before the first attack and after each",
    )
    parser.add_argument(
        "--per-address",
        type=int,
        help="clients per loopback source address (default: 10 with --attacks,"
        " else all on 127.0.0.1)",
    )
    args = parser.parse_args(argv)
    if args.talkers + args.churners > args.clients:
        parser.error("--talkers plus --churners exceeds --clients")
    if args.rooms < 1 or args.load_processes < 1 or args.rate <= 0:
        parser.error("--rooms, --load-processes and --rate must be positive")
    names = [name for name in args.attacks.split(",") if name]
    args.attacks = list(ATTACKS) if names == ["all"] else names
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    needed = args.attack_pause + len(args.attacks) * (
        args.attack_seconds + args.attack_pause
    )
    if args.attacks and needed > args.minutes * 60:
        parser.error(f"the attacks need {needed:.0f} s; give --minutes more")
    if args.per_address is None:
        args.per_address = 10 if args.attacks else 0
    return args


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by the children)."""
    soft = raise_file_limit(needed)
    if soft != resource.RLIM_INFINITY and soft < needed:  # raised to the hard limit
        sys.exit(f"soak: need {needed} file descriptors, the hard limit is {soft}")
    return soft


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        meminfo = Path("/proc/meminfo").read_text()
        found = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
        memory = f"{int(found.group(1)) / 2**20:.1f} GiB" if found else "?"
    except OSError:
        memory = "?"
    import trio  # only for its version

    return {
        "cpu": f"{cpu} x {os.cpu_count()}",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "trio": trio.__version__,
    }


# --- processes ----------------------------------------------------------------


class Processes:
    """Everything this run starts; ``stop_all`` ends them, gracefully first."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_server(
    procs: Processes, work: Path, limits: bool
) -> tuple[subprocess.Popen[bytes], int]:
    """The server; ``limits``: with its default limits (but a TCP user
    timeout of 30 s), else rate limiting off (the talkers are polite; the
    churners bursty)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(HERE), env.get("PYTHONPATH", "")])
    )
    env["CHATKIT_SOAK_STATS"] = str(work / "server-stats.json")
    log = work / "server.log"
    server = procs.start(
        [
            sys.executable,
            "-m",
            "chatkit.server",
            "--port=0",
            "--no-interactive",
            "--no-entry-points",
            "--log-level=warning",
            # With the attacks: default limits, but a vanished peer is reaped
            # within an attack's minute (the default user timeout is 90 s).
            *(["--tcp-user-timeout=30"] if limits else ["--rate-limit=0"]),
            "--idle-timeout=0",  # listeners are silent for minutes
            "--plugin=_soak_probe:TaskCounter",
            f"--db={work / 'soak.sqlite3'}",  # the CLI's default store, not in cwd
        ],
        log,
        env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        found = re.search(r"Server started on 127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return server, int(found.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"the server did not start:\n{log.read_text()}")


ROOT = HERE.parent


def start_bystander(procs: Processes, work: Path, port: int) -> subprocess.Popen[bytes]:
    """tests/bystander.py: a round trip in ``lobby`` every 0.2 s, on its own
    process; it stops when its standard input closes."""
    with (work / "bystander.log").open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "bystander.py"),
                str(port),
                "by",
                "0.2",
            ],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    procs.started.append(proc)
    return proc


def start_attacker(
    procs: Processes, work: Path, port: int, args: argparse.Namespace
) -> subprocess.Popen[bytes]:
    config = {
        "port": port,
        "attacks": args.attacks,
        "seconds": args.attack_seconds,
        "pause": args.attack_pause,
    }
    path = work / "attack.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, str(HERE / "_soak_attack.py"), str(path)]
    return procs.start(command, work / "attack.log")


def finish_attacks(
    bystander: subprocess.Popen[bytes] | None,
    attacker: subprocess.Popen[bytes] | None,
    work: Path,
) -> dict[str, Any] | None:
    """Stop the bystander, wait for the attacker, and sum up what both
    reported: the bystander's round trips during each attack and overall."""
    if bystander is None or attacker is None:
        return None
    try:
        attacker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        attacker.terminate()
    assert bystander.stdin is not None
    bystander.stdin.close()
    bystander.wait(timeout=30)
    reports = [json.loads(x) for x in (work / "bystander.log").read_text().splitlines()]
    rtts = [(r["t"], r["rtt"]) for r in reports if "rtt" in r]
    attacks = []
    for line in (work / "attack.log").read_text().splitlines():
        try:
            attack = json.loads(line)
        except ValueError:
            attacks.append({"attack": "?", "output": line})
            continue
        during = [rtt for t, rtt in rtts if attack["start"] <= t <= attack["end"] + 1]
        attack["bystander_ms"] = percentiles(during)
        attacks.append(attack)
    return {
        "attacks": attacks,
        "bystander_ms": percentiles([rtt for _, rtt in rtts]),
        "acked": [(r["id"], "lobby") for r in reports if "rtt" in r],
        "bystander_errors": [r["error"] for r in reports if "error" in r],
        "bystander_lost": [r["lost"] for r in reports if "lost" in r],
        "bystander_closed": next((r["closed"] for r in reports if "closed" in r), None),
        "attacker_exit": attacker.returncode,
    }


def percentiles(seconds: list[float]) -> dict[str, Any]:
    """Count, p50, p99 and max of ``seconds``, in milliseconds."""
    if not seconds:
        return {"count": 0}
    ordered = sorted(seconds)
    return {
        "count": len(ordered),
        "p50": round(1000 * statistics.median(ordered), 2),
        "p99": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2),
        "max": round(1000 * ordered[-1], 2),
    }


def bot_plan(args: argparse.Namespace) -> list[list[tuple[str, str, str]]]:
    """(name, role, room) of every client, per load process."""
    plans: list[list[tuple[str, str, str]]] = [[] for _ in range(args.load_processes)]
    for i in range(args.clients):
        if i < args.talkers:
            role = "talker"
        elif i < args.talkers + args.churners:
            role = "churner"
        else:
            role = "listener"
        bot = (f"soak{i:04d}", role, f"room-{i % args.rooms}")
        plans[i % args.load_processes].append(bot)
    return plans


# --- sampling -------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def sample_server(pid: int, work: Path) -> dict[str, Any]:
    sample: dict[str, Any] = {}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        for key in ("VmRSS", "VmHWM", "Threads"):
            found = re.search(rf"^{key}:\s+(\d+)", status, re.MULTILINE)
            if found:
                sample[key] = int(found.group(1))
        sample["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass  # the server has exited; the caller notices
    stats = read_json(work / "server-stats.json")
    if stats and time.time() - stats["time"] < 5:
        sample["tasks"] = stats["tasks"]
    return sample


def take_sample(
    started: float, server: subprocess.Popen[bytes], work: Path, nloads: int
) -> dict[str, Any]:
    progress = [read_json(work / f"progress-{i}.json") for i in range(nloads)]
    phases = {p.get("phase", "starting") for p in progress}
    phase = phases.pop() if len(phases) == 1 else "mixed"
    row: dict[str, Any] = {
        "t": round(time.monotonic() - started, 1),
        "phase": phase,
        **sample_server(server.pid, work),
    }
    for key in ("connected", "sent", "acked", "received"):
        row[key] = sum(p.get(key, 0) for p in progress)
    return row


# --- checking -----------------------------------------------------------------


def check(
    results: list[dict[str, Any]], more_acks: list[tuple[int, str]]
) -> dict[str, Any]:
    """What was lost: ``more_acks`` are (id, room) of messages acknowledged
    to a sender other than the load processes' (the bystander)."""
    room_ids: dict[str, list[int]] = {}
    acked: set[int] = set()
    for message_id, room in [ack for r in results for ack in r["acks"]] + more_acks:
        room_ids.setdefault(room, []).append(message_id)
        acked.add(message_id)
    for ids in room_ids.values():
        ids.sort()
    bots = {bot["name"]: bot for result in results for bot in result["bots"]}
    expected = received = 0
    lost: list[dict[str, Any]] = []
    unacked_deliveries = 0
    for bot in bots.values():
        got = {room: set(ids) for room, ids in bot["received"].items()}
        for room, lo, hi in bot["windows"]:
            ids = room_ids.get(room, [])
            window = ids[bisect.bisect_right(ids, lo) : bisect.bisect_right(ids, hi)]
            expected += len(window)
            missing = [i for i in window if i not in got.get(room, ())]
            lost.extend({"to": bot["name"], "room": room, "id": i} for i in missing)
        for ids in bot["received"].values():
            received += len(ids)
            unacked_deliveries += sum(1 for i in ids if i not in acked)
    dm_lost = []
    dm_acks = [ack for result in results for ack in result["dm_acks"]]
    for message_id, to in dm_acks:
        if message_id not in bots[to]["dms"]:
            dm_lost.append({"to": to, "id": message_id})
    latencies = sorted(x for result in results for x in result["latencies"])
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    for result in results:
        for key, value in result["counts"].items():
            counts[key] = counts.get(key, 0) + value
        for key, value in result["errors"].items():
            errors[key] = errors.get(key, 0) + value
    return {
        "messages_acked": sum(len(ids) for ids in room_ids.values()),
        "dms_acked": len(dm_acks),
        "deliveries_expected": expected,
        "deliveries_received": received,
        "dms_received": sum(len(bot["dms"]) for bot in bots.values()),
        "lost": len(lost),
        "lost_examples": lost[:20],
        "dms_lost": len(dm_lost),
        "dms_lost_examples": dm_lost[:20],
        "duplicates": sum(bot["duplicates"] for bot in bots.values()),
        "strays": sum(bot["strays"] for bot in bots.values()),
        "delivered_but_not_acked": unacked_deliveries,
        "ack_latency_ms": {
            "p50": round(1000 * statistics.median(latencies), 2) if latencies else None,
            "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2)
            if latencies
            else None,
            "max": round(1000 * latencies[-1], 2) if latencies else None,
        },
        "counts": counts,
        "errors": errors,
    }


def memory_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    running = [s for s in samples if s["phase"] == "running" and "VmRSS" in s]
    if len(running) < 2:
        return {}
    first, last = running[0], running[-1]
    times = [s["t"] / 60 for s in running]
    rss = [s["VmRSS"] / 1024 for s in running]
    slope = statistics.linear_regression(times, rss).slope if len(set(times)) > 1 else 0
    # The first minute warms up (buffers, caches, history fills); growth
    # that matters is what continues after it.
    warm = [s for s in running if s["t"] - first["t"] >= 60] or running
    return {
        "rss_mib_start": round(first["VmRSS"] / 1024, 1),
        "rss_mib_end": round(last["VmRSS"] / 1024, 1),
        "rss_mib_peak": round(max(s.get("VmHWM", 0) for s in samples) / 1024, 1),
        "rss_growth_mib": round((last["VmRSS"] - first["VmRSS"]) / 1024, 1),
        "rss_growth_after_first_minute_mib": round(
            (last["VmRSS"] - warm[0]["VmRSS"]) / 1024, 1
        ),
        "rss_slope_mib_per_min": round(slope, 2),
        "fds_start": first.get("fds"),
        "fds_end": last.get("fds"),
        "tasks_start": first.get("tasks"),
        "tasks_end": last.get("tasks"),
    }


# --- report ---------------------------------------------------------------------


def table(samples: list[dict[str, Any]], rows: int = 24) -> str:
    step = max(1, len(samples) // rows)
    picked = samples[::step]
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    header = f"{'t (s)':>7} {'phase':<10} {'RSS MiB':>8} {'fds':>5} {'tasks':>6}"
    header += f" {'clients':>7} {'sent':>7} {'received':>9}"
    lines = [header]
    for s in picked:
        rss = f"{s['VmRSS'] / 1024:.1f}" if "VmRSS" in s else "-"
        lines.append(
            f"{s['t']:>7.0f} {s['phase']:<10} {rss:>8} {s.get('fds', '-'):>5}"
            f" {s.get('tasks', '-'):>6} {s['connected']:>7} {s['sent']:>7}"
            f" {s['received']:>9}"
        )
    return "\n".join(lines)


def report(summary: dict[str, Any]) -> str:
    c, m, k = summary["config"], summary["memory"], summary["check"]
    lines = [
        f"command: {summary['command']}",
        "machine: " + ", ".join(f"{k}={v}" for k, v in summary["machine"].items()),
        f"clients: {c['clients']} ({c['talkers']} talkers at {c['rate']}/s, "
        f"{c['churners']} churners, rest listening), rooms: lobby + {c['rooms']}, "
        f"{c['minutes']} min",
        "",
        table(summary["samples"]),
        "",
        f"server RSS: {m.get('rss_mib_start')} MiB with everyone connected -> "
        f"{m.get('rss_mib_end')} MiB at the end of the run "
        f"(growth {m.get('rss_growth_mib')} MiB, "
        f"{m.get('rss_growth_after_first_minute_mib')} MiB after the first minute, "
        f"slope {m.get('rss_slope_mib_per_min')} MiB/min), "
        f"peak {m.get('rss_mib_peak')} MiB",
        f"fds {m.get('fds_start')} -> {m.get('fds_end')}, "
        f"tasks {m.get('tasks_start')} -> {m.get('tasks_end')}; "
        f"idle before: {summary['idle_before']}; after everyone left: "
        f"{summary['idle_after']}",
        "",
        f"messages acknowledged: {k['messages_acked']} says, {k['dms_acked']} dms "
        f"(refused: {k['counts'].get('refused', 0)}, errors: {k['errors'] or 'none'})",
        f"deliveries: {k['deliveries_expected']} expected in membership windows, "
        f"{k['deliveries_received']} room messages received in all, "
        f"{k['dms_received']} dms received",
        f"LOST: {k['lost']} room messages, {k['dms_lost']} dms; duplicates: "
        f"{k['duplicates']}; received outside membership: {k['strays']}; "
        f"delivered but never acknowledged: {k['delivered_but_not_acked']}",
        *(f"  lost: {x}" for x in k["lost_examples"] + k["dms_lost_examples"]),
        f"churn: {k['counts'].get('churn_rejoin', 0)} rejoins, "
        f"{k['counts'].get('churn_bye', 0)} reconnects after bye, "
        f"{k['counts'].get('churn_drop', 0)} dropped connections "
        f"({k['counts'].get('hello_retries', 0)} hello retries while the old name "
        "was still held)",
        f"ack latency: p50 {k['ack_latency_ms']['p50']} ms, "
        f"p99 {k['ack_latency_ms']['p99']} ms, max {k['ack_latency_ms']['max']} ms",
        *attack_report(summary["attacks"]),
    ]
    return "\n".join(lines)


def attack_report(attacks: dict[str, Any] | None) -> list[str]:
    if attacks is None:
        return []
    lines = ["", "attacks (bystander round trips, ms):"]
    for attack in attacks["attacks"]:
        ms = attack.get("bystander_ms", {})
        outcome = ", ".join(f"{k}: {v}" for k, v in attack.get("outcome", {}).items())
        lines.append(
            f"  {attack['attack']:<14} p50 {ms.get('p50')} p99 {ms.get('p99')} "
            f"max {ms.get('max')} ({ms.get('count')} round trips); {outcome}"
        )
    ms = attacks["bystander_ms"]
    lines.append(
        f"  whole run      p50 {ms.get('p50')} p99 {ms.get('p99')} max {ms.get('max')}"
        f" ({ms.get('count')} round trips); errors {attacks['bystander_errors'] or 0},"
        f" lost {attacks['bystander_lost'] or 0},"
        f" disconnected: {attacks['bystander_closed'] or 'no'}"
    )
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    fd_limit = raise_fd_limit(args.clients + 256)
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="chatkit-soak-") as tmp:
        work = Path(tmp)
        try:
            server, port = start_server(procs, work, limits=bool(args.attacks))
            time.sleep(1.5)  # let the probe report once
            idle_before = sample_server(server.pid, work)
            seconds = args.minutes * 60
            timeout = seconds + CONNECT_GRACE + DRAIN_GRACE
            loads = []
            for i, bots in enumerate(bot_plan(args)):
                config = {
                    "port": port,
                    "seed": args.seed * 1000 + i,
                    "bots": bots,
                    "seconds": seconds,
                    "timeout": timeout,
                    "rate": args.rate,
                    "lobby_share": args.lobby_share,
                    "dm_share": args.dm_share,
                    "churn_every": args.churn_every,
                    "per_address": args.per_address,
                    "progress_path": str(work / f"progress-{i}.json"),
                    "result_path": str(work / f"result-{i}.json"),
                }
                config_path = work / f"load-{i}.json"
                config_path.write_text(json.dumps(config))
                command = [
                    sys.executable,
                    str(HERE / "_soak_load.py"),
                    str(config_path),
                ]
                loads.append(procs.start(command, work / f"load-{i}.log"))
            bystander = attacker = None
            if args.attacks:
                bystander = start_bystander(procs, work, port)
                attacker = start_attacker(procs, work, port, args)
            started = time.monotonic()
            samples = []
            deadline = started + timeout + 10
            while any(load.poll() is None for load in loads):
                if server.poll() is not None:
                    raise RuntimeError(
                        f"the server died:\n{(work / 'server.log').read_text()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError("the load generators did not finish in time")
                samples.append(take_sample(started, server, work, len(loads)))
                row = samples[-1]
                rss = row.get("VmRSS", 0) / 1024
                print(
                    f"  t={row['t']:.0f}s {row['phase']} rss={rss:.1f}MiB"
                    f" fds={row.get('fds')} tasks={row.get('tasks')}"
                    f" clients={row['connected']} sent={row['sent']}"
                    f" received={row['received']}",
                    file=sys.stderr,
                    flush=True,
                )
                wait_until = time.monotonic() + args.sample_every
                while time.monotonic() < wait_until and any(
                    load.poll() is None for load in loads
                ):
                    time.sleep(0.1)
            failed = [i for i, load in enumerate(loads) if load.returncode != 0]
            if failed:
                logs = "\n".join(
                    (work / f"load-{i}.log").read_text()[-5000:] for i in failed
                )
                raise RuntimeError(f"load generator(s) {failed} failed:\n{logs}")
            attacks = finish_attacks(bystander, attacker, work)
            time.sleep(2)  # the server finishes closing the last connections
            idle_after = sample_server(server.pid, work)
            results = [
                json.loads((work / f"result-{i}.json").read_text())
                for i in range(len(loads))
            ]
        except RuntimeError as exc:
            procs.stop_all()
            log = (work / "server.log").read_text()[-3000:]
            raise RuntimeError(f"{exc}\nthe server's last output:\n{log}") from None
        finally:
            procs.stop_all()
        server_log = "\n".join(
            line
            for line in (work / "server.log").read_text().splitlines()
            if not line.startswith(("Server started on", "Server has shut down"))
        )
    return {
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        },
        "fd_limit": fd_limit,
        "samples": samples,
        "idle_before": idle_before,
        "idle_after": idle_after,
        "memory": memory_summary(samples),
        "check": check(results, attacks["acked"] if attacks else []),
        "attacks": attacks,
        "server_log_tail": server_log[-3000:],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    print(report(summary))
    if summary["server_log_tail"].strip():
        print("\nserver output (warnings and errors):\n" + summary["server_log_tail"])
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    k = summary["check"]
    bad = k["lost"] + k["dms_lost"] + k["duplicates"] + k["strays"]
    attacks = summary["attacks"]
    if attacks is not None:
        harmed = attacks["bystander_errors"] or attacks["bystander_lost"]
        bad += bool(harmed or attacks["bystander_closed"])
        bad += attacks["bystander_ms"].get("max", 0) >= 1000  # the bound
    return 1 if bad or k["delivered_but_not_acked"] else 0


if __name__ == "__main__":
    sys.exit(main())
