"""Running a server: for the duration of an ``async with`` block
(:func:`open_server`), or until someone stops it: Enter, SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .._console import StdinReader
from ._server import ChatServer

__all__ = ["open_server", "serve_until_stopped", "serve_until_stopped_by"]

log = logging.getLogger("chatkit.server")


@asynccontextmanager
async def open_server(
    host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> AsyncIterator[ChatServer]:
    """Run a :class:`ChatServer` for the duration of an ``async with`` block.

    Takes :class:`ChatServer`'s arguments; the server is listening on entry
    (read ``server.port``) and shut down gracefully on exit. An exception
    raised in the block propagates unchanged (not wrapped in an
    ``ExceptionGroup`` by the server's nursery).
    """
    server = ChatServer(host, port, **kwargs)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        except BaseException as exc:
            # Re-raised below, outside the nursery, so it is not grouped.
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await server.aclose()
    if body_error is not None:
        raise body_error


async def serve_until_stopped(
    server: ChatServer,
    *,
    interactive: bool,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``server`` until Enter (if ``interactive``), SIGINT or SIGTERM,
    then shut it down gracefully."""
    stdin = StdinReader() if interactive else None
    await serve_until_stopped_by(server, stdin, task_status=task_status)


async def serve_until_stopped_by(
    server: ChatServer,
    stdin: StdinReader | None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`serve_until_stopped`, watching ``stdin`` for Enter (if not
    ``None``)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop_watchers(
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                await server.serve(task_status=task_status)
                nursery.cancel_scope.cancel()  # serve returned: stop watching

            port = await nursery.start(serve_then_stop_watchers)
            print(f"Server started on {server.host}:{port}", flush=True)
            if server.web_port is not None:
                print(f"Web chat on {server.web_url}", flush=True)
            task_status.started(port)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.debug("received %s", signal.Signals(signum).name)
                    break
                await server.aclose()

            async def stop_on_enter(reader: StdinReader) -> None:
                while True:
                    data = await reader.read()
                    # Enter stops, and so does end of input (Ctrl-D).
                    if not data or b"\n" in data:
                        break
                await server.aclose()

            nursery.start_soon(stop_on_signal)
            if stdin is not None:
                print("Press Enter to stop the server.", flush=True)
                nursery.start_soon(stop_on_enter, stdin)
    print("Server has shut down.", flush=True)
