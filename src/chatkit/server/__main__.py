"""``python -m chatkit.server``: run a chat server from the command line.

Behaves like the original line-based chat program's server: it prints
``Server started on HOST:PORT``, logs each connection, join and leave, and
stops gracefully when Enter is pressed in its terminal (or on SIGINT /
SIGTERM), printing ``Server has shut down.``. With no terminal on standard
input (a service, CI) it ignores standard input and runs until a signal.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import ssl
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import pluggy
import trio

from .._argtypes import at_least, not_negative, port, positive
from .._console import StdinReader
from .._exceptions import StartupError
from ..auth import PasswordFileAuth, TokenAuth
from ..history import HistoryStore, MemoryHistory
from ..sqlite import SqliteHistory
from ._limits import Limits
from ._run import serve_until_stopped_by
from ._server import ChatServer

__all__ = ["build_parser", "load_plugin", "main"]

DEFAULT_PORT = 12345
DEFAULT_DB = "chatkit.sqlite3"
DEFAULT_DB_HISTORY = 10_000
DEFAULT_MEMORY_HISTORY = 100

log = logging.getLogger("chatkit.server")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m chatkit.server``."""
    parser = argparse.ArgumentParser(
        prog="python -m chatkit.server",
        description="Run a chatkit chat server (protocol v1, JSON and line mode).",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=port(0),
        default=DEFAULT_PORT,
        help="TCP port; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE[:ATTR]",
        help="load a plugin: a module, or an object in it (a class is "
        "instantiated with no arguments); repeatable, run in the order given",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what to log on standard output (default: %(default)s)",
    )
    parser.add_argument(
        "--no-entry-points",
        action="store_true",
        help="do not load plugins from the 'chatkit' entry-point group "
        "(CHATKIT_LOAD_PLUGINS filters them otherwise)",
    )
    parser.add_argument(
        "--interactive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stop when Enter is pressed on standard input (default: only "
        "when standard input is a terminal)",
    )
    history = parser.add_argument_group("history (see docs/deployment.md)")
    where = history.add_mutually_exclusive_group()
    where.add_argument(
        "--db",
        metavar="PATH",
        help="keep room history in this SQLite database, across restarts "
        f"(default: {DEFAULT_DB}, in the current directory; with --redis, "
        "history is kept in Redis)",
    )
    where.add_argument(
        "--no-db",
        action="store_true",
        help="keep room history in memory only: lost when the server stops",
    )
    history.add_argument(
        "--history",
        type=int,
        metavar="N",
        help=f"messages kept per room (default: {DEFAULT_DB_HISTORY} in the "
        f"database, {DEFAULT_MEMORY_HISTORY} with --no-db)",
    )
    history.add_argument(
        "--history-max-age",
        type=float,
        metavar="SECONDS",
        help="also forget messages older than this (default: keep them; "
        "not with --no-db)",
    )
    limits = parser.add_argument_group("limits (see docs/security.md)")
    # A flag whose 0 (or -1) means "off" is checked here, against the range
    # its help gives: Limits, which takes None for "off", would name the
    # wrong range. The others are checked by Limits (error: max_... must be
    # at least 1, not 0).
    for flag, kind, default, text in (
        ("--max-connections", int, 10_000, "connections at once"),
        (
            "--max-unauthenticated",
            int,
            1000,
            "connections at once that have not logged in yet",
        ),
        (
            "--max-connections-per-address",
            at_least(0),
            16,
            "connections at once from one IPv4 address or IPv6 /64; 0: no limit",
        ),
        ("--max-rooms-per-user", int, 50, "rooms one user may be in"),
        ("--max-message-length", int, 4096, "characters in one message"),
        ("--max-line-length", int, 64 * 1024, "bytes in one protocol line"),
        ("--max-hello-length", int, 8192, "bytes in one line before hello"),
        (
            "--rate-limit",
            not_negative,
            20.0,
            "requests per second per connection; 0: off",
        ),
        ("--rate-burst", int, 40, "requests a connection may send at once"),
        ("--rename-burst", int, 3, "renames a user may make at once"),
        (
            "--rename-interval",
            not_negative,
            10.0,
            "seconds for each rename regained past --rename-burst; 0: no limit "
            "but --rate-limit",
        ),
        (
            "--max-dm-queued-bytes",
            int,
            64 * 1024,
            "bytes of one sender's direct messages that may wait unwritten at "
            "one recipient",
        ),
        ("--handshake-timeout", float, 10.0, "seconds to say hello"),
        (
            "--idle-timeout",
            not_negative,
            0.0,
            "seconds of silence before closing; 0: never",
        ),
        (
            "--tcp-user-timeout",
            not_negative,
            90.0,
            "seconds sent data may go unacknowledged before a vanished peer's "
            "connection ends; 0: the kernel's default (about 15 minutes)",
        ),
        (
            "--presence-limit",
            at_least(-1),
            1000,
            "rooms larger than this do not announce joins, leaves and renames; "
            "-1: always",
        ),
    ):
        integer = isinstance(default, int)
        limits.add_argument(
            flag,
            type=kind,
            default=default,
            metavar="N"
            if integer
            else "SECONDS"
            if "timeout" in flag or "interval" in flag
            else "RATE",
            help=f"{text} (default: %(default)s)",
        )
    limits.add_argument(
        "--exempt-network",
        action="append",
        type=_network,
        metavar="CIDR",
        help="a network --max-connections-per-address does not limit (a proxy "
        "or NAT you trust); repeatable; replaces the default, 127.0.0.1/32 and "
        "::1/128; 'none': no network",
    )
    web = parser.add_argument_group("browsers (see docs/browsers.md)")
    web.add_argument(
        "--web-port",
        type=port(0),
        default=None,
        metavar="PORT",
        help="also serve the web chat page and its WebSocket on this port of "
        "--host (0 picks a free one; default: no web port)",
    )
    web.add_argument(
        "--web-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages from ORIGIN (such as https://example.com) open a "
        "WebSocket, besides the chat page's own; repeatable; '*': any page",
    )
    web.add_argument(
        "--ws-ping-interval",
        type=not_negative,
        default=30.0,
        metavar="SECONDS",
        help="ping each WebSocket this often; one silent for two intervals is "
        "closed; 0: no pings (default: %(default)s)",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--certfile", metavar="PEM", help="serve TLS with this certificate chain"
    )
    tls.add_argument("--keyfile", metavar="PEM", help="the certificate's private key")
    auth = parser.add_argument_group("authentication (one of)")
    auth.add_argument(
        "--auth-token", metavar="TOKEN", help="clients must send this token in hello"
    )
    auth.add_argument(
        "--operator-token",
        metavar="TOKEN",
        help="with --auth-token: clients sending this token instead get in as "
        "server operators (docs/moderation.md)",
    )
    auth.add_argument(
        "--password-file",
        metavar="PATH",
        help="clients log in with a password from this file "
        "(manage it with python -m chatkit.auth)",
    )
    moderation = parser.add_argument_group("moderation (see docs/moderation.md)")
    moderation.add_argument(
        "--operator",
        action="append",
        default=[],
        metavar="NAME",
        help="a server operator, who may kick, ban and mute anywhere; "
        "repeatable (use with --auth-token or --password-file, or anyone "
        "could log in under the name)",
    )
    cluster = parser.add_argument_group(
        "cluster (several servers as one; see docs/deployment.md)"
    )
    cluster.add_argument(
        "--redis",
        metavar="URL",
        help="join the cluster of servers sharing this Redis, e.g. "
        "redis://127.0.0.1:6379/0 (needs pip install 'chatkit[redis]')",
    )
    cluster.add_argument(
        "--name-ttl",
        type=positive,
        default=15.0,
        metavar="SECONDS",
        help="how long a crashed node's names stay taken (default: %(default)s)",
    )
    cluster.add_argument(
        "--redis-prefix",
        default="chatkit:",
        metavar="PREFIX",
        help="prefix of the cluster's Redis keys (default: %(default)s)",
    )
    return parser


