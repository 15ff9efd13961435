"""Run a chatkit server for benchmarks/fanout.py and benchmarks/cluster.py.

Like ``python -m chatkit.server`` (it prints ``Server started on HOST:PORT``
and stops gracefully on SIGTERM), with what a benchmark needs: the file
limit raised to the hard limit, rate limiting off and no connection cap
below the benchmark's.

History is the library's default (in memory) unless ``--db PATH`` gives
the server a :class:`chatkit.SqliteHistory` on that file (default
arguments). ``--redis URL`` makes it one node of a cluster (a
:class:`chatkit.cluster.RedisBackplane` on that Redis, default settings),
as ``python -m chatkit.server --redis`` does. ``--web-port PORT`` also
serves the web port (``ChatServer(web_port=PORT)``, issue 20's WebSocket
transport at ``/ws``; 0 picks a free one) and prints ``Web port: PORT``
once it is bound.

It serves chatkit's source from before issue 17's server core (``fanout.py
--before-rev``) as well as after: the limits go to
``ChatServer(limits=chatkit.Limits(...))`` where ``chatkit.Limits`` exists,
else to ``ChatServer`` as keyword arguments.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from functools import partial
from typing import Any

import trio
from loadgen import raise_file_limit

import chatkit
from chatkit import ChatServer
from chatkit.server import serve_until_stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--presence-limit",
        type=int,
        default=1000,
        help="presence_limit of the server's limits; -1 for None",
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        default=None,
        help="keep history in chatkit.SqliteHistory(PATH) (default: in memory)",
    )
    parser.add_argument(
        "--no-split-fanout",
        action="store_true",
        help="a chatkit from before issue 17: split_fanout_at=None (it sent a "
        "lone message to a room of 256 or more from two threads)",
    )
    parser.add_argument(
        "--web-port",
        type=int,
        default=None,
        help="also serve the web port (0: a free one) and print 'Web port: PORT'",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="join the cluster sharing this Redis (needs chatkit[redis])",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    limit = raise_file_limit()
    limits: dict[str, Any] = {
        "rate_limit": None,
        "max_connections": max(1, limit - 100),
        "presence_limit": None if args.presence_limit < 0 else args.presence_limit,
    }
    options: dict[str, Any] = {}
    if args.db is not None:
        options["history"] = chatkit.SqliteHistory(args.db)
    if args.redis is not None:
        from chatkit.cluster import RedisBackplane

        options["backplane"] = RedisBackplane(args.redis)
    if hasattr(chatkit, "Limits"):  # issue 17's server core
        options["limits"] = chatkit.Limits(**limits)
    else:  # before it; a chatkit older than 33f5bcf may lack some limits
        accepted = inspect.signature(ChatServer).parameters
        options.update({k: v for k, v in limits.items() if k in accepted})
        if args.no_split_fanout and "split_fanout_at" in accepted:
            options["split_fanout_at"] = None
    if args.web_port is not None:
        options["web_port"] = args.web_port
    server = ChatServer(args.host, args.port, **options)
    trio.run(serve, server)


async def serve(server: ChatServer) -> None:
    """Serve until SIGTERM; with a web port, print it once bound."""
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_until_stopped, server, interactive=False))
        web_port = getattr(server, "web_port", None)
        if web_port is not None:
            print(f"Web port: {web_port}", flush=True)


if __name__ == "__main__":
    main()
