"""ChatServer lifecycle: start, graceful and hard stop, server-side actions,
limits, and a slow reader that must never slow anybody else down."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import chatkit
from tests.conftest import OpenRaw, login
from tests.helpers import RawClient, open_small_window

SHUTDOWN = {"type": "shutdown", "reason": "server shutting down"}
SHUTDOWN_LINE = "Server is shutting down: server shutting down"


async def sync(client: RawClient) -> list[dict[str, Any]]:
    """Ping and read up to the pong; return what came before it."""
    await client.send_json(type="ping", ref="sync")
    before = []
    while (event := await client.receive_json()) != {"type": "pong", "ref": "sync"}:
        before.append(event)
    return before


class Served:
    """Runs ``server.serve`` and records when it returns."""

    def __init__(self, server: chatkit.ChatServer) -> None:
        self.server = server
        self.returned = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int]) -> None:
        await self.server.serve(task_status=task_status)
        self.returned.set()


# --- starting ----------------------------------------------------------------


async def test_start_returns_the_bound_port(open_raw: OpenRaw) -> None:
    server = chatkit.ChatServer(port=0)
    assert server.port == 0
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        assert isinstance(port, int)
        assert port > 0
        assert server.port == port
        await login(open_raw, port, "alice")
        await server.aclose()


async def test_a_server_cannot_be_started_twice() -> None:
    server = chatkit.ChatServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with pytest.raises(RuntimeError):
            await server.serve()
        await server.aclose()
    with pytest.raises(RuntimeError):
        await server.serve()


async def test_a_server_closed_before_it_started_cannot_start() -> None:
    server = chatkit.ChatServer()
    await server.aclose()
    with trio.fail_after(2), pytest.raises(RuntimeError):
        await server.serve()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_line_length": 0},
        {"max_connections": -5},
        {"presence_limit": -1},
        {"rate_limit": 0},
        {"rate_burst": 1.5},
        {"idle_timeout": float("nan")},
        {"max_queued_bytes": True},
        {"max_queued_bytes": "1"},
        {"max_queued_bytes": 0},
        {"max_queued_messages": 0},
        {"hook_timeout": 0},
        {"hook_timeout": -1.0},
        {"close_timeout": 0},
        {"close_timeout": -0.5},
    ],
)
def test_bad_limits_are_rejected(kwargs: dict[str, Any]) -> None:
    (field,) = kwargs
    with pytest.raises(ValueError, match=field):
        chatkit.Limits(**kwargs)
    with pytest.raises(ValueError, match=field):
        chatkit.Limits().replace(**kwargs)


def test_limits_of_one_are_accepted() -> None:
    server = chatkit.ChatServer(
        limits=chatkit.Limits(
            max_line_length=1,
            max_queued_bytes=1,
            max_queued_messages=1,
            hook_timeout=0.01,
            close_timeout=0.01,
        ),
    )
    assert server.limits.max_queued_bytes == 1
    assert chatkit.Limits(presence_limit=0, rate_limit=None).presence_limit == 0


# --- graceful shutdown -------------------------------------------------------


async def test_aclose_sends_shutdown_to_every_client_and_ends_everything(
    open_raw: OpenRaw,
) -> None:
    server = chatkit.ChatServer()
    served = Served(server)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(served.run)
        alice = await login(open_raw, port, "alice")
        bob = await login(open_raw, port, "bob")
        carol = await open_raw(port)
        await carol.send_line("carol")
        for client in (alice, bob):
            await sync(client)
        # A client that connected but never said hello is closed too.
        stranger = await open_raw(port)
        start = trio.current_time()
        with trio.fail_after(2):
            await server.aclose()
            # aclose returns once serve has returned: every task has ended.
            assert served.returned.is_set()
            assert server.users == ()
            assert await alice.assert_closed() == [
                '{"type":"shutdown","reason":"server shutting down"}'
            ]
            assert await bob.assert_closed() == [
                '{"type":"shutdown","reason":"server shutting down"}'
            ]
            assert await carol.assert_closed() == [SHUTDOWN_LINE]
            # (In JSON, the default, unless the handshake says otherwise.)
            assert await stranger.assert_closed() in (
                [],
                ['{"type":"shutdown","reason":"server shutting down"}'],
            )
        elapsed = trio.current_time() - start
    assert elapsed < 1.0, elapsed


async def test_aclose_is_idempotent_and_concurrent_calls_all_wait(
    open_raw: OpenRaw,
) -> None:
    server = chatkit.ChatServer()
    served = Served(server)
    finished: list[int] = []

    async def close(i: int) -> None:
        await server.aclose()
        assert served.returned.is_set()
        finished.append(i)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(served.run)
        alice = await login(open_raw, port, "alice")
        with trio.fail_after(2):
            async with trio.open_nursery() as closers:
                for i in range(3):
                    closers.start_soon(close, i)
            await server.aclose()
            await server.aclose()
    assert sorted(finished) == [0, 1, 2]
    assert await alice.assert_closed() == [
        '{"type":"shutdown","reason":"server shutting down"}'
    ]


async def test_aclose_reason_is_sent(open_raw: OpenRaw) -> None:
    async with trio.open_nursery() as nursery:
        server = chatkit.ChatServer()
        port = await nursery.start(server.serve)
        alice = await login(open_raw, port, "alice")
        bob = await open_raw(port)
        await bob.send_line("bob")
        await alice.expect("joined", name="bob")
        await server.aclose("maintenance")
    assert await alice.receive_json() == {"type": "shutdown", "reason": "maintenance"}
    assert await bob.receive_line() == "Server is shutting down: maintenance"


async def test_everything_accepted_before_aclose_is_delivered_first(
    open_raw: OpenRaw,
) -> None:
    count = 300
    server = chatkit.ChatServer(
        limits=chatkit.Limits(rate_limit=None),
    )  # a burst of 300 on purpose
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        alice = await login(open_raw, port, "alice")
        bob = await login(open_raw, port, "bob")  # never reads until the end
        carol = await open_raw(port)  # line mode, never reads until the end
        await carol.send_line("carol")
        await alice.expect("joined", name="carol")
        batch = b"".join(b'{"type":"say","text":"m%d"}\n' % i for i in range(count))
        await alice.send_bytes(batch)
        acks = await sync(alice)  # the server has handled every say
        assert [a["text"] for a in acks] == [f"m{i}" for i in range(count)]
        posted = await server.post("lobby", "last word")
        with trio.fail_after(2):
            await server.aclose()

    with trio.fail_after(2):
        bob_lines = await bob.assert_closed()
        carol_lines = await carol.assert_closed()
        alice_lines = await alice.assert_closed()
    bob_events = [json.loads(line) for line in bob_lines]
    assert bob_events[0] == {"type": "joined", "room": "lobby", "name": "carol"}
    assert [e["text"] for e in bob_events[1:-1]] == [
        *(f"m{i}" for i in range(count)),
        "last word",
    ]
    assert bob_events[-2]["id"] == posted.id
    assert bob_events[-2]["from"] == "*server*"
    assert bob_events[-1] == SHUTDOWN
    assert carol_lines == [
        *(f"alice: m{i}" for i in range(count)),
        "*server*: last word",
        SHUTDOWN_LINE,
    ]
    alice_events = [json.loads(line) for line in alice_lines]
    assert alice_events == [bob_events[-2], SHUTDOWN]


async def test_connections_after_shutdown_are_refused() -> None:
    server = chatkit.ChatServer()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        await server.aclose()
    with trio.fail_after(2), pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_connections_during_shutdown_are_closed(open_raw: OpenRaw) -> None:
    late: list[RawClient] = []

    class ConnectWhileStopping:
        @chatkit.hookimpl
        async def chatkit_server_stopping(self, server: chatkit.ChatServer) -> None:
            # The listener is still open here: this connection is accepted
            # while the server is already closing.
            client = await open_raw(server.port)
            await client.send_json(type="hello", name="late", protocol=1)
            late.append(client)
            await trio.sleep(0.05)

    server = chatkit.ChatServer(plugins=[ConnectWhileStopping()])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with trio.fail_after(2):
            await server.aclose()
    (client,) = late
    lines = await client.assert_closed(within=2)
    assert lines in ([], ['{"type":"shutdown","reason":"server shutting down"}'])
    assert server.users == ()


async def test_aclose_is_bounded_when_a_client_never_reads(
    open_raw: OpenRaw,
) -> None:
    server = chatkit.ChatServer(
        limits=chatkit.Limits(close_timeout=0.3),
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        stuck = await open_small_window(port)
        try:
            await stuck.hello("stuck")
            alice = await login(open_raw, port, "alice")
            # Fill stuck's socket buffers (but not its 1 MiB queue).
            for i in range(40):
                await alice.send_json(type="say", text=f"{i:04d}" + "x" * 4000)
                await alice.receive_json()
            start = trio.current_time()
            with trio.fail_after(2):
                await server.aclose()
            elapsed = trio.current_time() - start
            assert await alice.assert_closed() == [
                '{"type":"shutdown","reason":"server shutting down"}'
            ]
        finally:
            await stuck.aclose()
    # The stuck client holds up the shutdown by close_timeout, no more.
    assert 0.25 <= elapsed < 1.0, elapsed


# --- hard stop ---------------------------------------------------------------


async def test_cancelling_serve_closes_everything_without_hanging(
    open_raw: OpenRaw,
) -> None:
    server = chatkit.ChatServer()
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            alice = await login(open_raw, port, "alice")
            bob = await open_raw(port)
            await bob.send_line("bob")
            await alice.expect("joined", name="bob")
            stuck = await open_small_window(port)
            try:
                await stuck.hello("stuck")
                for _ in range(20):
                    await alice.send_json(type="say", text="y" * 4000)
                nursery.cancel_scope.cancel()
            finally:
                await stuck.aclose()
        for client in (alice, bob):
            lines = await client.assert_closed()
            assert not any("shutdown" in line for line in lines)


class Lingering:
    """Leave hooks that never return (within hook_timeout)."""

    @chatkit.hookimpl
    async def chatkit_user_left(self) -> None:
        await trio.sleep_forever()

    @chatkit.hookimpl
    async def chatkit_user_disconnected(self) -> None:
        await trio.sleep_forever()


@pytest.mark.parametrize("stop", ["aclose", "cancel"])
async def test_slow_leave_hooks_do_not_hold_up_the_shutdown(
    open_raw: OpenRaw, stop: str
) -> None:
    # Three leave hooks of 5 s each would take 15 s: aclose is bounded by
    # close_timeout plus a second, a cancellation by close_timeout.
    server = chatkit.ChatServer(
        plugins=[Lingering()],
        limits=chatkit.Limits(hook_timeout=5.0, close_timeout=0.2),
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            alice = await login(open_raw, port, "alice")
            for room in ("a", "b"):
                await alice.send_json(type="join", room=room)
                await alice.expect("joined", room=room)
            start = trio.current_time()
            if stop == "aclose":
                await server.aclose()
            else:
                nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - start
    assert elapsed < 0.2 + 1 + 0.5, elapsed


# --- server actions ----------------------------------------------------------


async def test_post_delivers_to_the_room(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await open_raw(server.port)
    await bob.send_line("bob")
    await alice.expect("joined", name="bob")
    message = await server.post("lobby", "welcome all")
    assert isinstance(message, chatkit.Message)
    assert message.sender == chatkit.SERVER_SENDER
    event = await alice.receive_json()
    assert event == {
        "type": "message",
        "id": message.id,
        "ts": message.ts,
        "room": "lobby",
        "from": "*server*",
        "text": "welcome all",
    }
    assert await bob.receive_line() == "*server*: welcome all"

    # Only the room's members; a custom sender; it is in the history.
    await alice.send_json(type="join", room="dev")
    await alice.expect("joined", room="dev")
    await server.post("dev", "dev news", sender="bot")
    dev_event = await alice.receive_json()
    assert (dev_event["room"], dev_event["from"]) == ("dev", "bot")
    await bob.assert_silent()
    await alice.send_json(type="history", room="lobby")
    history = await alice.receive_json()
    assert history["messages"] == [event]
    with pytest.raises(KeyError):
        await server.post("nowhere", "lost")


async def test_kick_closes_the_user_and_tells_the_others(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await login(open_raw, server.port, "bob")
    await alice.expect("joined", name="bob")
    await bob.send_json(type="join", room="dev")
    await bob.expect("joined", room="dev")
    await alice.send_json(type="join", room="dev")
    await alice.expect("joined", room="dev", name="alice")
    await bob.expect("joined", room="dev", name="alice")

    assert server.kick("BOB") is True
    with trio.fail_after(2):
        assert await bob.assert_closed() == [
            '{"type":"error","code":"kicked","message":"kicked"}'
        ]
    # Those sharing a room with bob are told what happened, then see him go.
    assert await alice.receive_json() == {
        "type": "moderated",
        "action": "kick",
        "by": chatkit.SERVER_SENDER,
        "name": "bob",
        "reason": "kicked",
    }
    left = [await alice.receive_json() for _ in range(2)]
    assert sorted(left, key=lambda e: e["room"]) == [
        {"type": "left", "room": "dev", "name": "bob", "reason": "kicked"},
        {"type": "left", "room": "lobby", "name": "bob", "reason": "kicked"},
    ]
    assert server.get_user("bob") is None
    assert server.kick("bob") is False
    assert server.kick("nobody") is False
    await alice.assert_silent()


async def test_kick_a_line_user_with_a_reason(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await open_raw(server.port)
    await bob.send_line("bob")
    await alice.expect("joined", name="bob")
    assert server.kick("bob", "spamming") is True
    assert await bob.assert_closed(within=2) == ["error (kicked): spamming"]
    assert (await alice.receive_json())["type"] == "moderated"
    assert await alice.receive_json() == {
        "type": "left",
        "room": "lobby",
        "name": "bob",
        "reason": "kicked",
    }
    # The name is free again.
    bob2 = await open_raw(server.port)
    await bob2.send_line("bob")
    await alice.expect("joined", name="bob")


# --- a slow reader -----------------------------------------------------------


CHATTERS = 50
ROUNDS = 15
PAD = "p" * 300


@pytest.fixture
async def slow_server() -> AsyncIterator[chatkit.ChatServer]:
    # Every chatter's buffer must hold one round (50 messages of about 400
    # bytes, which can all arrive in one scheduler tick in this
    # single-threaded test), with room to spare; the slow reader overflows
    # it after a few rounds.
    async with chatkit.open_server(
        limits=chatkit.Limits(max_queued_bytes=64 * 1024, close_timeout=0.5),
    ) as server:
        yield server


async def test_a_slow_reader_never_slows_fifty_chatters(
    slow_server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    server = slow_server
    test_start = trio.current_time()
    slow = await open_small_window(server.port)
    try:
        await slow.hello("slow")  # and never reads again
        names = [f"user{i:02d}" for i in range(CHATTERS)]
        clients = [await open_raw(server.port) for _ in names]
        for name, client in zip(names, clients, strict=True):
            await client.hello(name)
        for client in clients:
            assert {e["type"] for e in await sync(client)} == {"joined"}

        received: dict[str, list[str]] = {name: [] for name in names}
        left: dict[str, list[dict[str, Any]]] = {name: [] for name in names}

        async def chat_round(r: int, name: str, client: RawClient) -> None:
            await client.send_json(type="say", text=f"{name} {r} {PAD}", ref=r)
            got = 0
            while got < CHATTERS:
                event = await client.receive_json()
                if event["type"] == "left":
                    left[name].append(event)
                    continue
                assert event["type"] == "message", event
                if event["from"] == name:
                    assert event["ref"] == r
                else:
                    assert "ref" not in event
                received[name].append(event["text"])
                got += 1

        round_times = []
        for r in range(ROUNDS):
            start = trio.current_time()
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    for name, client in zip(names, clients, strict=True):
                        nursery.start_soon(chat_round, r, name, client)
            round_times.append(trio.current_time() - start)

        # The slow reader was dropped (during the rounds, or just after).
        with trio.fail_after(2):
            for name, client in zip(names, clients, strict=True):
                if not left[name]:
                    left[name].append(await client.receive_json())
        for name in names:
            assert left[name] == [
                {"type": "left", "room": "lobby", "name": "slow", "reason": "too_slow"}
            ]
        assert server.get_user("slow") is None

        # Nothing lost, nothing doubled, each sender's messages in order.
        expected = [f"{s} {r} {PAD}" for r in range(ROUNDS) for s in names]
        for name in names:
            assert sorted(received[name]) == sorted(expected)
            for sender in names:
                mine = [t for t in received[name] if t.startswith(sender + " ")]
                assert mine == [f"{sender} {r} {PAD}" for r in range(ROUNDS)]
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.assert_silent, 0.05)

        # The slow client gets what fitted in its buffers, then EOF.
        slow_lines = await slow.assert_closed(within=3)
        complete = slow_lines[:-1]
        events = [json.loads(line) for line in complete]
        assert len(events) < CHATTERS + ROUNDS * CHATTERS
        ids = [e["id"] for e in events if e["type"] == "message"]
        assert ids == sorted(ids)
        if slow_lines and slow_lines[-1].startswith('{"type":"error"'):
            assert '"code":"too_slow"' in slow_lines[-1]
    finally:
        await slow.aclose()

    total = trio.current_time() - test_start
    print(f"slow reader: rounds max {max(round_times):.3f}s, total {total:.2f}s")
    assert max(round_times) < 0.5, round_times
    assert total < 5.0, total


async def test_open_server_lets_the_blocks_exception_through_unwrapped() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with chatkit.open_server():
            raise Boom


async def test_open_server_body_can_be_cancelled_from_outside() -> None:
    with trio.move_on_after(0.05) as scope:
        async with chatkit.open_server():
            await trio.sleep_forever()
    assert scope.cancelled_caught
