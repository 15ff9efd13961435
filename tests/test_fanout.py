"""The fan-out (chatkit/server/_fanout.py), through the public API only.

What members receive: every member gets every message once, in one order,
the sender its own copy with its ``ref`` (JSON) or none (line mode),
whatever mix of wire formats and transports a room holds. Where the point is
the write strategy (the room fast path, one write per member per batch),
the writes are counted with ``server.stats`` (deltas around one action),
never through private names. A member that stops reading, ``presence_limit``,
stored before seen with a slow or failing store, and shutdown follow.

Clients are :class:`~tests.helpers.RawClient`; a member that does not read
is one on a small receive window (:func:`~tests.helpers.open_small_window`).
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import trio
import trio.testing

import chatkit
from tests.conftest import OpenRaw, crowd, line_login, login
from tests.helpers import RawClient, open_small_window, wait_until

PROMPT = 1.0
"""Seconds a delivery that nothing holds up may take (loopback, a loaded
2-core machine): far below what waiting on something would take."""

WITHIN = 10.0
"""Seconds a long exchange (hundreds of messages) may take at most."""

NO_RATE_LIMIT = chatkit.Limits(rate_limit=None)
"""Bursts of hundreds of requests on purpose."""

COUNTERS = ("sends", "room_sends", "batches", "store_flushes")


def say(text: str, room: str = "lobby", ref: str | int | None = None) -> bytes:
    """One ``say`` request line."""
    fields: dict[str, Any] = {"type": "say", "room": room, "text": text}
    if ref is not None:
        fields["ref"] = ref
    return json.dumps(fields).encode() + b"\n"


def request(**fields: Any) -> bytes:
    """One JSON request line."""
    return json.dumps(fields).encode() + b"\n"


class Counted:
    """How much each of ``server.stats``' counters grew since this was made."""

    def __init__(self, server: chatkit.ChatServer) -> None:
        self._stats = server.stats
        self._start = self._now()

    def _now(self) -> dict[str, int]:
        return {name: getattr(self._stats, name) for name in COUNTERS}

    def delta(self) -> dict[str, int]:
        now = self._now()
        return {name: now[name] - self._start[name] for name in COUNTERS}


