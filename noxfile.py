"""Developer tasks. ``nox`` runs the default sessions with this machine's python3."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs", "bench_smoke"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHONS = ["3.11", "3.12", "3.13"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with the interpreter nox runs under."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHONS)
def tests_matrix(session: nox.Session) -> None:
    """The test suite on every supported Python (needs them, e.g. via pyenv)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy, strict on src/chatkit."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ with ``mkdocs build --strict``.

    Any warning (a broken link, a page left out of the nav, a docstring
    griffe cannot parse) fails the build.
    """
    session.install(".[docs]")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        "site",
        *session.posargs,
        # Material's end-of-life notice is printed on every build otherwise.
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def bench_smoke(session: nox.Session) -> None:
    """A ~20-second run of the fan-out benchmark (tiny N) so that it cannot
    rot: the threaded baseline, ngircd, chatkit (history in memory and in
    SQLite), trio-minimal, and over WebSocket chatkit's web port and the
    websockets reference, every delivery counted.

    Fails (never skips) when ngircd is missing: scripts/install-test-deps.sh
    installs it. Its JSON report goes through benchmarks/tables.py too.
    """
    session.install("-e", ".[bench]")
    report = Path(session.create_tmp()) / "smoke.json"
    session.run(
        "python",
        "benchmarks/fanout.py",
        "--smoke",
        "--json",
        str(report),
        *session.posargs,
    )
    session.run("python", "benchmarks/tables.py", str(report), silent=True)


@nox.session
def bench(session: nox.Session) -> None:
    """The full fan-out benchmark (minutes; not in CI). Writes
    benchmarks/results.json; docs/performance.md reports it.

    ``nox -s bench -- --profile chatkit`` adds a py-spy profile.
    """
    session.install("-e", ".[bench]")
    session.run(
        "python",
        "benchmarks/fanout.py",
        "--json",
        "benchmarks/results.json",
        *session.posargs,
    )


@nox.session
def bench_cluster(session: nox.Session) -> None:
    """The cluster benchmark: fan-out on 1, 2 and 3 chatkit nodes through
    Redis against one node alone (minutes; not in CI, not a default
    session). Writes benchmarks/cluster_results.json; docs/performance.md
    reports it.

    ``nox -s bench_cluster -- --smoke`` is the few-second version. Fails
    (never skips) when redis-server is missing: scripts/install-test-deps.sh
    installs it.
    """
    session.install("-e", ".[bench,redis]")
    session.run("python", "benchmarks/cluster.py", *session.posargs)
