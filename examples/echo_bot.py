"""A bot: a chatkit client plus a client plugin that echoes what others say.

Start a server, then the bot::

    python -m chatkit.server
    python examples/echo_bot.py --host 127.0.0.1 --port 12345 --name echo

and chat with it from a client (``python -m chatkit.client``): in every room
the bot is in, ``hello`` from alice gets ``alice said: hello`` back. It
ignores its own messages, the server's, and other bots' echoes, so two echo
bots never talk to each other forever.

The bot runs until the server shuts down or drops it, or until Ctrl-C
(SIGINT) or SIGTERM, when it says goodbye and leaves. It prints one line per
message it echoes.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Final

import trio

import chatkit

#: What the bot puts between a sender and their text.
SAID: Final = " said: "


class Echo:
    """The plugin: echoes every room message that is not its own, the
    server's, or an echo itself."""

    def __init__(self) -> None:
        self.disconnected = trio.Event()
        self.reason: str | None = None

    @chatkit.hookimpl
    async def chatkit_client_message(
        self, client: chatkit.ChatClient, message: chatkit.Message
    ) -> None:
        """Say ``<sender> said: <text>`` back in the message's room."""
        if message.sender in (client.name, chatkit.SERVER_SENDER):
            return
        if SAID in message.text:
            return  # an echo (ours or another bot's): don't start a loop
        echo = f"{message.sender}{SAID}{message.text}"
        try:
            await client.say(echo, room=message.room)
        except chatkit.RequestError as exc:
            # Refused (a server plugin vetoed it) or the connection is gone;
            # the bot carries on either way.
            print(f"could not echo in {message.room}: {exc}", flush=True)
            return
        print(f"echoed in {message.room}: {echo}", flush=True)

    @chatkit.hookimpl
    def chatkit_client_disconnected(self, reason: str) -> None:
        """Let :func:`run_bot` return."""
        if self.reason is None:  # a signal may have stopped us first
            self.reason = reason
        self.disconnected.set()


async def run_bot(host: str, port: int, name: str) -> str:
    """Connect as ``name`` and echo until disconnected or signalled.

    Returns:
        Why the bot stopped.
    """
    echo = Echo()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with chatkit.open_client(
            host, port, name=name, plugins=[echo], event_buffer=None
        ) as bot:
            print(f"{bot.name} is listening on {host}:{port}", flush=True)
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        echo.reason = f"{signal.Signals(signum).name} received"
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                await echo.disconnected.wait()
                nursery.cancel_scope.cancel()
        # Leaving the ``async with`` said goodbye to the server.
    return echo.reason or "closed"


def main(argv: list[str] | None = None) -> int:
    """The command line: ``echo_bot.py [--host H] [--port P] [--name N]``."""
    parser = argparse.ArgumentParser(description="A chatkit bot that echoes.")
    parser.add_argument("--host", default="127.0.0.1", help="server address")
    parser.add_argument(
        "--port", type=int, default=chatkit.DEFAULT_PORT, help="server port"
    )
    parser.add_argument("--name", default="echo", help="the bot's user name")
    args = parser.parse_args(argv)
    try:
        reason = trio.run(run_bot, args.host, args.port, args.name)
    except (OSError, chatkit.RequestError) as exc:
        print(f"echo bot: {exc}", file=sys.stderr)
        return 1
    print(f"stopped: {reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
