from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import chatkit
from tests.helpers import RawClient

# chatkit's own tests never pick up entry-point plugins installed on the
# machine; tests that exercise entry points pass their own allow-list.
os.environ["CHATKIT_LOAD_PLUGINS"] = ""

OpenRaw = Callable[..., Awaitable[RawClient]]


@pytest.fixture
async def server() -> AsyncIterator[chatkit.ChatServer]:
    """A ChatServer with default settings on a free loopback port."""
    async with chatkit.open_server() as server:
        yield server


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
