from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

import chatkit
from tests.helpers import RawClient
from tests.redis_server import RedisServer, redis_server

# chatkit's own tests never pick up entry-point plugins installed on the
# machine; tests that exercise entry points pass their own allow-list.
os.environ["CHATKIT_LOAD_PLUGINS"] = ""

# chatkit.testing's fixtures (``chat``, ``chat_factory``, ...), as a plugin
# author's conftest.py would load them; pytester runs whole pytest sessions
# to test them. tests.fires: the ``fires`` marker and the ``hooks`` fixture.
pytest_plugins = [
    "chatkit.testing",
    "pytester",
    "tests.programs",
    "tests.terminal",
    "tests.fires",
]

OpenRaw = Callable[..., Awaitable[RawClient]]


@pytest.fixture
async def server() -> AsyncIterator[chatkit.ChatServer]:
    """A ChatServer with default settings on a free loopback port."""
    async with chatkit.open_server() as server:
        yield server


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A ``redis-server`` of the test's own, on a free loopback port."""
    async with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate from ``ca`` for 127.0.0.1."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts ``ca``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def open_raw() -> AsyncIterator[OpenRaw]:
    """``await open_raw(port)`` opens a RawClient, closed at teardown."""
    opened: list[RawClient] = []

    async def open_(port: int) -> RawClient:
        client = await RawClient.open(port)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        await client.aclose()


async def login(open_raw: OpenRaw, port: int, name: str, **fields: Any) -> RawClient:
    """Open a JSON-mode client and log in, checking the exact handshake."""
    client = await open_raw(port)
    await client.send_json(type="hello", name=name, protocol=1, **fields)
    welcome = await client.receive_json()
    # The session's secret for a reconnect to take it over (random).
    assert isinstance(welcome.pop("resume", None), str), welcome
    assert welcome == {
        "type": "welcome",
        "name": name,
        "protocol": 1,
        "server": "chatkit",
        "rooms": ["lobby"],
    }
    assert await client.receive_json() == {
        "type": "joined",
        "room": "lobby",
        "name": name,
    }
    return client


async def line_login(
    open_raw: OpenRaw, port: int, name: str, *watchers: RawClient
) -> RawClient:
    """A line-mode client; ``watchers`` (JSON clients) see it join."""
    client = await open_raw(port)
    await client.send_line(name)
    for watcher in watchers:
        assert await watcher.receive_json() == {
            "type": "joined",
            "room": "lobby",
            "name": name,
        }
    return client


async def crowd(open_raw: OpenRaw, port: int, *names: str) -> list[RawClient]:
    """Log in ``names`` in order; earlier clients consume the later join
    notices, so nothing is pending on any client returned."""
    clients: list[RawClient] = []
    for name in names:
        client = await login(open_raw, port, name)
        for earlier in clients:
            assert await earlier.receive_json() == {
                "type": "joined",
                "room": "lobby",
                "name": name,
            }
        clients.append(client)
    return clients
