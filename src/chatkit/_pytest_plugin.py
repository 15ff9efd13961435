"""The pytest fixtures of :mod:`chatkit.testing`.

pytest loads this module when a ``conftest.py`` says
``pytest_plugins = ["chatkit.testing"]`` (that module names this one in its
own ``pytest_plugins``). It is the only chatkit module that imports pytest.
The fixtures are async: they need pytest-trio, with ``trio_mode = true`` or
tests marked ``@pytest.mark.trio``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from functools import partial
from typing import Any, cast

import pytest
import trio

from .testing import Chat, ChatFactory, open_chat

__all__ = ["chat", "chat_clients", "chat_factory", "chat_options", "chat_plugins"]


@pytest.fixture
def chat_plugins() -> Iterable[object]:
    """The server plugins of the ``chat`` fixture: none.

    Override it (in a test module, a class or a ``conftest.py``) to test
    yours::

        @pytest.fixture
        def chat_plugins():
            return [Shout()]
    """
    return ()


@pytest.fixture
def chat_clients() -> Iterable[str]:
    """The clients the ``chat`` fixture connects: ``alice`` and ``bob``.
    Override it for others."""
    return ("alice", "bob")


@pytest.fixture
def chat_options() -> dict[str, Any]:
    """Other :func:`~chatkit.testing.open_chat` arguments for the ``chat``
    fixture (``wait_timeout``, ``history_size``, ``hook_timeout``, ...): none.
    Override it to set some."""
    return {}


@pytest.fixture
async def chat(
    chat_plugins: Iterable[object],
    chat_clients: Iterable[str],
    chat_options: dict[str, Any],
) -> AsyncIterator[Chat]:
    """A running :class:`~chatkit.testing.Chat`: a server with
    ``chat_plugins``, and ``chat_clients`` logged in; closed after the
    test."""
    async with open_chat(
        plugins=chat_plugins, clients=chat_clients, **chat_options
    ) as chat:
        yield chat


async def _hold_chat(
    options: dict[str, Any], *, task_status: trio.TaskStatus[Chat]
) -> None:
    # Runs in the fixture's nursery: the chat is opened and closed by this
    # task, whichever task asked for it.
    async with open_chat(**options) as chat:
        task_status.started(chat)
        await trio.sleep_forever()


@pytest.fixture
async def chat_factory() -> AsyncIterator[ChatFactory]:
    """``await chat_factory(plugins=[...], clients=[...], ...)`` opens a
    :class:`~chatkit.testing.Chat` (taking :func:`~chatkit.testing.open_chat`'s
    arguments) that stays open until the test ends: for tests that need
    several chats or build their plugins first."""
    async with trio.open_nursery() as nursery:

        async def factory(**options: Any) -> Chat:
            return cast(Chat, await nursery.start(partial(_hold_chat, options)))

        yield factory
        # Each chat closes gracefully, shielded and bounded, on cancellation.
        nursery.cancel_scope.cancel()
