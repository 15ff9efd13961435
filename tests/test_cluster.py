"""Several servers acting as one through a real Redis (chatkit.cluster).

Every test starts its own ``redis-server`` on a free loopback port and
stops it; a missing ``redis-server`` fails them (see tests/redis_server.py).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

import chatkit
from chatkit import ChatServer, Message, hookimpl
from chatkit.cluster import BackplaneError, RedisBackplane
from tests.helpers import RawClient, next_event, unref, wait_until
from tests.programs import Launch, start_server
from tests.redis_server import RedisServer, free_port, redis_proxy

TIMEOUT = 10.0


@asynccontextmanager
async def cluster(
    redis: RedisServer,
    nodes: int = 3,
    *,
    plugins: Callable[[int], list[Any]] | None = None,
    **backplane: Any,
) -> AsyncIterator[list[ChatServer]]:
    """``nodes`` ChatServers on free ports, one cluster through ``redis``."""
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                chatkit.open_server(
                    backplane=RedisBackplane(redis.url, **backplane),
                    plugins=plugins(n) if plugins else (),
                )
            )
            for n in range(nodes)
        ]
        yield servers


async def messages(
    client: chatkit.ChatClient, count: int, room: str | None = None
) -> list[Message]:
    """The next ``count`` messages ``client`` receives (in ``room``)."""
    got: list[Message] = []
    with trio.fail_after(TIMEOUT):
        async for event in client:
            if isinstance(event, Message) and room in (None, event.room):
                got.append(event)
                if len(got) == count:
                    return got
    raise AssertionError(f"connection ended after {got}")


async def quiet(client: chatkit.ChatClient, within: float = 0.3) -> list[Any]:
    """Whatever ``client`` receives within ``within`` seconds."""
    got: list[Any] = []
    with trio.move_on_after(within):
        async for event in client:
            got.append(event)
    return got


async def test_a_message_reaches_every_member_on_every_node_once_in_one_order(
    redis: RedisServer,
) -> None:
    async with cluster(redis, 3) as nodes, AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                chatkit.open_client(port=nodes[n % 3].port, name=f"user{n}")
            )
            for n in range(6)
        ]
        members, outsiders = clients[:4], clients[4:]  # 2 nodes + 1 node, 2 + 1
        for client in members:
            await client.join("dev")
        senders = members[:3]  # one on each node
        per_sender = 30
        received: dict[int, list[Message]] = {}

        async def receive(n: int, client: chatkit.ChatClient) -> None:
            received[n] = [
                unref(m) for m in await messages(client, 3 * per_sender, "dev")
            ]

        async def send(client: chatkit.ChatClient) -> None:
            for k in range(per_sender):
                await client.say(f"{client.name} {k}", room="dev")

        async with trio.open_nursery() as nursery:
            for n, client in enumerate(members):
                nursery.start_soon(receive, n, client)
            for client in senders:
                nursery.start_soon(send, client)

        first = received[0]
        assert len(first) == 3 * per_sender
        ids = [m.id for m in first]
        assert ids == sorted(set(ids)), "ids must be unique and increasing"
        for n in range(1, len(members)):
            assert received[n] == first, f"member {n} saw another order"
        for client in senders:
            mine = [m.text for m in first if m.sender == client.name]
            assert mine == [f"{client.name} {k}" for k in range(per_sender)]
        for client in outsiders:
            assert not [e for e in await quiet(client) if isinstance(e, Message)], (
                "a non-member got a room message"
            )


async def test_a_name_is_unique_across_nodes(redis: RedisServer) -> None:
    async with cluster(redis, 2) as (a, b):
        async with chatkit.open_client(port=a.port, name="alice"):
            with pytest.raises(chatkit.NameTaken):
                async with chatkit.open_client(port=b.port, name="ALICE"):
                    pass
            async with chatkit.open_client(port=b.port, name="bob") as bob:
                with pytest.raises(chatkit.NameTaken):
                    await bob.nick("Alice")
                await bob.nick("robert")  # a free name is fine
                assert await bob.who() == ("alice", "robert")
        # alice left node a: her name is free on node b at once.
        async with chatkit.open_client(port=b.port, name="alice") as alice:
            assert alice.name == "alice"


async def test_who_rooms_and_history_answer_for_the_whole_cluster(
    redis: RedisServer,
) -> None:
    async with cluster(redis, 3) as nodes, AsyncExitStack() as stack:
        alice, bob, carol = [
            await stack.enter_async_context(
                chatkit.open_client(port=node.port, name=name)
            )
            for node, name in zip(nodes, ["alice", "bob", "carol"], strict=True)
        ]
        await alice.join("dev")
        await bob.join("dev")
        said = [
            unref(await alice.say("one", "dev")),
            unref(await bob.say("two", "dev")),
        ]
        for client in (alice, bob, carol):
            assert await client.who("dev") == ("alice", "bob")
            assert await client.who() == ("alice", "bob", "carol")
            assert await client.rooms() == {"dev": 2, "lobby": 3}
        await carol.join("dev")
        assert await carol.history("dev") == tuple(said)
        assert await carol.history("dev", after=said[0].id) == (said[1],)
        assert await carol.history("dev", before=said[1].id) == (said[0],)
        await bob.leave("dev")
        assert await carol.who("dev") == ("alice", "carol")


async def test_direct_messages_cross_nodes(redis: RedisServer) -> None:
    async with (
        cluster(redis, 2) as (a, b),
        chatkit.open_client(port=a.port, name="alice") as alice,
        chatkit.open_client(port=b.port, name="bob") as bob,
    ):
        sent = await alice.dm("bob", "psst")
        assert sent.sender == "alice" and sent.to == "bob"
        got = await next_event(bob, chatkit.DirectMessage)
        assert (got.id, got.text) == (sent.id, "psst")
        with pytest.raises(chatkit.NoSuchUser):
            await alice.dm("nobody", "hello?")


class Recorder:
    """Records the hooks one node fires."""

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.joined: list[str] = []

    @hookimpl
    def chatkit_message_delivered(self, message: Message) -> None:
        self.delivered.append(message.text)

    @hookimpl
    def chatkit_user_joined(self, user: chatkit.User, room: str) -> None:
        self.joined.append(f"{user.name}@{room}")


async def test_hooks_fire_once_on_the_node_where_the_event_originated(
    redis: RedisServer,
) -> None:
    recorders = [Recorder(), Recorder()]
    async with (
        cluster(redis, 2, plugins=lambda n: [recorders[n]]) as (a, b),
        chatkit.open_client(port=a.port, name="alice") as alice,
        chatkit.open_client(port=b.port, name="bob") as bob,
    ):
        await alice.say("from a")
        await bob.say("from b")
        posted = await b.post("lobby", "from b's program")
        assert posted.id > 0
        await messages(alice, 3)
    assert recorders[0].delivered == ["from a"]
    assert recorders[1].delivered == ["from b", "from b's program"]
    assert recorders[0].joined == ["alice@lobby"]
    assert recorders[1].joined == ["bob@lobby"]


async def test_a_killed_node_releases_its_names_within_the_expiry(
    redis: RedisServer,
    launch: Launch,
) -> None:
    node, port = await start_server(
        launch, "--redis", redis.url, "--name-ttl", "1", "--no-interactive"
    )
    async with cluster(redis, 1) as (survivor,):
        async with chatkit.open_client(port=port, name="alice"):
            with pytest.raises(chatkit.NameTaken):
                async with chatkit.open_client(port=survivor.port, name="alice"):
                    pass
            node.process.send_signal(signal.SIGKILL)
            await node.wait()
        start = trio.current_time()
        with trio.fail_after(3):
            while True:
                try:
                    async with chatkit.open_client(
                        port=survivor.port, name="alice"
                    ) as alice:
                        assert await alice.who() == ("alice",)
                        break
                except chatkit.NameTaken:
                    await trio.sleep(0.1)
        assert trio.current_time() - start <= 1 + 1.0  # ttl, plus slack


async def test_nodes_survive_a_redis_restart_and_lose_nothing_after_it(
    redis: RedisServer,
) -> None:
    async with cluster(redis, 2, reconnect_delay=0.05, max_reconnect_delay=0.2) as (
        a,
        b,
    ):
        backplanes = [a.backplane, b.backplane]
        assert all(bp is not None for bp in backplanes)
        async with (
            chatkit.open_client(port=a.port, name="alice") as alice,
            chatkit.open_client(port=b.port, name="bob") as bob,
        ):
            before = unref(await alice.say("before"))
            assert await messages(bob, 1) == [before]

            await redis.stop()
            await wait_until(
                lambda: not any(bp.available for bp in backplanes),  # type: ignore[union-attr]
                within=TIMEOUT,
            )
            # Alone, node a still serves its users...
            alone = await alice.say("while redis is down")
            assert alone.text == "while redis is down"
            # ...but cannot check a new name against the cluster.
            with pytest.raises(chatkit.Unavailable):
                async with chatkit.open_client(port=a.port, name="carol"):
                    pass

            await redis.start()  # empty: no persistence
            await wait_until(
                lambda: all(bp.available for bp in backplanes),  # type: ignore[union-attr]
                within=TIMEOUT,
            )
            assert await bob.who() == ("alice", "bob")
            after = [unref(await alice.say("after 1")), unref(await bob.say("after 2"))]
            assert after[0].id > alone.id > before.id, "ids must keep increasing"
            assert after[1].id > after[0].id
            got_bob = await messages(bob, 2)
            # alice's own copies come through her events too: before, while
            # redis is down, after 1; then bob's after 2.
            got_alice = await messages(alice, 4)
            assert [unref(m) for m in got_bob] == after
            assert [unref(m) for m in got_alice][2:] == after
            assert not [e for e in await quiet(bob) if isinstance(e, Message)], (
                "a message arrived twice"
            )
        assert backplanes[0].outages == 1  # type: ignore[union-attr]


async def test_a_server_whose_redis_is_unreachable_does_not_start() -> None:
    server = ChatServer(backplane=RedisBackplane(f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
    error = info.value.exceptions[0]
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, BackplaneError)
    assert "cannot reach Redis" in str(error)


def test_the_cli_keeps_history_in_redis_with_redis(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from chatkit.server.__main__ import main

    for extra in (["--db", "x.sqlite3"], ["--no-db"], ["--history-max-age", "60"]):
        with pytest.raises(SystemExit) as exited:
            main(["--redis", "redis://127.0.0.1:1/0", *extra])
        assert exited.value.code == 2
        assert "with --redis, history is kept in Redis" in capsys.readouterr().err


async def test_a_name_taken_over_in_redis_disconnects_its_local_holder(
    redis: RedisServer,
) -> None:
    # What a node finds when another claimed its user's name while it was
    # cut off: the heartbeat's renewal reports it, and the user is kicked.
    import coredis

    async with cluster(redis, 1, name_ttl=0.3) as (node,):
        async with chatkit.open_client(port=node.port, name="Alice") as alice:
            client = coredis.Redis.from_url(redis.url)
            async with client:
                await client.set("chatkit:name:alice", "another-node", px=10_000)
            with trio.fail_after(TIMEOUT):
                events = [event async for event in alice]
            kicked = [e for e in events if isinstance(e, chatkit.ErrorReply)]
            assert [e.code for e in kicked] == ["kicked"]
            assert "in use elsewhere" in kicked[0].message
        assert node.get_user("alice") is None


async def answers(ask: Callable[[], Awaitable[Any]], expected: Any) -> None:
    """Ask until the answer is ``expected``: what another node writes to
    Redis lands there a moment later."""
    got = None
    with trio.move_on_after(TIMEOUT):
        while True:
            got = await ask()
            if got == expected:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"still {got!r}, not {expected!r}")


async def events_until(
    client: RawClient, last: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The events ``client`` receives up to the first for which ``last``
    holds (included)."""
    got: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT):
        while not got or not last(got[-1]):
            got.append(await client.receive_json())
    return got


