"""docs/performance.md's tables from a fan-out benchmark's JSON report.

    python benchmarks/tables.py                        # benchmarks/results.json
    python benchmarks/tables.py /tmp/run.json > tables.md

Prints, in Markdown: the run's command, commit and machine, then the
throughput, latency, connections and saturated-latency tables (every figure
also as a ratio to the threaded baseline and to ngircd of the same run), the
optimisation steps (``chatkit-before`` → ``chatkit-writer`` →
``chatkit-direct`` → ``chatkit``, each against the previous row: only in
reports from before issue 17, whose runs had those rows), the profiles and
the 10,000-client probe: whatever of these the run measured.
With ``--rounds``, every ratio is to the same round's baseline, and the
medians over the rounds follow (fanout.py's ``round_summary``). Issue 17's
targets (fanout.py's ``targets``: chatkit against chatkit-before, history
in memory and in SQLite) come after them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fanout import fmt as num  # noqa: E402
from fanout import key, ratio, round_summary, targets, ws_targets  # noqa: E402

PERCENTILES = ("p50", "p90", "p99", "max")
#: The rows of issue 5's optimisation steps; fanout.py has not measured the
#: middle two since issue 17 removed their switches from chatkit.
STEPS = ("chatkit-before", "chatkit-writer", "chatkit-direct", "chatkit")

Result = dict[str, Any]


def figure(result: Result | None, mode: str, name: str) -> float | None:
    """One figure of one result: ``figure(r, "latency", "p99_ms")``; a
    top-level one with ``mode`` empty."""
    if result is None:
        return None
    value = result.get(mode, {}).get(name) if mode else result.get(name)
    return None if value is None else float(value)


class Report:
    """The results of one run, looked up by server, N and round."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        self.results: list[Result] = [
            r for r in report["results"] if "throughput" in r or "latency" in r
        ]
        self.by_key = {key(r): r for r in self.results}

    def table(self, columns: list[str], cells: Callable[[Result], list[str]]) -> str:
        """One row per result: its server and N, then ``cells(result)``
        under ``columns``."""
        lines = [
            "| server | N | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * (len(columns) + 1),
        ]
        for r in self.results:
            row = [r["server"], str(r["clients"]), *cells(r)]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def against(self, r: Result, mode: str, name: str) -> list[str]:
        """The figure's ratio to the same N's threaded baseline and ngircd."""
        value = figure(r, mode, name)
        return [
            ratio(value, figure(self.by_key.get(key(r, server)), mode, name))
            for server in ("threaded", "ngircd")
        ]

    def throughput(self) -> str:
        def cells(r: Result) -> list[str]:
            tp = "throughput"
            return [
                num(figure(r, tp, "deliveries_per_s"), ",.0f"),
                *self.against(r, tp, "deliveries_per_s"),
                num(figure(r, tp, "server_cpu"), ".2f"),
                num(figure(r, tp, "generator_cpu"), ".2f"),
                str(r.get(tp, {}).get("loss", "-")),
            ]

        columns = ["deliveries/s", "vs threaded", "vs ngircd"]
        columns += ["server CPU (cores)", "generator CPU (cores)", "loss"]
        return self.table(columns, cells)

    def latency(self) -> str:
        def cells(r: Result) -> list[str]:
            lat = "latency"
            return [
                *(num(figure(r, lat, f"{q}_ms"), ".2f") for q in PERCENTILES),
                *self.against(r, lat, "p99_ms"),
                num(figure(r, lat, "server_cpu"), ".2f"),
                str(r.get(lat, {}).get("loss", "-")),
            ]

        columns = [f"{q} ms" for q in PERCENTILES]
        columns += ["p99 vs threaded", "p99 vs ngircd", "server CPU (cores)", "loss"]
        return self.table(columns, cells)

    def connections(self) -> str:
        def cells(r: Result) -> list[str]:
            return [
                num(figure(r, "", "register_s"), ".3f"),
                num(figure(r, "", "rss_per_connection_kib"), ".1f"),
                *self.against(r, "", "rss_per_connection_kib"),
            ]

        columns = ["register N clients (s)", "RSS per idle connection (KiB)"]
        columns += ["vs threaded", "vs ngircd"]
        return self.table(columns, cells)

    def saturated(self) -> str:
        def cells(r: Result) -> list[str]:
            sat = r.get("throughput", {}).get("saturated", {})
            return [num(sat.get("p50_ms"), ".1f"), num(sat.get("p99_ms"), ".1f")]

        return self.table(["p50 ms", "p99 ms"], cells)

    def steps(self) -> str:
        """Each step against the previous one, then chatkit against
        chatkit-before, per N (and round); empty unless the run has every
        step."""
        lines = [
            "| step | N | deliveries/s | vs previous | p99 ms at 50k/s "
            "| vs previous | server CPU at 50k/s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for n, round_ in sorted({key(r)[1:] for r in self.results}):
            rows = [self.by_key.get((step, n, round_)) for step in STEPS]
            if any(r is None for r in rows):
                continue
            previous: Result | None = None
            for step, r in zip(STEPS, rows, strict=True):
                dps = figure(r, "throughput", "deliveries_per_s")
                p99 = figure(r, "latency", "p99_ms")
                dps_before = figure(previous, "throughput", "deliveries_per_s")
                p99_before = figure(previous, "latency", "p99_ms")
                lines.append(
                    f"| {step} | {n} | {num(dps, ',.0f')} "
                    f"| {ratio(dps, dps_before)} "
                    f"| {num(p99, '.2f')} "
                    f"| {ratio(p99, p99_before)} "
                    f"| {num(figure(r, 'latency', 'server_cpu'), '.2f')} |"
                )
                previous = r
            first, last = rows[0], rows[-1]
            dps_ratio = ratio(
                figure(last, "throughput", "deliveries_per_s"),
                figure(first, "throughput", "deliveries_per_s"),
            )
            p99_ratio = ratio(
                figure(last, "latency", "p99_ms"), figure(first, "latency", "p99_ms")
            )
            lines.append(
                f"| **chatkit vs chatkit-before** | {n} | | **{dps_ratio}** "
                f"| | **{p99_ratio}** | |"
            )
        return "\n".join(lines) if len(lines) > 2 else ""

    def profiles(self) -> str:
        parts = []
        for r in self.results:
            entries = r.get("profile")
            if not entries:
                continue
            rows = [
                f"| {e['own_pct']:.1f} | {e['total_pct']:.1f} | `{e['function']}` |"
                for e in entries
            ]
            parts.append(
                f"#### Profile: {r['server']}, N={r['clients']}\n\n"
                "| own % | total % | function |\n|---:|---:|---|\n" + "\n".join(rows)
            )
        return "\n\n".join(parts)

    def probes(self) -> str:
        lines = []
        for r in self.report["results"]:
            probe = r.get("probe")
            if probe:
                lines.append(
                    f"**{r['clients']:,} clients** ({r['server']}): registered in "
                    f"{r['register_s']:.2f} s; {r['rss_per_connection_kib']:.1f} KiB "
                    f"per idle connection; one message reached "
                    f"{probe['recipients']:,} others with loss {probe['loss']}, "
                    f"the last after {probe.get('max_ms', 0):.0f} ms "
                    f"(p50 {probe.get('p50_ms', 0):.0f} ms)."
                )
        return "\n\n".join(lines)

    def markdown(self) -> str:
        machine = self.report.get("machine", {})
        head = [
            f"Command: `{self.report.get('command', '?')}`, at commit "
            f"`{self.report.get('commit', 'unknown')}`, "
            f"{self.report.get('elapsed_s', 0) / 60:.0f} minutes.",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + ".",
        ]
        sections = [
            ("Throughput (as fast as possible)", self.throughput()),
            ("Latency (fixed offered rate)", self.latency()),
            ("Connections", self.connections()),
            ("Saturated latency (throughput mode)", self.saturated()),
            ("Over the rounds", "\n".join(round_summary(self.results)).strip()),
            ("Issue 17 targets", "\n".join(targets(self.results)).strip()),
            ("Issue 20 targets", "\n".join(ws_targets(self.results)).strip()),
            ("What each step bought", self.steps()),
            ("Profiles", self.profiles()),
            ("Scale", self.probes()),
        ]
        body = [f"### {title}\n\n{text}" for title, text in sections if text]
        return "\n\n".join(["\n".join(head), *body]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "report",
        nargs="?",
        type=Path,
        default=HERE / "results.json",
        help="fanout.py --json output (default: benchmarks/results.json)",
    )
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as exc:
        print(f"tables.py: cannot read {args.report}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(Report(report).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
