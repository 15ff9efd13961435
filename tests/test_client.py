"""The ChatClient API end to end, against a real server on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

import chatkit
from chatkit.testing import Chat, open_chat
from tests.helpers import TIMEOUT, serving, unref


def connect(server: chatkit.ChatServer, name: str, **kwargs: Any) -> chatkit.ChatClient:
    return chatkit.open_client("127.0.0.1", server.port, name=name, **kwargs)


async def next_event(client: chatkit.ChatClient) -> chatkit.Event:
    with trio.fail_after(TIMEOUT):
        return await client.__anext__()


@pytest.fixture
async def alice(server: chatkit.ChatServer) -> AsyncIterator[chatkit.ChatClient]:
    async with connect(server, "alice") as client:
        assert await next_event(client) == chatkit.Joined(room="lobby", name="alice")
        yield client


@pytest.fixture
async def bob(
    server: chatkit.ChatServer, alice: chatkit.ChatClient
) -> AsyncIterator[chatkit.ChatClient]:
    """bob, logged in after alice; alice's notice of him is consumed."""
    async with connect(server, "bob") as client:
        assert await next_event(client) == chatkit.Joined(room="lobby", name="bob")
        assert await next_event(alice) == chatkit.Joined(room="lobby", name="bob")
        yield client


# --- connecting --------------------------------------------------------------


async def test_connect_logs_in_and_tracks_the_welcome(
    server: chatkit.ChatServer,
) -> None:
    async with connect(server, "alice") as client:
        assert client.name == "alice"
        assert client.joined_rooms == {"lobby"}
        assert client.server_name == "chatkit"
        assert not client.closed
        assert server.rooms == {"lobby": ("alice",)}
    assert client.closed
    assert server.rooms == {"lobby": ()}


# --- requests ----------------------------------------------------------------


async def test_say_returns_the_delivered_message(chat: Chat) -> None:
    alice = chat["alice"]
    first = await alice.say("hi bob")
    assert isinstance(first, chatkit.Message)
    assert (first.room, first.sender, first.text) == ("lobby", "alice", "hi bob")
    assert await chat.next_event("bob") == unref(first)
    # The sender's own copy is in its event stream too, ref and all.
    assert await chat.next_event("alice") == first
    second = await alice.say("still there?")
    assert second.id > first.id
    assert await chat.next_event("bob") == unref(second)


async def test_say_in_another_room(
    alice: chatkit.ChatClient, bob: chatkit.ChatClient
) -> None:
    await alice.join("dev")
    assert unref(await next_event(alice)) == chatkit.Joined(room="dev", name="alice")
    message = await alice.say("dev only", room="dev")
    assert (message.room, message.text) == ("dev", "dev only")
    await bob.join("dev")
    assert unref(await next_event(bob)) == chatkit.Joined(room="dev", name="bob")
    assert await bob.history("dev") == (unref(message),)


async def test_dm_returns_the_delivered_message(chat: Chat) -> None:
    sent = await chat["alice"].dm("bob", "psst")
    assert isinstance(sent, chatkit.DirectMessage)
    assert (sent.sender, sent.to, sent.text) == ("alice", "bob", "psst")
    assert await chat.next_event("bob") == unref(sent)


async def test_join_leave_who_rooms(
    alice: chatkit.ChatClient, bob: chatkit.ChatClient
) -> None:
    assert await alice.join("dev") is None
    assert alice.joined_rooms == {"lobby", "dev"}
    assert await alice.who("dev") == ("alice",)
    assert await alice.who() == ("alice", "bob")
    assert await bob.who("nowhere") == ()
    assert await bob.rooms() == {"dev": 1, "lobby": 2}
    assert await alice.leave("dev") is None
    assert alice.joined_rooms == {"lobby"}
    assert await alice.rooms() == {"lobby": 2}
    with pytest.raises(chatkit.NotInRoom) as info:
        await alice.leave("dev")
    assert info.value.code == "not_in_room"