def _network(text: str) -> str:
    """An ``--exempt-network`` value, checked (``none`` is kept as is)."""
    if text == "none":
        return text
    try:
        (network,) = Limits(exempt_networks=(text,)).exempt_networks
    except ValueError as exc:
        message = str(exc).removeprefix("exempt_networks: ")
        raise argparse.ArgumentTypeError(message) from None
    return network


def _exempt_networks(values: list[str] | None) -> tuple[str, ...]:
    """The networks the ``--exempt-network`` flags give (the default if none)."""
    if values is None:
        return Limits().exempt_networks
    return tuple(value for value in values if value != "none")


def _backplane(args: argparse.Namespace) -> Any:
    """The RedisBackplane the flags ask for, or None."""
    url = args.redis
    if url is None:
        return None
    options: dict[str, Any] = {"name_ttl": args.name_ttl, "prefix": args.redis_prefix}
    if args.history is not None:
        options["history_size"] = args.history
    try:
        from ..cluster import RedisBackplane
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    try:
        return RedisBackplane(url, **options)
    except ValueError as exc:
        raise ValueError(f"--redis {url}: {exc}") from None


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if certfile is None:
        if keyfile is not None:
            raise ValueError("--keyfile needs --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS certificate {certfile}: {exc}") from exc
    return context


