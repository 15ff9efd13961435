"""Issue 18, items 2 and 3: rename storms, and a DM burst as a targeted kick.

Rename storms: every ``nick`` costs a ``renamed`` to every member of every
room the renamer is in. The defence: renames follow the presence policy of
joins and leaves (a room larger than ``presence_limit`` is not told), they
are released like room messages (encoded once per room), and each user has
a rename budget of its own (``rename_burst``, then one every
``rename_interval`` seconds; the excess gets ``error rate_limited``).

A DM burst: many senders, each within its rate limit, fill one recipient's
outgoing buffer until it is dropped as ``too_slow``. The defence: one
sender's direct messages waiting unwritten at one recipient are bounded
(``max_dm_queued_bytes``), everyone's by half of ``max_queued_bytes``; the
excess gets ``error rate_limited`` (with its ``ref``) and is not delivered,
and the recipient stays connected.

The attacks run against the CLI server with a bystander in its own process
(tests/attacks.py). docs/security.md states the limits.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from typing import Any

import trio

import chatkit
from tests.attacks import address, bystander, connect_from
from tests.conftest import OpenRaw, crowd, login
from tests.helpers import RawClient, wait_until
from tests.programs import Launch, start_server

#: ``Limits.rename_burst``'s default: renames a user may make at once.
RENAME_BURST = 3
#: Renames each renamer tries at once.
NICKS = 6


async def answers(client: RawClient, count: int, within: float = 20.0) -> Counter[str]:
    """Read until ``count`` events carrying a ``ref`` came; how many of
    each kind (``renamed``, ``error rate_limited``...) there were, and, as
    ``others'``, how many ``renamed`` without a ref (others' renames)."""
    seen: Counter[str] = Counter()
    with trio.fail_after(within):
        while seen.total() - seen["others'"] < count:
            event = await client.receive_json()
            kind = event["type"]
            if event.get("ref") is None:
                if kind == "renamed":
                    seen["others'"] += 1
                continue
            if kind == "error":
                kind = f"error {event['code']}"
            seen[kind] += 1
    return seen


async def renamer(
    port: int, index: int, ready: trio.Event, go: trio.Event, results: list[Any]
) -> None:
    """Log in from ``address(index)``, wait for ``go``, try :data:`NICKS`
    renames at once; append what came back, and the client (still open)."""
    client = RawClient(await connect_from(port, address(index)))
    try:
        await client.hello(f"r{index}")
        ready.set()
        await go.wait()
        await client.send_bytes(
            b"".join(
                json.dumps({"type": "nick", "name": f"r{index}_{n}", "ref": n}).encode()
                + b"\n"
                for n in range(1, NICKS + 1)
            )
        )
        results.append((await answers(client, NICKS), client))
    except BaseException:
        await client.aclose()
        raise


async def rename_storm(
    port: int, count: int, observer: RawClient
) -> list[tuple[Counter[str], RawClient]]:
    """``count`` users log in, then each tries :data:`NICKS` renames at
    once; each one's answers (their clients are the caller's to close)."""
    results: list[Any] = []
    go = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                ready = trio.Event()
                nursery.start_soon(renamer, port, index, ready, go, results)
                with trio.fail_after(5):
                    await ready.wait()
            # Everyone is in: the observer has seen every join it is told.
            await observer.send_json(type="ping", ref="in")
            await observer.expect("pong", ref="in")
            go.set()
    except BaseException:
        for _, client in results:
            await client.aclose()
        raise
    return results


async def renames_seen(observer: RawClient) -> int:
    """How many ``renamed`` the observer got before its ping's pong (sent
    after every rename was answered: the pong comes after them)."""
    await observer.send_json(type="ping", ref="end")
    count = 0
    with trio.fail_after(10):
        while (event := await observer.receive_json())["type"] != "pong":
            count += event["type"] == "renamed"
    return count


async def test_a_rename_storm_in_a_large_room_is_not_told(launch: Launch) -> None:
    # The 1,100 users each renaming 3 times, scaled: 120 users, a
    # presence limit of 50, each trying 6 renames at once.
    _server, port = await start_server(
        launch, "--no-db", "--log-level", "error", "--presence-limit", "50"
    )
    async with bystander(port) as b:
        observer = RawClient(await connect_from(port, address(200)))
        results: list[tuple[Counter[str], RawClient]] = []
        try:
            await observer.hello("observer")
            results = await rename_storm(port, 120, observer)
            seen = await renames_seen(observer)
            await b.round_trips(6)
            # Who is in the lobby is right all the same.
            await observer.send_json(type="who", room="lobby", ref="who")
            who = await observer.expect("who", ref="who")
        finally:
            for _, client in results:
                await client.aclose()
            await observer.aclose()
        b.check()
        print(f"bystander: worst {b.worst:.3f} s")
    # Nobody in the lobby (121 members and the bystander) is told.
    assert seen == 0
    assert len(results) == 120
    for counts, _ in results:
        # Each renamer got its own renames, within its budget, and the rest
        # refused; and none of the others'.
        assert counts == {
            "renamed": RENAME_BURST,
            "error rate_limited": NICKS - RENAME_BURST,
        }, counts
    names = set(who["names"])
    assert {f"r{i}_{RENAME_BURST}" for i in range(120)} <= names
    assert not names & {f"r{i}" for i in range(120)}


async def test_a_rename_storm_in_a_small_room_costs_the_renamers(
    launch: Launch,
) -> None:
    # Within the presence limit, renames are told: 10 renamers trying 6
    # each make 10 x 3 notices, the rest is refused to them.
    _server, port = await start_server(launch, "--no-db", "--log-level", "error")
    async with bystander(port) as b:
        observer = RawClient(await connect_from(port, address(200)))
        results: list[tuple[Counter[str], RawClient]] = []
        try:
            await observer.hello("observer")
            results = await rename_storm(port, 10, observer)
            seen = await renames_seen(observer)
            await b.round_trips(6)
        finally:
            for _, client in results:
                await client.aclose()
            await observer.aclose()
        b.check()
    assert seen == 10 * RENAME_BURST
    for counts, _ in results:
        assert counts["renamed"] == RENAME_BURST, counts
        assert counts["error rate_limited"] == NICKS - RENAME_BURST, counts


# --- a DM burst ---------------------------------------------------------------

#: The issue's attack, scaled in time: 30 senders each sending 38 DMs of
#: 16 KiB at once (within the rate limit's burst of 40).
SENDERS = 30
DMS = 38
#: 4,096 characters (the longest message) of 4 bytes each: 16 KiB.
TEXT = "\N{GRINNING FACE}" * 4096


async def sender(port: int, index: int, results: list[Counter[str]]) -> None:
    """Log in, send :data:`DMS` direct messages to ``victim`` at once, and
    count the answers: ``dm`` (delivered) or ``error ...``."""
    client = RawClient(await connect_from(port, address(index)))
    try:
        await client.hello(f"s{index}")
        line = {"type": "dm", "to": "victim", "text": TEXT}
        await client.send_bytes(
            b"".join(
                json.dumps({**line, "ref": n}).encode() + b"\n" for n in range(DMS)
            )
        )
        results.append(await answers(client, DMS, within=30))
    finally:
        await client.aclose()


class Victim:
    """A client that reads continuously but at a modest pace (at most
    16 KiB every 10 ms, through a small receive buffer)."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.dms = 0
        self.errors: list[dict[str, Any]] = []
        self.closed = False

    async def read(self) -> None:
        """Count the direct messages and errors until the connection ends."""
        buf = b""
        stream = self.client.stream
        while data := await stream.receive_some(16384):
            *lines, buf = (buf + data).split(b"\n")
            for line in lines:
                event = json.loads(line)
                if event["type"] == "dm":
                    self.dms += 1
                elif event["type"] == "error":
                    self.errors.append(event)
            await trio.sleep(0.01)
        self.closed = True