async def test_nick_renames_and_others_see_it(chat: Chat) -> None:
    alice, bob = chat["alice"], chat["bob"]
    assert await alice.nick("alicia") is None
    assert alice.name == "alicia"
    assert await chat.next_event(bob) == chatkit.Renamed(old="alice", new="alicia")
    assert await bob.who() == ("alicia", "bob")
    assert chat.server.get_user("alicia") is not None
    message = await alice.say("new name")
    assert message.sender == "alicia"


async def test_history_with_limit_before_and_after(
    alice: chatkit.ChatClient,
) -> None:
    said = [unref(await alice.say(f"m{n}")) for n in range(5)]
    ids = [m.id for m in said]
    assert await alice.history("lobby") == tuple(said)
    assert await alice.history("lobby", limit=2) == tuple(said[-2:])
    assert await alice.history("lobby", limit=0) == ()
    assert await alice.history("lobby", before=ids[2]) == tuple(said[:2])
    assert await alice.history("lobby", after=ids[2]) == tuple(said[3:])
    # With ``after``, a page is the oldest messages after it (catching up).
    assert await alice.history("lobby", 1, before=ids[3], after=ids[0]) == (said[1],)
    assert await alice.history("lobby", 2, after=ids[0]) == tuple(said[1:3])
    assert await alice.history("lobby", 2, before=ids[4]) == tuple(said[2:4])
    assert await alice.history("lobby", after=ids[-1]) == ()


async def test_a_history_reply_longer_than_the_servers_line_limit_arrives() -> None:
    # A page of long messages, each within the server's limits, is a line
    # well over 64 KiB (the server's limit for the lines it reads).
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(rate_limit=None),
        ) as server,
        connect(server, "alice") as alice,
    ):
        longest = server.limits.max_message_length
        texts = ["x" * longest, "\U0001f600" * longest]  # 4 and 16 KiB
        said = [unref(await alice.say(texts[n % 2])) for n in range(20)]
        with trio.fail_after(TIMEOUT):
            assert await alice.history("lobby", 20) == tuple(said)


async def serve_oddly(stream: trio.SocketStream) -> None:
    """A server that logs one client in, answers ``history`` with an invalid
    line that has the request's ref, and ``ping`` with a 2000-byte message
    before the pong and a short one after it."""
    proto = chatkit.protocol.ServerConnection()

    async def next_request() -> Any:
        while (request := proto.next_event()) is chatkit.protocol.NEED_DATA:
            proto.receive_data(await stream.receive_some(65536))
        return request

    hello = await next_request()
    await stream.send_all(
        proto.send(chatkit.Welcome(name=hello.name, protocol=1, server="odd", rooms=()))
    )
    while True:
        request = await next_request()
        if isinstance(request, chatkit.protocol.History):
            await stream.send_all(
                b'{"type":"history","room":"lobby","messages":"none","ref":%d}\n'
                % request.ref
            )
        elif isinstance(request, chatkit.protocol.Ping):
            for text in ["x" * 2000, "short"]:
                message = chatkit.Message(
                    id=len(text), ts=1.0, room="lobby", sender="bob", text=text
                )
                await stream.send_all(proto.send(message))
            await stream.send_all(proto.send(chatkit.Pong(ref=request.ref)))
        else:
            return


async def test_a_bad_answer_fails_its_request_and_long_lines_are_dropped() -> None:
    async with (
        serving(serve_oddly) as port,
        chatkit.open_client(
            "127.0.0.1", port, name="alice", max_line_length=1000
        ) as alice,
    ):
        with trio.fail_after(TIMEOUT):
            # Answered, with an error, rather than never.
            with pytest.raises(chatkit.BadRequest, match="bad answer"):
                await alice.history("lobby")
            # A line over max_line_length is dropped, and only that line.
            await alice.ping()
            event = await next_event(alice)
            assert isinstance(event, chatkit.Message)
            assert event.text == "short"


# Far more than the socket buffers between client and StallingServer hold
# (the server's receive buffer is fixed small; the client's send buffer
# grows to a few MiB at most): sending it waits for the server to read.
HUGE = 16 * 1024 * 1024


