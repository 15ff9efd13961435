"""Moderation: roles, kick, ban, mute, op/deop and the ban list, each
operation and each refusal, over the wire (docs/moderation.md)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import chatkit
from tests.attacks import connect_from
from tests.conftest import OpenRaw, login
from tests.helpers import RawClient


@pytest.fixture
async def server() -> AsyncIterator[chatkit.ChatServer]:
    """A server where ``root`` is a server operator."""
    async with chatkit.open_server(operators=["root"]) as server:
        yield server


async def joined(client: RawClient, room: str, name: str) -> None:
    """``client`` joins ``room`` (and sees its own join)."""
    await client.send_json(type="join", room=room)
    await client.expect("joined", room=room, name=name)


async def in_dev(open_raw: OpenRaw, port: int, *names: str) -> list[RawClient]:
    """Log in ``names``, then each joins ``dev`` in turn (the first creates
    it, and so owns it)."""
    clients = [await login(open_raw, port, name) for name in names]
    for client, name in zip(clients, names, strict=True):
        await joined(client, "dev", name)
    return clients


# --- who may ------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        {"type": "kick", "name": "bob"},
        {"type": "kick", "name": "bob", "room": "lobby"},
        {"type": "ban", "name": "bob"},
        {"type": "ban", "name": "bob", "room": "lobby"},
        {"type": "unban", "name": "bob"},
        {"type": "mute", "name": "bob", "room": "lobby"},
        {"type": "unmute", "name": "bob"},
        {"type": "op", "room": "lobby", "name": "alice"},
        {"type": "deop", "room": "lobby", "name": "bob"},
        {"type": "bans"},
    ],
    ids=lambda r: "-".join(map(str, r.values())),
)
async def test_a_member_who_is_no_operator_is_forbidden(
    server: chatkit.ChatServer, open_raw: OpenRaw, request_: dict[str, Any]
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await login(open_raw, server.port, "bob")
    await alice.send_json(**request_, ref=1)
    error = await alice.expect("error", ref=1)
    assert error["code"] == "forbidden"
    # Nothing happened to bob.
    await bob.send_json(type="say", text="still here", ref=2)
    await bob.expect("message", text="still here", ref=2)


async def test_a_rooms_creator_owns_it_and_may_make_operators(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    # alice creates dev: she owns it.
    alice, bob, carol = await in_dev(open_raw, server.port, "alice", "bob", "carol")
    # bob is no operator of dev: he may not op carol, nor kick.
    await bob.send_json(type="op", room="dev", name="carol", ref=1)
    assert (await bob.expect("error", ref=1))["code"] == "forbidden"
    await alice.send_json(type="op", room="dev", name="bob", ref=2)
    ack = await alice.expect("moderated", ref=2)
    assert (ack["action"], ack["name"], ack["by"]) == ("op", "bob", "alice")
    await carol.expect("moderated", action="op", name="bob")
    # An operator kicks, but does not make operators: only the owner does.
    await bob.send_json(type="op", room="dev", name="carol", ref=3)
    assert (await bob.expect("error", ref=3))["code"] == "forbidden"
    await bob.send_json(
        type="kick", room="dev", name="carol", reason="off topic", ref=4
    )
    await bob.expect("moderated", action="kick", name="carol", ref=4)
    await alice.send_json(type="deop", room="dev", name="bob", ref=5)
    await alice.expect("moderated", action="deop", ref=5)
    await bob.send_json(type="kick", room="dev", name="alice", ref=6)
    assert (await bob.expect("error", ref=6))["code"] == "forbidden"


# --- kick ---------------------------------------------------------------------


async def test_a_kick_from_a_room_is_seen_by_the_room_and_leaves_the_user_online(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await in_dev(open_raw, server.port, "alice", "bob")
    await alice.send_json(type="kick", room="dev", name="bob", reason="spam", ref=1)
    ack = await alice.expect("moderated", ref=1)
    assert ack == {
        "type": "moderated",
        "action": "kick",
        "by": "alice",
        "name": "bob",
        "room": "dev",
        "reason": "spam",
        "ref": 1,
    }
    seen = await bob.expect("moderated", action="kick")
    assert seen["reason"] == "spam"
    left = await alice.expect("left", room="dev", name="bob")
    assert left["reason"] == "kicked"
    assert server.rooms["dev"] == ("alice",)
    await bob.send_json(type="say", room="dev", text="hello?", ref=2)
    assert (await bob.expect("error", ref=2))["code"] == "not_in_room"
    await bob.send_json(type="say", text="still online", ref=3)
    await bob.expect("message", text="still online", ref=3)


async def test_a_kick_from_the_server_disconnects(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    root = await login(open_raw, server.port, "root")
    bob = await login(open_raw, server.port, "bob")
    await root.send_json(type="kick", name="bob", reason="enough", ref=1)
    await root.expect("moderated", action="kick", name="bob", ref=1)
    lines = await bob.assert_closed()
    assert '"code":"kicked"' in lines[-1] and "enough" in lines[-1]
    await root.expect("left", name="bob")


async def test_kicking_nobody_is_an_error(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    root = await login(open_raw, server.port, "root")
    await root.send_json(type="kick", name="ghost", ref=1)
    assert (await root.expect("error", ref=1))["code"] == "no_such_user"
    await root.send_json(type="kick", name="root", room="nowhere", ref=2)
    assert (await root.expect("error", ref=2))["code"] == "no_such_user"


# --- ban ----------------------------------------------------------------------


async def test_a_room_ban_puts_out_and_keeps_out_until_lifted(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await in_dev(open_raw, server.port, "alice", "bob")
    await alice.send_json(type="ban", room="dev", name="Bob", reason="trolling", ref=1)
    await alice.expect("moderated", action="ban", ref=1)
    await bob.expect("moderated", action="ban", name="Bob")
    await alice.expect("left", room="dev", name="bob")
    await bob.send_json(type="join", room="dev", ref=2)
    error = await bob.expect("error", ref=2)
    assert error["code"] == "banned" and "trolling" in error["message"]
    await alice.send_json(type="unban", room="dev", name="bob", ref=3)
    await alice.expect("moderated", action="unban", ref=3)
    await bob.send_json(type="join", room="dev", ref=4)
    await bob.expect("joined", room="dev", name="bob", ref=4)
    await alice.send_json(type="unban", room="dev", name="bob", ref=5)
    assert (await alice.expect("error", ref=5))["code"] == "bad_request"


async def test_a_server_ban_disconnects_and_refuses_the_name_at_hello(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    root = await login(open_raw, server.port, "root")
    bob = await login(open_raw, server.port, "bob")
    await root.send_json(type="ban", name="bob", reason="rules", ref=1)
    await root.expect("moderated", action="ban", ref=1)
    lines = await bob.assert_closed()
    assert '"code":"banned"' in lines[-1]
    again = await open_raw(server.port)
    await again.send_json(type="hello", name="BOB", protocol=1, ref=2)
    error = await again.expect("error", ref=2)
    assert error["code"] == "banned" and "rules" in error["message"]
    await again.assert_closed()


async def test_an_address_ban_keeps_out_a_network(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    root = await login(open_raw, server.port, "root")  # from 127.0.0.1
    eve = RawClient(await connect_from(server.port, "127.1.2.3"))
    try:
        await eve.hello("eve")
        await root.send_json(type="ban", address="127.1.0.0/16", ref=1)
        ack = await root.expect("moderated", action="ban", ref=1)
        assert ack["address"] == "127.1.0.0/16"
        assert '"code":"banned"' in (await eve.assert_closed())[-1]
    finally:
        await eve.aclose()
    mallory = RawClient(await connect_from(server.port, "127.1.9.9"))
    try:
        await mallory.send_json(type="hello", name="mallory", protocol=1)
        assert (await mallory.expect("error"))["code"] == "banned"
    finally:
        await mallory.aclose()
    await root.send_json(type="ban", address="not-an-address", ref=2)
    assert (await root.expect("error", ref=2))["code"] == "bad_request"
    await root.send_json(type="ban", name="x", address="10.0.0.1", ref=3)
    assert (await root.expect("error", ref=3))["code"] == "bad_request"


async def test_a_ban_ends_when_it_expires(
    mock_clock: trio.testing.MockClock, open_raw: OpenRaw
) -> None:
    mock_clock.rate = 1  # real time, and jumps
    async with chatkit.open_server(operators=["root"]) as server:
        root = await login(open_raw, server.port, "root")
        await root.send_json(type="ban", name="bob", duration=3600, ref=1)
        ack = await root.expect("moderated", ref=1)
        assert ack["until"] == pytest.approx(time.time() + 3600, abs=5)
        bob = await open_raw(server.port)
        await bob.send_json(type="hello", name="bob", protocol=1)
        assert (await bob.expect("error"))["code"] == "banned"
        mock_clock.jump(3601)
        later = await open_raw(server.port)
        await later.hello("bob")


# --- mute ---------------------------------------------------------------------


async def test_a_muted_member_is_refused_while_others_chat(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await in_dev(open_raw, server.port, "alice", "bob")
    await alice.send_json(
        type="mute", room="dev", name="bob", reason="calm down", ref=1
    )
    await alice.expect("moderated", action="mute", ref=1)
    await bob.expect("moderated", action="mute", name="bob")
    await bob.send_json(type="say", room="dev", text="LOUD", ref=2)
    error = await bob.expect("error", ref=2)
    assert error["code"] == "muted" and "calm" in error["message"]
    await bob.send_json(type="say", text="in the lobby", ref=3)  # not muted there
    await bob.expect("message", text="in the lobby", ref=3)
    await alice.send_json(type="say", room="dev", text="quiet now", ref=4)
    await bob.expect("message", text="quiet now")
    await alice.send_json(type="unmute", room="dev", name="bob", ref=5)
    await alice.expect("moderated", action="unmute", ref=5)
    await bob.send_json(type="say", room="dev", text="sorry", ref=6)
    await bob.expect("message", text="sorry", ref=6)


async def test_a_server_mute_silences_rooms_and_direct_messages(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    root = await login(open_raw, server.port, "root")
    bob = await login(open_raw, server.port, "bob")
    await root.send_json(type="mute", name="bob", ref=1)
    await root.expect("moderated", action="mute", ref=1)
    await bob.send_json(type="say", text="x", ref=2)
    assert (await bob.expect("error", ref=2))["code"] == "muted"
    await bob.send_json(type="dm", to="root", text="x", ref=3)
    assert (await bob.expect("error", ref=3))["code"] == "muted"


# --- the list -------------------------------------------------------------------


async def test_bans_lists_bans_mutes_and_operators(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    await joined(alice, "dev", "alice")
    await alice.send_json(type="ban", room="dev", name="eve", reason="spam", ref=1)
    await alice.expect("moderated", ref=1)
    await alice.send_json(type="mute", room="dev", name="bob", duration=60, ref=2)
    await alice.expect("moderated", ref=2)
    await alice.send_json(type="op", room="dev", name="carol", ref=3)
    await alice.expect("moderated", ref=3)
    await alice.send_json(type="bans", room="dev", ref=4)
    reply = await alice.expect("bans", ref=4)
    assert reply["bans"] == [{"name": "eve", "by": "alice", "reason": "spam"}]
    assert [m["name"] for m in reply["mutes"]] == ["bob"]
    assert reply["mutes"][0]["until"] > 0
    assert reply["operators"] == ["alice", "carol"]


# --- persistence and the Python API ------------------------------------------


async def test_moderation_survives_a_restart_on_the_same_database(
    tmp_path: Path, open_raw: OpenRaw
) -> None:
    db = tmp_path / "chat.db"
    async with chatkit.open_server(
        history=chatkit.SqliteHistory(db), operators=["root"]
    ) as server:
        alice = await login(open_raw, server.port, "alice")
        await joined(alice, "dev", "alice")
        await alice.send_json(type="op", room="dev", name="bob", ref=1)
        await alice.expect("moderated", ref=1)
        await alice.send_json(type="mute", room="dev", name="carol", ref=2)
        await alice.expect("moderated", ref=2)
        await server.ban("eve", reason="spam")
    async with chatkit.open_server(history=chatkit.SqliteHistory(db)) as server:
        eve = await open_raw(server.port)
        await eve.send_json(type="hello", name="eve", protocol=1)
        assert (await eve.expect("error"))["code"] == "banned"
        bob = await login(open_raw, server.port, "bob")
        await joined(bob, "dev", "bob")  # dev is re-created: alice still owns it
        carol = await login(open_raw, server.port, "carol")
        await joined(carol, "dev", "carol")
        await carol.send_json(type="say", room="dev", text="hi", ref=3)
        assert (await carol.expect("error", ref=3))["code"] == "muted"
        await bob.send_json(type="kick", room="dev", name="carol", ref=4)
        await bob.expect("moderated", action="kick", ref=4)  # still an operator
        await bob.send_json(type="bans", room="dev", ref=5)
        assert (await bob.expect("bans", ref=5))["operators"] == ["alice", "bob"]


async def test_the_python_api_moderates_as_the_server(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, _bob = await in_dev(open_raw, server.port, "alice", "bob")
    assert server.kick("bob", "bye", room="dev")
    seen = await alice.expect("moderated", action="kick")
    assert seen["by"] == chatkit.SERVER_SENDER
    await server.mute("alice", room="dev", duration=60)
    await alice.send_json(type="say", room="dev", text="x", ref=1)
    assert (await alice.expect("error", ref=1))["code"] == "muted"
    assert await server.unmute("alice", room="dev")
    assert not await server.unmute("alice", room="dev")
    await server.op("dev", "bob")
    await server.ban(address="10.0.0.0/8", room="dev")
    assert await server.unban(address="10.0.0.0/8", room="dev")
    with pytest.raises(ValueError, match="a name or an address"):
        await server.ban()
    with pytest.raises(ValueError, match="positive"):
        await server.mute("bob", duration=0)
    assert not server.kick("ghost")


async def test_line_mode_users_read_what_happened(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    root = await login(open_raw, server.port, "root")
    bob = await open_raw(server.port)
    await bob.send_line("bob")
    await root.expect("joined", name="bob")
    await root.send_json(type="mute", name="bob", room="lobby", reason="shh", ref=1)
    await root.expect("moderated", ref=1)
    assert await bob.receive_line() == "root muted bob in lobby: shh."
    await bob.send_line("can I talk?")
    assert await bob.receive_line() == "error (muted): you are muted in lobby: shh"
    await root.send_json(type="kick", name="bob", room="lobby", ref=2)
    await root.expect("moderated", ref=2)
    assert await bob.receive_line() == "root kicked bob from lobby."


# --- topics and modes -----------------------------------------------------------


async def test_a_topic_is_set_by_operators_and_shown_on_join(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await in_dev(open_raw, server.port, "alice", "bob")
    await bob.send_json(type="topic", room="dev", text="bob's topic", ref=1)
    assert (await bob.expect("error", ref=1))["code"] == "forbidden"
    await alice.send_json(type="topic", room="dev", text="Release on Friday", ref=2)
    assert await alice.expect("topic", ref=2) == {
        "type": "topic",
        "room": "dev",
        "text": "Release on Friday",
        "by": "alice",
        "ref": 2,
    }
    await bob.expect("topic", text="Release on Friday", by="alice")
    carol = await login(open_raw, server.port, "carol")
    await joined(carol, "dev", "carol")
    topic = await carol.expect("topic", room="dev")
    assert topic["text"] == "Release on Friday"
    await carol.send_json(type="topic", room="dev", ref=3)  # anyone may ask
    assert (await carol.expect("topic", ref=3))["text"] == "Release on Friday"


async def test_an_invite_only_room_lets_in_the_invited_once(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await login(open_raw, server.port, "bob")
    await joined(alice, "dev", "alice")
    await alice.send_json(type="mode", room="dev", invite_only=True, ref=1)
    modes = await alice.expect("modes", ref=1)
    assert (modes["invite_only"], modes["by"]) == (True, "alice")
    await bob.send_json(type="join", room="dev", ref=2)
    error = await bob.expect("error", ref=2)
    assert error["code"] == "forbidden" and "invite-only" in error["message"]
    await alice.send_json(type="invite", room="dev", name="bob", ref=3)
    await alice.expect("moderated", action="invite", ref=3)
    await bob.expect("moderated", action="invite", room="dev", by="alice")
    await joined(bob, "dev", "bob")
    await bob.send_json(type="leave", room="dev")
    await bob.expect("left", room="dev", name="bob")
    await bob.send_json(type="join", room="dev", ref=4)  # the invite is used up
    assert (await bob.expect("error", ref=4))["code"] == "forbidden"


async def test_a_moderated_room_hears_operators_and_the_voiced(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await in_dev(open_raw, server.port, "alice", "bob")
    await alice.send_json(type="mode", room="dev", moderated=True, ref=1)
    await alice.expect("modes", ref=1)
    await bob.expect("modes", moderated=True)
    await bob.send_json(type="say", room="dev", text="hi", ref=2)
    error = await bob.expect("error", ref=2)
    assert error["code"] == "muted" and "moderated" in error["message"]
    await alice.send_json(type="say", room="dev", text="ops speak", ref=3)
    await alice.expect("message", text="ops speak", ref=3)
    await alice.send_json(type="voice", room="dev", name="bob", ref=4)
    await alice.expect("moderated", action="voice", ref=4)
    await bob.send_json(type="say", room="dev", text="voiced now", ref=5)
    await bob.expect("message", text="voiced now", ref=5)
    await alice.send_json(type="devoice", room="dev", name="bob", ref=6)
    await alice.expect("moderated", action="devoice", ref=6)
    await bob.send_json(type="say", room="dev", text="again?", ref=7)
    assert (await bob.expect("error", ref=7))["code"] == "muted"


async def test_a_secret_room_is_not_listed_to_strangers(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await login(open_raw, server.port, "bob")
    await joined(alice, "dev", "alice")
    await alice.send_json(type="mode", room="dev", secret=True, ref=1)
    await alice.expect("modes", ref=1)
    await bob.send_json(type="rooms", ref=2)
    names = [room["name"] for room in (await bob.expect("rooms", ref=2))["rooms"]]
    assert names == ["lobby"]
    await bob.send_json(type="who", room="dev", ref=3)
    assert (await bob.expect("error", ref=3))["code"] == "not_in_room"
    await alice.send_json(type="rooms", ref=4)
    names = [room["name"] for room in (await alice.expect("rooms", ref=4))["rooms"]]
    assert names == ["dev", "lobby"]


async def test_a_member_limit_fills_a_room(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await login(open_raw, server.port, "bob")
    carol = await login(open_raw, server.port, "carol")
    await joined(alice, "dev", "alice")
    await alice.send_json(type="mode", room="dev", limit=2, ref=1)
    assert (await alice.expect("modes", ref=1))["limit"] == 2
    await joined(bob, "dev", "bob")
    await carol.send_json(type="join", room="dev", ref=2)
    assert (await carol.expect("error", ref=2))["code"] == "room_full"
    await alice.send_json(type="mode", room="dev", limit=0, ref=3)
    await alice.expect("modes", ref=3)
    await joined(carol, "dev", "carol")


async def test_slow_mode_allows_one_message_per_interval(
    mock_clock: trio.testing.MockClock, open_raw: OpenRaw
) -> None:
    mock_clock.rate = 1
    async with chatkit.open_server() as server:
        alice, bob = await in_dev(open_raw, server.port, "alice", "bob")
        await alice.send_json(type="mode", room="dev", slow=30, ref=1)
        await alice.expect("modes", ref=1)
        await bob.send_json(type="say", room="dev", text="one", ref=2)
        await bob.expect("message", text="one", ref=2)
        await bob.send_json(type="say", room="dev", text="two", ref=3)
        error = await bob.expect("error", ref=3)
        assert error["code"] == "rate_limited" and "slow mode" in error["message"]
        await alice.send_json(type="say", room="dev", text="ops are not slowed", ref=4)
        await alice.expect("message", ref=4)
        await alice.send_json(type="say", room="dev", text="twice", ref=5)
        await alice.expect("message", ref=5)
        mock_clock.jump(31)
        await bob.send_json(type="say", room="dev", text="three", ref=6)
        await bob.expect("message", text="three", ref=6)


async def test_topics_and_modes_survive_a_restart(
    tmp_path: Path, open_raw: OpenRaw
) -> None:
    db = tmp_path / "chat.db"
    async with chatkit.open_server(history=chatkit.SqliteHistory(db)) as server:
        alice = await login(open_raw, server.port, "alice")
        await joined(alice, "dev", "alice")
        await alice.send_json(type="topic", room="dev", text="kept", ref=1)
        await alice.expect("topic", ref=1)
        await alice.send_json(type="mode", room="dev", moderated=True, slow=5, ref=2)
        await alice.expect("modes", ref=2)
    async with chatkit.open_server(history=chatkit.SqliteHistory(db)) as server:
        bob = await login(open_raw, server.port, "bob")
        await joined(bob, "dev", "bob")
        assert (await bob.expect("topic", room="dev"))["text"] == "kept"
        await bob.send_json(type="mode", room="dev", ref=3)
        modes = await bob.expect("modes", ref=3)
        assert (modes["moderated"], modes["slow"], modes["secret"]) == (True, 5, False)
        await bob.send_json(type="mode", room="dev", moderated=False, ref=4)
        assert (await bob.expect("error", ref=4))["code"] == "forbidden"


async def test_a_room_ban_by_address_tells_those_it_puts_out_by_name(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    root = await login(open_raw, server.port, "root")
    await joined(root, "dev", "root")
    eve = RawClient(await connect_from(server.port, "127.1.4.4"))
    try:
        await eve.hello("eve")
        await joined(eve, "dev", "eve")
        await root.send_json(type="ban", room="dev", address="127.1.0.0/16", ref=1)
        await root.expect("moderated", ref=1)
        told = await eve.expect("moderated", action="ban")
        assert (told["name"], told["room"]) == ("eve", "dev")
        assert "address" not in told
        await root.expect("left", room="dev", name="eve")
    finally:
        await eve.aclose()


async def test_an_owner_hands_the_room_over(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await in_dev(open_raw, server.port, "alice", "bob")
    await bob.send_json(type="owner", room="dev", name="bob", ref=1)
    assert (await bob.expect("error", ref=1))["code"] == "forbidden"
    await alice.send_json(type="owner", room="dev", name="bob", ref=2)
    await alice.expect("moderated", action="owner", name="bob", ref=2)
    await bob.expect("moderated", action="owner", name="bob", by="alice")
    await bob.send_json(type="bans", room="dev", ref=3)
    assert (await bob.expect("bans", ref=3))["operators"] == ["bob"]
    await alice.send_json(type="topic", room="dev", text="mine?", ref=4)
    assert (await alice.expect("error", ref=4))["code"] == "forbidden"
    await bob.send_json(type="op", room="dev", name="alice", ref=5)
    await bob.expect("moderated", action="op", ref=5)


async def test_the_python_api_sets_topics_modes_and_owners(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await login(open_raw, server.port, "bob")
    await joined(alice, "dev", "alice")
    await server.set_topic("dev", "from the program")
    topic = await alice.expect("topic", text="from the program")
    assert topic["by"] == chatkit.SERVER_SENDER
    await server.set_modes("dev", invite_only=True, slow=10)
    modes = await alice.expect("modes")
    assert (modes["invite_only"], modes["slow"], modes["moderated"]) == (
        True,
        10,
        False,
    )
    await bob.send_json(type="join", room="dev", ref=1)
    assert (await bob.expect("error", ref=1))["code"] == "forbidden"
    await server.invite("dev", "bob")
    await bob.expect("moderated", action="invite", room="dev")
    await joined(bob, "dev", "bob")
    await server.owner("dev", "bob")
    await alice.expect("moderated", action="owner", name="bob")
    await bob.send_json(type="bans", room="dev", ref=2)
    assert (await bob.expect("bans", ref=2))["operators"] == ["bob"]
    with pytest.raises(ValueError, match="slow"):
        await server.set_modes("dev", slow=-1)


async def test_an_address_ban_and_a_room_ban_end_when_they_expire(
    mock_clock: trio.testing.MockClock, open_raw: OpenRaw
) -> None:
    mock_clock.rate = 1  # real time, and jumps
    async with chatkit.open_server(operators=["root"]) as server:
        root = await login(open_raw, server.port, "root")
        bob = await login(open_raw, server.port, "bob")
        await root.send_json(type="ban", address="127.1.0.0/16", duration=60, ref=1)
        await root.expect("moderated", action="ban", ref=1)
        await root.send_json(type="ban", name="bob", room="dev", duration=600, ref=2)
        await root.expect("moderated", action="ban", ref=2)

        async def hello_from(source: str) -> RawClient:
            client = RawClient(await connect_from(server.port, source))
            await client.send_json(type="hello", name="eve", protocol=1)
            return client

        eve = await hello_from("127.1.2.3")
        try:
            assert (await eve.expect("error"))["code"] == "banned"
        finally:
            await eve.aclose()
        await bob.send_json(type="join", room="dev", ref=3)
        assert (await bob.expect("error", ref=3))["code"] == "banned"
        mock_clock.jump(61)  # the address ban is over, not the room ban
        eve = await hello_from("127.1.2.3")
        try:
            await eve.expect("welcome")
        finally:
            await eve.aclose()
        await bob.send_json(type="join", room="dev", ref=4)
        assert (await bob.expect("error", ref=4))["code"] == "banned"
        mock_clock.jump(540)
        await bob.send_json(type="join", room="dev", ref=5)
        await bob.expect("joined", room="dev", name="bob", ref=5)