async def test_a_dm_burst_does_not_disconnect_its_target(launch: Launch) -> None:
    _server, port = await start_server(launch, "--no-db", "--log-level", "error")
    async with bystander(port) as b:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await sock.bind((address(200), 0))
        await sock.connect(("127.0.0.1", port))
        victim = Victim(RawClient(trio.SocketStream(sock)))
        results: list[Counter[str]] = []
        try:
            await victim.client.hello("victim")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(victim.read)
                async with trio.open_nursery() as senders:
                    for index in range(SENDERS):
                        senders.start_soon(sender, port, index, results)
                delivered = sum(counts["dm"] for counts in results)
                # The victim gets every DM that was not refused.
                await wait_until(
                    lambda: victim.dms >= delivered or victim.closed, within=30
                )
                await b.round_trips(6)
                nursery.cancel_scope.cancel()
        finally:
            await victim.client.aclose()
        b.check()
    refused = sum(counts["error rate_limited"] for counts in results)
    print(f"delivered {delivered}, refused {refused}; worst {b.worst:.3f} s")
    assert not victim.closed, f"the victim was disconnected: {victim.errors}"
    assert victim.errors == []
    assert victim.dms == delivered
    # Every DM was answered: delivered, or refused to its sender.
    assert len(results) == SENDERS
    assert delivered + refused == SENDERS * DMS
    # The burst was more than the victim may be sent at once.
    assert refused > 0