class StallingServer:
    """Serves each connection by hand. The first one stops reading part-way
    through the first ``say`` (a line of HUGE bytes, so the client's send
    waits) until ``unstall`` is set, then reads to the end; the next ones
    answer normally."""

    def __init__(self) -> None:
        self.connections = 0
        self.stalled = trio.Event()
        self.unstall = trio.Event()
        self.first_closed = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        await self._serve(stream, self.connections)

    async def _serve(self, stream: trio.SocketStream, number: int) -> None:
        proto = chatkit.protocol.ServerConnection()
        received = b""
        while True:
            while (request := proto.next_event()) is chatkit.protocol.NEED_DATA:
                data = await stream.receive_some(10 if number == 1 else 65536)
                received += data
                if number == 1 and b'"say"' in received:
                    # Part of the say line read: the client's send_all waits
                    # for us to read the rest, which we do only when told.
                    self.stalled.set()
                    await self.unstall.wait()
                    with contextlib.suppress(trio.BrokenResourceError):
                        while await stream.receive_some(1024 * 1024):
                            pass
                    self.first_closed.set()
                    return
                proto.receive_data(data)
            match request:
                case chatkit.protocol.Hello(name=name):
                    welcome = chatkit.Welcome(
                        name=name, protocol=1, server="fake", rooms=("lobby",)
                    )
                    await stream.send_all(proto.send(welcome))
                case chatkit.protocol.History(room=room, ref=ref):
                    reply = chatkit.HistoryReply(room=room, messages=(), ref=ref)
                    await stream.send_all(proto.send(reply))
                case chatkit.protocol.Say(room=room, text=text, ref=ref):
                    message = chatkit.Message(
                        id=1, ts=1.0, room=room, sender=name, text=text, ref=ref
                    )
                    await stream.send_all(proto.send(message))
                case _:
                    return


@pytest.mark.parametrize("reconnect", [False, True], ids=["alone", "reconnect"])
async def test_a_request_cancelled_mid_line_costs_the_connection(
    reconnect: bool,
) -> None:
    # Half a line on the wire would swallow the next request: the connection
    # is given up (and got back, with a reconnect policy) instead.
    server = StallingServer()
    policy = chatkit.Reconnect(initial_delay=0.01, jitter=0) if reconnect else None
    async with (
        serving(server.serve, receive_buffer=16 * 1024) as port,
        chatkit.open_client(
            "127.0.0.1",
            port,
            name="alice",
            reconnect=policy,
            server_max_line_length=2 * HUGE,
        ) as alice,
    ):
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as requests:
                requests.start_soon(alice.say, "x" * HUGE)
                await server.stalled.wait()
                requests.cancel_scope.cancel()
            server.unstall.set()
            await server.first_closed.wait()
            if reconnect:
                assert (await alice.say("after")).text == "after"
                assert server.connections == 2
            else:
                with pytest.raises(chatkit.ConnectionClosed):
                    await alice.say("after")
                assert alice.close_reason == "a request was cancelled while being sent"


async def test_ping_returns_the_round_trip_time(alice: chatkit.ChatClient) -> None:
    rtt = await alice.ping()
    assert isinstance(rtt, float)
    assert 0 <= rtt < TIMEOUT


async def test_concurrent_requests_each_get_their_own_answer(
    alice: chatkit.ChatClient, bob: chatkit.ChatClient
) -> None:
    results: dict[str, Any] = {}

    async def ask(key: str, request: Any) -> None:
        results[key] = await request()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "who", alice.who)
            nursery.start_soon(ask, "rooms", alice.rooms)
            nursery.start_soon(ask, "history", lambda: alice.history("lobby"))
            nursery.start_soon(ask, "ping", alice.ping)
    assert results["who"] == ("alice", "bob")
    assert results["rooms"] == {"lobby": 2}
    assert results["history"] == ()
    assert isinstance(results["ping"], float)


# --- events ------------------------------------------------------------------


class SlowHistory(chatkit.MemoryHistory):
    """History whose pages take a while: an answer that comes late."""

    async def recent(self, room: str, limit: int) -> Any:
        await trio.sleep(0.3)
        return await super().recent(room, limit)