async def send_together(*pairs: tuple[RawClient, bytes]) -> None:
    """Write each client's bytes to its socket without letting the server
    run in between (no checkpoint), so that its readers wake in one
    scheduler round; what a socket does not take at once follows normally
    (the test's checks do not depend on it)."""
    rests: list[tuple[RawClient, bytes]] = []
    for client, data in pairs:
        try:
            sent = os.write(client.stream.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        rests.append((client, data[sent:]))
    for client, rest in rests:
        if rest:
            await client.send_bytes(rest)


async def receive_events(client: RawClient, count: int) -> list[dict[str, Any]]:
    """The next ``count`` JSON events ``client`` receives."""
    with trio.fail_after(WITHIN):
        return [await client.receive_json() for _ in range(count)]


async def receive_lines(client: RawClient, count: int) -> list[str]:
    """The next ``count`` lines a line-mode ``client`` receives."""
    with trio.fail_after(WITHIN):
        return [await client.receive_line() for _ in range(count)]


def seen(events: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each message as ``(from, text)``, in order; fails on anything else."""
    result = []
    for event in events:
        assert event["type"] == "message", event
        result.append((event["from"], event["text"]))
    return result


def check_stream(
    events: Sequence[dict[str, Any]],
    order: Sequence[tuple[str, str]],
    name: str,
    refs: dict[str, Any],
) -> None:
    """``events`` (what member ``name`` got) are the messages of ``order``,
    in that order, with increasing ids; its own carry their ref (``refs``:
    text to ref), nobody else's any."""
    assert seen(events) == list(order)
    ids = [event["id"] for event in events]
    assert ids == sorted(set(ids)), "ids not increasing: a message twice?"
    for event in events:
        if event["from"] == name:
            assert event.get("ref") == refs[event["text"]], event
        else:
            assert "ref" not in event, event


async def sync(client: RawClient) -> list[dict[str, Any]]:
    """Ping and read up to the pong: what the server sent before it."""
    await client.send_json(type="ping", ref="sync")
    before = []
    with trio.fail_after(WITHIN):
        while (event := await client.receive_json()) != {"type": "pong", "ref": "sync"}:
            before.append(event)
    return before


# --- what members receive ----------------------------------------------------


async def test_every_member_gets_every_message_once_in_one_order(
    open_raw: OpenRaw,
) -> None:
    """Three members each send 150 messages in one packet, at the same
    moment; a fourth listens. Every member gets all 450 once, all four in
    the same order (each sender's own in the order sent), each sender its
    own with their refs and the others' without."""
    count = 150
    async with chatkit.open_server(limits=NO_RATE_LIMIT) as server:
        names = ("alice", "bob", "carol", "dave")
        clients = dict(
            zip(names, await crowd(open_raw, server.port, *names), strict=True)
        )
        senders = names[:3]
        refs = {f"{name} {i}": f"{name}-{i}" for name in senders for i in range(count)}
        await send_together(
            *(
                (
                    clients[name],
                    b"".join(
                        say(f"{name} {i}", ref=f"{name}-{i}") for i in range(count)
                    ),
                )
                for name in senders
            )
        )
        streams = {
            name: await receive_events(clients[name], count * len(senders))
            for name in names
        }
        order = seen(streams["dave"])
        for sender in senders:
            assert [text for who, text in order if who == sender] == [
                f"{sender} {i}" for i in range(count)
            ]
        for name in names:
            check_stream(streams[name], order, name, refs)
        for client in clients.values():
            assert await sync(client) == []


async def test_a_mixed_room_of_json_and_line_members_sees_one_order(
    open_raw: OpenRaw,
) -> None:
    """alice and bob (JSON) and erin (line mode) send bursts at the same
    moment; carol (JSON) and dave (line mode) listen. JSON members get every
    message as JSON, senders with their refs; line-mode members get every
    message as ``from: text`` lines, except that erin does not get her own
    back; and everyone's order is the same."""
    count = 60
    async with chatkit.open_server(limits=NO_RATE_LIMIT) as server:
        alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
        erin = await line_login(open_raw, server.port, "erin", alice, bob, carol)
        dave = await line_login(open_raw, server.port, "dave", alice, bob, carol)
        assert await erin.receive_line() == "dave has joined the chat."
        refs = {f"{who} {i}": i for who in ("alice", "bob") for i in range(count)}
        counted = Counted(server)
        await send_together(
            (alice, b"".join(say(f"alice {i}", ref=i) for i in range(count))),
            (erin, b"".join(b"erin %d\n" % i for i in range(count))),
            (bob, b"".join(say(f"bob {i}", ref=i) for i in range(count))),
        )
        total = 3 * count
        order = seen(await receive_events(carol, total))
        for who in ("alice", "bob", "erin"):
            assert [text for sender, text in order if sender == who] == [
                f"{who} {i}" for i in range(count)
            ]
        check_stream(await receive_events(alice, total), order, "alice", refs)
        check_stream(await receive_events(bob, total), order, "bob", refs)
        lines = [f"{sender}: {text}" for sender, text in order]
        assert await receive_lines(dave, total) == lines
        others = [line for line in lines if not line.startswith("erin: ")]
        assert await receive_lines(erin, len(others)) == others
        # Line mode keeps no room off the fast path (see the next tests); a
        # few writes per member in all, not one per message.
        delta = counted.delta()
        assert delta["room_sends"] >= 1, delta
        assert delta["sends"] <= 5 * delta["batches"] < total, delta
        for client in (alice, bob, carol):
            assert await sync(client) == []
        await erin.assert_silent()
        await dave.assert_silent()


async def tls_crowd(port: int, context: ssl.SSLContext, *names: str) -> list[RawClient]:
    """:func:`~tests.conftest.crowd` over TLS (the caller closes them)."""
    clients: list[RawClient] = []
    for name in names:
        client = await RawClient.open_tls(port, context)
        clients.append(client)
        await client.hello(name)
        assert await client.receive_json() == {
            "type": "joined",
            "room": "lobby",
            "name": name,
        }
        for earlier in clients[:-1]:
            assert (await earlier.receive_json())["name"] == name
    return clients


async def test_a_tls_room_gets_everything_in_one_order_without_the_fast_path(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    """On a TLS server, alice and bob send bursts at the same moment and
    carol listens: all three get every message once, in one order, the
    senders' own with refs. TLS connections have no plain socket, so the
    room fast path is never taken (``room_sends`` stays put): each member's
    outbox writes the batch with its writer task."""
    count = 50
    async with chatkit.open_server(
        limits=NO_RATE_LIMIT, ssl_context=server_tls
    ) as server:
        clients = await tls_crowd(server.port, client_tls, "alice", "bob", "carol")
        try:
            alice, bob, carol = clients
            refs = {f"{who} {i}": i for who in ("alice", "bob") for i in range(count)}
            counted = Counted(server)
            # Over TLS the bytes are encrypted records: sent the ordinary way.
            async with trio.open_nursery() as nursery:
                for client, who in ((alice, "alice"), (bob, "bob")):
                    burst = b"".join(say(f"{who} {i}", ref=i) for i in range(count))
                    nursery.start_soon(client.send_bytes, burst)
            order = seen(await receive_events(carol, 2 * count))
            check_stream(await receive_events(alice, 2 * count), order, "alice", refs)
            check_stream(await receive_events(bob, 2 * count), order, "bob", refs)
            delta = counted.delta()
            assert delta["room_sends"] == 0, delta
            # Each batch costs a TLS member an attempt at a direct write (no
            # socket: nothing written) and its writer's send_all.
            assert delta["sends"] <= 2 * 3 * delta["batches"], delta
            assert delta["sends"] < 2 * count, delta
            for client in clients:
                assert await sync(client) == []
        finally:
            for client in clients:
                await client.aclose()


# --- the write strategy, counted through server.stats -----------------------


async def test_a_lone_message_to_an_idle_room_takes_the_room_fast_path(
    open_raw: OpenRaw,
) -> None:
    """alice says one message to a room of three idle JSON members: bob and
    carol get it, alice her copy with its ref; the server wrote it by the
    room fast path (one C-level loop over the room's sockets), one write
    per member, the store flushed once."""
    async with chatkit.open_server() as server:
        alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
        counted = Counted(server)
        await alice.send_bytes(say("hi", ref=1))
        for client in (bob, carol):
            event = await client.receive_json(PROMPT)
            assert (event["type"], event["text"], "ref" in event) == (
                "message",
                "hi",
                False,
            )
        assert (await alice.receive_json(PROMPT))["ref"] == 1
        # The sender's copy is the release's last write: the counts are final.
        assert counted.delta() == {
            "sends": 3,
            "room_sends": 1,
            "batches": 1,
            "store_flushes": 1,
        }


async def test_a_burst_in_one_read_reaches_each_member_in_one_write(
    open_raw: OpenRaw,
) -> None:
    """alice sends 100 messages in one packet to a room of four: each member
    gets all 100 in order, written in one write per member (a few at most,
    should the server split the batch), not 100."""
    count = 100
    async with chatkit.open_server(limits=NO_RATE_LIMIT) as server:
        names = ("alice", "bob", "carol", "dave")
        clients = await crowd(open_raw, server.port, *names)
        counted = Counted(server)
        await clients[0].send_bytes(b"".join(say(f"m{i}", ref=i) for i in range(count)))
        order = [("alice", f"m{i}") for i in range(count)]
        refs = {f"m{i}": i for i in range(count)}
        for name, client in zip(names, clients, strict=True):
            check_stream(await receive_events(client, count), order, name, refs)
        delta = counted.delta()
        # Usually exactly one batch, one fast-path write to each member.
        assert 1 <= delta["batches"] <= 2, delta
        assert 1 <= delta["room_sends"] <= delta["batches"], delta
        assert delta["sends"] <= 4 * delta["batches"], delta
        assert delta["store_flushes"] == delta["batches"], delta


async def test_senders_woken_together_share_the_writes(open_raw: OpenRaw) -> None:
    """alice and bob each send 20 messages at the same moment; carol
    listens. Everyone gets all 40 in one order, and the server wrote them
    in a few writes per member (usually one batch: one fast-path write to
    each), not 40 each."""
    count = 20
    async with chatkit.open_server(limits=NO_RATE_LIMIT) as server:
        alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
        counted = Counted(server)
        await send_together(
            (alice, b"".join(say(f"a{i}", ref=i) for i in range(count))),
            (bob, b"".join(say(f"b{i}", ref=i) for i in range(count))),
        )
        order = seen(await receive_events(carol, 2 * count))
        refs = {text: int(text[1:]) for _, text in order}
        check_stream(await receive_events(alice, 2 * count), order, "alice", refs)
        check_stream(await receive_events(bob, 2 * count), order, "bob", refs)
        delta = counted.delta()
        assert 1 <= delta["room_sends"] <= 2, delta
        assert delta["sends"] <= 3 * delta["batches"] <= 6, delta


async def test_a_room_with_line_mode_members_keeps_the_fast_path(
    open_raw: OpenRaw,
) -> None:
    """A room of alice (JSON) and dave and erin (line mode): a message from
    alice reaches the line-mode members as a text line and alice with its
    ref; one from dave reaches alice and erin, not dave. Every member is on
    a plain socket, so both take the room fast path (one loop per wire
    format), one write per member who gets something."""
    async with chatkit.open_server() as server:
        alice = await login(open_raw, server.port, "alice")
        dave = await line_login(open_raw, server.port, "dave", alice)
        erin = await line_login(open_raw, server.port, "erin", alice)
        assert await dave.receive_line() == "erin has joined the chat."

        counted = Counted(server)
        await alice.send_bytes(say("hi all", ref="a"))
        assert await dave.receive_line(PROMPT) == "alice: hi all"
        assert await erin.receive_line(PROMPT) == "alice: hi all"
        assert (await alice.receive_json(PROMPT))["ref"] == "a"
        assert counted.delta() == {
            "sends": 3,
            "room_sends": 1,
            "batches": 1,
            "store_flushes": 1,
        }

        counted = Counted(server)
        await dave.send_line("hello from dave")
        assert await erin.receive_line(PROMPT) == "dave: hello from dave"
        event = await alice.receive_json(PROMPT)
        assert (event["from"], event["text"], "ref" in event) == (
            "dave",
            "hello from dave",
            False,
        )
        await trio.testing.wait_all_tasks_blocked()  # the release is over
        assert counted.delta() == {
            "sends": 2,
            "room_sends": 1,
            "batches": 1,
            "store_flushes": 1,
        }
        await dave.assert_silent()


async def test_one_write_mixing_rooms_replies_and_membership_changes_keeps_order(
    open_raw: OpenRaw,
) -> None:
    """alice sends, in one write, messages to two rooms, a direct message,
    a leave and a join of den (membership changes amid the batch) and a
    ping: bob gets what concerns him in exactly that order (nothing said
    in den while alice was out of it is lost to him, nothing doubled),
    alice all her replies in the order of her requests."""
    async with chatkit.open_server(limits=NO_RATE_LIMIT) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        for client in (alice, bob):
            await client.send_json(type="join", room="den", ref="j")
            await client.expect("joined", room="den", ref="j")
        assert await sync(alice) == [{"type": "joined", "room": "den", "name": "bob"}]
        await alice.send_bytes(
            say("m1", ref=1)
            + say("d1", room="den", ref=2)
            + request(type="dm", to="bob", text="p1", ref=3)
            + say("m2", ref=4)
            + request(type="leave", room="den", ref=5)
            + say("m3", ref=6)
            + request(type="join", room="den", ref=7)
            + say("d2", room="den", ref=8)
            + request(type="ping", ref=9)
        )
        got = [
            (event["type"], event.get("room"), event.get("text"))
            for event in await receive_events(bob, 8)
        ]
        assert got == [
            ("message", "lobby", "m1"),
            ("message", "den", "d1"),
            ("dm", None, "p1"),
            ("message", "lobby", "m2"),
            ("left", "den", None),
            ("message", "lobby", "m3"),
            ("joined", "den", None),
            ("message", "den", "d2"),
        ]
        replies = await receive_events(alice, 9)
        assert [event.get("ref") for event in replies] == list(range(1, 10))
        assert [event["type"] for event in replies] == [
            "message",
            "message",
            "dm",
            "message",
            "left",
            "message",
            "joined",
            "message",
            "pong",
        ]
        assert await sync(bob) == []


@pytest.mark.parametrize(
    ("limits", "texts"),
    [
        # More messages in one write than a member's outbox may hold...
        ({"max_queued_messages": 10}, [f"m{i}" for i in range(11)]),
        # ... or more bytes (12 KB: far less than any kernel socket buffer).
        ({"max_queued_bytes": 10_000}, [f"{i}" + "x" * 4000 for i in range(3)]),
    ],
    ids=["max_queued_messages", "max_queued_bytes"],
)
async def test_a_burst_bigger_than_an_outbox_drops_nobody(
    open_raw: OpenRaw, limits: dict[str, int], texts: list[str]
) -> None:
    """alice sends, in one write, more than a member's outbox may hold: it
    is the server that holds that output back, not its readers, so nobody
    is dropped as too slow; bob gets every message, alice every ref (the
    server releases it in several batches, each within the bounds)."""
    async with chatkit.open_server(
        limits=chatkit.Limits(rate_limit=None, **limits)
    ) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        counted = Counted(server)
        await alice.send_bytes(b"".join(say(t, ref=i) for i, t in enumerate(texts)))
        order = [("alice", text) for text in texts]
        refs = {text: i for i, text in enumerate(texts)}
        check_stream(await receive_events(bob, len(texts)), order, "bob", refs)
        check_stream(await receive_events(alice, len(texts)), order, "alice", refs)
        assert counted.delta()["batches"] >= 2, counted.delta()
        for client in (alice, bob):
            assert await sync(client) == []


# --- a member that stops reading ---------------------------------------------


async def back_up(
    server: chatkit.ChatServer, alice: RawClient, bob: RawClient, text: str
) -> int:
    """alice says ``text`` with a number (and ref) until a member that does
    not read has backed up: three releases in a row not written by the
    room fast path (its outbox holds output, so its room is written through
    the outboxes). bob, reading, gets each promptly. Returns how many were
    said."""
    streak = 0
    for i in range(500):
        counted = Counted(server)
        await alice.send_bytes(say(f"{i} {text}", ref=i))
        assert (await bob.receive_json(PROMPT))["text"] == f"{i} {text}"
        assert (await alice.receive_json(PROMPT))["ref"] == i
        streak = 0 if counted.delta()["room_sends"] else streak + 1
        if streak == 3:
            return i + 1
    raise AssertionError("the member that does not read never backed up")


async def test_a_member_that_stops_reading_gets_everything_when_it_reads_again(
    open_raw: OpenRaw,
) -> None:
    """lazy stops reading (a small receive window soon full). alice and bob
    chat on, each message reaching bob promptly; the room is then written
    through the outboxes (no fast path while a member's outbox holds
    output). When lazy reads again it gets every message, once, in order,
    and once it has caught up the room takes the fast path again."""
    async with chatkit.open_server(limits=NO_RATE_LIMIT) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        lazy = await open_small_window(server.port)
        try:
            await lazy.hello("lazy")
            assert (await lazy.receive_json())["name"] == "lazy"
            for client in (alice, bob):
                assert (await client.receive_json())["name"] == "lazy"
            text = "x" * 2000
            said = await back_up(server, alice, bob, text)
            counted = Counted(server)
            for i in range(said, said + 30):
                await alice.send_bytes(say(f"{i} {text}", ref=i))
                assert (await bob.receive_json(PROMPT))["text"] == f"{i} {text}"
                assert (await alice.receive_json(PROMPT))["ref"] == i
            assert counted.delta()["room_sends"] == 0, counted.delta()
            said += 30

            got = [event["text"] for event in await receive_events(lazy, said)]
            assert got == [f"{i} {text}" for i in range(said)]
            # Its writer ends once everything is out; then the room is idle.
            await trio.testing.wait_all_tasks_blocked()
            counted = Counted(server)
            await alice.send_bytes(say("caught up", ref="c"))
            for client in (bob, lazy):
                assert (await client.receive_json(PROMPT))["text"] == "caught up"
            assert (await alice.receive_json(PROMPT))["ref"] == "c"
            assert counted.delta()["room_sends"] == 1, counted.delta()
        finally:
            await lazy.aclose()


@pytest.mark.parametrize(
    ("limits", "text", "burst"),
    [
        # Short messages: the bound in frames is reached first...
        (chatkit.Limits(rate_limit=None, max_queued_messages=100), "x", 20),
        # ... or, long ones, the bound in bytes.
        (chatkit.Limits(rate_limit=None, max_queued_bytes=32 * 1024), "x" * 1000, 6),
    ],
    ids=["max_queued_messages", "max_queued_bytes"],
)
async def test_a_member_that_stops_reading_is_dropped_past_its_bounds(
    open_raw: OpenRaw, limits: chatkit.Limits, text: str, burst: int
) -> None:
    """lazy stops reading while alice talks (in bursts) and bob reads. Once
    lazy's outbox passes ``max_queued_messages`` or ``max_queued_bytes``,
    lazy gets ``error too_slow`` (after whole frames only, a prefix of what
    was said) and is disconnected; alice and bob see ``left`` with reason
    ``too_slow`` and, besides, every message once and in order, and chat
    on (by the room fast path again)."""
    async with chatkit.open_server(limits=limits) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        lazy = await open_small_window(server.port)
        try:
            await lazy.hello("lazy")
            for client in (alice, bob):
                assert (await client.receive_json())["name"] == "lazy"
            gone = {
                "type": "left",
                "room": "lobby",
                "name": "lazy",
                "reason": "too_slow",
            }
            said = 0
            notices: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}
            texts: dict[str, list[str]] = {"alice": [], "bob": []}
            with trio.fail_after(WITHIN):
                while not notices["bob"]:
                    assert said < 20_000, "lazy was never dropped"
                    await alice.send_bytes(
                        b"".join(
                            say(f"{i} {text}", ref=i) for i in range(said, said + burst)
                        )
                    )
                    said += burst
                    for name, client in (("alice", alice), ("bob", bob)):
                        while len(texts[name]) < said:
                            event = await client.receive_json()
                            if event["type"] == "left":
                                notices[name].append(event)
                            else:
                                texts[name].append(event["text"])
                while not notices["alice"]:
                    notices["alice"].append(await alice.receive_json())
            assert notices == {"alice": [gone], "bob": [gone]}
            for name in ("alice", "bob"):
                assert texts[name] == [f"{i} {text}" for i in range(said)]

            lines = await lazy.assert_closed()
            events = [json.loads(line) for line in lines]  # no torn frame
            *messages, last = events
            assert last["type"] == "error" and last["code"] == "too_slow", last
            got = [event["text"] for event in messages if event["type"] == "message"]
            assert got == [f"{i} {text}" for i in range(len(got))]
            assert len(got) < said
            await wait_until(lambda: server.get_user("lazy") is None)

            # The room is idle again: lazy's outbox, gone, holds it up no more.
            counted = Counted(server)
            await alice.send_bytes(say("still here", ref="s"))
            assert (await bob.receive_json(PROMPT))["text"] == "still here"
            assert (await alice.receive_json(PROMPT))["ref"] == "s"
            assert counted.delta()["room_sends"] == 1, counted.delta()
        finally:
            await lazy.aclose()


# --- presence_limit ----------------------------------------------------------


async def test_above_the_presence_limit_joins_and_leaves_are_not_announced(
    open_raw: OpenRaw,
) -> None:
    """presence_limit=2: alice and bob see each other come; carol, dave
    (JSON) and erin (line mode) log in to the lobby unannounced, each JSON
    joiner still getting its own ``joined``; messages still reach everyone;
    carol's ``leave`` (she gets her own ``left``) and dave's ``bye`` from
    the crowded lobby are not announced either; once the lobby is down to
    two, bob's ``bye`` is announced to alice."""
    async with chatkit.open_server(limits=chatkit.Limits(presence_limit=2)) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        carol = await login(open_raw, server.port, "carol")  # her own joined
        dave = await login(open_raw, server.port, "dave")
        erin = await open_raw(server.port)
        await erin.send_line("erin")
        await alice.send_bytes(say("hello all", ref=1))
        for client in (bob, carol, dave):
            event = await client.receive_json(PROMPT)
            assert (event["type"], event["text"]) == ("message", "hello all")
        assert (await alice.receive_json(PROMPT))["ref"] == 1
        assert await erin.receive_line(PROMPT) == "alice: hello all"

        await carol.send_json(type="leave", room="lobby", ref="bye-lobby")
        assert await carol.receive_json() == {
            "type": "left",
            "room": "lobby",
            "name": "carol",
            "reason": "leave",
            "ref": "bye-lobby",
        }
        await dave.send_json(type="bye")
        assert await dave.assert_closed() == []
        await wait_until(lambda: server.rooms["lobby"] == ("alice", "bob", "erin"))
        for client in (alice, bob):
            assert await sync(client) == []
        await erin.assert_silent()
        # erin's exit from a lobby of three is not announced either; bob's,
        # from a lobby of two, is.
        await erin.send_line("exit")
        assert await erin.assert_closed() == []
        await wait_until(lambda: server.rooms["lobby"] == ("alice", "bob"))
        assert await sync(alice) == []
        await bob.send_json(type="bye")
        assert await alice.receive_json() == {
            "type": "left",
            "room": "lobby",
            "name": "bob",
            "reason": "bye",
        }


async def test_the_presence_limit_counts_each_room_on_its_own(
    open_raw: OpenRaw,
) -> None:
    """presence_limit=2 with three in the lobby (unannounced there): in the
    room den, bob's join is announced to alice (two members), carol's is
    not (three), and carol still gets her own ``joined`` with its ref."""
    async with chatkit.open_server(limits=chatkit.Limits(presence_limit=2)) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        carol = await login(open_raw, server.port, "carol")
        for client, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
            await client.send_json(type="join", room="den", ref=name)
            assert await client.receive_json() == {
                "type": "joined",
                "room": "den",
                "name": name,
                "ref": name,
            }
        assert await alice.receive_json() == {
            "type": "joined",
            "room": "den",
            "name": "bob",
        }
        for client in (alice, bob, carol):
            assert await sync(client) == []


async def test_presence_limit_none_always_announces(open_raw: OpenRaw) -> None:
    """presence_limit=None: in a lobby of five, every join is announced to
    everyone there (crowd checks it), and so is a leave."""
    async with chatkit.open_server(
        limits=chatkit.Limits(presence_limit=None)
    ) as server:
        clients = await crowd(open_raw, server.port, *(f"u{n}" for n in range(5)))
        await clients[-1].send_json(type="leave", room="lobby", ref="l")
        assert (await clients[-1].receive_json())["ref"] == "l"
        for client in clients[:-1]:
            assert await client.receive_json() == {
                "type": "left",
                "room": "lobby",
                "name": "u4",
                "reason": "leave",
            }


# --- stored before seen, with a slow or failing store ------------------------


class GatedStore(chatkit.MemoryHistory):
    """A history store whose ``flush`` waits at a gate the test closes and
    opens (a slow disk), and refuses (raises) as many flushes as the test
    asks with :attr:`refuse`. Appended messages are kept aside until a
    flush stores them; a refused flush lets them go. (Queries see stored
    messages only: the tests ask once nothing is waiting.)"""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.gate.set()
        self.refuse = 0
        """How many of the next flushes to refuse."""
        self.held = 0
        """Flushes waiting at the gate now."""
        self._arrived = trio.Event()
        self._queued: list[chatkit.Message] = []

    def close_gate(self) -> None:
        self.gate = trio.Event()

    def open_gate(self) -> None:
        self.gate.set()

    def append(self, message: chatkit.Message) -> None:
        self._queued.append(message)

    async def flush(self) -> None:
        batch, self._queued = self._queued, []
        refused = self.refuse > 0
        if refused:
            self.refuse -= 1
        gate = self.gate
        if not gate.is_set():
            self.held += 1
            self._arrived.set()
            try:
                await gate.wait()
            finally:
                self.held -= 1
        if refused:
            raise chatkit.HistoryStoreError("the disk is full")
        for message in batch:
            super().append(message)

    async def wait_held(self) -> None:
        """Wait until a flush waits at the (closed) gate."""
        with trio.fail_after(WITHIN):
            while not self.held:
                self._arrived = trio.Event()
                await self._arrived.wait()


async def handled() -> None:
    """Let the server handle what was sent to it: every request written so
    far has been read and acted on once all tasks are blocked (loopback
    bytes are readable as soon as they are sent)."""
    with trio.fail_after(WITHIN):
        await trio.testing.wait_all_tasks_blocked()


async def silent(*clients: RawClient) -> None:
    """Nothing has been sent to any of ``clients`` (checked once the server
    has done all it can)."""
    await handled()
    for client in clients:
        await client.assert_silent(0.05)


def message(event: dict[str, Any]) -> tuple[Any, ...]:
    """A room message as ``(room, from, text, ref)``."""
    assert event["type"] == "message", event
    return (event["room"], event["from"], event["text"], event.get("ref"))


async def test_nobody_sees_a_message_until_the_store_has_flushed_it(
    open_raw: OpenRaw,
) -> None:
    """The store is slow to flush: alice's message reaches nobody, not even
    alice herself (her acknowledgement); alice's ``ping`` sent after it and
    bob's ``ping`` wait too. Once the flush is done, alice gets her message
    then her ``pong``, bob the message then his ``pong``, carol the
    message."""
    store = GatedStore()
    async with chatkit.open_server(history=store) as server:
        alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
        counted = Counted(server)
        store.close_gate()
        await alice.send_bytes(say("m", ref="m"))
        await store.wait_held()
        await alice.send_json(type="ping", ref="a")
        await bob.send_json(type="ping", ref="b")
        await silent(alice, bob, carol)
        store.open_gate()
        assert message(await alice.receive_json()) == ("lobby", "alice", "m", "m")
        assert await alice.receive_json() == {"type": "pong", "ref": "a"}
        assert message(await bob.receive_json()) == ("lobby", "alice", "m", None)
        assert await bob.receive_json() == {"type": "pong", "ref": "b"}
        assert message(await carol.receive_json()) == ("lobby", "alice", "m", None)
        for client in (alice, bob, carol):
            assert await sync(client) == []
        assert counted.delta()["store_flushes"] == 1


async def test_membership_changes_while_storing_go_by_who_was_there_when_said(
    open_raw: OpenRaw,
) -> None:
    """alice, bob and carol are in den; alice says something there while
    the store is slow; then bob leaves den, carol says ``bye`` and dave
    joins den. Once stored: bob and carol get the message (it was said
    while they were there; carol before her connection closes), dave does
    not (he joined after); everyone gets the notices, in the order things
    happened."""
    store = GatedStore()
    async with chatkit.open_server(history=store) as server:
        alice, bob, carol, dave = await crowd(
            open_raw, server.port, "alice", "bob", "carol", "dave"
        )
        for client in (alice, bob, carol):
            await client.send_json(type="join", room="den", ref="j")
            await client.expect("joined", room="den", ref="j")
        for client, later in ((alice, ("bob", "carol")), (bob, ("carol",))):
            assert await sync(client) == [
                {"type": "joined", "room": "den", "name": name} for name in later
            ]
        store.close_gate()
        await alice.send_bytes(say("m", room="den", ref="m"))
        await store.wait_held()
        await bob.send_json(type="leave", room="den", ref="l")
        await handled()
        await carol.send_json(type="bye")
        await handled()
        await dave.send_json(type="join", room="den", ref="j")
        await silent(alice, bob, carol, dave)
        assert server.rooms["den"] == ("alice", "dave")
        store.open_gate()

        said = ("den", "alice", "m", None)
        left_den = {"type": "left", "room": "den", "name": "bob", "reason": "leave"}
        carol_left = [
            {"type": "left", "room": room, "name": "carol", "reason": "bye"}
            for room in ("lobby", "den")
        ]
        dave_joined = {"type": "joined", "room": "den", "name": "dave"}
        events = await receive_events(alice, 5)
        assert message(events[0]) == ("den", "alice", "m", "m")
        assert events[1:] == [left_den, *carol_left, dave_joined]
        events = await receive_events(bob, 3)
        assert message(events[0]) == said
        assert events[1:] == [{**left_den, "ref": "l"}, carol_left[0]]
        lines = await carol.assert_closed()
        assert message(json.loads(lines[0])) == said
        assert [json.loads(line) for line in lines[1:]] == [left_den]
        assert await receive_events(dave, 2) == [
            carol_left[0],
            {**dave_joined, "ref": "j"},
        ]
        for client in (alice, bob, dave):
            assert await sync(client) == []


async def test_output_queued_behind_a_flush_keeps_its_order_and_shares_a_flush(
    open_raw: OpenRaw,
) -> None:
    """While the store is slow with alice's message in the lobby, bob and
    carol talk in den, carol pings and alice says more: nobody sees any of
    it until the flush is done, then everyone gets everything in the order
    it was said (den's talk and carol's pong too, though they did not wait
    for the store themselves); what came in meanwhile was stored with one
    more flush (group commit), not one per message."""
    store = GatedStore()
    async with chatkit.open_server(history=store) as server:
        alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
        for client in (bob, carol):
            await client.send_json(type="join", room="den", ref="j")
            await client.expect("joined", ref="j")
        await bob.expect("joined", room="den", name="carol")
        for client in (alice, bob, carol):
            assert await sync(client) == []
        counted = Counted(server)
        store.close_gate()
        await alice.send_bytes(say("m1", ref=1))
        await store.wait_held()
        for client, data in (
            (bob, say("d1", room="den", ref=2)),
            (carol, request(type="ping", ref=3)),
            (alice, say("m2", ref=4)),
            (carol, say("d2", room="den", ref=5)),
        ):
            await client.send_bytes(data)
            await handled()
        await silent(alice, bob, carol)
        store.open_gate()
        events = await receive_events(alice, 2)
        assert [message(event) for event in events] == [
            ("lobby", "alice", "m1", 1),
            ("lobby", "alice", "m2", 4),
        ]
        events = await receive_events(bob, 4)
        assert [message(event) for event in events] == [
            ("lobby", "alice", "m1", None),
            ("den", "bob", "d1", 2),
            ("lobby", "alice", "m2", None),
            ("den", "carol", "d2", None),
        ]
        events = await receive_events(carol, 5)
        assert events[2] == {"type": "pong", "ref": 3}
        assert [message(event) for event in events[:2] + events[3:]] == [
            ("lobby", "alice", "m1", None),
            ("den", "bob", "d1", None),
            ("lobby", "alice", "m2", None),
            ("den", "carol", "d2", 5),
        ]
        delta = counted.delta()
        assert (delta["store_flushes"], delta["batches"]) == (2, 2), delta
        for client in (alice, bob, carol):
            assert await sync(client) == []


async def test_messages_a_store_cannot_flush_are_shown_to_nobody(
    open_raw: OpenRaw,
) -> None:
    """The store is slow with carol's "first", and then cannot store the
    next flush: alice's and bob's messages and alice's direct message to
    carol, said meanwhile, reach nobody; alice and bob get ``error
    unavailable`` for each, with its ref; the rest of that output (carol's
    ``pong``, bob joining den) is delivered; later messages flow."""
    store = GatedStore()
    async with chatkit.open_server(history=store) as server:
        alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
        store.close_gate()
        await carol.send_bytes(say("first", ref="f"))
        await store.wait_held()
        store.refuse = 1  # the next flush: what comes in now
        for client, data in (
            (alice, say("lost 1", ref="a")),
            (bob, say("lost 2", ref="b")),
            (alice, request(type="dm", to="carol", text="lost 3", ref="d")),
            (carol, request(type="ping", ref="p")),
            (bob, request(type="join", room="den", ref="j")),
        ):
            await client.send_bytes(data)
            await handled()
        await silent(alice, bob, carol)
        store.open_gate()

        first = ("lobby", "carol", "first", None)
        alice_got = await receive_events(alice, 3)
        assert message(alice_got[0]) == first
        # (In which order: see test_a_refused_message_is_answered_in_turn.)
        assert sorted(
            (event["type"], event["code"], event["ref"]) for event in alice_got[1:]
        ) == [("error", "unavailable", "a"), ("error", "unavailable", "d")]
        bob_got = await receive_events(bob, 3)
        assert message(bob_got[0]) == first
        assert {"type": "joined", "room": "den", "name": "bob", "ref": "j"} in bob_got
        assert {
            (event["type"], event.get("code"), event["ref"]) for event in bob_got[1:]
        } == {("joined", None, "j"), ("error", "unavailable", "b")}
        carol_got = await receive_events(carol, 2)
        assert message(carol_got[0]) == ("lobby", "carol", "first", "f")
        assert carol_got[1] == {"type": "pong", "ref": "p"}

        await alice.send_bytes(say("afterwards", ref="w"))
        assert message(await alice.receive_json()) == (
            "lobby",
            "alice",
            "afterwards",
            "w",
        )
        for client in (bob, carol):
            assert message(await client.receive_json()) == (
                "lobby",
                "alice",
                "afterwards",
                None,
            )
        for client in (alice, bob, carol):
            assert await sync(client) == []
        await carol.send_json(type="history", room="lobby", ref="h")
        reply = await carol.receive_json()
        assert [m["text"] for m in reply["messages"]] == ["first", "afterwards"]


async def refused(
    client: RawClient, store: GatedStore, data: bytes, count: int
) -> list[dict[str, Any]]:
    """Send ``data`` from ``client`` while the store is slow with another
    message (said by ``client``), then have the store refuse the flush
    that holds ``data``'s messages; the (at most) ``count`` events
    ``client`` gets after its first message."""
    store.close_gate()
    await client.send_bytes(say("first", ref="f"))
    await store.wait_held()
    store.refuse = 1
    await client.send_bytes(data)
    await handled()
    store.open_gate()
    assert message(await client.receive_json()) == ("lobby", "alice", "first", "f")
    got: list[dict[str, Any]] = []
    with trio.move_on_after(PROMPT):  # a failure shows what did arrive
        while len(got) < count:
            got.append(await client.receive_json())
    return got


UNAVAILABLE = {
    "type": "error",
    "code": "unavailable",
    "message": "your message could not be stored; it was not delivered",
}


async def test_a_refused_message_is_answered_in_turn(open_raw: OpenRaw) -> None:
    """alice says a message the store then cannot store, and pings in the
    same write: she should get ``error unavailable`` for the message, then
    her ``pong`` (replies come in the order of the requests; a client that
    pings to learn that everything before was answered relies on it).
    Today the ``pong`` comes first."""
    store = GatedStore()
    async with chatkit.open_server(history=store) as server:
        (alice,) = await crowd(open_raw, server.port, "alice")
        got = await refused(
            alice, store, say("lost", ref="a") + request(type="ping", ref="p"), 2
        )
        assert got == [{**UNAVAILABLE, "ref": "a"}, {"type": "pong", "ref": "p"}]


async def test_a_refused_direct_message_without_a_ref_is_not_silently_lost(
    open_raw: OpenRaw,
) -> None:
    """alice sends bob a direct message without a ``ref``, and then a
    ``say`` without one, both of which the store cannot store: for the
    ``say`` she gets ``error unavailable`` (without a ref); for the direct
    message she should too, but today gets nothing at all (neither her copy
    nor an error: the message vanishes unnoticed)."""
    store = GatedStore()
    async with chatkit.open_server(history=store) as server:
        alice, _bob = await crowd(open_raw, server.port, "alice", "bob")
        got = await refused(
            alice,
            store,
            request(type="dm", to="bob", text="lost") + say("lost too"),
            2,
        )
        assert got == [UNAVAILABLE, UNAVAILABLE]


# --- shutdown ----------------------------------------------------------------


async def test_a_message_being_stored_at_shutdown_is_delivered_before_shutdown(
    open_raw: OpenRaw,
) -> None:
    """alice says her last words while the store is slow, and the server is
    shut down before they are stored: once they are, alice gets them back,
    bob and carol (line mode) get them, and only then everyone ``shutdown``
    and the end of the connection."""
    store = GatedStore()
    async with chatkit.open_server(history=store) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        carol = await line_login(open_raw, server.port, "carol", alice, bob)
        store.close_gate()
        await alice.send_bytes(say("last words", ref=1))
        await store.wait_held()
        with trio.fail_after(WITHIN):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.aclose)
                await silent(alice, bob, carol)  # shutdown waits its turn
                store.open_gate()
        shutdown = {"type": "shutdown", "reason": "server shutting down"}
        lines = await alice.assert_closed()
        assert message(json.loads(lines[0])) == ("lobby", "alice", "last words", 1)
        assert [json.loads(line) for line in lines[1:]] == [shutdown]
        lines = await bob.assert_closed()
        assert message(json.loads(lines[0])) == ("lobby", "alice", "last words", None)
        assert [json.loads(line) for line in lines[1:]] == [shutdown]
        assert await carol.assert_closed() == [
            "alice: last words",
            "Server is shutting down: server shutting down",
        ]


async def test_a_store_that_never_flushes_does_not_hold_up_shutdown(
    open_raw: OpenRaw,
) -> None:
    """alice says something the store never gets to store, then the server
    shuts down: the shutdown takes no longer than ``close_timeout`` (plus
    the second ``aclose`` allows), and nobody ever sees the message. (The
    connections end without ``shutdown`` too: it is queued behind the
    message.)"""
    store = GatedStore()
    close_timeout = 0.2
    async with chatkit.open_server(
        history=store, limits=chatkit.Limits(close_timeout=close_timeout)
    ) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        store.close_gate()
        await alice.send_bytes(say("never stored", ref=1))
        await store.wait_held()
        start = trio.current_time()
        with trio.fail_after(close_timeout + 1 + WITHIN):
            await server.aclose()
        elapsed = trio.current_time() - start
        assert elapsed < close_timeout + 1 + PROMPT, elapsed
        for client in (alice, bob):
            lines = await client.assert_closed()
            assert not [line for line in lines if "never stored" in line], lines
