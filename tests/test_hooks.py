"""Every server and client hook, end to end against a real server.

Each hook is exercised over loopback sockets and its arguments are checked
exactly. The recording plugins come in a ``def`` and an ``async def`` flavour
(the ``recorder`` fixture), so every hook is also shown to be awaited. Then:
rewrite and veto, the order plugins compose in, isolation of raising and
hanging plugins, registration errors, entry points, and bots.

A test that shows hooks firing is marked ``@pytest.mark.fires(...)`` with
their names and gives the ``hooks`` recorder to the server or clients it
builds: it fails unless they fired (tests/fires.py), and
tests/test_docs.py fails unless every hook has such a test.
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest
import trio

import chatkit
from chatkit.testing import HookRecorder, open_chat
from tests.conftest import OpenRaw, crowd, line_login, login
from tests.helpers import TIMEOUT, HoldLogin, RawClient, unref, wait_until

# --- recording plugins -------------------------------------------------------


class Recorder:
    """Records hook calls, in order, as ``(hook, arguments)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._lot = trio.lowlevel.ParkingLot()

    def record(self, hook: str, **arguments: Any) -> None:
        self.calls.append((hook, arguments))
        self._lot.unpark_all()

    def of(self, hook: str) -> list[dict[str, Any]]:
        return [arguments for name, arguments in self.calls if name == hook]

    async def wait(self, hook: str, count: int = 1) -> list[dict[str, Any]]:
        """Wait until ``hook`` was called ``count`` times; its calls."""
        with trio.fail_after(TIMEOUT):
            while len(self.of(hook)) < count:
                await self._lot.park()
        return self.of(hook)


class ServerRecorder(Recorder):
    """Implements every server hook with a plain ``def``; observes only."""

    @chatkit.hookimpl
    def chatkit_server_started(self, server: chatkit.ChatServer) -> None:
        self.record("chatkit_server_started", server=server)

    @chatkit.hookimpl
    def chatkit_server_stopping(self, server: chatkit.ChatServer) -> None:
        self.record("chatkit_server_stopping", server=server)

    @chatkit.hookimpl
    def chatkit_authenticate(
        self, server: chatkit.ChatServer, name: str, token: str | None, address: str
    ) -> None:
        self.record(
            "chatkit_authenticate",
            server=server,
            name=name,
            token=token,
            address=address,
        )

    @chatkit.hookimpl
    def chatkit_user_connected(
        self, server: chatkit.ChatServer, user: chatkit.User
    ) -> None:
        self.record("chatkit_user_connected", server=server, user=user)

    @chatkit.hookimpl
    def chatkit_user_disconnected(
        self, server: chatkit.ChatServer, user: chatkit.User, reason: str
    ) -> None:
        self.record(
            "chatkit_user_disconnected", server=server, user=user, reason=reason
        )

    @chatkit.hookimpl
    def chatkit_user_joined(
        self, server: chatkit.ChatServer, user: chatkit.User, room: str
    ) -> None:
        self.record("chatkit_user_joined", server=server, user=user, room=room)

    @chatkit.hookimpl
    def chatkit_user_left(
        self, server: chatkit.ChatServer, user: chatkit.User, room: str, reason: str
    ) -> None:
        self.record(
            "chatkit_user_left", server=server, user=user, room=room, reason=reason
        )

    @chatkit.hookimpl
    def chatkit_user_renamed(
        self, server: chatkit.ChatServer, user: chatkit.User, old: str, new: str
    ) -> None:
        self.record(
            "chatkit_user_renamed",
            server=server,
            user=user,
            old=old,
            new=new,
            name_then=user.name,
        )

    @chatkit.hookimpl
    def chatkit_message(
        self, server: chatkit.ChatServer, user: chatkit.User, room: str, text: str
    ) -> None:
        self.record("chatkit_message", server=server, user=user, room=room, text=text)

    @chatkit.hookimpl
    def chatkit_dm(
        self,
        server: chatkit.ChatServer,
        user: chatkit.User,
        recipient: chatkit.User,
        text: str,
    ) -> None:
        self.record(
            "chatkit_dm", server=server, user=user, recipient=recipient, text=text
        )

    @chatkit.hookimpl
    def chatkit_message_delivered(
        self, server: chatkit.ChatServer, message: chatkit.Message
    ) -> None:
        self.record("chatkit_message_delivered", server=server, message=message)

    @chatkit.hookimpl
    def chatkit_dm_delivered(
        self, server: chatkit.ChatServer, message: chatkit.DirectMessage
    ) -> None:
        self.record("chatkit_dm_delivered", server=server, message=message)