async def test_a_late_answer_to_a_cancelled_request_is_not_an_event() -> None:
    async with (
        chatkit.open_server(history=SlowHistory()) as server,
        connect(server, "alice") as alice,
    ):
        assert isinstance(await next_event(alice), chatkit.Joined)
        with trio.move_on_after(0.1):  # sent, then given up before the answer
            await alice.history("lobby")
        await trio.sleep(0.3)  # the answer has come meanwhile
        said = await alice.say("hi")
        assert await next_event(alice) == said


async def test_iteration_yields_typed_events_and_ends_at_shutdown(
    server: chatkit.ChatServer,
) -> None:
    async with connect(server, "bob") as bob:
        async with connect(server, "alice") as alice:
            said = await alice.say("hello")
            await alice.join("dev")
            await bob.join("dev")
            await alice.nick("alicia")
            await alice.leave("dev")
        await server.aclose()
        events = []
        with trio.fail_after(TIMEOUT):
            async for event in bob:
                events.append(event)
    assert [type(event) for event in events] == [
        chatkit.Joined,
        chatkit.Joined,
        chatkit.Message,
        chatkit.Joined,
        chatkit.Renamed,
        chatkit.Left,
        chatkit.Left,
        chatkit.Shutdown,
    ]
    # Only bob's own join (a request of his) carries a ref.
    assert [unref(event) for event in events] == [
        chatkit.Joined(room="lobby", name="bob"),
        chatkit.Joined(room="lobby", name="alice"),
        unref(said),
        chatkit.Joined(room="dev", name="bob"),
        chatkit.Renamed(old="alice", new="alicia"),
        chatkit.Left(room="dev", name="alicia", reason="leave"),
        chatkit.Left(room="lobby", name="alicia", reason="bye"),
        chatkit.Shutdown(reason="server shutting down"),
    ]
    assert bob.close_reason == "server shutting down: server shutting down"


async def test_closing_sends_bye(
    server: chatkit.ChatServer, alice: chatkit.ChatClient
) -> None:
    async with connect(server, "bob") as bob:
        assert await next_event(alice) == chatkit.Joined(room="lobby", name="bob")
        await bob.join("dev")
        await alice.join("dev")
    assert unref(await next_event(alice)) == chatkit.Joined(room="dev", name="alice")
    assert await next_event(alice) == chatkit.Left(
        room="lobby", name="bob", reason="bye"
    )
    assert await next_event(alice) == chatkit.Left(room="dev", name="bob", reason="bye")
    assert server.get_user("bob") is None


async def test_a_kicked_client_sees_why_and_its_events_end(
    server: chatkit.ChatServer, alice: chatkit.ChatClient
) -> None:
    assert server.kick("alice", "spam")
    assert await next_event(alice) == chatkit.ErrorReply(code="kicked", message="spam")
    with trio.fail_after(TIMEOUT), pytest.raises(StopAsyncIteration):
        await alice.__anext__()
    assert alice.closed
    assert alice.close_reason == "kicked: spam"
    with trio.fail_after(TIMEOUT), pytest.raises(chatkit.ConnectionClosed):
        await alice.say("let me back")


async def test_iterating_without_an_event_buffer_is_an_error(
    server: chatkit.ChatServer,
) -> None:
    async with connect(server, "alice", event_buffer=None) as alice:
        with pytest.raises(RuntimeError, match="event_buffer=None"):
            async for _ in alice:
                pass  # pragma: no cover
        # Requests still work.
        assert await alice.who() == ("alice",)


# --- errors ------------------------------------------------------------------


async def test_a_taken_name_fails_to_connect(
    server: chatkit.ChatServer, alice: chatkit.ChatClient
) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(chatkit.NameTaken) as info:
        async with connect(server, "ALICE"):
            pytest.fail("connected with a taken name")  # pragma: no cover
    assert info.value.code == "name_taken"
    assert info.value.message == "ALICE is taken"
    assert isinstance(info.value, chatkit.RequestError)
    assert str(info.value) == "name_taken: ALICE is taken"
    assert await alice.who() == ("alice",)


