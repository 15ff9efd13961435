"""The integer fields of a ``history`` request have bounds, and a request
outside them is a bad request, whatever the store behind it.

The choice made here (issue: "a history request with a huge integer reaches
SQLite and raises OverflowError inside the server"): message ids are
SQLite's 64-bit signed integers and are positive, so ``before``, ``after``
and ``limit`` must each be an integer with ``0 <= x <= 2**63 - 1``
(:data:`MAX`). Anything outside (``10**30``, ``2**63``, ``-1``...) is
answered with ``error bad_request`` carrying the request's ``ref``, for a
:class:`~chatkit.SqliteHistory` and a :class:`~chatkit.MemoryHistory`
alike (the protocol does not depend on the store), and the connection
stays usable. The bounds themselves are valid: ``before=0`` and
``after=MAX`` find nothing, ``before=MAX`` and ``after=0`` find
everything, ``limit=MAX`` is capped to the server's page size like any
large limit.

Only the public API and the wire protocol (RawClient) are used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import chatkit
from tests.conftest import OpenRaw, crowd
from tests.helpers import RawClient

MAX = 2**63 - 1
"""The largest valid ``before``, ``after`` and ``limit``: SQLite's largest
integer."""

OUT_OF_RANGE = {
    "-10**30": -(10**30),
    "-2**63-1": -(2**63) - 1,
    "-2**63": -(2**63),
    "-1": -1,
    "2**63": 2**63,
    "2**64": 2**64,
    "10**30": 10**30,
}


@pytest.fixture(params=["sqlite", "memory"])
async def server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[chatkit.ChatServer]:
    """A server whose history is in a SQLite file, or in memory."""
    history: chatkit.HistoryStore = (
        chatkit.SqliteHistory(tmp_path / "history.sqlite3")
        if request.param == "sqlite"
        else chatkit.MemoryHistory()
    )
    async with chatkit.open_server(history=history) as server:
        yield server


async def ask(client: RawClient, **fields: Any) -> dict[str, Any]:
    """Send a lobby ``history`` request with ``fields`` (ref "h"); the
    reply."""
    await client.send_json(type="history", room="lobby", ref="h", **fields)
    return await client.receive_json()


async def say_three(alice: RawClient, bob: RawClient) -> list[str]:
    texts = ["first", "second", "third"]
    for text in texts:
        await alice.send_json(type="say", room="lobby", text=text, ref=text)
        assert (await alice.receive_json())["ref"] == text
        assert (await bob.receive_json())["text"] == text
    return texts


@pytest.mark.parametrize("value", list(OUT_OF_RANGE.values()), ids=list(OUT_OF_RANGE))
@pytest.mark.parametrize("field", ["limit", "after", "before"])
async def test_an_out_of_range_history_field_is_a_bad_request(
    server: chatkit.ChatServer, open_raw: OpenRaw, field: str, value: int
) -> None:
    """``{"type": "history", "room": "lobby", "<field>": <value>}`` with a
    value below 0 or above 2**63 - 1.

    What the user sees: ``error bad_request`` with the request's ref (before
    the fix, SQLite raised OverflowError for some of these and the server
    dropped the connection; the others were answered as if valid); then a
    ping still gets its pong, and what the user says still reaches the
    room (no leave notice first).
    """
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await say_three(alice, bob)
    reply = await ask(alice, **{field: value})
    assert (reply["type"], reply.get("code"), reply.get("ref")) == (
        "error",
        "bad_request",
        "h",
    ), reply
    assert isinstance(reply.get("message"), str), reply
    await alice.send_json(type="ping", ref="p")
    assert await alice.receive_json() == {"type": "pong", "ref": "p"}
    await alice.send_json(type="say", room="lobby", text="still here", ref="s")
    assert (await alice.receive_json())["ref"] == "s"
    event = await bob.receive_json()
    assert (event["type"], event.get("text")) == ("message", "still here"), event


EDGES = {
    "before=MAX": ({"before": MAX}, "all"),
    "before=0": ({"before": 0}, "none"),
    "after=0": ({"after": 0}, "all"),
    "after=MAX": ({"after": MAX}, "none"),
    "after=0,before=MAX": ({"after": 0, "before": MAX}, "all"),
    "limit=MAX": ({"limit": MAX}, "all"),
    "limit=0": ({"limit": 0}, "none"),
    "limit=MAX,before=MAX": ({"limit": MAX, "before": MAX}, "all"),
    "limit=MAX,after=0": ({"limit": MAX, "after": 0}, "all"),
}


@pytest.mark.parametrize(("fields", "found"), list(EDGES.values()), ids=list(EDGES))
async def test_history_fields_at_their_bounds_are_answered(
    server: chatkit.ChatServer,
    open_raw: OpenRaw,
    fields: dict[str, int],
    found: str,
) -> None:
    """A history request at the edges of the valid range (0 and 2**63 - 1).

    What the user sees: an ordinary history page, everything or nothing as
    the bounds say, never an error.
    """
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    texts = await say_three(alice, bob)
    reply = await ask(bob, **fields)
    assert (reply["type"], reply.get("ref")) == ("history", "h"), reply
    assert [m["text"] for m in reply["messages"]] == (texts if found == "all" else [])