@pytest.mark.parametrize("then", ["leave", "bye"])
async def test_a_say_then_leave_is_acknowledged_and_seen_in_one_order(
    redis: RedisServer, then: str
) -> None:
    # The leave (or disconnect) is applied on the sender's node at once,
    # but reaches the others through the stream, after the message: it
    # must wait for the message here too, or the sender loses its
    # acknowledgement and the nodes disagree on the order.
    async with cluster(redis, 2) as (a, b), AsyncExitStack() as stack:
        alice, carol, bob = [await RawClient.open(node.port) for node in (a, a, b)]
        for client in (alice, carol, bob):
            stack.push_async_callback(client.aclose)
        for client, name in ((alice, "alice"), (carol, "carol"), (bob, "bob")):
            await client.hello(name)
            await client.send_json(type="join", room="dev", ref="j")
            await client.expect("joined", name=name, ref="j")
        await carol.expect("joined", name="bob")  # bob's join came from b
        # One packet: the leave is handled before the message comes back.
        await alice.send_bytes(
            b'{"type":"say","room":"dev","text":"bye all","ref":"s"}\n'
            + (
                b'{"type":"leave","room":"dev","ref":"l"}\n'
                if then == "leave"
                else b'{"type":"bye"}\n'
            )
        )
        if then == "leave":
            mine = await events_until(alice, lambda e: e["type"] == "left")
            assert [(e["type"], e.get("ref")) for e in mine][-2:] == [
                ("message", "s"),
                ("left", "l"),
            ]
        for client in (carol, bob):
            seen = await events_until(
                client,
                lambda e: e == e | {"type": "left", "room": "dev", "name": "alice"},
            )
            about_alice = [
                e["type"]
                for e in seen
                if e.get("room") == "dev" and "alice" in (e.get("name"), e.get("from"))
            ]
            assert about_alice == ["message", "left"], seen