class AsyncServerRecorder(Recorder):
    """The same as :class:`ServerRecorder`, every hook ``async def`` and
    yielding to the scheduler before it records."""

    @chatkit.hookimpl
    async def chatkit_server_started(self, server: chatkit.ChatServer) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_server_started", server=server)

    @chatkit.hookimpl
    async def chatkit_server_stopping(self, server: chatkit.ChatServer) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_server_stopping", server=server)

    @chatkit.hookimpl
    async def chatkit_authenticate(
        self, server: chatkit.ChatServer, name: str, token: str | None, address: str
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record(
            "chatkit_authenticate",
            server=server,
            name=name,
            token=token,
            address=address,
        )

    @chatkit.hookimpl
    async def chatkit_user_connected(
        self, server: chatkit.ChatServer, user: chatkit.User
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_user_connected", server=server, user=user)

    @chatkit.hookimpl
    async def chatkit_user_disconnected(
        self, server: chatkit.ChatServer, user: chatkit.User, reason: str
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record(
            "chatkit_user_disconnected", server=server, user=user, reason=reason
        )

    @chatkit.hookimpl
    async def chatkit_user_joined(
        self, server: chatkit.ChatServer, user: chatkit.User, room: str
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_user_joined", server=server, user=user, room=room)

    @chatkit.hookimpl
    async def chatkit_user_left(
        self, server: chatkit.ChatServer, user: chatkit.User, room: str, reason: str
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record(
            "chatkit_user_left", server=server, user=user, room=room, reason=reason
        )

    @chatkit.hookimpl
    async def chatkit_user_renamed(
        self, server: chatkit.ChatServer, user: chatkit.User, old: str, new: str
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record(
            "chatkit_user_renamed",
            server=server,
            user=user,
            old=old,
            new=new,
            name_then=user.name,
        )

    @chatkit.hookimpl
    async def chatkit_message(
        self, server: chatkit.ChatServer, user: chatkit.User, room: str, text: str
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_message", server=server, user=user, room=room, text=text)

    @chatkit.hookimpl
    async def chatkit_dm(
        self,
        server: chatkit.ChatServer,
        user: chatkit.User,
        recipient: chatkit.User,
        text: str,
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record(
            "chatkit_dm", server=server, user=user, recipient=recipient, text=text
        )

    @chatkit.hookimpl
    async def chatkit_message_delivered(
        self, server: chatkit.ChatServer, message: chatkit.Message
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_message_delivered", server=server, message=message)

    @chatkit.hookimpl
    async def chatkit_dm_delivered(
        self, server: chatkit.ChatServer, message: chatkit.DirectMessage
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_dm_delivered", server=server, message=message)


@pytest.fixture(params=["def", "async def"])
def recorder(request: pytest.FixtureRequest) -> Recorder:
    """A plugin recording every server hook, sync or async."""
    if request.param == "def":
        return ServerRecorder()
    return AsyncServerRecorder()


# --- helpers -----------------------------------------------------------------


def local_address(client: RawClient) -> str:
    host, port = client.stream.socket.getsockname()[:2]
    return f"{host}:{port}"


def message_from(event: dict[str, Any]) -> chatkit.Message:
    """The Message a JSON ``message`` frame (without ``ref``) stands for."""
    return chatkit.Message(
        id=event["id"],
        ts=event["ts"],
        room=event["room"],
        sender=event["from"],
        text=event["text"],
    )


def plugin_logs(
    caplog: pytest.LogCaptureFixture, logger: str = "chatkit.server"
) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


# --- server_started / server_stopping ----------------------------------------


@pytest.mark.fires("chatkit_server_started", "chatkit_server_stopping")
async def test_server_started_and_stopping_fire_once_each(
    recorder: Recorder, hooks: HookRecorder
) -> None:
    async with chatkit.open_server(plugins=[recorder, hooks.server]) as server:
        assert recorder.calls == [("chatkit_server_started", {"server": server})]
    assert recorder.calls == [
        ("chatkit_server_started", {"server": server}),
        ("chatkit_server_stopping", {"server": server}),
    ]


class Lifecycle:
    """Sees the bound port at start; posts a farewell while stopping."""

    def __init__(self) -> None:
        self.port_at_start: int | None = None

    @chatkit.hookimpl
    def chatkit_server_started(self, server: chatkit.ChatServer) -> None:
        self.port_at_start = server.port

    @chatkit.hookimpl
    async def chatkit_server_stopping(self, server: chatkit.ChatServer) -> None:
        await server.post("lobby", "closing time")


@pytest.mark.fires("chatkit_server_started", "chatkit_server_stopping")
async def test_server_started_sees_the_bound_port_and_stopping_can_still_post(
    open_raw: OpenRaw, hooks: HookRecorder
) -> None:
    lifecycle = Lifecycle()
    async with chatkit.open_server(plugins=[lifecycle, hooks.server]) as server:
        assert server.port != 0
        assert lifecycle.port_at_start == server.port
        alice = await login(open_raw, server.port, "alice")
        await server.aclose()
        message = await alice.receive_json()
        assert message == {
            "type": "message",
            "id": 1,
            "ts": message["ts"],
            "room": "lobby",
            "from": chatkit.SERVER_SENDER,
            "text": "closing time",
        }
        assert await alice.receive_json() == {
            "type": "shutdown",
            "reason": "server shutting down",
        }
        assert await alice.assert_closed() == []


# --- authenticate ------------------------------------------------------------


@pytest.mark.fires(
    "chatkit_authenticate", "chatkit_user_connected", "chatkit_user_joined"
)
async def test_login_fires_authenticate_connected_then_joined(
    recorder: Recorder, open_raw: OpenRaw, hooks: HookRecorder
) -> None:
    async with chatkit.open_server(plugins=[recorder, hooks.server]) as server:
        recorder.calls.clear()
        alice = await login(open_raw, server.port, "alice", token="s3cret")
        await recorder.wait("chatkit_user_joined")
        user = server.get_user("alice")
        assert user is not None
        assert recorder.calls == [
            (
                "chatkit_authenticate",
                {
                    "server": server,
                    "name": "alice",
                    "token": "s3cret",
                    "address": local_address(alice),
                },
            ),
            ("chatkit_user_connected", {"server": server, "user": user}),
            ("chatkit_user_joined", {"server": server, "user": user, "room": "lobby"}),
        ]
        assert user.name == "alice"
        assert user.rooms == frozenset({"lobby"})
        assert user.mode == "json"


async def test_authenticate_gets_no_token_without_one_and_in_line_mode(
    recorder: Recorder, open_raw: OpenRaw
) -> None:
    async with chatkit.open_server(plugins=[recorder]) as server:
        alice = await login(open_raw, server.port, "alice")
        bob = await open_raw(server.port)
        await bob.send_line("bob")
        await recorder.wait("chatkit_user_joined", 2)
        assert recorder.of("chatkit_authenticate") == [
            {
                "server": server,
                "name": "alice",
                "token": None,
                "address": local_address(alice),
            },
            {
                "server": server,
                "name": "bob",
                "token": None,
                "address": local_address(bob),
            },
        ]
        bob_user = server.get_user("bob")
        assert bob_user is not None
        assert bob_user.mode == "line"


class Gatekeeper:
    """Lets in only the holders of the token."""

    def __init__(self, token: str) -> None:
        self.token = token

    @chatkit.hookimpl
    def chatkit_authenticate(self, token: str | None) -> None:
        if token != self.token:
            raise chatkit.Veto("members only")


class AsyncGatekeeper(Gatekeeper):
    @chatkit.hookimpl
    async def chatkit_authenticate(self, token: str | None) -> None:
        await trio.lowlevel.checkpoint()
        if token != self.token:
            raise chatkit.Veto("members only")


@pytest.mark.parametrize("gatekeeper", [Gatekeeper, AsyncGatekeeper])
async def test_authenticate_reject_refuses_with_unauthorized_and_disconnects(
    gatekeeper: type[Gatekeeper], open_raw: OpenRaw
) -> None:
    recorder = ServerRecorder()
    async with chatkit.open_server(
        plugins=[gatekeeper("open sesame"), recorder]
    ) as server:
        bob = await login(open_raw, server.port, "bob", token="open sesame")
        intruder = await open_raw(server.port)
        await intruder.send_json(
            type="hello", name="alice", protocol=1, token="guess", ref=7
        )
        assert await intruder.receive_json() == {
            "type": "error",
            "code": "unauthorized",
            "message": "members only",
            "ref": 7,
        }
        assert await intruder.assert_closed() == []
        # The veto stopped the chain, and nobody heard of the intruder.
        await bob.assert_silent()
        assert [c["name"] for c in recorder.of("chatkit_authenticate")] == ["bob"]
        assert [c["user"].name for c in recorder.of("chatkit_user_connected")] == [
            "bob"
        ]
        assert server.get_user("alice") is None
        # The name was never taken: the rightful alice gets in.
        await login(open_raw, server.port, "alice", token="open sesame")
        assert await bob.receive_json() == {
            "type": "joined",
            "room": "lobby",
            "name": "alice",
        }


async def test_authenticate_reject_in_line_mode(open_raw: OpenRaw) -> None:
    async with chatkit.open_server(plugins=[Gatekeeper("open sesame")]) as server:
        client = await open_raw(server.port)
        await client.send_line("alice")
        assert await client.assert_closed() == ["error (unauthorized): members only"]
        assert server.get_user("alice") is None


class BrokenAuth:
    @chatkit.hookimpl
    def chatkit_authenticate(self, name: str) -> None:
        raise RuntimeError(f"database down while checking {name}")


async def test_authenticate_fails_closed_when_a_plugin_raises(
    open_raw: OpenRaw, caplog: pytest.LogCaptureFixture
) -> None:
    async with chatkit.open_server(plugins=[BrokenAuth()]) as server:
        client = await open_raw(server.port)
        await client.send_json(type="hello", name="alice", protocol=1)
        assert await client.receive_json() == {
            "type": "error",
            "code": "unauthorized",
            "message": "refused: the server could not check this request",
        }
        assert await client.assert_closed() == []
        assert server.get_user("alice") is None
    assert "plugin 'BrokenAuth' raised in chatkit_authenticate" in plugin_logs(caplog)


# --- user_joined / user_left / user_disconnected / user_renamed --------------


@pytest.mark.fires("chatkit_user_joined", "chatkit_user_left")
async def test_join_and_leave_fire_user_joined_and_user_left(
    recorder: Recorder, open_raw: OpenRaw, hooks: HookRecorder
) -> None:
    async with chatkit.open_server(plugins=[recorder, hooks.server]) as server:
        alice = await login(open_raw, server.port, "alice")
        await recorder.wait("chatkit_user_joined")
        user = server.get_user("alice")
        recorder.calls.clear()

        await alice.send_json(type="join", room="dev", ref=1)
        await alice.expect("joined", room="dev", name="alice", ref=1)
        await recorder.wait("chatkit_user_joined")
        # Joining a room one is already in is no new join.
        await alice.send_json(type="join", room="dev", ref=2)
        await alice.expect("joined", room="dev", name="alice", ref=2)
        await alice.send_json(type="leave", room="dev", ref=3)
        await alice.expect("left", room="dev", name="alice", ref=3)
        await recorder.wait("chatkit_user_left")
        assert recorder.calls == [
            ("chatkit_user_joined", {"server": server, "user": user, "room": "dev"}),
            (
                "chatkit_user_left",
                {"server": server, "user": user, "room": "dev", "reason": "leave"},
            ),
        ]
        (left,) = recorder.of("chatkit_user_left")
        assert left["reason"] is chatkit.LeaveReason.LEAVE


@pytest.mark.parametrize("how", ["bye", "exit", "disconnect", "kicked", "shutdown"])
@pytest.mark.fires("chatkit_user_left", "chatkit_user_disconnected")
async def test_leaving_the_server_fires_user_left_per_room_then_disconnected(
    recorder: Recorder, open_raw: OpenRaw, how: str, hooks: HookRecorder
) -> None:
    async with chatkit.open_server(plugins=[recorder, hooks.server]) as server:
        client = await open_raw(server.port)
        if how == "exit":
            await client.send_line("alice")  # line mode: lobby only
            rooms = ["lobby"]
        else:
            await client.hello("alice")
            await client.send_json(type="join", room="dev")
            await client.expect("joined", room="dev", name="alice")
            rooms = ["lobby", "dev"]
        await recorder.wait("chatkit_user_joined", len(rooms))
        user = server.get_user("alice")
        assert user is not None
        recorder.calls.clear()

        if how == "bye":
            await client.send_json(type="bye")
        elif how == "exit":
            await client.send_line("exit")
        elif how == "disconnect":
            await client.aclose()
        elif how == "kicked":
            assert server.kick("alice", "spam")
        else:
            await server.aclose()
        await recorder.wait("chatkit_user_disconnected")

        reason = chatkit.LeaveReason(how)
        expected: list[tuple[str, dict[str, Any]]] = [
            (
                "chatkit_user_left",
                {"server": server, "user": user, "room": room, "reason": reason},
            )
            for room in rooms
        ]
        expected.append(
            (
                "chatkit_user_disconnected",
                {"server": server, "user": user, "reason": reason},
            )
        )
        if how == "shutdown":
            expected.insert(0, ("chatkit_server_stopping", {"server": server}))
        assert recorder.calls == expected
        assert {
            type(arguments["reason"])
            for _, arguments in recorder.calls
            if "reason" in arguments
        } == {chatkit.LeaveReason}
        assert server.get_user("alice") is None


@pytest.mark.fires("chatkit_nick", "chatkit_user_renamed")
async def test_nick_fires_user_renamed_after_the_rename(
    recorder: Recorder, open_raw: OpenRaw, hooks: HookRecorder
) -> None:
    async with chatkit.open_server(plugins=[recorder, hooks.server]) as server:
        alice = await login(open_raw, server.port, "alice")
        await recorder.wait("chatkit_user_joined")
        user = server.get_user("alice")
        recorder.calls.clear()
        await alice.send_json(type="nick", name="alicia", ref=4)
        assert await alice.receive_json() == {
            "type": "renamed",
            "old": "alice",
            "new": "alicia",
            "ref": 4,
        }
        await recorder.wait("chatkit_user_renamed")
        assert recorder.calls == [
            (
                "chatkit_user_renamed",
                {
                    "server": server,
                    "user": user,
                    "old": "alice",
                    "new": "alicia",
                    "name_then": "alicia",
                },
            )
        ]
        assert server.get_user("alicia") is user


# --- message / dm / message_delivered / dm_delivered: observe ----------------


@pytest.mark.fires("chatkit_message", "chatkit_message_delivered")
async def test_message_hooks_observe_what_is_said_and_delivered(
    recorder: Recorder, open_raw: OpenRaw, hooks: HookRecorder
) -> None:
    async with chatkit.open_server(plugins=[recorder, hooks.server]) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        await recorder.wait("chatkit_user_joined", 2)
        alice_user = server.get_user("alice")
        recorder.calls.clear()

        await alice.send_json(type="say", text="hi bob", ref="r1")
        echo = await alice.receive_json()
        received = await bob.receive_json()
        assert received == {
            "type": "message",
            "id": echo["id"],
            "ts": echo["ts"],
            "room": "lobby",
            "from": "alice",
            "text": "hi bob",
        }
        assert echo == {**received, "ref": "r1"}
        await recorder.wait("chatkit_message_delivered")
        assert recorder.calls == [
            (
                "chatkit_message",
                {
                    "server": server,
                    "user": alice_user,
                    "room": "lobby",
                    "text": "hi bob",
                },
            ),
            (
                "chatkit_message_delivered",
                {"server": server, "message": message_from(received)},
            ),
        ]


@pytest.mark.fires("chatkit_message_delivered")
async def test_message_delivered_fires_for_server_post(
    recorder: Recorder, open_raw: OpenRaw, hooks: HookRecorder
) -> None:
    async with chatkit.open_server(plugins=[recorder, hooks.server]) as server:
        alice = await login(open_raw, server.port, "alice")
        await recorder.wait("chatkit_user_joined")
        recorder.calls.clear()
        posted = await server.post("lobby", "maintenance at noon")
        assert message_from(await alice.receive_json()) == posted
        assert (posted.room, posted.sender, posted.text) == (
            "lobby",
            "*server*",
            "maintenance at noon",
        )
        await recorder.wait("chatkit_message_delivered")
        # The program is trusted: no chatkit_message for a post.
        assert recorder.calls == [
            ("chatkit_message_delivered", {"server": server, "message": posted})
        ]


@pytest.mark.fires("chatkit_dm", "chatkit_dm_delivered")
async def test_dm_hooks_observe_what_is_sent_and_delivered(
    recorder: Recorder, open_raw: OpenRaw, hooks: HookRecorder
) -> None:
    async with chatkit.open_server(plugins=[recorder, hooks.server]) as server:
        alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
        await recorder.wait("chatkit_user_joined", 3)
        alice_user, bob_user = server.get_user("alice"), server.get_user("bob")
        recorder.calls.clear()

        await alice.send_json(type="dm", to="bob", text="psst", ref=9)
        received = await bob.receive_json()
        assert received == {
            "type": "dm",
            "id": received["id"],
            "ts": received["ts"],
            "from": "alice",
            "to": "bob",
            "text": "psst",
        }
        assert await alice.receive_json() == {**received, "ref": 9}
        await recorder.wait("chatkit_dm_delivered")
        assert recorder.calls == [
            (
                "chatkit_dm",
                {
                    "server": server,
                    "user": alice_user,
                    "recipient": bob_user,
                    "text": "psst",
                },
            ),
            (
                "chatkit_dm_delivered",
                {
                    "server": server,
                    "message": chatkit.DirectMessage(
                        id=received["id"],
                        ts=received["ts"],
                        sender="alice",
                        to="bob",
                        text="psst",
                    ),
                },
            ),
        ]
        await carol.assert_silent()


# --- message / dm: rewrite, veto, order --------------------------------------


class Censor:
    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> str:
        return text.replace("darn", "d**n")

    @chatkit.hookimpl
    def chatkit_dm(self, text: str) -> str:
        return text.replace("darn", "d**n")


class AsyncCensor:
    @chatkit.hookimpl
    async def chatkit_message(self, text: str) -> str:
        await trio.lowlevel.checkpoint()
        return text.replace("darn", "d**n")

    @chatkit.hookimpl
    async def chatkit_dm(self, text: str) -> str:
        await trio.lowlevel.checkpoint()
        return text.replace("darn", "d**n")


@pytest.mark.parametrize("censor", [Censor, AsyncCensor])
async def test_rewrite_reaches_everyone_and_the_history(
    censor: type[Any], open_raw: OpenRaw
) -> None:
    recorder = ServerRecorder()
    async with chatkit.open_server(plugins=[censor(), recorder]) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        carol = await line_login(open_raw, server.port, "carol", alice, bob)

        await alice.send_json(type="say", text="darn it", ref=1)
        received = await bob.receive_json()
        assert received["text"] == "d**n it"
        assert await alice.receive_json() == {**received, "ref": 1}
        assert await carol.receive_line() == "alice: d**n it"
        await alice.send_json(type="history", room="lobby", ref=2)
        assert await alice.receive_json() == {
            "type": "history",
            "room": "lobby",
            "messages": [received],
            "ref": 2,
        }
        # Later plugins see the rewritten text.
        await recorder.wait("chatkit_message_delivered")
        assert recorder.of("chatkit_message")[0]["text"] == "d**n it"
        assert recorder.of("chatkit_message_delivered")[0]["message"] == message_from(
            received
        )

        await alice.send_json(type="dm", to="bob", text="darn you", ref=3)
        dm = await bob.receive_json()
        assert dm["text"] == "d**n you"
        assert await alice.receive_json() == {**dm, "ref": 3}
        await recorder.wait("chatkit_dm_delivered")
        assert recorder.of("chatkit_dm")[0]["text"] == "d**n you"
        assert recorder.of("chatkit_dm_delivered")[0]["message"].text == "d**n you"
        await carol.assert_silent()


class Tag:
    """Appends ``+tag`` to every message and dm, noting that it ran."""

    def __init__(self, tag: str, seen: list[str]) -> None:
        self.tag = tag
        self.seen = seen

    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> str:
        self.seen.append(self.tag)
        return f"{text}+{self.tag}"

    @chatkit.hookimpl
    def chatkit_dm(self, text: str) -> str:
        self.seen.append(self.tag)
        return f"{text}+{self.tag}"


class AsyncTag(Tag):
    @chatkit.hookimpl
    async def chatkit_message(self, text: str) -> str:
        await trio.lowlevel.checkpoint()
        return super().chatkit_message(text)

    @chatkit.hookimpl
    async def chatkit_dm(self, text: str) -> str:
        await trio.lowlevel.checkpoint()
        return super().chatkit_dm(text)


class FirstTag(Tag):
    @chatkit.hookimpl(tryfirst=True)
    def chatkit_message(self, text: str) -> str:
        return super().chatkit_message(text)

    @chatkit.hookimpl(tryfirst=True)
    def chatkit_dm(self, text: str) -> str:
        return super().chatkit_dm(text)


class LastTag(Tag):
    @chatkit.hookimpl(trylast=True)
    def chatkit_message(self, text: str) -> str:
        return super().chatkit_message(text)

    @chatkit.hookimpl(trylast=True)
    def chatkit_dm(self, text: str) -> str:
        return super().chatkit_dm(text)


async def test_rewrites_compose_in_plugin_order_honouring_tryfirst_trylast(
    open_raw: OpenRaw,
) -> None:
    seen: list[str] = []
    plugins = [
        Tag("a", seen),
        LastTag("z", seen),
        AsyncTag("b", seen),
        FirstTag("f", seen),
        Tag("c", seen),
    ]
    async with chatkit.open_server(plugins=plugins) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        await alice.send_json(type="say", text="x")
        assert (await bob.receive_json())["text"] == "x+f+a+b+c+z"
        assert seen == ["f", "a", "b", "c", "z"]
        seen.clear()
        await alice.send_json(type="dm", to="bob", text="y")
        assert (await bob.receive_json())["text"] == "y+f+a+b+c+z"
        assert seen == ["f", "a", "b", "c", "z"]


class NotAString:
    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> object:
        return 42


async def test_a_non_str_rewrite_is_ignored_and_logged(
    open_raw: OpenRaw, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    plugins = [Tag("a", seen), NotAString(), Tag("b", seen)]
    async with chatkit.open_server(plugins=plugins) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        await alice.send_json(type="say", text="x")
        assert (await bob.receive_json())["text"] == "x+a+b"
    assert (
        "plugin 'NotAString' returned 42 from chatkit_message, "
        "expected str or None; ignored"
    ) in plugin_logs(caplog)


class NoLinks:
    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> None:
        if "http" in text:
            raise chatkit.Veto("no links, please")

    @chatkit.hookimpl
    def chatkit_dm(self, text: str) -> None:
        if "http" in text:
            raise chatkit.Veto("no private links either")


class AsyncNoLinks:
    @chatkit.hookimpl
    async def chatkit_message(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if "http" in text:
            raise chatkit.Veto("no links, please")

    @chatkit.hookimpl
    async def chatkit_dm(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if "http" in text:
            raise chatkit.Veto("no private links either")


@pytest.mark.parametrize("no_links", [NoLinks, AsyncNoLinks])
async def test_reject_answers_the_sender_only_and_stops_the_chain(
    no_links: type[Any], open_raw: OpenRaw
) -> None:
    seen: list[str] = []
    recorder = ServerRecorder()
    async with chatkit.open_server(
        plugins=[no_links(), Tag("after", seen), recorder]
    ) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        carol = await line_login(open_raw, server.port, "carol", alice, bob)

        await alice.send_json(type="say", text="see http://x", ref=1)
        assert await alice.receive_json() == {
            "type": "error",
            "code": "rejected",
            "message": "no links, please",
            "ref": 1,
        }
        await alice.send_json(type="dm", to="bob", text="http://y", ref=2)
        assert await alice.receive_json() == {
            "type": "error",
            "code": "rejected",
            "message": "no private links either",
            "ref": 2,
        }
        await carol.send_line("http://z")
        assert await carol.receive_line() == "error (rejected): no links, please"
        await alice.send_json(type="history", room="lobby", ref=3)
        assert await alice.receive_json() == {
            "type": "history",
            "room": "lobby",
            "messages": [],
            "ref": 3,
        }
        await bob.assert_silent()
        await alice.assert_silent(0)
        assert seen == []
        assert recorder.of("chatkit_message") == []
        assert recorder.of("chatkit_dm") == []
        assert recorder.of("chatkit_message_delivered") == []
        assert recorder.of("chatkit_dm_delivered") == []

        # The chain still runs for everything else.
        await alice.send_json(type="say", text="fine")
        assert (await bob.receive_json())["text"] == "fine+after"
        assert seen == ["after"]


# --- isolation: raising and hanging plugins ----------------------------------


class Boom:
    """Raises from every hook it implements."""

    @chatkit.hookimpl
    def chatkit_user_joined(self, room: str) -> None:
        raise ValueError(f"boom in {room}")

    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> str:
        raise ValueError("boom")

    @chatkit.hookimpl
    def chatkit_message_delivered(self) -> None:
        raise ValueError("boom")

    @chatkit.hookimpl
    def chatkit_dm(self) -> str:
        raise ValueError("boom")


class AsyncBoom:
    @chatkit.hookimpl
    async def chatkit_user_joined(self, room: str) -> None:
        await trio.lowlevel.checkpoint()
        raise ValueError(f"boom in {room}")

    @chatkit.hookimpl
    async def chatkit_message(self, text: str) -> str:
        await trio.lowlevel.checkpoint()
        raise ValueError("boom")

    @chatkit.hookimpl
    async def chatkit_message_delivered(self) -> None:
        await trio.lowlevel.checkpoint()
        raise ValueError("boom")

    @chatkit.hookimpl
    async def chatkit_dm(self) -> str:
        await trio.lowlevel.checkpoint()
        raise ValueError("boom")


@pytest.mark.parametrize("boom", [Boom, AsyncBoom])
async def test_a_raising_plugin_is_logged_by_name_and_changes_nothing_else(
    boom: type[Any], open_raw: OpenRaw, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    recorder = ServerRecorder()
    name = boom.__name__
    async with chatkit.open_server(
        plugins=[boom(), Tag("t", seen), recorder]
    ) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        await alice.send_json(type="say", text="hi", ref=1)
        received = await bob.receive_json()
        assert received["text"] == "hi+t"
        assert await alice.receive_json() == {**received, "ref": 1}
        await alice.send_json(type="dm", to="bob", text="psst")
        assert (await bob.receive_json())["text"] == "psst+t"
        await recorder.wait("chatkit_dm_delivered")
        assert [c["text"] for c in recorder.of("chatkit_message")] == ["hi+t"]
        assert len(recorder.of("chatkit_message_delivered")) == 1
        assert len(recorder.of("chatkit_user_joined")) == 2
        # The server keeps serving: a newcomer gets in and is heard.
        carol = await login(open_raw, server.port, "carol")
        await carol.send_json(type="say", text="hello")
        assert (await bob.receive_json())["name"] == "carol"
        assert (await bob.receive_json())["text"] == "hello+t"
        # Delivery comes before the delivered hook: wait for it to have run.
        await recorder.wait("chatkit_message_delivered", count=2)
    logs = plugin_logs(caplog)
    for hook in ("chatkit_user_joined", "chatkit_message", "chatkit_dm"):
        assert f"plugin {name!r} raised in {hook}" in logs
    assert logs.count(f"plugin {name!r} raised in chatkit_message_delivered") == 2
    failures = [r for r in caplog.records if "raised in" in r.getMessage()]
    assert failures
    for record in failures:
        assert record.exc_info is not None
        assert record.exc_info[0] is ValueError


class Hang:
    @chatkit.hookimpl
    async def chatkit_user_joined(self) -> None:
        await trio.sleep_forever()

    @chatkit.hookimpl
    async def chatkit_message(self, text: str) -> str:
        await trio.sleep_forever()
        return text.upper()  # pragma: no cover


async def test_a_hanging_hook_is_cancelled_after_hook_timeout(
    open_raw: OpenRaw, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    async with chatkit.open_server(
        plugins=[Hang(), Tag("t", seen)],
        limits=chatkit.Limits(hook_timeout=0.2),
    ) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        start = trio.current_time()
        await alice.send_json(type="say", text="hi")
        received = await bob.receive_json(within=2.0)
        elapsed = trio.current_time() - start
        assert received["text"] == "hi+t"
        assert 0.15 <= elapsed < 2.0
    logs = plugin_logs(caplog)
    assert "plugin 'Hang' timed out in chatkit_message after 0.2s; skipped" in logs
    assert (
        logs.count("plugin 'Hang' timed out in chatkit_user_joined after 0.2s; skipped")
        == 2
    )


# --- registration ------------------------------------------------------------


async def test_implementations_may_take_fewer_arguments(open_raw: OpenRaw) -> None:
    joined: list[str] = []
    delivered: list[int] = []
    module = types.ModuleType("minimal_plugin")

    @chatkit.hookimpl
    def chatkit_user_joined(room: str) -> None:
        joined.append(room)

    @chatkit.hookimpl
    async def chatkit_message(text: str) -> str:
        return text.upper()

    @chatkit.hookimpl
    def chatkit_message_delivered(message: chatkit.Message) -> None:
        delivered.append(message.id)

    @chatkit.hookimpl
    def chatkit_dm() -> str:
        return "redacted"

    module.__dict__.update(
        chatkit_user_joined=chatkit_user_joined,
        chatkit_message=chatkit_message,
        chatkit_message_delivered=chatkit_message_delivered,
        chatkit_dm=chatkit_dm,
    )
    async with chatkit.open_server(plugins=[module]) as server:
        assert server.plugin_manager.get_plugin("minimal_plugin") is module
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        await alice.send_json(type="say", text="quiet")
        message = await bob.receive_json()
        assert message["text"] == "QUIET"
        await alice.send_json(type="dm", to="bob", text="secret")
        assert (await bob.receive_json())["text"] == "redacted"
        assert joined == ["lobby", "lobby"]
        assert delivered == [message["id"]]


class Misspelled:
    @chatkit.hookimpl
    def chatkit_mesage(self, text: str) -> None: ...


class WrongArgument:
    @chatkit.hookimpl
    def chatkit_message(self, txt: str) -> None: ...


class ClientMisspelled:
    @chatkit.hookimpl
    def chatkit_client_mesage(self, message: chatkit.Message) -> None: ...


def test_a_misspelled_hook_fails_loudly() -> None:
    with pytest.raises(pluggy.PluginValidationError, match="chatkit_mesage"):
        chatkit.ChatServer(plugins=[Misspelled()])
    with pytest.raises(pluggy.PluginValidationError, match="txt"):
        chatkit.ChatServer(plugins=[WrongArgument()])
    with pytest.raises(pluggy.PluginValidationError, match="chatkit_client_mesage"):
        chatkit.ChatClient(name="bot", plugins=[ClientMisspelled()])
    # Server hooks mean nothing to a client, and the other way round.
    with pytest.raises(pluggy.PluginValidationError, match="chatkit_message"):
        chatkit.ChatClient(name="bot", plugins=[NotAString()])
    with pytest.raises(pluggy.PluginValidationError, match="chatkit_client_message"):
        chatkit.ChatServer(plugins=[Echo()])


class NewWrapper:
    @chatkit.hookimpl(wrapper=True)
    def chatkit_message(self, text: str) -> Iterator[None]:
        return (yield)


class OldWrapper:
    @chatkit.hookimpl(hookwrapper=True)
    def chatkit_message(self, text: str) -> Iterator[None]:
        yield


@pytest.mark.parametrize("wrapper", [NewWrapper, OldWrapper])
def test_a_hook_wrapper_is_refused(wrapper: type[Any]) -> None:
    with pytest.raises(
        TypeError,
        match=f"plugin '{wrapper.__name__}': chatkit_message is a hook wrapper",
    ):
        chatkit.ChatServer(plugins=[Censor(), wrapper()])


def test_plugins_are_named_for_the_logs() -> None:
    module = types.ModuleType("some_module")
    server = chatkit.ChatServer(plugins=[Censor(), module, Censor(), NoLinks()])
    assert server.plugin_manager.list_name_plugin() == [
        ("NoLinks", server.plugin_manager.get_plugin("NoLinks")),
        ("Censor#2", server.plugin_manager.get_plugin("Censor#2")),
        ("some_module", module),
        ("Censor", server.plugin_manager.get_plugin("Censor")),
    ]


# --- entry points ------------------------------------------------------------

FAKEPLUG = """
import chatkit


@chatkit.hookimpl
def chatkit_message(text):
    return text + "+{name}"
"""


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``install({entry point name: module source})`` installs a fake
    ``fakeplug`` distribution declaring them in the ``chatkit`` group (each
    entry point a module of its own name)."""
    modules: list[str] = []

    def install_(sources: dict[str, str], group: str = "chatkit") -> None:
        info = tmp_path / "fakeplug-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n"
        )
        lines = [f"{name} = {name}" for name in sources]
        (info / "entry_points.txt").write_text(f"[{group}]\n" + "\n".join(lines) + "\n")
        for name, source in sources.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
            modules.append(name)
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install_
    for name in modules:
        sys.modules.pop(name, None)


def entry_point_plugins(server: chatkit.ChatServer) -> set[str | None]:
    pm = server.plugin_manager
    return {pm.get_name(plugin) for plugin, _ in pm.list_plugin_distinfo()}


@pytest.mark.parametrize(
    ("allow", "load", "expected"),
    [
        ("fakeplug", True, {"fakeplug"}),
        ("", True, set()),
        (" fakeplug_extra , not_installed", True, {"fakeplug_extra"}),
        ("fakeplug,fakeplug_extra", True, {"fakeplug", "fakeplug_extra"}),
        (None, True, {"fakeplug", "fakeplug_extra"}),
        (None, False, set()),
        ("fakeplug", False, set()),
    ],
)
def test_entry_points_follow_the_allow_list(
    install: Any,
    monkeypatch: pytest.MonkeyPatch,
    allow: str | None,
    load: bool,
    expected: set[str],
) -> None:
    install(
        {
            "fakeplug": FAKEPLUG.format(name="fakeplug"),
            "fakeplug_extra": FAKEPLUG.format(name="extra"),
        }
    )
    if allow is None:
        monkeypatch.delenv("CHATKIT_LOAD_PLUGINS", raising=False)
        installed = {ep.name for ep in importlib.metadata.entry_points(group="chatkit")}
        assert expected <= installed
        if load:
            expected = installed  # unset loads every installed one
    else:
        monkeypatch.setenv("CHATKIT_LOAD_PLUGINS", allow)
    server = chatkit.ChatServer(load_entry_points=load)
    assert entry_point_plugins(server) == expected


async def test_entry_point_plugins_run_after_the_given_ones(
    install: Any, monkeypatch: pytest.MonkeyPatch, open_raw: OpenRaw
) -> None:
    install(
        {
            "fakeplug": FAKEPLUG.format(name="fakeplug"),
            "fakeplug_extra": FAKEPLUG.format(name="extra"),
        }
    )
    monkeypatch.setenv("CHATKIT_LOAD_PLUGINS", "fakeplug")
    seen: list[str] = []
    async with chatkit.open_server(
        plugins=[Tag("a", seen)], load_entry_points=True
    ) as server:
        (distribution,) = [d for _, d in server.plugin_manager.list_plugin_distinfo()]
        assert distribution.project_name == "fakeplug"
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        await alice.send_json(type="say", text="x")
        assert (await bob.receive_json())["text"] == "x+a+fakeplug"


def test_an_entry_point_hook_wrapper_is_refused(
    install: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(
        {
            "fakeplug": """
            import chatkit


            @chatkit.hookimpl(wrapper=True)
            def chatkit_message(text):
                return (yield)
            """
        }
    )
    monkeypatch.setenv("CHATKIT_LOAD_PLUGINS", "fakeplug")
    with pytest.raises(TypeError, match="plugin 'fakeplug': chatkit_message"):
        chatkit.ChatServer(load_entry_points=True)


# --- client hooks ------------------------------------------------------------


class ClientRecorder(Recorder):
    """Implements every client hook with a plain ``def``."""

    @chatkit.hookimpl
    def chatkit_client_connected(
        self, client: chatkit.ChatClient, welcome: chatkit.Welcome
    ) -> None:
        self.record("chatkit_client_connected", client=client, welcome=welcome)

    @chatkit.hookimpl
    def chatkit_client_event(
        self, client: chatkit.ChatClient, event: chatkit.Event
    ) -> None:
        self.record("chatkit_client_event", client=client, event=event)

    @chatkit.hookimpl
    def chatkit_client_message(
        self, client: chatkit.ChatClient, message: chatkit.Message
    ) -> None:
        self.record("chatkit_client_message", client=client, message=message)

    @chatkit.hookimpl
    def chatkit_client_dm(
        self, client: chatkit.ChatClient, message: chatkit.DirectMessage
    ) -> None:
        self.record("chatkit_client_dm", client=client, message=message)

    @chatkit.hookimpl
    def chatkit_client_joined(
        self, client: chatkit.ChatClient, room: str, name: str
    ) -> None:
        self.record("chatkit_client_joined", client=client, room=room, name=name)

    @chatkit.hookimpl
    def chatkit_client_left(
        self, client: chatkit.ChatClient, room: str, name: str, reason: str | None
    ) -> None:
        self.record(
            "chatkit_client_left", client=client, room=room, name=name, reason=reason
        )

    @chatkit.hookimpl
    def chatkit_client_disconnected(
        self, client: chatkit.ChatClient, reason: str
    ) -> None:
        self.record("chatkit_client_disconnected", client=client, reason=reason)


class AsyncClientRecorder(Recorder):
    """The same as :class:`ClientRecorder`, every hook ``async def``."""

    @chatkit.hookimpl
    async def chatkit_client_connected(
        self, client: chatkit.ChatClient, welcome: chatkit.Welcome
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_client_connected", client=client, welcome=welcome)

    @chatkit.hookimpl
    async def chatkit_client_event(
        self, client: chatkit.ChatClient, event: chatkit.Event
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_client_event", client=client, event=event)

    @chatkit.hookimpl
    async def chatkit_client_message(
        self, client: chatkit.ChatClient, message: chatkit.Message
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_client_message", client=client, message=message)

    @chatkit.hookimpl
    async def chatkit_client_dm(
        self, client: chatkit.ChatClient, message: chatkit.DirectMessage
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_client_dm", client=client, message=message)

    @chatkit.hookimpl
    async def chatkit_client_joined(
        self, client: chatkit.ChatClient, room: str, name: str
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_client_joined", client=client, room=room, name=name)

    @chatkit.hookimpl
    async def chatkit_client_left(
        self, client: chatkit.ChatClient, room: str, name: str, reason: str | None
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record(
            "chatkit_client_left", client=client, room=room, name=name, reason=reason
        )

    @chatkit.hookimpl
    async def chatkit_client_disconnected(
        self, client: chatkit.ChatClient, reason: str
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.record("chatkit_client_disconnected", client=client, reason=reason)


@pytest.fixture(params=["def", "async def"])
def client_recorder(request: pytest.FixtureRequest) -> Recorder:
    """A plugin recording every client hook, sync or async."""
    if request.param == "def":
        return ClientRecorder()
    return AsyncClientRecorder()


@pytest.mark.fires(
    "chatkit_client_connected",
    "chatkit_client_event",
    "chatkit_client_joined",
    "chatkit_client_message",
    "chatkit_client_dm",
    "chatkit_client_left",
    "chatkit_client_disconnected",
)
async def test_client_hooks_fire_in_order_with_their_arguments(
    client_recorder: Recorder, hooks: HookRecorder
) -> None:
    rec = client_recorder
    async with (
        chatkit.open_server() as server,
        chatkit.open_client(
            "127.0.0.1",
            server.port,
            name="bot",
            plugins=[rec, hooks.client],
            event_buffer=None,
        ) as bot,
    ):
        async with chatkit.open_client("127.0.0.1", server.port, name="alice") as alice:
            await rec.wait("chatkit_client_joined", 2)
            said = await alice.say("hi bot")
            sent = await alice.dm("bot", "psst")
            await rec.wait("chatkit_client_dm")
        await rec.wait("chatkit_client_left")
        await server.aclose()
        await rec.wait("chatkit_client_disconnected")

    def both(event: chatkit.Event, hook: str, **arguments: Any) -> list[Any]:
        return [
            ("chatkit_client_event", {"client": bot, "event": event}),
            (hook, {"client": bot, **arguments}),
        ]

    (connected,) = rec.of("chatkit_client_connected")
    welcome = connected["welcome"]
    assert unref(welcome) == chatkit.Welcome(
        name="bot",
        protocol=1,
        server="chatkit",
        rooms=("lobby",),
        resume=welcome.resume,
    )
    assert welcome.resume
    assert rec.calls == [
        ("chatkit_client_connected", {"client": bot, "welcome": welcome}),
        *both(
            chatkit.Joined(room="lobby", name="bot"),
            "chatkit_client_joined",
            room="lobby",
            name="bot",
        ),
        *both(
            chatkit.Joined(room="lobby", name="alice"),
            "chatkit_client_joined",
            room="lobby",
            name="alice",
        ),
        *both(unref(said), "chatkit_client_message", message=unref(said)),
        *both(unref(sent), "chatkit_client_dm", message=unref(sent)),
        *both(
            chatkit.Left(room="lobby", name="alice", reason="bye"),
            "chatkit_client_left",
            room="lobby",
            name="alice",
            reason="bye",
        ),
        (
            "chatkit_client_event",
            {"client": bot, "event": chatkit.Shutdown(reason="server shutting down")},
        ),
        (
            "chatkit_client_disconnected",
            {"client": bot, "reason": "server shutting down: server shutting down"},
        ),
    ]
    assert (said.sender, said.text, sent.sender, sent.to, sent.text) == (
        "alice",
        "hi bot",
        "alice",
        "bot",
        "psst",
    )


class Echo:
    """A bot: answers every message that is not its own."""

    @chatkit.hookimpl
    async def chatkit_client_message(
        self, client: chatkit.ChatClient, message: chatkit.Message
    ) -> None:
        if message.sender != client.name:
            await client.say(
                f"{message.sender} said: {message.text}", room=message.room
            )


class Roll:
    """A bot that asks the server from inside its hook."""

    @chatkit.hookimpl
    async def chatkit_client_message(
        self, client: chatkit.ChatClient, message: chatkit.Message
    ) -> None:
        if message.text == "!who":
            names = await client.who(message.room)
            rooms = await client.rooms()
            await client.ping()
            await client.say(f"here: {', '.join(names)}; rooms: {rooms}")


@pytest.mark.parametrize(
    ("bot", "said", "answer"),
    [
        (Echo(), "hello", "alice said: hello"),
        (Roll(), "!who", "here: bot, alice; rooms: {'lobby': 2}"),
    ],
)
async def test_a_bot_is_a_client_plus_a_plugin(
    bot: object, said: str, answer: str
) -> None:
    async with open_chat() as chat:
        await chat.connect("bot", plugins=[bot], event_buffer=None)
        alice = await chat.connect("alice")
        await alice.say(said)
        reply = await chat.expect(alice, chatkit.Message, sender="bot")
        assert reply.text == answer
        # The bot keeps answering.
        await alice.say(said)
        reply = await chat.expect(alice, chatkit.Message, sender="bot")
        assert reply.text == answer


class ClientBoom:
    @chatkit.hookimpl
    def chatkit_client_message(self, message: chatkit.Message) -> None:
        raise ValueError(f"bot bug on {message.text}")


class AsyncClientBoom:
    @chatkit.hookimpl
    async def chatkit_client_message(self, message: chatkit.Message) -> None:
        await trio.lowlevel.checkpoint()
        raise ValueError(f"bot bug on {message.text}")


@pytest.mark.parametrize("boom", [ClientBoom, AsyncClientBoom])
async def test_a_raising_client_hook_is_logged_and_the_client_keeps_working(
    boom: type[Any], caplog: pytest.LogCaptureFixture
) -> None:
    rec = ClientRecorder()
    async with open_chat() as chat:
        bot = await chat.connect("bot", plugins=[boom(), rec])
        alice = await chat.connect("alice")
        await alice.say("one")
        await alice.say("two")
        await rec.wait("chatkit_client_message", 2)
        assert [c["message"].text for c in rec.of("chatkit_client_message")] == [
            "one",
            "two",
        ]
        await bot.say("still here")
        reply = await chat.expect(alice, chatkit.Message, sender="bot")
        assert reply.text == "still here"
        assert await bot.who() == ("bot", "alice")
    logs = plugin_logs(caplog, "chatkit.client")
    name = boom.__name__
    # For "one", "two" and the echo of the bot's own "still here".
    assert logs.count(f"plugin {name!r} raised in chatkit_client_message") == 3


CLIENT_FAKEPLUG = """
import chatkit

seen = []


@chatkit.hookimpl
def chatkit_client_connected(client, welcome):
    seen.append(welcome.name)
"""


async def test_client_entry_points_have_their_own_group(
    install: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bot installed on the machine must not break servers (its client hooks
    # would fail the server's validation) and must reach clients that ask.
    install({"fakebot": CLIENT_FAKEPLUG}, group="chatkit.client")
    monkeypatch.delenv("CHATKIT_LOAD_PLUGINS", raising=False)
    async with chatkit.open_server(load_entry_points=True) as server:
        assert entry_point_plugins(server) == set()
        async with chatkit.open_client(
            "127.0.0.1", server.port, name="alice", load_entry_points=True
        ) as alice:
            pm = alice.plugin_manager
            assert {pm.get_name(p) for p, _ in pm.list_plugin_distinfo()} == {"fakebot"}
        assert sys.modules["fakebot"].seen == ["alice"]


async def test_a_client_closing_itself_reports_so(server: chatkit.ChatServer) -> None:
    reasons: list[str] = []

    class Watch:
        @chatkit.hookimpl
        def chatkit_client_disconnected(self, reason: str) -> None:
            reasons.append(reason)

    async with chatkit.open_client(
        "127.0.0.1", server.port, name="alice", plugins=[Watch()], event_buffer=None
    ) as alice:
        await alice.ping()
    assert reasons == ["closed by the client"]
    assert alice.close_reason == "closed by the client"


class ReconnectRecorder(Recorder):
    """The reconnect hooks (one of them ``async def``) and a few others."""

    @chatkit.hookimpl
    def chatkit_client_connected(self, welcome: chatkit.Welcome) -> None:
        self.record("chatkit_client_connected", name=welcome.name)

    @chatkit.hookimpl
    def chatkit_client_message(self, message: chatkit.Message) -> None:
        self.record("chatkit_client_message", text=message.text)

    @chatkit.hookimpl
    def chatkit_client_interrupted(
        self, client: chatkit.ChatClient, reason: str
    ) -> None:
        assert client.reconnecting
        self.record("chatkit_client_interrupted", reason=reason)

    @chatkit.hookimpl
    def chatkit_client_reconnecting(
        self, client: chatkit.ChatClient, attempt: int, delay: float, error: str | None
    ) -> None:
        self.record(
            "chatkit_client_reconnecting", attempt=attempt, delay=delay, error=error
        )

    @chatkit.hookimpl
    async def chatkit_client_reconnected(
        self, client: chatkit.ChatClient, missed: int
    ) -> None:
        await client.say("back")  # the client is usable from the hook
        self.record("chatkit_client_reconnected", missed=missed)

    @chatkit.hookimpl
    def chatkit_client_disconnected(self, reason: str) -> None:
        self.record("chatkit_client_disconnected", reason=reason)


@pytest.mark.fires(
    "chatkit_client_interrupted",
    "chatkit_client_reconnecting",
    "chatkit_client_reconnected",
)
async def test_reconnect_hooks_fire_around_the_missed_messages(
    hooks: HookRecorder,
) -> None:
    rec = ReconnectRecorder()
    history = chatkit.MemoryHistory()
    hold = HoldLogin("bot")
    policy = chatkit.Reconnect(initial_delay=0.02, max_delay=0.05)
    async with trio.open_nursery() as nursery:
        first = chatkit.ChatServer(port=0, history=history)
        port = await nursery.start(first.serve)
        async with chatkit.open_client(
            "127.0.0.1",
            port,
            name="bot",
            plugins=[rec, hooks.client],
            event_buffer=None,
            reconnect=policy,
        ):
            async with chatkit.open_client("127.0.0.1", port, name="alice") as alice:
                await alice.say("before")
                await rec.wait("chatkit_client_message")
            await first.aclose()
            await rec.wait("chatkit_client_reconnecting")
            second = chatkit.ChatServer(
                port=port,
                history=history,
                plugins=[hold],
                limits=chatkit.Limits(hook_timeout=30),
            )
            await nursery.start(second.serve)
            async with chatkit.open_client("127.0.0.1", port, name="alice") as alice:
                await alice.say("meanwhile")
                hold.opened.set()
                await rec.wait("chatkit_client_reconnected")
        await second.aclose()
    await rec.wait("chatkit_client_disconnected")

    calls = [
        (hook, arguments)
        for hook, arguments in rec.calls
        if hook != "chatkit_client_reconnecting" or arguments["attempt"] == 1
    ]
    (first_try,) = rec.of("chatkit_client_reconnecting")[:1]
    assert calls == [
        ("chatkit_client_connected", {"name": "bot"}),
        ("chatkit_client_message", {"text": "before"}),
        (
            "chatkit_client_interrupted",
            {"reason": "server shutting down: server shutting down"},
        ),
        ("chatkit_client_reconnecting", first_try),
        ("chatkit_client_message", {"text": "meanwhile"}),
        ("chatkit_client_reconnected", {"missed": 1}),
        ("chatkit_client_message", {"text": "back"}),
        ("chatkit_client_disconnected", {"reason": "closed by the client"}),
    ]
    assert first_try["attempt"] == 1 and first_try["error"] is None
    assert 0.01 <= first_try["delay"] <= 0.02


@pytest.mark.fires("chatkit_nick")
async def test_nick_can_be_vetoed_and_fails_closed(
    caplog: pytest.LogCaptureFixture, hooks: HookRecorder
) -> None:
    calls: list[tuple[str, str]] = []

    class Reserved:
        @chatkit.hookimpl
        async def chatkit_nick(self, user: chatkit.User, new: str) -> None:
            calls.append((user.name, new))
            if new.startswith("admin"):
                raise chatkit.Veto("that name is reserved")
            if new == "boom":
                raise RuntimeError("bug in the plugin")

    async with open_chat(
        plugins=[hooks.server, Reserved()], clients=["alice", "bob"]
    ) as chat:
        alice = chat["alice"]
        with pytest.raises(chatkit.Rejected, match="that name is reserved"):
            await alice.nick("admin1")
        with pytest.raises(chatkit.Rejected):
            await alice.nick("boom")  # a raising plugin refuses (fails closed)
        assert alice.name == "alice"
        await alice.nick("alicia")
        await chat.expect("bob", chatkit.Renamed, old="alice", new="alicia")
        assert calls == [("alice", "admin1"), ("alice", "boom"), ("alice", "alicia")]
        assert [r.name for r in chat.server.users] == ["alicia", "bob"]
    assert ".<locals>.Reserved' raised in chatkit_nick" in caplog.text


# --- issue 21: join veto, plugin commands, moderation observed ----------------


class Doorman:
    """Refuses ``vault`` (the reason names the user), raises on ``broken``;
    records every join asked, ``def`` or ``async def``."""

    def __init__(self, asynchronous: bool) -> None:
        self.asked: list[tuple[str, str]] = []
        self.asynchronous = asynchronous

    def decide(self, user: chatkit.User, room: str) -> None:
        self.asked.append((user.name, room))
        if room == "vault":
            raise chatkit.Veto(f"{user.name} may not enter the vault")
        if room == "broken":
            raise RuntimeError("bug in the doorman")

    @chatkit.hookimpl
    def chatkit_join(self, user: chatkit.User, room: str) -> Any:
        if not self.asynchronous:
            return self.decide(user, room)

        async def later() -> None:
            await trio.lowlevel.checkpoint()
            self.decide(user, room)

        return later()


@pytest.mark.fires("chatkit_join", "chatkit_user_joined")
@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_join_can_be_vetoed_and_only_the_joiner_hears_of_it(
    asynchronous: bool,
    open_raw: OpenRaw,
    hooks: HookRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    doorman = Doorman(asynchronous)
    async with chatkit.open_server(plugins=[hooks.server, doorman]) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        # The lobby a login puts one in is not asked about.
        assert doorman.asked == []
        await bob.send_json(type="join", room="vault", ref=1)
        assert await bob.receive_json() == {
            "type": "error",
            "code": "rejected",
            "message": "bob may not enter the vault",
            "ref": 1,
        }
        assert server.rooms.get("vault") is None  # not even created
        await alice.send_json(type="join", room="vault")
        await alice.expect("error", code="rejected")
        await bob.assert_silent()
        # A raising plugin is logged and the join goes on (fails open).
        await bob.send_json(type="join", room="broken", ref=2)
        await bob.expect("joined", room="broken", name="bob", ref=2)
        await bob.send_json(type="join", room="dev", ref=3)
        await bob.expect("joined", room="dev", name="bob", ref=3)
        await alice.assert_silent()
        assert doorman.asked == [
            ("bob", "vault"),
            ("alice", "vault"),
            ("bob", "broken"),
            ("bob", "dev"),
        ]
        assert server.rooms["broken"] == ("bob",)
        # A join of a room one is in is not asked again.
        await bob.send_json(type="join", room="dev", ref=4)
        await bob.expect("joined", room="dev", name="bob", ref=4)
        assert len(doorman.asked) == 4
        assert hooks.count("chatkit_join") == 4
    assert "plugin 'Doorman' raised in chatkit_join" in plugin_logs(caplog)


class Dice:
    """Answers ``/roll`` (always 4), refuses ``/forbidden``, breaks on
    ``/crash``; ``/roll`` in a room says which."""

    @chatkit.hookimpl
    def chatkit_command(
        self, user: chatkit.User, name: str, args: str, room: str | None
    ) -> str | None:
        if name == "roll":
            return f"{user.name} rolled {args or 'd6'}: 4" + (
                f" in {room}" if room else ""
            )
        if name == "forbidden":
            raise chatkit.Veto("not for you")
        if name == "crash":
            raise ZeroDivisionError("bug in the dice")
        return None


class Backup:
    """Answers whatever the plugins before it did not: proof that the first
    answer wins and that a failing plugin is skipped."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @chatkit.hookimpl
    async def chatkit_command(self, name: str) -> str | None:
        await trio.lowlevel.checkpoint()
        self.asked.append(name)
        return "backup answer" if name in {"crash", "other"} else None


@pytest.mark.fires("chatkit_command")
async def test_a_command_is_answered_privately_by_the_first_plugin_that_knows_it(
    open_raw: OpenRaw, hooks: HookRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    backup = Backup()
    async with chatkit.open_server(plugins=[hooks.server, Dice(), backup]) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        await alice.send_json(type="command", name="roll", args="2d6", ref=1)
        assert await alice.receive_json() == {
            "type": "command",
            "name": "roll",
            "text": "alice rolled 2d6: 4",
            "ref": 1,
        }
        await alice.send_json(type="command", name="roll", room="lobby", ref=2)
        assert await alice.receive_json() == {
            "type": "command",
            "name": "roll",
            "text": "alice rolled d6: 4 in lobby",
            "room": "lobby",
            "ref": 2,
        }
        assert backup.asked == []  # the first answer wins
        await alice.send_json(type="command", name="other", ref=3)
        await alice.expect("command", text="backup answer", ref=3)
        # Unknown to every plugin.
        await alice.send_json(type="command", name="nope", args="x", ref=4)
        assert await alice.receive_json() == {
            "type": "error",
            "code": "bad_request",
            "message": "no command /nope",
            "ref": 4,
        }
        # A veto stops the chain.
        await alice.send_json(type="command", name="forbidden", ref=5)
        await alice.expect("error", code="rejected", message="not for you", ref=5)
        # A raising plugin is logged and skipped: the next one answers.
        await alice.send_json(type="command", name="crash", ref=6)
        await alice.expect("command", text="backup answer", ref=6)
        # A room must be one's own; a name must be a name.
        await alice.send_json(type="command", name="roll", room="dev", ref=7)
        await alice.expect("error", code="not_in_room", ref=7)
        await alice.send_json(type="command", name="no way", ref=8)
        await alice.expect("error", code="bad_request", ref=8)
        assert backup.asked == ["other", "nope", "crash"]
        # Nobody else sees any of it.
        await bob.assert_silent()
        assert hooks.count("chatkit_command") == 6
    assert "plugin 'Dice' raised in chatkit_command" in plugin_logs(caplog)


async def test_a_command_nobody_can_answer_after_a_failure_is_rejected(
    open_raw: OpenRaw, caplog: pytest.LogCaptureFixture
) -> None:
    async with chatkit.open_server(plugins=[Dice()]) as server:
        alice = await login(open_raw, server.port, "alice")
        await alice.send_json(type="command", name="crash", ref=1)
        assert await alice.receive_json() == {
            "type": "error",
            "code": "rejected",
            "message": "/crash failed on the server",
            "ref": 1,
        }
    async with chatkit.open_server() as server:
        alice = await login(open_raw, server.port, "alice")
        await alice.send_json(type="command", name="roll", ref=2)
        await alice.expect("error", code="bad_request", message="no command /roll")
    assert "plugin 'Dice' raised in chatkit_command" in plugin_logs(caplog)


class Audit:
    """Records each moderation event, ``async def``."""

    def __init__(self) -> None:
        self.events: list[chatkit.Moderated] = []

    @chatkit.hookimpl
    async def chatkit_moderated(
        self, server: chatkit.ChatServer, event: chatkit.Moderated
    ) -> None:
        assert isinstance(server, chatkit.ChatServer)
        await trio.lowlevel.checkpoint()
        self.events.append(event)


@pytest.mark.fires("chatkit_moderated")
async def test_every_moderation_action_is_observed_once(
    open_raw: OpenRaw, hooks: HookRecorder
) -> None:
    audit = Audit()
    plugins = [audit, hooks.server]
    async with chatkit.open_server(plugins=plugins, operators=["alice"]) as server:
        alice, bob, carol = await crowd(open_raw, server.port, "alice", "bob", "carol")
        requests: list[dict[str, Any]] = [
            {"type": "op", "room": "lobby", "name": "bob"},
            {"type": "deop", "room": "lobby", "name": "bob"},
            {"type": "mute", "name": "bob", "room": "lobby", "reason": "shh"},
            {"type": "unmute", "name": "bob", "room": "lobby"},
            {"type": "ban", "address": "203.0.113.0/24", "reason": "spam"},
            {"type": "unban", "address": "203.0.113.0/24"},
            {"type": "kick", "name": "bob", "room": "lobby", "reason": "out"},
            {"type": "ban", "name": "carol", "reason": "bye"},
        ]
        for ref, request in enumerate(requests, 1):
            await alice.send_json(**request, ref=ref)
            await alice.expect("moderated", action=request["type"], ref=ref)
        # Refused requests are no actions.
        await alice.send_json(type="unmute", name="bob", ref=20)
        await alice.expect("error", code="bad_request", ref=20)
        await alice.send_json(type="kick", name="nobody", ref=21)
        await alice.expect("error", code="no_such_user", ref=21)
        await bob.send_json(type="kick", name="alice", ref=22)
        await bob.expect("error", code="forbidden", ref=22)
        assert [(e.action, e.by, e.name or e.address) for e in audit.events] == [
            ("op", "alice", "bob"),
            ("deop", "alice", "bob"),
            ("mute", "alice", "bob"),
            ("unmute", "alice", "bob"),
            ("ban", "alice", "203.0.113.0/24"),
            ("unban", "alice", "203.0.113.0/24"),
            ("kick", "alice", "bob"),
            ("ban", "alice", "carol"),
        ]
        assert audit.events[2] == chatkit.Moderated(
            action="mute", by="alice", name="bob", room="lobby", reason="shh"
        )
        assert all(event.ref is None for event in audit.events)
        await carol.assert_closed()
        # The server's Python API fires it too, kick() (which cannot await)
        # included.
        audit.events.clear()
        await server.mute("bob", reason="quiet", duration=60)
        assert server.kick("bob", "enough")
        assert not server.kick("nobody")
        await wait_until(lambda: len(audit.events) == 2)
        mute, kick = audit.events
        assert (mute.action, mute.by, mute.name, mute.reason) == (
            "mute",
            "*server*",
            "bob",
            "quiet",
        )
        assert mute.until is not None
        assert kick == chatkit.Moderated(
            action="kick", by="*server*", name="bob", reason="enough"
        )
        await server.op("dev", "alice")
        await server.unban("carol")
        assert [e.action for e in audit.events] == ["mute", "kick", "op", "unban"]
    assert hooks.count("chatkit_moderated") == 12
