"""ChatServer in line mode, as ``nc`` or ``telnet`` users see it.

A first line that does not start with ``{`` is the user name; later lines
are messages to ``lobby``; ``exit`` leaves. The server answers in plain
text lines like the original chat program.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import chatkit
from tests.conftest import OpenRaw, line_login, login


async def test_first_line_is_the_name_and_others_see_the_join(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    # No welcome, no own join notice in line mode.
    await bob.assert_silent()
    assert server.rooms == {"lobby": ("alice", "bob")}
    user = server.get_user("bob")
    assert user is not None
    assert user.mode == "line"


async def test_line_user_gets_messages_and_notices_as_text(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    await alice.send_json(type="say", text="hi", ref=1)
    assert await bob.receive_line() == "alice: hi"

    carol = await login(open_raw, server.port, "carol")
    assert await bob.receive_line() == "carol has joined the chat."
    await carol.send_json(type="say", text="hello bob")
    assert await bob.receive_line() == "carol: hello bob"
    await carol.send_json(type="bye")
    assert await bob.receive_line() == "carol has left the chat."
    await bob.assert_silent()


async def test_line_user_does_not_get_its_own_message_back(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    carol = await line_login(open_raw, server.port, "carol", alice)
    assert await bob.receive_line() == "carol has joined the chat."
    await bob.send_line("hello everyone")
    message = await alice.receive_json()
    assert {k: message[k] for k in ("type", "room", "from", "text")} == {
        "type": "message",
        "room": "lobby",
        "from": "bob",
        "text": "hello everyone",
    }
    assert "ref" not in message
    assert await carol.receive_line() == "bob: hello everyone"
    await bob.assert_silent()


async def test_messages_in_other_rooms_do_not_reach_line_users(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    await alice.send_json(type="join", room="dev")
    await alice.expect("joined", room="dev")
    await alice.send_json(type="say", text="dev only", room="dev")
    await alice.send_json(type="say", text="lobby")
    assert await bob.receive_line() == "alice: lobby"


async def test_exit_leaves_and_the_server_closes(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    await bob.send_line("exit")
    assert await bob.assert_closed() == []
    assert await alice.receive_json() == {
        "type": "left",
        "room": "lobby",
        "name": "bob",
        "reason": "exit",
    }
    assert server.get_user("bob") is None
    # Only the exact word exits: the name is free and "exit" inside a
    # sentence is a message.
    bob2 = await line_login(open_raw, server.port, "bob", alice)
    await bob2.send_line("the exit is there")
    assert (await alice.receive_json())["text"] == "the exit is there"


async def test_taken_or_invalid_name_gets_an_error_line_and_another_try(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    client = await open_raw(server.port)
    await client.send_line("ALICE")
    assert await client.receive_line() == "error (name_taken): ALICE is taken"
    await client.send_line("not valid!")
    line = await client.receive_line()
    assert line.startswith("error (bad_name): ")
    await alice.assert_silent()
    await client.send_line("bob")
    assert await alice.receive_json() == {
        "type": "joined",
        "room": "lobby",
        "name": "bob",
    }
    await client.send_line("finally")
    assert (await alice.receive_json())["text"] == "finally"


async def test_blank_lines_before_the_name_are_ignored(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await open_raw(server.port)
    await bob.send_bytes(b"\n\r\n  \nbob\n\nhi\n")
    assert (await alice.receive_json())["name"] == "bob"
    assert (await alice.receive_json())["text"] == "hi"
    await bob.assert_silent()
    await alice.assert_silent()


async def test_telnet_crlf_line_endings(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await open_raw(server.port)
    await bob.send_bytes(b"bob\r\n")
    assert (await alice.receive_json())["name"] == "bob"
    await bob.send_bytes(b"hi there\r\n")
    message = await alice.receive_json()
    assert message["text"] == "hi there"
    assert message["from"] == "bob"
    await alice.send_json(type="say", text="hello")
    assert await bob.receive_line() == "alice: hello"
    assert (await alice.receive_json())["text"] == "hello"
    await bob.send_bytes(b"exit\r\n")
    assert await bob.assert_closed() == []
    assert (await alice.receive_json())["reason"] == "exit"


async def test_json_and_line_users_chat_both_ways(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    for i in range(5):
        await alice.send_json(type="say", text=f"ping {i}")
        assert await bob.receive_line() == f"alice: ping {i}"
        await bob.send_line(f"pong {i}")
        ack = await alice.receive_json()  # her own copy first
        assert (ack["from"], ack["text"]) == ("alice", f"ping {i}")
        reply = await alice.receive_json()
        assert (reply["from"], reply["text"]) == ("bob", f"pong {i}")
        assert reply["id"] > ack["id"]
    # Line users' messages are in the history and they are in who.
    await alice.send_json(type="history", room="lobby", limit=2)
    history = await alice.receive_json()
    assert [(m["from"], m["text"]) for m in history["messages"]] == [
        ("alice", "ping 4"),
        ("bob", "pong 4"),
    ]
    await alice.send_json(type="who")
    assert (await alice.receive_json())["names"] == ["alice", "bob"]


async def test_control_characters_reach_a_line_user_as_one_line(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    await alice.send_json(
        type="say", text="one\ntwo\r\nthree\x1b[31mred\x00nul\x7fdel\ttab"
    )
    await alice.send_json(type="say", text="next")
    assert await bob.receive_line() == "alice: one two  three [31mred nul del\ttab"
    assert await bob.receive_line() == "alice: next"
    # The JSON user got the text untouched.
    assert (await alice.receive_json())["text"] == (
        "one\ntwo\r\nthree\x1b[31mred\x00nul\x7fdel\ttab"
    )


async def test_line_user_text_is_cleaned_for_other_line_users_only(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    carol = await line_login(open_raw, server.port, "carol", alice)
    assert await bob.receive_line() == "carol has joined the chat."
    await bob.send_bytes(b"bell\x07 esc\x1b[2J\n")
    assert (await alice.receive_json())["text"] == "bell\x07 esc\x1b[2J"
    assert await carol.receive_line() == "bob: bell  esc [2J"


async def test_line_user_sees_dms_and_renames(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    await alice.send_json(type="dm", to="bob", text="psst")
    assert await bob.receive_line() == "alice (private): psst"
    await alice.send_json(type="nick", name="alicia")
    assert await bob.receive_line() == "alice is now known as alicia."
    await alice.send_json(type="say", text="new me")
    assert await bob.receive_line() == "alicia: new me"


async def test_invalid_utf8_in_line_mode_is_an_error_line(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    await bob.send_bytes(b"caf\xe9\n")
    assert await bob.receive_line() == "error (bad_request): line is not valid UTF-8"
    await bob.send_line("café")
    assert (await alice.receive_json())["text"] == "café"
    await alice.assert_silent()


@pytest.fixture
async def small_server() -> AsyncIterator[chatkit.ChatServer]:
    async with chatkit.open_server(
        limits=chatkit.Limits(max_line_length=50),
    ) as server:
        yield server


async def test_too_large_line_in_line_mode(
    small_server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, small_server.port, "alice")
    bob = await open_raw(small_server.port)
    # Even the first line: too large, answered in line mode, next try works.
    await bob.send_line("b" * 60)
    assert await bob.receive_line() == "error (too_large): line longer than 50 bytes"
    await bob.send_line("bob")
    assert (await alice.receive_json())["name"] == "bob"
    await bob.send_line("x" * 51)
    assert await bob.receive_line() == "error (too_large): line longer than 50 bytes"
    await bob.send_line("x" * 50)
    assert (await alice.receive_json())["text"] == "x" * 50
    await alice.assert_silent()


async def test_line_user_disconnecting_is_left_disconnect(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await login(open_raw, server.port, "alice")
    bob = await line_login(open_raw, server.port, "bob", alice)
    await bob.aclose()
    assert await alice.receive_json() == {
        "type": "left",
        "room": "lobby",
        "name": "bob",
        "reason": "disconnect",
    }
    await line_login(open_raw, server.port, "bob", alice)


async def test_line_mode_is_chosen_per_connection(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    bob = await open_raw(server.port)
    await bob.send_line("bob")
    carol = await line_login(open_raw, server.port, "carol")
    assert await bob.receive_line() == "carol has joined the chat."
    # A later line starting with "{" is just text in line mode.
    await carol.send_line('{"type": "ping"}')
    assert await bob.receive_line() == 'carol: {"type": "ping"}'
    await carol.assert_silent()


async def test_a_user_leaving_lobby_but_not_the_chat_is_told_apart(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    # Only a user who leaves the server has "left the chat" (the original
    # program's words); one who leaves lobby with a leave request is still
    # connected.
    bob = await line_login(open_raw, server.port, "bob")
    alice = await login(open_raw, server.port, "alice")
    assert await bob.receive_line() == "alice has joined the chat."
    await alice.send_json(type="leave", room="lobby")
    assert await bob.receive_line() == "alice has left lobby."
    await alice.send_json(type="join", room="lobby")
    assert await bob.receive_line() == "alice has joined the chat."
    await alice.aclose()  # disconnected, as the original program's users did
    assert await bob.receive_line() == "alice has left the chat."
    await bob.assert_silent()
