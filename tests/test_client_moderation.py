"""ChatClient's moderation methods (kick, ban, unban, mute, unmute, op,
deop, bans) against a real server on loopback: each one's acknowledgement,
what the others see through ``async for``, and the refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

import chatkit
from tests.helpers import TIMEOUT, connect, ended, next_event


@pytest.fixture
async def server() -> AsyncIterator[chatkit.ChatServer]:
    """A server where ``root`` is a server operator."""
    async with chatkit.open_server(operators=["root"]) as server:
        yield server


async def test_kick_from_a_room_is_acknowledged_and_seen_by_the_room(
    server: chatkit.ChatServer,
) -> None:
    async with connect(server, "root") as root, connect(server, "bob") as bob:
        await root.join("dev")
        await bob.join("dev")
        ack = await root.kick("bob", room="dev", reason="spam")
        assert (ack.action, ack.by, ack.name, ack.room, ack.reason) == (
            "kick",
            "root",
            "bob",
            "dev",
            "spam",
        )
        assert ack.ref is not None
        seen = await next_event(bob, chatkit.Moderated, action="kick")
        assert isinstance(seen, chatkit.Moderated)
        assert (seen.by, seen.name, seen.room, seen.ref) == ("root", "bob", "dev", None)
        # bob is out of dev (told by `moderated` alone), still connected;
        # the client knows it.
        assert bob.joined_rooms == {"lobby"}
        assert not bob.closed
        assert server.rooms["dev"] == ("root",)
        # The operator's own copy comes through async for too.
        mine = await next_event(root, chatkit.Moderated, action="kick")
        assert mine == ack


async def test_kick_off_the_server_ends_the_kicked_client(
    server: chatkit.ChatServer,
) -> None:
    async with (
        connect(server, "root") as root,
        connect(server, "bob", reconnect=True) as bob,
    ):
        await root.kick("bob", reason="enough")
        await ended(bob)
        assert bob.closed
        assert "enough" in (bob.close_reason or "")


async def test_a_member_who_is_no_operator_gets_forbidden(
    server: chatkit.ChatServer,
) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        calls = [
            alice.kick("bob"),
            alice.kick("bob", room="lobby"),
            alice.ban("bob"),
            alice.ban(address="203.0.113.0/24"),
            alice.unban("bob"),
            alice.mute("bob", room="lobby"),
            alice.unmute("bob"),
            alice.op("lobby", "alice"),
            alice.deop("lobby", "bob"),
            alice.bans(),
        ]
        for call in calls:
            with pytest.raises(chatkit.Forbidden):
                await call
        assert (await bob.say("still here")).text == "still here"


async def test_ban_unban_and_the_bans_list(server: chatkit.ChatServer) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.join("dev")  # alice owns dev
        ack = await alice.ban("bob", room="dev", reason="spam", duration=600)
        assert (ack.action, ack.name, ack.room, ack.reason) == (
            "ban",
            "bob",
            "dev",
            "spam",
        )
        assert ack.until is not None
        with pytest.raises(chatkit.Banned):
            await bob.join("dev")
        listing = await alice.bans("dev")
        assert isinstance(listing, chatkit.BansReply)
        assert listing.room == "dev"
        assert [(b.name, b.by, b.reason) for b in listing.bans] == [
            ("bob", "alice", "spam")
        ]
        assert listing.operators == ("alice",)
        assert (await alice.unban("bob", room="dev")).action == "unban"
        await bob.join("dev")
        with pytest.raises(chatkit.BadRequest):
            await alice.unban("bob", room="dev")  # not banned any more
        assert (await alice.bans("dev")).bans == ()
        # The answers to bans() are no news: async for never sees them.
        await alice.say("done", room="dev")
        seen = await events_until(alice, "done")
        assert not [e for e in seen if isinstance(e, chatkit.BansReply)]
        assert [e.action for e in seen if isinstance(e, chatkit.Moderated)] == [
            "ban",
            "unban",
        ]


async def test_ban_needs_a_name_or_an_address() -> None:
    client = chatkit.ChatClient(name="nobody")  # never entered: nothing sent
    with pytest.raises(ValueError, match="name or an address"):
        await client.ban()
    with pytest.raises(ValueError, match="name or an address"):
        await client.unban("eve", address="203.0.113.7")


async def test_a_server_ban_ends_a_client_for_good(
    server: chatkit.ChatServer,
) -> None:
    async with connect(server, "root") as root:
        async with connect(server, "eve", reconnect=True) as eve:
            await root.ban("eve", reason="no")
            await ended(eve)  # no reconnect: the ban would refuse it
            assert eve.closed
            assert (eve.close_reason or "").startswith("banned")
        with pytest.raises(chatkit.Banned):
            async with connect(server, "eve"):
                pass


async def test_mute_and_unmute(server: chatkit.ChatServer) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.join("dev")
        await bob.join("dev")
        ack = await alice.mute("bob", room="dev", reason="calm down", duration=60)
        assert (ack.action, ack.name, ack.room) == ("mute", "bob", "dev")
        with pytest.raises(chatkit.Muted):
            await bob.say("let me speak", room="dev")
        assert (await bob.say("elsewhere")).room == "lobby"
        assert [m.name for m in (await alice.bans("dev")).mutes] == ["bob"]
        assert (await alice.unmute("bob", room="dev")).action == "unmute"
        assert (await bob.say("thanks", room="dev")).text == "thanks"


async def test_op_and_deop(server: chatkit.ChatServer) -> None:
    async with (
        connect(server, "alice") as alice,
        connect(server, "bob") as bob,
        connect(server, "carol") as carol,
    ):
        for client in (alice, bob, carol):
            await client.join("dev")
        with pytest.raises(chatkit.Forbidden):
            await bob.kick("carol", room="dev")
        ack = await alice.op("dev", "bob")
        assert (ack.action, ack.by, ack.name, ack.room) == ("op", "alice", "bob", "dev")
        assert (await alice.bans("dev")).operators == ("alice", "bob")
        await bob.kick("carol", room="dev")
        assert (await alice.deop("dev", "bob")).action == "deop"
        await carol.join("dev")
        with pytest.raises(chatkit.Forbidden):
            await bob.kick("carol", room="dev")


async def test_topic_set_ask_and_seen(server: chatkit.ChatServer) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.join("dev")  # alice owns dev
        await bob.join("dev")
        empty = await alice.topic("dev")
        assert (empty.room, empty.text) == ("dev", "")
        reply = await alice.topic("dev", "release on Friday")
        assert isinstance(reply, chatkit.TopicReply)
        assert (reply.room, reply.text, reply.by) == (
            "dev",
            "release on Friday",
            "alice",
        )
        assert reply.ref is not None
        seen = await next_event(bob, chatkit.TopicReply)
        assert isinstance(seen, chatkit.TopicReply)
        assert (seen.text, seen.by, seen.ref) == ("release on Friday", "alice", None)
        asked = await bob.topic("dev")
        assert (asked.text, asked.by) == ("release on Friday", "alice")
        with pytest.raises(chatkit.Forbidden):
            await bob.topic("dev", "mine now")
        # alice sees her own change, as bob does; her ask's answer is no news.
        await alice.topic("dev")
        await alice.say("done", room="dev")
        events = await events_until(alice, "done")
        topics = [e for e in events if isinstance(e, chatkit.TopicReply)]
        assert [(t.text, t.by) for t in topics] == [("release on Friday", "alice")]


async def test_a_joiner_gets_the_topic_through_async_for(
    server: chatkit.ChatServer,
) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.join("dev")
        await alice.topic("dev", "welcome")
        await bob.join("dev")
        seen = await next_event(bob, chatkit.TopicReply, room="dev")
        assert isinstance(seen, chatkit.TopicReply)
        assert (seen.text, seen.by) == ("welcome", "alice")


async def test_modes_set_ask_and_their_effects(server: chatkit.ChatServer) -> None:
    async with (
        connect(server, "alice") as alice,
        connect(server, "bob") as bob,
        connect(server, "carol") as carol,
    ):
        await alice.join("dev")
        await bob.join("dev")
        plain = await alice.modes("dev")
        assert isinstance(plain, chatkit.ModesReply)
        assert (plain.invite_only, plain.moderated, plain.secret) == (False,) * 3
        assert (plain.limit, plain.slow) == (0, 0)
        reply = await alice.modes("dev", invite_only=True, moderated=True)
        assert (reply.invite_only, reply.moderated, reply.slow, reply.by) == (
            True,
            True,
            0,
            "alice",
        )
        seen = await next_event(bob, chatkit.ModesReply)
        assert isinstance(seen, chatkit.ModesReply)
        assert (seen.invite_only, seen.moderated, seen.by) == (True, True, "alice")
        with pytest.raises(chatkit.Forbidden):
            await bob.modes("dev", invite_only=False)
        assert (await bob.modes("dev")).invite_only  # anyone may ask
        # moderated: bob speaks once voiced.
        with pytest.raises(chatkit.Muted):
            await bob.say("hello?", room="dev")
        ack = await alice.voice("dev", "bob")
        assert (ack.action, ack.name, ack.room, ack.by) == (
            "voice",
            "bob",
            "dev",
            "alice",
        )
        assert (await bob.say("thanks", room="dev")).text == "thanks"
        assert (await alice.devoice("dev", "bob")).action == "devoice"
        with pytest.raises(chatkit.Muted):
            await bob.say("again?", room="dev")
        # invite_only: carol joins once invited.
        with pytest.raises(chatkit.Forbidden):
            await carol.join("dev")
        ack = await alice.invite("dev", "carol")
        assert (ack.action, ack.name, ack.room) == ("invite", "carol", "dev")
        await carol.join("dev")
        assert "dev" in carol.joined_rooms
        # alice's own change comes through async for; her ask does not.
        await alice.say("done", room="dev")
        events = await events_until(alice, "done")
        modes = [e for e in events if isinstance(e, chatkit.ModesReply)]
        assert [(m.invite_only, m.by) for m in modes] == [(True, "alice")]


class Echo:
    """A plugin with one command, ``/echo``."""

    @chatkit.hookimpl
    def chatkit_command(
        self, user: chatkit.User, name: str, args: str, room: str | None
    ) -> str | None:
        if name != "echo":
            return None
        return f"{user.name} said {args!r}" + (f" in {room}" if room else "")


async def test_plugin_commands() -> None:
    async with (
        chatkit.open_server(plugins=[Echo()]) as server,
        connect(server, "alice") as alice,
    ):
        reply = await alice.command("echo", "hi there")
        assert isinstance(reply, chatkit.CommandReply)
        assert (reply.name, reply.text, reply.room) == (
            "echo",
            "alice said 'hi there'",
            None,
        )
        await alice.join("dev")
        reply = await alice.command("echo", "x", room="dev")
        assert (reply.text, reply.room) == ("alice said 'x' in dev", "dev")
        with pytest.raises(chatkit.BadRequest, match="no command /nope"):
            await alice.command("nope")
        # The answers are no news.
        await alice.say("done")
        events = await events_until(alice, "done")
        assert not [e for e in events if isinstance(e, chatkit.CommandReply)]


async def events_until(client: chatkit.ChatClient, text: str) -> list[object]:
    """``client``'s events up to its message ``text``."""
    seen: list[object] = []
    with trio.fail_after(TIMEOUT):
        async for event in client:
            seen.append(event)
            if isinstance(event, chatkit.Message) and event.text == text:
                return seen
    raise AssertionError(f"{client.name}'s events ended: {client.close_reason}")