async def test_a_bad_name_fails_to_connect(server: chatkit.ChatServer) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(chatkit.BadName) as info:
        async with connect(server, "no spaces"):
            pytest.fail("connected with a bad name")  # pragma: no cover
    assert info.value.code == "bad_name"


async def test_request_errors_raise_chat_error_subclasses(
    alice: chatkit.ChatClient, bob: chatkit.ChatClient
) -> None:
    cases: list[tuple[Any, type[chatkit.RequestError], str]] = [
        (lambda: alice.nick("no spaces"), chatkit.BadName, "bad_name"),
        (lambda: alice.nick("BOB"), chatkit.NameTaken, "name_taken"),
        (lambda: alice.join("bad room!"), chatkit.BadName, "bad_name"),
        (lambda: alice.say("hi", room="nowhere"), chatkit.NotInRoom, "not_in_room"),
        (lambda: alice.history("nowhere"), chatkit.NotInRoom, "not_in_room"),
        (lambda: alice.leave("nowhere"), chatkit.NotInRoom, "not_in_room"),
        (lambda: alice.dm("nobody", "hi"), chatkit.NoSuchUser, "no_such_user"),
    ]
    for request, error, code in cases:
        with trio.fail_after(TIMEOUT), pytest.raises(error) as info:
            await request()
        assert type(info.value) is error
        assert info.value.code == code
        assert info.value.message
    # None of it changed anything.
    assert alice.name == "alice"
    assert alice.joined_rooms == {"lobby"}
    assert await alice.who() == ("alice", "bob")


async def test_a_request_over_the_servers_line_limit_raises_too_large() -> None:
    # The server cannot parse such a line, so its `too_large` has no ref: the
    # request would never be answered. The client refuses it itself.
    async with chatkit.open_server(
        limits=chatkit.Limits(max_line_length=2000),
    ) as server:
        async with connect(server, "alice", server_max_line_length=2000) as alice:
            with trio.fail_after(TIMEOUT):
                with pytest.raises(chatkit.TooLarge) as info:
                    await alice.say("x" * 2000)
                assert info.value.code == "too_large"
                # Nothing was sent: the connection goes on as before.
                assert (await alice.say("x" * 1900)).text == "x" * 1900
        async with connect(server, "bob") as bob:  # the default: 64 KiB
            with trio.fail_after(TIMEOUT), pytest.raises(chatkit.TooLarge):
                await bob.say("x" * 70_000)


class NoShouting:
    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> None:
        if text.isupper():
            raise chatkit.Veto("please don't shout")

    @chatkit.hookimpl
    def chatkit_dm(self, text: str) -> None:
        if text.isupper():
            raise chatkit.Veto("not even privately")


async def test_a_rejecting_server_plugin_raises_rejected() -> None:
    async with open_chat(plugins=[NoShouting()], clients=["alice", "bob"]) as chat:
        alice = chat["alice"]
        with pytest.raises(chatkit.Rejected) as info:
            await alice.say("HELLO")
        assert (info.value.code, info.value.message) == (
            "rejected",
            "please don't shout",
        )
        with pytest.raises(chatkit.Rejected) as info:
            await alice.dm("bob", "HELLO")
        assert (info.value.code, info.value.message) == (
            "rejected",
            "not even privately",
        )
        hello = await alice.say("hello")
        assert hello.text == "hello"
        # The refused message and DM reached nobody: bob's first event is this.
        assert await chat.next_event("bob") == unref(hello)


class Gatekeeper:
    @chatkit.hookimpl
    def chatkit_authenticate(self, token: str | None) -> None:
        if token != "open sesame":
            raise chatkit.Veto("members only")


async def test_a_refusing_authenticate_plugin_raises_unauthorized() -> None:
    async with open_chat(plugins=[Gatekeeper()]) as chat:
        with trio.fail_after(TIMEOUT), pytest.raises(chatkit.Unauthorized) as info:
            await chat.connect("alice", token="guess")
        assert (info.value.code, info.value.message) == ("unauthorized", "members only")
        assert chat.server.users == ()
        alice = await chat.connect("alice", token="open sesame")
        assert alice.name == "alice"