# --- the policies in detail, in-process -----------------------------------------


async def test_a_rename_is_told_in_the_renamers_rooms_within_the_limit(
    open_raw: OpenRaw,
) -> None:
    # The lobby (3 members) is over the limit of 2, dev (2) within it.
    limits = chatkit.Limits(presence_limit=2)
    async with chatkit.open_server(limits=limits) as server:
        alice = await login(open_raw, server.port, "alice")
        bob = await login(open_raw, server.port, "bob")
        await alice.expect("joined", name="bob")
        carol = await login(open_raw, server.port, "carol")
        for client, name in ((alice, "alice"), (bob, "bob")):
            await client.send_json(type="join", room="dev", ref="j")
            await client.expect("joined", room="dev", name=name, ref="j")
        await alice.expect("joined", room="dev", name="bob")
        await alice.send_json(type="nick", name="alicia", ref="n")
        assert await alice.receive_json() == {
            "type": "renamed",
            "old": "alice",
            "new": "alicia",
            "ref": "n",
        }
        # bob shares dev with alice: told once; carol, in the lobby only,
        # is not told (who still lists the new name).
        assert await bob.receive_json() == {
            "type": "renamed",
            "old": "alice",
            "new": "alicia",
        }
        await bob.assert_silent()
        await carol.send_json(type="who", ref="w")
        assert (await carol.receive_json())["names"] == ["alicia", "bob", "carol"]


async def test_renames_come_back_with_time(open_raw: OpenRaw) -> None:
    limits = chatkit.Limits(rename_burst=2, rename_interval=0.3)
    async with chatkit.open_server(limits=limits) as server:
        alice = await login(open_raw, server.port, "alice")
        for n in range(3):
            await alice.send_json(type="nick", name=f"a{n}", ref=n)
        assert (await alice.receive_json())["new"] == "a0"
        assert (await alice.receive_json())["new"] == "a1"
        refused = await alice.receive_json()
        assert (refused["type"], refused["code"], refused["ref"]) == (
            "error",
            "rate_limited",
            2,
        )
        assert server.get_user("a1") is not None
        await trio.sleep(0.35)
        await alice.send_json(type="nick", name="a3", ref=3)
        assert await alice.receive_json() == {
            "type": "renamed",
            "old": "a1",
            "new": "a3",
            "ref": 3,
        }


async def test_direct_messages_one_at_a_time_are_never_refused(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    # 35 of the longest messages (within the rate limit's burst), 140 KiB
    # in all, over twice max_dm_queued_bytes, each sent once the last one
    # was acknowledged: the recipient's socket takes each at once, so none
    # waits there, whether the recipient reads or not.
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    text = "x" * 4096
    for n in range(35):
        await alice.send_json(type="dm", to="bob", text=text, ref=n)
        echo = await alice.receive_json()
        assert (echo["type"], echo["ref"]) == ("dm", n), echo
    for _ in range(35):
        assert (await bob.receive_json(within=10))["text"] == text
