"""ChatServer in JSON mode, spoken by hand over real loopback sockets.

Every protocol v1 message type and every error code that applies without a
plugin. Each test checks exact frames with ``receive_json`` where the order
is defined, and ``assert_silent`` where nothing may arrive.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import chatkit
from tests.conftest import OpenRaw, crowd, login
from tests.helpers import RawClient

MESSAGE_KEYS = {"type", "id", "ts", "room", "from", "text"}


@pytest.fixture
async def small_server() -> AsyncIterator[chatkit.ChatServer]:
    """A server with a tiny history ring and a tiny line limit."""
    async with chatkit.open_server(
        history=chatkit.MemoryHistory(3),
        limits=chatkit.Limits(max_line_length=100),
    ) as server:
        yield server


def without(event: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in keys}


async def join(client: RawClient, room: str, name: str) -> None:
    await client.send_json(type="join", room=room)
    assert await client.receive_json() == {"type": "joined", "room": room, "name": name}


# --- hello / welcome ---------------------------------------------------------


async def test_hello_gets_welcome_then_own_join_notice(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    await alice.assert_silent()
    assert server.rooms == {"lobby": ("alice",)}
    assert [u.name for u in server.users] == ["alice"]


async def test_welcome_echoes_ref_and_server_name(open_raw: OpenRaw) -> None:
    async with chatkit.open_server(server_name="test-server") as server:
        alice = await open_raw(server.port)
        await alice.send_json(type="hello", name="alice", protocol=1, ref="h1")
        welcome = await alice.receive_json()
        assert isinstance(welcome.pop("resume"), str)
        assert welcome == {
            "type": "welcome",
            "name": "alice",
            "protocol": 1,
            "server": "test-server",
            "rooms": ["lobby"],
            "ref": "h1",
        }
        assert await alice.receive_json() == {
            "type": "joined",
            "room": "lobby",
            "name": "alice",
        }


async def test_others_are_told_of_a_join(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await login(open_raw, server.port, "bob")
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "lobby",
        "name": "bob",
    }
    await alice.assert_silent()
    await bob.assert_silent()


async def test_names_are_unique_case_insensitively_and_retry_works(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    (alice,) = await crowd(open_raw, server.port, "Alice")
    other = await open_raw(server.port)
    await other.send_json(type="hello", name="aLICE", protocol=1, ref=1)
    error = await other.receive_json()
    assert without(error, "message") == {
        "type": "error",
        "code": "name_taken",
        "ref": 1,
    }
    assert isinstance(error["message"], str)
    assert error["message"]
    await other.send_json(type="hello", name="no spaces", protocol=1, ref=2)
    error = await other.receive_json()
    assert without(error, "message") == {"type": "error", "code": "bad_name", "ref": 2}
    # Still not logged in: requests are refused.
    await other.send_json(type="ping", ref=3)
    error = await other.receive_json()
    assert without(error, "message") == {"type": "error", "code": "not_ready", "ref": 3}
    await alice.assert_silent()
    # Retrying with a good name on the same connection works.
    await other.send_json(type="hello", name="Alice2", protocol=1)
    assert (await other.receive_json())["type"] == "welcome"
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "lobby",
        "name": "Alice2",
    }
    assert server.rooms == {"lobby": ("Alice", "Alice2")}


@pytest.mark.parametrize(
    "name",
    ["", "a" * 33, "has space", "star*", "ünïcode", "new\nline", "semi;colon"],
)
async def test_hello_with_an_invalid_name_is_bad_name(
    server: chatkit.ChatServer, open_raw: OpenRaw, name: str
) -> None:
    client = await open_raw(server.port)
    await client.send_json(type="hello", name=name, protocol=1, ref="x")
    error = await client.receive_json()
    assert without(error, "message") == {
        "type": "error",
        "code": "bad_name",
        "ref": "x",
    }
    assert server.users == ()


async def test_every_allowed_name_character_is_accepted(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    name = "Az09_.-" + "x" * 25  # 32 characters, every class of the alphabet
    assert len(name) == 32
    await login(open_raw, server.port, name)


async def test_anything_before_hello_is_not_ready(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    client = await open_raw(server.port)
    for request in (
        {"type": "say", "text": "hi", "ref": 1},
        {"type": "ping", "ref": "p"},
        {"type": "who"},
        {"type": "bye"},
    ):
        await client.send_json(**request)
        error = await client.receive_json()
        assert error["type"] == "error"
        assert error["code"] == "not_ready"
        assert error.get("ref") == request.get("ref")
    # The connection is still usable (even bye before hello did not close it).
    await login_on(client, "alice")


async def login_on(client: RawClient, name: str) -> None:
    await client.send_json(type="hello", name=name, protocol=1)
    assert (await client.receive_json())["type"] == "welcome"
    assert await client.receive_json() == {
        "type": "joined",
        "room": "lobby",
        "name": name,
    }


async def test_second_hello_and_wrong_protocol_are_bad_request(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    client = await open_raw(server.port)
    await client.send_json(type="hello", name="alice", protocol=2, ref="v2")
    error = await client.receive_json()
    assert without(error, "message") == {
        "type": "error",
        "code": "bad_request",
        "ref": "v2",
    }
    await login_on(client, "alice")
    await client.send_json(type="hello", name="alice2", protocol=1, ref="again")
    error = await client.receive_json()
    assert without(error, "message") == {
        "type": "error",
        "code": "bad_request",
        "ref": "again",
    }
    assert [u.name for u in server.users] == ["alice"]


# --- say -------------------------------------------------------------------


async def test_say_sender_gets_ref_others_do_not(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
    before = time.time()
    await alice.send_json(type="say", text="hello, world", ref="r1")
    own = await alice.receive_json()
    assert set(own) == MESSAGE_KEYS | {"ref"}
    assert own["ref"] == "r1"
    assert isinstance(own["id"], int)
    assert isinstance(own["ts"], float)
    assert before - 1 <= own["ts"] <= time.time() + 1
    for other in (bob, carol):
        copy = await other.receive_json()
        assert copy == without(own, "ref")
        assert copy["from"] == "alice"
        assert copy["room"] == "lobby"
        assert copy["text"] == "hello, world"

    # Ids increase; a say without ref gets an ack without ref.
    await bob.send_json(type="say", text="second", room="lobby")
    own2 = await bob.receive_json()
    assert set(own2) == MESSAGE_KEYS
    assert own2["id"] > own["id"]
    assert own2["ts"] >= own["ts"]
    assert await alice.receive_json() == own2
    assert await carol.receive_json() == own2
    for client in (alice, bob, carol):
        await client.assert_silent()


async def test_message_ids_increase_across_senders_rooms_and_dms(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await join(alice, "dev", "alice")
    ids = []
    for request in (
        {"type": "say", "text": "1"},
        {"type": "say", "text": "2", "room": "dev"},
        {"type": "dm", "to": "bob", "text": "3"},
        {"type": "say", "text": "4"},
    ):
        await alice.send_json(**request)
        ids.append((await alice.receive_json())["id"])
    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    received = [await bob.receive_json() for _ in range(3)]
    assert [e["text"] for e in received] == ["1", "3", "4"]
    assert [e["id"] for e in received] == [ids[0], ids[2], ids[3]]


async def test_text_is_delivered_verbatim(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    text = 'multi\nline "quoted" \\ tab\t nul\x00 ünïcödé 🎉 \u2028'
    await alice.send_json(type="say", text=text)
    assert (await alice.receive_json())["text"] == text
    assert (await bob.receive_json())["text"] == text
    await alice.send_json(type="say", text="")
    assert (await bob.receive_json())["text"] == ""


async def test_say_to_a_room_you_are_not_in_is_not_in_room(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await join(bob, "dev", "bob")
    for room in ("dev", "nowhere"):
        await alice.send_json(type="say", text="psst", room=room, ref=f"s-{room}")
        error = await alice.receive_json()
        assert without(error, "message") == {
            "type": "error",
            "code": "not_in_room",
            "ref": f"s-{room}",
        }
        assert room in error["message"]
    await bob.assert_silent()
    await alice.assert_silent()


async def test_say_in_a_room_reaches_only_its_members(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
    await join(alice, "dev", "alice")
    await join(bob, "dev", "bob")
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "dev",
        "name": "bob",
    }
    await alice.send_json(type="say", text="dev only", room="dev", ref=5)
    own = await alice.receive_json()
    assert own["room"] == "dev"
    assert own["ref"] == 5
    assert await bob.receive_json() == without(own, "ref")
    await carol.assert_silent()


# --- dm --------------------------------------------------------------------


async def test_dm_goes_to_recipient_and_sender_only(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
    await alice.send_json(type="dm", to="BOB", text="secret", ref="d1")
    own = await alice.receive_json()
    assert set(own) == {"type", "id", "ts", "from", "to", "text", "ref"}
    assert own["type"] == "dm"
    assert own["from"] == "alice"
    assert own["to"] == "bob"  # the recipient's real name, not as typed
    assert own["text"] == "secret"
    assert own["ref"] == "d1"
    assert isinstance(own["id"], int)
    assert isinstance(own["ts"], float)
    assert await bob.receive_json() == without(own, "ref")
    await carol.assert_silent()
    await bob.assert_silent()
    await alice.assert_silent()


async def test_dm_to_nobody_is_no_such_user(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await alice.send_json(type="dm", to="zed", text="hello?", ref=9)
    error = await alice.receive_json()
    assert without(error, "message") == {
        "type": "error",
        "code": "no_such_user",
        "ref": 9,
    }
    await bob.assert_silent()


async def test_dm_to_self_arrives_once(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    (alice,) = await crowd(open_raw, server.port, "alice")
    await alice.send_json(type="dm", to="alice", text="note to self", ref="me")
    own = await alice.receive_json()
    assert without(own, "id", "ts") == {
        "type": "dm",
        "from": "alice",
        "to": "alice",
        "text": "note to self",
        "ref": "me",
    }
    await alice.assert_silent()


# --- join / leave ----------------------------------------------------------


async def test_join_creates_a_room_and_notifies_its_members(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
    await alice.send_json(type="join", room="dev", ref="j1")
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "dev",
        "name": "alice",
        "ref": "j1",
    }
    assert server.rooms["dev"] == ("alice",)
    await bob.assert_silent()  # not in dev
    await bob.send_json(type="join", room="dev", ref="j2")
    assert await bob.receive_json() == {
        "type": "joined",
        "room": "dev",
        "name": "bob",
        "ref": "j2",
    }
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "dev",
        "name": "bob",
    }
    await carol.assert_silent()
    assert server.rooms["dev"] == ("alice", "bob")


async def test_joining_twice_acks_without_a_second_notice(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await join(alice, "dev", "alice")
    await join(bob, "dev", "bob")
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "dev",
        "name": "bob",
    }
    for room in ("dev", "lobby"):
        await bob.send_json(type="join", room=room, ref="again")
        assert await bob.receive_json() == {
            "type": "joined",
            "room": room,
            "name": "bob",
            "ref": "again",
        }
    await alice.assert_silent()
    assert server.rooms == {"lobby": ("alice", "bob"), "dev": ("alice", "bob")}


@pytest.mark.parametrize("room", ["", "x" * 65, "with space", "#hash", "ünï", "a/b"])
async def test_join_with_an_invalid_room_name_is_bad_name(
    server: chatkit.ChatServer, open_raw: OpenRaw, room: str
) -> None:
    (alice,) = await crowd(open_raw, server.port, "alice")
    await alice.send_json(type="join", room=room, ref="bad")
    error = await alice.receive_json()
    assert without(error, "message") == {
        "type": "error",
        "code": "bad_name",
        "ref": "bad",
    }
    assert list(server.rooms) == ["lobby"]


async def test_room_names_up_to_64_characters_are_accepted(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    (alice,) = await crowd(open_raw, server.port, "alice")
    room = "R" * 64
    await join(alice, room, "alice")
    assert server.rooms[room] == ("alice",)


async def test_leave_tells_the_room_and_the_leaver(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
    await join(alice, "dev", "alice")
    await join(bob, "dev", "bob")
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "dev",
        "name": "bob",
    }
    await bob.send_json(type="leave", room="dev", ref="l1")
    assert await bob.receive_json() == {
        "type": "left",
        "room": "dev",
        "name": "bob",
        "reason": "leave",
        "ref": "l1",
    }
    assert await alice.receive_json() == {
        "type": "left",
        "room": "dev",
        "name": "bob",
        "reason": "leave",
    }
    await carol.assert_silent()
    # Bob no longer gets dev's messages, but still gets lobby's.
    await alice.send_json(type="say", text="dev", room="dev")
    await alice.send_json(type="say", text="lobby")
    assert (await bob.receive_json())["text"] == "lobby"


async def test_leave_a_room_you_are_not_in_is_not_in_room(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await join(bob, "dev", "bob")
    for room in ("dev", "nowhere"):
        await alice.send_json(type="leave", room=room, ref=room)
        error = await alice.receive_json()
        assert without(error, "message") == {
            "type": "error",
            "code": "not_in_room",
            "ref": room,
        }
    await bob.assert_silent()
    assert server.rooms["dev"] == ("bob",)


async def test_an_emptied_room_disappears_but_lobby_stays(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await join(alice, "dev", "alice")
    await alice.send_json(type="say", text="old", room="dev")
    await alice.receive_json()
    await alice.send_json(type="rooms")
    assert await alice.receive_json() == {
        "type": "rooms",
        "rooms": [{"name": "dev", "members": 1}, {"name": "lobby", "members": 2}],
    }
    await alice.send_json(type="leave", room="dev")
    assert (await alice.receive_json())["type"] == "left"
    await alice.send_json(type="leave", room="lobby")
    assert (await alice.receive_json())["type"] == "left"
    assert await bob.receive_json() == {
        "type": "left",
        "room": "lobby",
        "name": "alice",
        "reason": "leave",
    }
    await bob.send_json(type="leave", room="lobby")
    assert (await bob.receive_json())["type"] == "left"
    await alice.send_json(type="rooms", ref="r")
    assert await alice.receive_json() == {
        "type": "rooms",
        "rooms": [{"name": "lobby", "members": 0}],
        "ref": "r",
    }
    # History belongs to the room's name, not to its members: a recreated
    # room still has what was said in it (the store keeps it).
    await join(alice, "dev", "alice")
    await alice.send_json(type="history", room="dev")
    reply = await alice.receive_json()
    assert [m["text"] for m in reply["messages"]] == ["old"]


# --- nick ------------------------------------------------------------------


async def test_nick_tells_everyone_sharing_a_room_once(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
    # bob shares two rooms with alice, carol none.
    await join(alice, "dev", "alice")
    await join(bob, "dev", "bob")
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "dev",
        "name": "bob",
    }
    await carol.send_json(type="leave", room="lobby")
    assert (await carol.receive_json())["type"] == "left"
    for client in (alice, bob):
        assert (await client.receive_json())["type"] == "left"

    await alice.send_json(type="nick", name="alicia", ref="n1")
    assert await alice.receive_json() == {
        "type": "renamed",
        "old": "alice",
        "new": "alicia",
        "ref": "n1",
    }
    assert await bob.receive_json() == {
        "type": "renamed",
        "old": "alice",
        "new": "alicia",
    }
    await bob.assert_silent()
    await carol.assert_silent()
    assert server.get_user("alicia") is not None
    assert server.get_user("alice") is None
    assert server.rooms["dev"] == ("alicia", "bob")

    # Later messages carry the new name; the old one is free.
    await alice.send_json(type="say", text="hi")
    assert (await bob.receive_json())["from"] == "alicia"
    await login(open_raw, server.port, "alice")


async def test_nick_to_a_taken_name_is_name_taken_case_insensitively(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await bob.send_json(type="nick", name="ALICE", ref=1)
    error = await bob.receive_json()
    assert without(error, "message") == {
        "type": "error",
        "code": "name_taken",
        "ref": 1,
    }
    await bob.send_json(type="nick", name="bad name!", ref=2)
    error = await bob.receive_json()
    assert without(error, "message") == {"type": "error", "code": "bad_name", "ref": 2}
    await alice.assert_silent()
    assert [u.name for u in server.users] == ["alice", "bob"]


async def test_nick_changing_only_the_case_of_your_own_name_is_allowed(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await alice.send_json(type="nick", name="Alice", ref="case")
    assert await alice.receive_json() == {
        "type": "renamed",
        "old": "alice",
        "new": "Alice",
        "ref": "case",
    }
    assert await bob.receive_json() == {
        "type": "renamed",
        "old": "alice",
        "new": "Alice",
    }
    assert [u.name for u in server.users] == ["Alice", "bob"]
    # Still unique: nobody else can take "ALICE".
    other = await open_raw(server.port)
    await other.send_json(type="hello", name="ALICE", protocol=1)
    assert (await other.receive_json())["code"] == "name_taken"


# --- who / rooms -----------------------------------------------------------


async def test_who_lists_members_in_join_order(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
    await alice.send_json(type="who")
    assert await alice.receive_json() == {
        "type": "who",
        "room": "lobby",
        "names": ["alice", "bob", "carol"],
    }
    await join(carol, "dev", "carol")
    await join(alice, "dev", "alice")
    assert (await carol.receive_json())["type"] == "joined"
    # Any room may be asked about, even one you are not in.
    await bob.send_json(type="who", room="dev", ref="w")
    assert await bob.receive_json() == {
        "type": "who",
        "room": "dev",
        "names": ["carol", "alice"],
        "ref": "w",
    }
    await bob.send_json(type="who", room="nowhere")
    assert await bob.receive_json() == {"type": "who", "room": "nowhere", "names": []}


async def test_rooms_are_sorted_with_member_counts(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await join(alice, "zeta", "alice")
    await join(alice, "alpha", "alice")
    await join(bob, "alpha", "bob")
    assert (await alice.receive_json())["type"] == "joined"
    await join(bob, "m", "bob")
    await bob.send_json(type="rooms", ref=3)
    assert await bob.receive_json() == {
        "type": "rooms",
        "rooms": [
            {"name": "alpha", "members": 2},
            {"name": "lobby", "members": 2},
            {"name": "m", "members": 1},
            {"name": "zeta", "members": 1},
        ],
        "ref": 3,
    }


# --- history ---------------------------------------------------------------


async def say_many(
    client: RawClient, texts: list[str], room: str = "lobby"
) -> list[dict[str, Any]]:
    """Say each text and return the acks without their ref."""
    acks = []
    for text in texts:
        await client.send_json(type="say", text=text, room=room, ref=text)
        ack = await client.receive_json()
        assert ack["ref"] == text
        acks.append(without(ack, "ref"))
    return acks


async def history(client: RawClient, room: str, **fields: Any) -> list[dict[str, Any]]:
    await client.send_json(type="history", room=room, ref="h", **fields)
    reply = await client.receive_json()
    assert set(reply) == {"type", "room", "messages", "ref"}
    assert reply["type"] == "history"
    assert reply["room"] == room
    assert reply["ref"] == "h"
    messages: list[dict[str, Any]] = reply["messages"]
    return messages


async def test_history_oldest_first_with_limit_before_after(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    assert await history(alice, "lobby") == []
    sent = await say_many(alice, ["m1", "m2"])
    assert [await bob.receive_json() for _ in range(2)] == sent
    sent += await say_many(bob, ["m3", "m4", "m5"])
    assert [await alice.receive_json() for _ in range(3)] == sent[2:]
    await join(alice, "dev", "alice")
    await say_many(alice, ["elsewhere"], room="dev")  # another room's history

    assert await history(bob, "lobby") == sent
    assert await history(bob, "lobby", limit=2) == sent[3:]
    assert await history(bob, "lobby", limit=5) == sent
    assert await history(bob, "lobby", limit=50) == sent
    assert await history(bob, "lobby", limit=0) == []
    ids = [m["id"] for m in sent]
    assert await history(bob, "lobby", before=ids[2]) == sent[:2]
    assert await history(bob, "lobby", after=ids[2]) == sent[3:]
    assert await history(bob, "lobby", after=ids[0], before=ids[4]) == sent[1:4]
    assert await history(bob, "lobby", before=ids[4], limit=2) == sent[2:4]
    assert await history(bob, "lobby", after=ids[4]) == []
    # With ``after``, a page is the oldest after it: a client catching up
    # asks again after the last id it got, until a page comes back empty.
    assert await history(bob, "lobby", after=ids[0], limit=2) == sent[1:3]
    assert await history(bob, "lobby", after=ids[2], limit=2) == sent[3:5]
    assert [m["text"] for m in await history(alice, "dev")] == ["elsewhere"]


async def test_a_history_page_of_long_messages_is_cut_to_fit(
    open_raw: OpenRaw,
) -> None:
    # Default bounds: 100 messages of 4096 emoji (16 KiB each) would be a
    # 1.6 MiB reply, more than the asker's 1 MiB buffer. The page is cut
    # (newest kept; oldest with after), and paging by id gets everything.
    store = chatkit.MemoryHistory()
    async with chatkit.open_server(history=store) as server:
        (bob,) = await crowd(open_raw, server.port, "bob")
        texts = [f"{i:03d}" + "\U0001f600" * 4093 for i in range(100)]
        for text in texts:
            await server.post("lobby", text)
            await bob.expect("message", text=text)
        newest = await history(bob, "lobby")
        assert 10 < len(newest) < 100
        assert [m["text"] for m in newest] == texts[-len(newest) :]
        pages = [newest]
        while older := await history(bob, "lobby", before=pages[0][0]["id"]):
            pages.insert(0, older)
        assert [m["text"] for page in pages for m in page] == texts
        oldest = await history(bob, "lobby", after=0)
        assert [m["text"] for m in oldest] == texts[: len(oldest)]
    # A budget (half of 40,000) that holds one message of the page, and one
    # (half of 30,000) that holds none: a page still has one.
    for bound in (40_000, 30_000):
        limits = chatkit.Limits(max_queued_bytes=bound)
        async with chatkit.open_server(history=store, limits=limits) as small:
            (carol,) = await crowd(open_raw, small.port, "carol")
            assert [m["text"] for m in await history(carol, "lobby")] == texts[-1:]
            oldest = await history(carol, "lobby", after=0)
            assert [m["text"] for m in oldest] == texts[:1]


async def test_history_is_a_ring_bounded_by_history_size(
    small_server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    (alice,) = await crowd(open_raw, small_server.port, "alice")
    sent = await say_many(alice, ["1", "2", "3", "4", "5"])
    assert await history(alice, "lobby") == sent[2:]
    assert await history(alice, "lobby", limit=2) == sent[3:]
    assert await history(alice, "lobby", limit=10) == sent[2:]


async def test_history_of_a_room_you_are_not_in_is_not_in_room(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await join(bob, "dev", "bob")
    await say_many(bob, ["private"], room="dev")
    for room in ("dev", "nowhere"):
        await alice.send_json(type="history", room=room, ref=room)
        error = await alice.receive_json()
        assert without(error, "message") == {
            "type": "error",
            "code": "not_in_room",
            "ref": room,
        }


async def test_history_with_a_negative_limit_is_bad_request(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    (alice,) = await crowd(open_raw, server.port, "alice")
    await alice.send_json(type="history", room="lobby", limit=-1, ref="neg")
    error = await alice.receive_json()
    assert without(error, "message") == {
        "type": "error",
        "code": "bad_request",
        "ref": "neg",
    }


# --- ping / bye / disconnect -------------------------------------------------


async def test_ping_gets_pong_with_its_ref(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    (alice,) = await crowd(open_raw, server.port, "alice")
    await alice.send_json(type="ping", ref=42)
    assert await alice.receive_json() == {"type": "pong", "ref": 42}
    await alice.send_json(type="ping", ref="str")
    assert await alice.receive_json() == {"type": "pong", "ref": "str"}
    await alice.send_json(type="ping")
    assert await alice.receive_json() == {"type": "pong"}


async def test_bye_tells_every_room_and_closes(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await join(alice, "dev", "alice")
    await join(bob, "dev", "bob")
    assert (await alice.receive_json())["type"] == "joined"
    await bob.send_json(type="bye")
    assert await bob.assert_closed() == []
    left = [await alice.receive_json() for _ in range(2)]
    assert sorted(left, key=lambda e: e["room"]) == [
        {"type": "left", "room": "dev", "name": "bob", "reason": "bye"},
        {"type": "left", "room": "lobby", "name": "bob", "reason": "bye"},
    ]
    await alice.assert_silent()
    assert server.rooms == {"lobby": ("alice",), "dev": ("alice",)}
    # The name is free again.
    await login(open_raw, server.port, "BOB")


async def test_requests_pipelined_before_bye_are_answered(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await alice.send_bytes(
        b'{"type":"ping","ref":1}\n{"type":"say","text":"last words"}\n'
        b'{"type":"bye"}\n{"type":"ping","ref":2}\n'
    )
    lines = await alice.assert_closed()
    assert [line[:30] for line in lines] == [
        '{"type":"pong","ref":1}',
        '{"type":"message","id":1,"ts":',
    ]
    assert (await bob.receive_json())["text"] == "last words"
    assert await bob.receive_json() == {
        "type": "left",
        "room": "lobby",
        "name": "alice",
        "reason": "bye",
    }


async def test_abrupt_disconnect_is_left_disconnect_and_frees_the_name(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await bob.aclose()
    assert await alice.receive_json() == {
        "type": "left",
        "room": "lobby",
        "name": "bob",
        "reason": "disconnect",
    }
    await login(open_raw, server.port, "bob")
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "lobby",
        "name": "bob",
    }


async def test_connection_reset_is_left_disconnect(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    # SO_LINGER 0: close() sends RST instead of FIN.
    bob.stream.socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    await bob.aclose()
    assert await alice.receive_json() == {
        "type": "left",
        "room": "lobby",
        "name": "bob",
        "reason": "disconnect",
    }
    # The name is freed before the notice goes out.
    assert server.get_user("bob") is None


async def test_disconnect_before_hello_tells_nobody(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    (alice,) = await crowd(open_raw, server.port, "alice")
    stranger = await open_raw(server.port)
    await stranger.send_bytes(b'{"type":"ping"}\n')
    assert (await stranger.receive_json())["code"] == "not_ready"
    await stranger.aclose()
    await alice.assert_silent(0.2)


# --- bad input ---------------------------------------------------------------

GARBAGE = [
    b"{not json",
    b"[1, 2]",
    b'"just a string"',
    b"42",
    b"null",
    b"{}",
    b'{"type": "nope"}',
    b'{"type": 7}',
    b'{"type": "say"}',
    b'{"type": "say", "text": 5}',
    b'{"type": "say", "text": "hi", "room": ["lobby"]}',
    b'{"type": "dm", "text": "no recipient"}',
    b'{"type": "join"}',
    b'{"type": "ping", "ref": [1]}',
    b'{"type": "history", "room": "lobby", "limit": "ten"}',
    b'{"type": "say", "text": "\xff\xfe"}',
    b"\xff\xfe\xfd",
    b"",
]


async def test_garbage_is_bad_request_and_the_connection_survives(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, server.port, "alice", "bob")
    await alice.send_bytes(b"".join(line + b"\n" for line in GARBAGE))
    for line in GARBAGE:
        error = await alice.receive_json()
        assert error["type"] == "error", line
        assert error["code"] == "bad_request", line
        assert isinstance(error["message"], str)
    await alice.send_json(type="ping", ref="alive")
    assert await alice.receive_json() == {"type": "pong", "ref": "alive"}
    await bob.assert_silent()


async def test_bad_request_echoes_a_recoverable_ref(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    (alice,) = await crowd(open_raw, server.port, "alice")
    await alice.send_bytes(b'{"type": "say", "text": 5, "ref": "r9"}\n')
    error = await alice.receive_json()
    assert without(error, "message") == {
        "type": "error",
        "code": "bad_request",
        "ref": "r9",
    }


async def test_garbage_first_line_in_json_mode_then_hello_works(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    client = await open_raw(server.port)
    await client.send_bytes(b"{garbage\n")
    error = await client.receive_json()
    assert error["code"] == "bad_request"
    await login_on(client, "alice")


async def test_a_request_split_across_packets_is_reassembled(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    (alice,) = await crowd(open_raw, server.port, "alice")
    data = b'{"type": "ping", "ref": "split"}\n'
    for i in range(len(data)):
        await alice.send_bytes(data[i : i + 1])
    assert await alice.receive_json() == {"type": "pong", "ref": "split"}


async def test_too_large_line_is_discarded_and_the_connection_survives(
    small_server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice, bob = await crowd(open_raw, small_server.port, "alice", "bob")
    # Exactly at the limit (100 bytes without the newline) is accepted.
    prefix = b'{"type":"say","text":"'
    at_limit = prefix + b"x" * (100 - len(prefix) - 2) + b'"}'
    assert len(at_limit) == 100
    await alice.send_bytes(at_limit + b"\n")
    assert (await bob.receive_json())["text"] == "x" * 76

    over = prefix + b"y" * (101 - len(prefix) - 2) + b'"}'
    assert len(over) == 101
    await alice.send_bytes(over + b"\n")
    await alice.receive_json()  # the ack of the first message
    error = await alice.receive_json()
    assert set(error) == {"type", "code", "message"}
    assert error["code"] == "too_large"
    await bob.assert_silent()

    # Much longer, arriving in pieces: still one error, and nothing leaks.
    await alice.send_bytes(prefix)
    for _ in range(20):
        await alice.send_bytes(b"z" * 1000)
    await alice.send_bytes(b'"}\n{"type":"ping","ref":"after"}\n')
    error = await alice.receive_json()
    assert error["code"] == "too_large"
    assert await alice.receive_json() == {"type": "pong", "ref": "after"}
    await alice.send_json(type="say", text="still here")
    assert (await bob.receive_json())["text"] == "still here"
    await bob.assert_silent()


async def test_too_large_first_line_is_answered_in_json(
    small_server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    client = await open_raw(small_server.port)
    await client.send_bytes(b'{"type":"hello","name":"' + b"a" * 200 + b'"}\n')
    error = await client.receive_json()
    assert error["code"] == "too_large"
    await login_on(client, "alice")