def _auth_plugins(
    token: str | None, operator_token: str | None, password_file: str | None
) -> list[object]:
    if token is not None and password_file is not None:
        raise ValueError("use --auth-token or --password-file, not both")
    if operator_token is not None and token is None:
        raise ValueError(
            "--operator-token needs --auth-token (a password file gives roles "
            "itself: python -m chatkit.auth add --operator)"
        )
    if token is not None:
        return [TokenAuth(token, operator_token=operator_token)]
    if password_file is not None:
        try:
            return [PasswordFileAuth(password_file)]
        except OSError as exc:
            raise ValueError(f"cannot read {password_file}: {exc.strerror}") from exc
    return []


def _history_store(args: argparse.Namespace) -> HistoryStore | None:
    """The store the flags ask for: SQLite (the default), memory with
    ``--no-db``, or None with ``--redis`` (the cluster's shared history)."""
    size, max_age = args.history, args.history_max_age
    if size is not None and size < 1:
        raise ValueError(f"--history must be at least 1, not {size}")
    if args.redis is not None:
        if args.db is not None or args.no_db or max_age is not None:
            raise ValueError(
                "with --redis, history is kept in Redis: "
                "--db, --no-db and --history-max-age do not apply"
            )
        return None
    db = None if args.no_db else (args.db or DEFAULT_DB)
    if max_age is not None and not max_age > 0:  # also refuses nan
        raise ValueError(f"--history-max-age must be positive, not {max_age:g}")
    if db is None:
        if max_age is not None:
            raise ValueError("--history-max-age needs the database (not --no-db)")
        return MemoryHistory(DEFAULT_MEMORY_HISTORY if size is None else size)
    return SqliteHistory(
        db,
        max_messages_per_room=DEFAULT_DB_HISTORY if size is None else size,
        max_age=max_age,
    )


def load_plugin(spec: str) -> object:
    """Load a plugin from ``module`` or ``module:attr``; a class is
    instantiated with no arguments.

    Raises:
        ValueError: the module or attribute does not exist.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import plugin module {module_name!r}: {exc}") from exc
    if not attr:
        return module
    try:
        plugin: object = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    return plugin() if isinstance(plugin, type) else plugin


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m chatkit.server``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(message)s", stream=sys.stdout
    )
    # The Redis client's retries are its business; its failures are ours.
    logging.getLogger("coredis").setLevel(logging.WARNING)
    try:
        plugins = _auth_plugins(
            args.auth_token, args.operator_token, args.password_file
        )
        plugins += [load_plugin(spec) for spec in args.plugin]
        server = ChatServer(
            args.host,
            args.port,
            plugins=plugins,
            load_entry_points=not args.no_entry_points,
            history=_history_store(args),
            limits=Limits(
                max_connections=args.max_connections,
                max_unauthenticated=args.max_unauthenticated,
                max_connections_per_address=args.max_connections_per_address or None,
                exempt_networks=_exempt_networks(args.exempt_network),
                max_rooms_per_user=args.max_rooms_per_user,
                max_message_length=args.max_message_length,
                max_line_length=args.max_line_length,
                max_hello_length=args.max_hello_length,
                rate_limit=args.rate_limit or None,
                rate_burst=args.rate_burst,
                rename_burst=args.rename_burst,
                rename_interval=args.rename_interval or None,
                max_dm_queued_bytes=args.max_dm_queued_bytes,
                handshake_timeout=args.handshake_timeout,
                idle_timeout=args.idle_timeout or None,
                tcp_user_timeout=args.tcp_user_timeout or None,
                ws_ping_interval=args.ws_ping_interval or None,
                presence_limit=(
                    None if args.presence_limit == -1 else args.presence_limit
                ),
            ),
            ssl_context=_tls_context(args.certfile, args.keyfile),
            backplane=_backplane(args),
            web_port=args.web_port,
            web_origins=args.web_origin,
            operators=args.operator,
        )
    except (ValueError, TypeError, pluggy.PluginValidationError) as exc:
        parser.error(str(exc))
    # sys.stdin is None when standard input is closed: no terminal, and
    # (with --interactive) end of input at once.
    interactive = (
        sys.stdin is not None and sys.stdin.isatty()
        if args.interactive is None
        else args.interactive
    )
    # Opened before trio runs, whose own descriptors may reuse a closed 0.
    stdin = StdinReader(-1 if sys.stdin is None else 0) if interactive else None
    listening = False

    async def run() -> None:
        nonlocal listening
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_until_stopped_by, server, stdin))
            listening = True

    status = 0
    try:
        trio.run(run)
    except* StartupError as group:
        print(f"error: {_first(group)}", file=sys.stderr)
        status = 1
    except* OSError as group:
        if listening:
            raise  # not a startup error: a bug, with its traceback
        error = _first(group)
        reason = (
            error.strerror if isinstance(error, OSError) and error.strerror else error
        )
        where = f"{args.host}:{args.port}"
        if args.web_port is not None:
            where += f" (web port {args.web_port})"
        print(f"error: cannot listen on {where}: {reason}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
