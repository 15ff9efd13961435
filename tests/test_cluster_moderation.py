"""Moderation across a cluster (docs/moderation.md, "In a cluster"): two
nodes on one real Redis; what an operator does on one node holds for users
of the other at once, and the state lives in Redis across restarts.

Every test starts its own ``redis-server`` (the ``redis`` fixture) and
its servers on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

import chatkit
from chatkit.cluster import RedisBackplane
from tests.helpers import TIMEOUT, connect, ended, next_event, wait_until
from tests.redis_server import RedisServer, redis_proxy


@asynccontextmanager
async def two_nodes(
    redis: RedisServer, url: str | None = None, **backplane: Any
) -> AsyncIterator[tuple[chatkit.ChatServer, chatkit.ChatServer]]:
    """Nodes ``a`` (on ``url``, Redis itself by default) and ``b``, where
    ``root`` is a server operator."""
    async with (
        chatkit.open_server(
            operators=["root"], backplane=RedisBackplane(url or redis.url, **backplane)
        ) as a,
        chatkit.open_server(
            operators=["root"], backplane=RedisBackplane(redis.url, **backplane)
        ) as b,
    ):
        yield a, b


async def test_a_kick_on_one_node_puts_out_a_user_of_the_other(
    redis: RedisServer,
) -> None:
    async with (
        two_nodes(redis) as (a, b),
        connect(a, "root") as root,
        connect(a, "carol") as carol,
        connect(b, "bob") as bob,
        connect(b, "dave") as dave,
    ):
        for member in (root, carol, bob, dave):
            await member.join("dev")
        ack = await root.kick("BOB", room="dev", reason="spam")
        assert (ack.action, ack.room, ack.reason) == ("kick", "dev", "spam")
        # Everyone in dev, on either node, sees who was kicked and why.
        for member in (carol, bob, dave):
            seen = await next_event(member, chatkit.Moderated, action="kick")
            assert isinstance(seen, chatkit.Moderated)
            assert (seen.by, seen.room, seen.reason) == ("root", "dev", "spam")
            assert seen.name is not None and seen.name.casefold() == "bob"
        for member in (carol, dave):
            await next_event(member, chatkit.Left, name="bob", room="dev")
        await wait_until(lambda: bob.joined_rooms == {"lobby"})
        assert sorted(await carol.who("dev")) == ["carol", "dave", "root"]
        # Off the server: bob's connection (on b) ends with the reason.
        await root.kick("bob", reason="enough")
        assert "enough" in await ended(bob)
        seen = await next_event(dave, chatkit.Moderated, action="kick", name="bob")
        assert isinstance(seen, chatkit.Moderated) and seen.room is None
        # Nobody there: no_such_user, from either node's view.
        with pytest.raises(chatkit.NoSuchUser):
            await root.kick("bob")
        with pytest.raises(chatkit.NoSuchUser):
            await root.kick("dave", room="elsewhere")


async def test_a_ban_on_one_node_holds_on_the_other_until_it_expires(
    redis: RedisServer,
) -> None:
    async with two_nodes(redis) as (a, b), connect(a, "root") as root:
        async with connect(b, "bob") as bob, connect(b, "dave") as dave:
            await bob.join("dev")
            await dave.join("dev")
            await root.ban("bob", reason="spam", duration=2)
            assert "banned" in await ended(bob)
            seen = await next_event(dave, chatkit.Moderated, action="ban", name="bob")
            assert isinstance(seen, chatkit.Moderated) and seen.reason == "spam"
        for node in (a, b):
            with pytest.raises(chatkit.Banned):
                async with connect(node, "bob"):
                    pass
        # A room ban made on b keeps carol (on a) out of dev.
        async with connect(b, "root2") as other, connect(a, "carol") as carol:
            await carol.join("dev")
            with pytest.raises(chatkit.Forbidden):
                await other.ban("carol", room="dev")
        await b.ban("carol", room="dev", reason="off topic")
        async with connect(a, "carol") as carol:
            with pytest.raises(chatkit.Banned):
                await carol.join("dev")
        # The server's own ban had a 2 s expiry: it runs out on both nodes.
        await trio.sleep(2.1)
        for node in (a, b):
            async with connect(node, "bob") as bob:
                await bob.join("dev")


async def test_an_address_ban_from_one_node_puts_out_the_other_nodes_users(
    redis: RedisServer,
) -> None:
    async with (
        two_nodes(redis) as (a, b),
        connect(a, "root") as root,
        connect(b, "bob") as bob,
    ):
        await bob.join("dev")
        await root.join("dev")
        await root.ban(address="127.0.0.0/8", room="dev")
        # bob is told by name that he is out (not the address).
        seen = await next_event(bob, chatkit.Moderated, action="ban", name="bob")
        assert isinstance(seen, chatkit.Moderated) and seen.address is None
        await wait_until(lambda: "dev" not in bob.joined_rooms)
        with pytest.raises(chatkit.Banned):
            await bob.join("dev")


async def test_mutes_roles_topics_and_modes_are_the_clusters(
    redis: RedisServer,
) -> None:
    async with (
        two_nodes(redis) as (a, b),
        connect(a, "alice") as alice,
        connect(b, "bob") as bob,
        connect(b, "eve") as eve,
    ):
        await alice.join("dev")  # alice owns dev, on every node
        await bob.join("dev")
        await eve.join("dev")
        # A role granted on a is honoured on b.
        with pytest.raises(chatkit.Forbidden):
            await bob.mute("eve", room="dev")
        await alice.op("dev", "bob")
        seen = await next_event(eve, chatkit.Moderated, action="op", name="bob")
        assert isinstance(seen, chatkit.Moderated) and seen.by == "alice"
        await bob.mute("eve", room="dev", reason="calm down")
        with pytest.raises(chatkit.Muted):
            await eve.say("hello?", room="dev")
        await alice.unmute("eve", room="dev")
        assert (await eve.say("thanks", room="dev")).text == "thanks"
        # A topic set on a reaches b's members, and b's joiners.
        await alice.topic("dev", "release on Friday")
        topic = await next_event(bob, chatkit.TopicReply)
        assert isinstance(topic, chatkit.TopicReply)
        assert (topic.text, topic.by) == ("release on Friday", "alice")
        # Modes set on a: invite-only keeps b's users out until invited.
        await alice.modes("dev", invite_only=True)
        modes = await next_event(bob, chatkit.ModesReply)
        assert isinstance(modes, chatkit.ModesReply) and modes.invite_only
        async with connect(b, "frank") as frank:
            with pytest.raises(chatkit.Forbidden):
                await frank.join("dev")
            await alice.invite("dev", "frank")
            invite = await next_event(
                frank, chatkit.Moderated, action="invite", name="frank"
            )
            assert isinstance(invite, chatkit.Moderated) and invite.room == "dev"
            await frank.join("dev")
            shown = await next_event(frank, chatkit.TopicReply)
            assert isinstance(shown, chatkit.TopicReply)
            assert shown.text == "release on Friday"
        # The invite was used up, for every node.
        async with connect(a, "frank") as frank:
            with pytest.raises(chatkit.Forbidden):
                await frank.join("dev")


async def test_changes_made_at_once_on_both_nodes_are_all_kept(
    redis: RedisServer,
) -> None:
    async with two_nodes(redis) as (a, b):
        async with trio.open_nursery() as nursery:
            for node in (a, b):
                for n in range(10):
                    nursery.start_soon(
                        lambda node=node, n=n: node.ban(f"{node.port}-{n}")
                    )
        names = {f"{node.port}-{n}" for node in (a, b) for n in range(10)}
        for node in (a, b):
            async with connect(node, "root") as root:
                listing = await root.bans()
                assert {ban.name for ban in listing.bans} == names


async def test_invites_made_at_once_on_both_nodes_are_all_kept(
    redis: RedisServer,
) -> None:
    # An invite adds to the room's list: made again on the list another
    # node left when that node committed first, not on a stale copy.
    async with two_nodes(redis) as (a, b):
        await a.set_modes("dev", invite_only=True)
        names = {node: [f"guest{node.port}x{n}" for n in range(5)] for node in (a, b)}
        async with trio.open_nursery() as nursery:
            for node, guests in names.items():
                for guest in guests:
                    nursery.start_soon(node.invite, "dev", guest)
        for node, guests in names.items():
            for guest in guests:
                async with connect(node, guest) as invited:
                    await invited.join("dev")


async def test_the_state_is_in_redis_across_a_restart_of_every_node(
    redis: RedisServer,
) -> None:
    async with (
        two_nodes(redis) as (a, b),
        connect(a, "alice") as alice,
        connect(b, "root") as root,
    ):
        await alice.join("dev")
        await alice.topic("dev", "kept")
        await alice.modes("dev", moderated=True, slow=5)
        await alice.op("dev", "carol")
        await root.ban("mallory", reason="spam")
        await root.mute("eve", reason="shouting")
    async with AsyncExitStack() as stack:
        node = await stack.enter_async_context(
            chatkit.open_server(backplane=RedisBackplane(redis.url))
        )
        with pytest.raises(chatkit.Banned):
            async with connect(node, "mallory"):
                pass
        carol = await stack.enter_async_context(connect(node, "carol"))
        eve = await stack.enter_async_context(connect(node, "eve"))
        await carol.join("dev")
        topic = await carol.topic("dev")
        assert (topic.text, topic.by) == ("kept", "alice")
        modes = await carol.modes("dev")
        assert (modes.moderated, modes.slow) == (True, 5)
        # carol is still an operator of dev: she speaks in a moderated room.
        assert (await carol.say("still op", room="dev")).text == "still op"
        with pytest.raises(chatkit.Muted):
            await eve.say("hello")


async def test_moderation_needing_redis_is_refused_while_it_is_away(
    redis: RedisServer,
) -> None:
    fast = {"name_ttl": 0.6, "reconnect_delay": 0.05, "max_reconnect_delay": 0.2}
    async with (
        redis_proxy(redis.port) as proxy,
        two_nodes(redis, proxy.url, **fast) as (a, b),
        connect(a, "root") as root,
        connect(a, "bob") as bob,
    ):
        backplane = a.backplane
        assert backplane is not None
        proxy.cut()
        await wait_until(lambda: not backplane.available)
        with pytest.raises(chatkit.Unavailable):
            await root.ban("eve")
        # A kick needs no state: this node's users can still be put out.
        await root.kick("bob", room="lobby")
        await next_event(bob, chatkit.Moderated, action="kick", name="bob")
        await wait_until(lambda: bob.joined_rooms == set())
        proxy.restore()
        await wait_until(lambda: backplane.available)
        await root.ban("eve")
        with pytest.raises(chatkit.Banned):
            async with connect(b, "eve"):
                pass


async def test_a_redis_that_restarts_empty_gets_the_state_back_from_the_nodes(
    redis: RedisServer,
) -> None:
    fast = {"name_ttl": 0.6, "reconnect_delay": 0.05, "max_reconnect_delay": 0.2}
    async with two_nodes(redis, **fast) as (a, b):
        await a.ban("mallory", reason="spam")
        await b.set_topic("dev", "kept")
        backplanes = [node.backplane for node in (a, b)]
        await redis.stop()
        await wait_until(lambda: not any(bp and bp.available for bp in backplanes))
        await redis.start()  # empty: no persistence
        await wait_until(lambda: all(bp and bp.available for bp in backplanes))
        async with chatkit.open_server(backplane=RedisBackplane(redis.url)) as c:
            # The nodes give Redis their state back as soon as they are
            # back: a node that joins after them finds it there.
            with trio.fail_after(TIMEOUT):
                while True:
                    async with connect(c, "carol") as carol:
                        if (await carol.topic("dev")).text == "kept":
                            break
                    await trio.sleep(0.05)
            with pytest.raises(chatkit.Banned):
                async with connect(c, "mallory"):
                    pass
            await a.mute("eve")  # made on top of the state given back
            async with connect(c, "eve") as eve:
                assert (await eve.topic("dev")).text == "kept"
                with pytest.raises(chatkit.Muted):
                    await eve.say("hello")