# --- the connection ending ---------------------------------------------------


async def test_requests_after_the_server_is_gone_raise_connection_closed() -> None:
    async with chatkit.open_server() as server, connect(server, "alice") as alice:
        await server.aclose()
        with trio.fail_after(TIMEOUT):
            for request in (
                lambda: alice.say("anyone?"),
                lambda: alice.dm("alice", "hi"),
                alice.who,
                alice.rooms,
                alice.ping,
                lambda: alice.history("lobby"),
                lambda: alice.join("dev"),
            ):
                with pytest.raises(chatkit.ConnectionClosed) as info:
                    await request()
                assert info.value.code == "connection_closed"
        assert alice.closed


class Stall:
    """Holds every message forever (well, for the hook timeout)."""

    def __init__(self) -> None:
        self.stalled = trio.Event()

    @chatkit.hookimpl
    async def chatkit_message(self) -> None:
        self.stalled.set()
        await trio.sleep_forever()


async def test_a_request_in_flight_when_the_server_goes_raises_connection_closed() -> (
    None
):
    stall = Stall()
    async with (
        chatkit.open_server(
            plugins=[stall],
            limits=chatkit.Limits(hook_timeout=60),
        ) as server,
        connect(server, "alice") as alice,
    ):
        outcome: list[BaseException] = []

        async def say() -> None:
            try:
                await alice.say("stuck")
            except chatkit.ConnectionClosed as exc:
                outcome.append(exc)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(say)
                await stall.stalled.wait()
                assert outcome == []
                await server.aclose()
        (closed,) = outcome
        assert closed.message == "server shutting down: server shutting down"


async def test_aclose_is_idempotent_and_does_not_cancel_the_body(
    server: chatkit.ChatServer, alice: chatkit.ChatClient
) -> None:
    reached = False
    try:
        async with connect(server, "bob") as bob:
            await bob.aclose()
            assert bob.closed
            await bob.aclose()
            await trio.sleep(0.01)  # a checkpoint: raises if the body was cancelled
            with pytest.raises(chatkit.ConnectionClosed):
                await bob.say("gone")
            reached = True
    finally:
        # In ``finally``: a stray Cancelled would otherwise end the test
        # quietly, skipping every assertion after it.
        assert reached, "aclose() cancelled the rest of the body"
    assert await next_event(alice) == chatkit.Joined(room="lobby", name="bob")
    assert await next_event(alice) == chatkit.Left(
        room="lobby", name="bob", reason="bye"
    )
    assert await alice.who() == ("alice",)


async def test_an_exception_in_the_body_propagates_unchanged(
    server: chatkit.ChatServer, alice: chatkit.ChatClient
) -> None:
    error = KeyError("mine")
    with pytest.raises(KeyError) as info:
        async with connect(server, "bob"):
            raise error
    assert info.value is error
    assert await next_event(alice) == chatkit.Joined(room="lobby", name="bob")
    assert await next_event(alice) == chatkit.Left(
        room="lobby", name="bob", reason="bye"
    )


async def test_a_client_cannot_be_entered_twice(server: chatkit.ChatServer) -> None:
    client = connect(server, "alice")
    async with client:
        with pytest.raises(RuntimeError, match="already entered"):
            await client.__aenter__()


async def test_aclose_cancelled_midway_leaves_no_task_behind(
    server: chatkit.ChatServer,
) -> None:
    # A task iterating the client cancels the surrounding nursery as soon as
    # the connection ends, i.e. while aclose() is still waiting: aclose must
    # still stop every background task (the keepalive pinger among them), or
    # leaving the `async with` would hang.
    with trio.fail_after(5):
        async with (
            chatkit.open_client("127.0.0.1", server.port, name="alice") as alice,
            trio.open_nursery() as nursery,
        ):

            async def show_events() -> None:
                async for _ in alice:
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(show_events)
            await alice.say("hi")
            await alice.aclose()
            nursery.cancel_scope.cancel()
