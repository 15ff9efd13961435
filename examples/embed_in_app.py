"""A trio program that embeds a chatkit server next to work of its own.

The "app" here is a heartbeat: every ``--interval`` seconds it posts a status
line to the lobby with ``await server.post(...)`` (how many users are online,
how many messages they sent, counted by a small server plugin) and prints
it. The server and the heartbeat are two tasks in the app's nursery; after
``--seconds`` seconds, or on Ctrl-C (SIGINT) or SIGTERM, the app stops its
own work, says goodbye in the lobby and shuts the server down gracefully
(every client gets ``shutdown``)::

    python examples/embed_in_app.py --port 12345 --seconds 60 --interval 5

and, in other terminals, ``python -m chatkit.client --port 12345``.
``--seconds 0.5`` makes it finish quickly (tests use that); ``--port 0``
picks a free port, printed on the first line.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

import chatkit


class MessageCounter:
    """A server plugin the app reads: counts the messages users send."""

    def __init__(self) -> None:
        self.count = 0

    @chatkit.hookimpl
    def chatkit_message_delivered(self, message: chatkit.Message) -> None:
        """Count a delivered message unless the app posted it."""
        if message.sender != chatkit.SERVER_SENDER:
            self.count += 1


def plural(count: int, noun: str) -> str:
    """``1 user``, ``2 users``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


async def heartbeat(
    server: chatkit.ChatServer, counter: MessageCounter, interval: float
) -> None:
    """The app's own periodic work: post and print a status line, forever."""
    tick = 0
    while True:
        tick += 1
        status = (
            f"tick {tick}: {plural(len(server.users), 'user')} online,"
            f" {plural(counter.count, 'message')} so far"
        )
        print(status, flush=True)
        await server.post(chatkit.LOBBY, status)
        await trio.sleep(interval)


async def run_app(host: str, port: int, seconds: float, interval: float) -> None:
    """Serve chat and beat until ``seconds`` pass or a signal arrives."""
    counter = MessageCounter()
    server = chatkit.ChatServer(host, port, plugins=[counter])
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print(f"Server started on {host}:{server.port}", flush=True)
            # The app's own work gets a nursery of its own, so that it can be
            # stopped before the server is.
            async with trio.open_nursery() as work:
                work.start_soon(heartbeat, server, counter, interval)
                with trio.move_on_after(seconds):
                    async for signum in signals:
                        print(f"{signal.Signals(signum).name} received", flush=True)
                        break
                work.cancel_scope.cancel()
            await server.post(chatkit.LOBBY, "the app is shutting down, bye!")
            # Graceful: clients get what is queued, then ``shutdown``; serve()
            # returns, and with it the nursery.
            await server.aclose()
    print("Server has shut down.", flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command line; see the module's docstring."""
    parser = argparse.ArgumentParser(
        description="A trio app running a chatkit server next to its own work."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=chatkit.DEFAULT_PORT, help="0 picks a free one"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="stop after this long (default 60; 'inf': only on a signal)",
    )
    parser.add_argument(
        "--interval", type=float, default=5.0, help="seconds between heartbeats"
    )
    args = parser.parse_args(argv)
    try:
        trio.run(run_app, args.host, args.port, args.seconds, args.interval)
    except OSError as exc:
        print(f"embed_in_app: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