class SlowDelivery:
    """A ``chatkit_message_delivered`` hook that takes a while."""

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.entered = trio.Event()

    @hookimpl
    async def chatkit_message_delivered(self, message: Message) -> None:
        self.entered.set()
        await trio.sleep(0.5)
        self.delivered.append(message.text)


async def test_redis_lost_while_a_delivery_hook_runs_skips_no_hook_and_no_post(
    redis: RedisServer,
) -> None:
    # Two posts in one tick come back in one stream read; Redis is lost
    # while the first one's hook runs.
    hook = SlowDelivery()
    async with cluster(
        redis, 1, plugins=lambda n: [hook], name_ttl=0.3, reconnect_delay=0.05
    ) as (node,):
        posted: list[Message] = []

        async def post(text: str) -> None:
            posted.append(await node.post("lobby", text))

        with trio.move_on_after(TIMEOUT) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post, "one")
                nursery.start_soon(post, "two")
                await hook.entered.wait()
                await redis.stop()  # the heartbeat notices within ~0.1 s
        assert not scope.cancelled_caught, f"post() still waiting; got {posted}"
        assert sorted(m.text for m in posted) == ["one", "two"]
        await wait_until(lambda: len(hook.delivered) == 2)
        # Once each, in the order of the stream.
        assert hook.delivered == [m.text for m in sorted(posted, key=lambda m: m.id)]


