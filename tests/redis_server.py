"""A throwaway ``redis-server`` on a free loopback port, for the cluster tests.

``redis-server`` must be installed (``scripts/install-test-deps.sh`` does it,
and ``.ci/run`` calls that): a missing one fails the tests that need it
loudly, with the command that fixes it, never skips them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process, which a test may stop and start again
    on the same port (starting empty again: no persistence)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: run scripts/install-test-deps.sh "
                "(apt-get install redis-server)",
                pytrace=False,
            )
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        """The server's URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it and wait until it answers ``PING``."""
        assert self.process is None
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        self.process = await trio.lowlevel.open_process(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                async with stream:
                    await stream.send_all(b"PING\r\n")
                    if (await stream.receive_some(64)).startswith(b"+PONG"):
                        return
                await trio.sleep(0.02)

    async def stop(self) -> None:
        """Kill it (no goodbye) and wait for it to be gone."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


@asynccontextmanager
async def redis_server(directory: Path) -> AsyncIterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit."""
    server = RedisServer(directory)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class RedisProxy:
    """A TCP proxy in front of a Redis that a test can cut and restore: the
    node that goes through it loses Redis while the others keep it (a
    network partition)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._cut = False
        self._scopes: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        """The URL of the Redis behind the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        """Break every connection through the proxy and refuse new ones."""
        self._cut = True
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        """Let connections through again."""
        self._cut = False

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self._cut:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with upstream:
                with trio.CancelScope() as scope:
                    self._scopes.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(_pipe, client, upstream, scope)
                            nursery.start_soon(_pipe, upstream, client, scope)
                    finally:
                        self._scopes.discard(scope)


async def _pipe(
    source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
) -> None:
    """Copy ``source`` to ``sink``; either side ending ends both."""
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    scope.cancel()


@asynccontextmanager
async def redis_proxy(target_port: int) -> AsyncIterator[RedisProxy]:
    """A :class:`RedisProxy` to ``target_port`` listening on a free
    loopback port, stopped on exit."""
    proxy = RedisProxy(target_port)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, proxy._handle, listeners)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