async def test_a_user_who_goes_while_its_node_rejoins_is_not_left_listed(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rejoining node registers the users it had when it began, then
    # awaits Redis: whoever goes meanwhile must not stay listed (nor keep
    # the name) once it is back.
    async with cluster(redis, 2, reconnect_delay=0.05, max_reconnect_delay=0.2) as (
        a,
        b,
    ):
        backplanes = [a.backplane, b.backplane]
        assert backplanes[0] is not None and backplanes[1] is not None
        held, go = trio.Event(), trio.Event()
        hold = False
        real_pipeline = backplanes[0]._redis.pipeline

        @asynccontextmanager
        async def pipeline(**kwargs: Any) -> AsyncIterator[Any]:
            nonlocal hold
            async with real_pipeline(**kwargs) as pipe:
                yield pipe
                if hold:  # node a's rejoin: held before it is sent
                    hold = False
                    held.set()
                    await go.wait()

        monkeypatch.setattr(backplanes[0]._redis, "pipeline", pipeline)
        async with chatkit.open_client(port=b.port, name="alice") as alice:
            async with chatkit.open_client(port=a.port, name="bob") as bob:
                await bob.join("dev")
                await bob.join("ops")
                await answers(lambda: alice.who("dev"), ("bob",))
                await redis.stop()
                await wait_until(
                    lambda: not any(bp.available for bp in backplanes),  # type: ignore[union-attr]
                )
                hold = True
                await redis.start()  # empty: every node registers its users
                with trio.fail_after(TIMEOUT):
                    await held.wait()
                await bob.leave("dev")
            await wait_until(lambda: a.get_user("bob") is None)
            go.set()
            await wait_until(
                lambda: all(bp.available for bp in backplanes),  # type: ignore[union-attr]
            )
            await answers(alice.rooms, {"lobby": 1})
            assert await alice.who() == ("alice",)
            # bob's name is free at once, not after name_ttl.
            async with chatkit.open_client(port=b.port, name="bob") as bob:
                assert await bob.who() == ("alice", "bob")


async def test_ids_around_a_partition_are_as_documented(redis: RedisServer) -> None:
    # docs/deployment.md, "Ids and order around an outage": a node cut off
    # from Redis numbers messages on its own, above what it has seen; once
    # back it gets what the others said meanwhile, with their cluster ids;
    # from then on ids are above every id either side handed out.
    fast = {"name_ttl": 0.6, "reconnect_delay": 0.05, "max_reconnect_delay": 0.2}
    async with (
        redis_proxy(redis.port) as proxy,
        chatkit.open_server(backplane=RedisBackplane(proxy.url, **fast)) as a,
        chatkit.open_server(backplane=RedisBackplane(redis.url, **fast)) as b,
        chatkit.open_client(port=a.port, name="alice") as alice,
        chatkit.open_client(port=b.port, name="bob") as bob,
    ):
        cut_off = a.backplane

        async def unreffed(client: chatkit.ChatClient, count: int) -> list[Message]:
            return [unref(m) for m in await messages(client, count)]

        assert cut_off is not None
        first = unref(await alice.say("first"))
        assert await unreffed(alice, 1) == [first]
        assert await unreffed(bob, 1) == [first]
        proxy.cut()
        await wait_until(lambda: not cut_off.available)
        alone = unref(await alice.say("alice alone"))
        meanwhile = unref(await bob.say("bob meanwhile"))
        assert alone.id > first.id and meanwhile.id > first.id
        proxy.restore()
        await wait_until(lambda: cut_off.available)
        # Nothing the others said is lost; it comes after alice's own.
        assert await unreffed(alice, 2) == [alone, meanwhile]
        assert await unreffed(bob, 1) == [meanwhile]
        after = [unref(await bob.say("after 1")), unref(await alice.say("after 2"))]
        assert after[0].id > max(alone.id, meanwhile.id)
        assert after[1].id > after[0].id
        assert await unreffed(alice, 2) == after
        assert await unreffed(bob, 2) == after
        # Only what went through Redis is in the shared history.
        assert await bob.history("lobby") == (first, meanwhile, *after)


async def test_a_browser_on_one_node_chats_with_tcp_users_on_another(
    redis: RedisServer,
) -> None:
    from tests.wsclient import WsClient

    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                chatkit.open_server(backplane=RedisBackplane(redis.url), web_port=0)
            )
            for _ in range(2)
        ]
        assert a.web_port is not None
        browser = await WsClient.open(a.web_port)
        stack.push_async_callback(browser.aclose)
        await browser.hello("alice")
        bob = await stack.enter_async_context(
            chatkit.open_client(port=b.port, name="bob")
        )
        await browser.expect("joined", name="bob")
        await browser.send_json(type="say", text="across nodes", ref=1)
        sent = await browser.expect("message", ref=1)
        got = await messages(bob, 1)
        assert (got[0].id, got[0].text, got[0].sender) == (
            sent["id"],
            "across nodes",
            "alice",
        )
        await bob.say("back to you")
        await browser.expect("message", text="back to you")
