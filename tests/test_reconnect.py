"""Reconnect and resume: a client connected with ``reconnect=`` gets its
connection back after a server restart or a network blip, under the same
name, in the same rooms, and delivers every message it missed, once, in
order."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from unittest.mock import ANY

import pytest
import trio
import trio.testing

import chatkit
from tests.helpers import TIMEOUT, HoldLogin, serving, wait_until

_T = TypeVar("_T")

# Fast and repeatable: real-socket tests should not sit in backoff.
FAST = chatkit.Reconnect(initial_delay=0.02, max_delay=0.1, rng=random.Random(1).random)


# --- the policy --------------------------------------------------------------


def test_delays_grow_are_jittered_and_capped() -> None:
    policy = chatkit.Reconnect(
        initial_delay=1,
        multiplier=2,
        max_delay=8,
        jitter=0.5,
        rng=random.Random(42).random,
    )
    delays = [policy.delay(attempt) for attempt in range(1, 9)]
    bases = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, base in zip(delays, bases, strict=True):
        assert base * 0.5 <= delay <= base
    assert len(set(delays)) == len(delays)  # jittered: no two alike
    # Without jitter, the plain exponential series, capped.
    exact = chatkit.Reconnect(initial_delay=1, multiplier=2, max_delay=8, jitter=0)
    assert [exact.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    # A long outage neither overflows nor exceeds the cap.
    assert exact.delay(100_000) == 8
    assert chatkit.Reconnect(multiplier=1, jitter=0).delay(50) == 0.5


def test_full_jitter_spans_zero_to_the_delay() -> None:
    values = iter([0.0, 0.999, 0.5])
    policy = chatkit.Reconnect(
        initial_delay=2, max_delay=2, jitter=1, rng=lambda: next(values)
    )
    assert [policy.delay(1) for _ in range(3)] == pytest.approx([2, 0.002, 1])


@pytest.mark.parametrize(
    "options",
    [
        {"initial_delay": 0},
        {"initial_delay": 5, "max_delay": 1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"max_attempts": 0},
        {"max_name_taken": 0},
        {"give_up_after": 0},
        {"request_timeout": -1},
        {"ping_timeout": 0},
        {"max_held": -1},
    ],
)
def test_a_bad_policy_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        chatkit.Reconnect(**options)
    with pytest.raises(ValueError):
        chatkit.Reconnect().delay(0)


# --- helpers -----------------------------------------------------------------


class Inbox:
    """Everything a client yields, read by a task of its own."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.ended = False
        self._seen = 0
        self._lot = trio.lowlevel.ParkingLot()
        self.reading = trio.Event()  # cleared: the next event waits
        self.reading.set()

    async def read(self, client: chatkit.ChatClient) -> None:
        async for event in client:
            await self.reading.wait()
            self.events.append(event)
            self._lot.unpark_all()
        self.ended = True
        self._lot.unpark_all()

    async def expect(self, kind: type[_T], **fields: Any) -> _T:
        """The next event of ``kind`` with ``fields`` after the last one
        expected; fails after TIMEOUT or when the stream ends first."""
        with trio.fail_after(TIMEOUT):
            while True:
                for index in range(self._seen, len(self.events)):
                    event = self.events[index]
                    if isinstance(event, kind) and all(
                        getattr(event, key) == value for key, value in fields.items()
                    ):
                        self._seen = index + 1
                        return event
                if self.ended:
                    raise AssertionError(f"no {kind.__name__}{fields} in {self.events}")
                await self._lot.park()

    async def wait_end(self) -> None:
        with trio.fail_after(TIMEOUT):
            while not self.ended:
                await self._lot.park()

    def messages(self) -> list[tuple[str, str]]:
        return [
            (event.room, event.text)
            for event in self.events
            if isinstance(event, chatkit.Message)
        ]

    def of(self, kind: type[_T]) -> list[_T]:
        return [event for event in self.events if isinstance(event, kind)]


@asynccontextmanager
async def reading(
    client: chatkit.ChatClient, nursery: trio.Nursery
) -> AsyncIterator[Inbox]:
    inbox = Inbox()
    nursery.start_soon(inbox.read, client)
    yield inbox


class _Link:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.scope = trio.CancelScope()
        self.frozen = False

    async def pump(
        self, source: trio.abc.Stream, sink: trio.abc.Stream, *, upstream: bool
    ) -> None:
        while data := await source.receive_some(65536):
            if self.frozen:
                await trio.sleep_forever()  # bytes vanish: a network gone quiet
            trigger = self.proxy.cut_before
            if upstream and trigger is not None and trigger in data:
                self.proxy.cut_before = None
                break  # not forwarded: the link is cut instead
            await sink.send_all(data)
        self.scope.cancel()


class Proxy:
    """A TCP relay to a server: the network between client and server, which
    a test can cut (both ends see the connection close), take down (new
    connections are hung up on) or freeze (bytes stop, sockets stay open)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.up = True
        self.links: list[_Link] = []
        # The next client bytes that contain this are not forwarded: the
        # link is cut instead (once).
        self.cut_before: bytes | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._relay, listeners, task_status=task_status)

    async def _relay(self, downstream: trio.SocketStream) -> None:
        upstream: trio.SocketStream | None = None
        try:
            if not self.up:
                return
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
            link = _Link(self)
            self.links.append(link)
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(link.pump, downstream, upstream, upstream=True)
                    )
                    nursery.start_soon(
                        partial(link.pump, upstream, downstream, upstream=False)
                    )
        finally:
            # Shielded: the second close must not be skipped by a Cancelled
            # that the first one re-raises.
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(downstream)
                if upstream is not None:
                    await trio.aclose_forcefully(upstream)

    def cut(self) -> None:
        for link in self.links:
            link.scope.cancel()
        self.links.clear()

    def freeze(self) -> None:
        for link in self.links:
            link.frozen = True


def connect(port: int, name: str, **kwargs: Any) -> chatkit.ChatClient:
    kwargs.setdefault("reconnect", FAST)
    return chatkit.open_client("127.0.0.1", port, name=name, **kwargs)


def plain(port: int, name: str) -> chatkit.ChatClient:
    """A client that does not reconnect (the others in the room)."""
    return chatkit.open_client("127.0.0.1", port, name=name)


def unique_in_order(messages: Sequence[chatkit.Message]) -> None:
    ids = [message.id for message in messages]
    assert len(ids) == len(set(ids)), "a message came twice"
    for room in {message.room for message in messages}:
        in_room = [message.id for message in messages if message.room == room]
        assert in_room == sorted(in_room), f"{room} out of order"


# --- entering ----------------------------------------------------------------


async def test_entering_unbuffered_is_prompt_and_marks_the_lobby() -> None:
    # Entering asks for the lobby's newest message: where the lobby's news
    # starts, should the client have to resume it. With event_buffer=0 its
    # answer must not wait behind our own `joined lobby`, which nobody reads
    # before entering returns.
    with trio.fail_after(TIMEOUT * 2):
        async with (
            trio.open_nursery() as nursery,
            chatkit.open_server() as server,
            plain(server.port, "bob") as bob,
        ):
            proxy = Proxy(server.port)
            await nursery.start(proxy.serve)
            await bob.say("before")
            with trio.fail_after(TIMEOUT):
                async with connect(
                    proxy.port, "alice", event_buffer=0, connect_timeout=TIMEOUT * 2
                ) as alice:
                    # What came meanwhile is delivered, in order.
                    assert await alice.__anext__() == chatkit.Joined(
                        room="lobby", name="alice"
                    )
                    # Dropped before any message of the lobby reached her:
                    # the resume reads the lobby from its mark on, so what
                    # was said before she came is not news.
                    await drop_alice(server, proxy)
                    await bob.say("missed")
                    proxy.up = True
                    messages = []
                    async for event in alice:
                        if isinstance(event, chatkit.Message):
                            messages.append(event.text)
                        if isinstance(event, chatkit.Reconnected):
                            assert event.missed == 1
                            break
                    assert messages == ["missed"]
            nursery.cancel_scope.cancel()


# --- server restart ----------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    """Makes the history store of each server in a restart: one shared
    MemoryHistory, or a new SqliteHistory on the same file (as a restarted
    server process opens it)."""
    if request.param == "memory":
        shared = chatkit.MemoryHistory()
        return lambda: shared
    return lambda: chatkit.SqliteHistory(tmp_path / "history.sqlite3")


async def test_a_client_resumes_across_a_server_restart(
    store: Callable[[], Any],
) -> None:
    gate = HoldLogin("alice")
    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            first = chatkit.ChatServer(port=0, history=store())
            port = await nursery.start(first.serve)
            async with (
                connect(port, "alice") as alice,
                reading(alice, nursery) as inbox,
            ):
                await alice.join("dev")
                async with plain(port, "bob") as bob:
                    await bob.join("dev")
                    await bob.say("one")
                    await bob.say("d1", room="dev")
                    await inbox.expect(chatkit.Message, text="d1")

                await first.aclose()  # a planned restart: `shutdown` first
                await inbox.expect(chatkit.Shutdown)
                lost = await inbox.expect(chatkit.Interrupted)
                assert lost.reason == "server shutting down: server shutting down"
                await inbox.expect(chatkit.Reconnecting, attempt=1, error=None)
                assert alice.reconnecting and not alice.connected
                assert not alice.closed

                # The same port, the same store: ids go on. alice is held at
                # the door while bob says what she will have missed.
                second = chatkit.ChatServer(
                    port=port,
                    history=store(),
                    plugins=[gate],
                    limits=chatkit.Limits(hook_timeout=30),
                )
                await nursery.start(second.serve)
                async with plain(port, "bob") as bob:
                    await bob.join("dev")
                    await bob.say("two")
                    await bob.say("d2", room="dev")
                    await bob.say("three")
                    gate.opened.set()
                    reconnected = await inbox.expect(chatkit.Reconnected)
                    assert reconnected.missed == 3
                    assert alice.connected and not alice.reconnecting
                    await bob.say("live")
                    await inbox.expect(chatkit.Message, text="live")
                    await bob.say("d-live", room="dev")
                    await inbox.expect(chatkit.Message, text="d-live")

                assert alice.name == "alice"
                assert alice.joined_rooms == {"lobby", "dev"}
                assert second.rooms["dev"] == ("alice",)
                messages = inbox.of(chatkit.Message)
                unique_in_order(messages)
                assert inbox.messages() == [
                    ("lobby", "one"),
                    ("dev", "d1"),
                    ("lobby", "two"),  # caught up: the lobby, then dev
                    ("lobby", "three"),
                    ("dev", "d2"),
                    ("lobby", "live"),
                    ("dev", "d-live"),
                ]
                # Missed messages come before Reconnected, live ones after;
                # our own re-joins are no news.
                position = {event.text: inbox.events.index(event) for event in messages}
                assert position["d2"] < inbox.events.index(reconnected)
                assert inbox.events.index(reconnected) < position["live"]
                assert not [
                    event
                    for event in inbox.events[inbox.events.index(lost) :]
                    if isinstance(event, chatkit.Joined) and event.name == "alice"
                ]
            await second.aclose()


async def test_a_restart_that_lost_history_is_detected() -> None:
    # The new server has a fresh store: its ids start over, below the ones
    # alice saw. She notices and reads the rooms from the start.
    gate = HoldLogin("alice")
    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            first = chatkit.ChatServer(port=0)
            port = await nursery.start(first.serve)
            async with (
                connect(port, "alice") as alice,
                reading(alice, nursery) as inbox,
            ):
                async with plain(port, "bob") as bob:
                    for text in ("a", "b", "c", "d"):
                        await bob.say(text)
                await inbox.expect(chatkit.Message, text="d")
                await first.aclose()
                await inbox.expect(chatkit.Reconnecting)

                second = chatkit.ChatServer(
                    port=port,
                    plugins=[gate],
                    limits=chatkit.Limits(hook_timeout=30),
                )
                await nursery.start(second.serve)
                async with plain(port, "bob") as bob:
                    said = await bob.say("after the restart")
                    assert said.id == 1
                    gate.opened.set()
                    assert (await inbox.expect(chatkit.Reconnected)).missed == 1
                    await bob.say("and live")  # id 2: new, not a duplicate
                    await inbox.expect(chatkit.Message, text="and live")
                assert [text for _, text in inbox.messages()] == [
                    "a",
                    "b",
                    "c",
                    "d",
                    "after the restart",
                    "and live",
                ]
            await second.aclose()


async def test_after_shutdown_false_ends_the_client_at_a_shutdown() -> None:
    policy = chatkit.Reconnect(after_shutdown=False)
    async with (
        chatkit.open_server() as server,
        connect(server.port, "alice", reconnect=policy) as alice,
    ):
        async with trio.open_nursery() as nursery, reading(alice, nursery) as inbox:
            await server.aclose()
            await inbox.wait_end()
        assert alice.closed and not alice.reconnecting
        assert alice.close_reason == "server shutting down: server shutting down"
        assert inbox.of(chatkit.ClientEvent) == []


# --- network blips -----------------------------------------------------------


class Scene(NamedTuple):
    server: chatkit.ChatServer
    proxy: Proxy
    alice: chatkit.ChatClient
    inbox: Inbox
    bob: chatkit.ChatClient | None


@asynccontextmanager
async def alice_behind_proxy(
    *, bob: bool = True, client: dict[str, Any] | None = None, **server_options: Any
) -> AsyncIterator[Scene]:
    """A server; alice (reconnecting, options ``client``) reaches it through
    a Proxy that can cut or freeze her link, her events in an Inbox; bob
    (unless ``bob=False``) talks to it directly. All within TIMEOUT * 2;
    every task is stopped on the way out."""
    with trio.fail_after(TIMEOUT * 2):
        async with (
            trio.open_nursery() as nursery,
            chatkit.open_server(**server_options) as server,
            AsyncExitStack() as stack,
        ):
            proxy = Proxy(server.port)
            await nursery.start(proxy.serve)
            alice = await stack.enter_async_context(
                connect(proxy.port, "alice", **(client or {}))
            )
            inbox = await stack.enter_async_context(reading(alice, nursery))
            other = (
                await stack.enter_async_context(plain(server.port, "bob"))
                if bob
                else None
            )
            yield Scene(server, proxy, alice, inbox, other)
            nursery.cancel_scope.cancel()


async def drop_alice(server: chatkit.ChatServer, proxy: Proxy) -> None:
    """Cut alice's link and keep the network down (until the test sets
    ``proxy.up``); return once the server has let her go."""
    proxy.up = False
    proxy.cut()
    await wait_until(lambda: server.get_user("alice") is None)


async def test_a_client_resumes_after_the_network_drops_it() -> None:
    async with alice_behind_proxy() as (server, proxy, alice, inbox, bob):
        await alice.join("dev")
        await bob.join("dev")
        await bob.say("before")
        await inbox.expect(chatkit.Message, text="before")

        proxy.up = False  # new connections are hung up on, for now
        proxy.cut()
        # (A close with unread data is a reset: "connection lost".)
        hung_up = {"server closed the connection", "connection lost"}
        lost = await inbox.expect(chatkit.Interrupted)
        assert lost.reason in hung_up
        await wait_until(lambda: server.get_user("alice") is None)
        await bob.say("while away")
        await bob.say("in dev too", room="dev")
        failed = await inbox.expect(chatkit.Reconnecting, attempt=2)
        assert failed.error in hung_up

        proxy.up = True
        assert (await inbox.expect(chatkit.Reconnected)).missed == 2
        await bob.say("after")
        await inbox.expect(chatkit.Message, text="after")
        assert inbox.messages() == [
            ("lobby", "before"),
            ("lobby", "while away"),
            ("dev", "in dev too"),
            ("lobby", "after"),
        ]
        assert set(server.rooms["dev"]) == {"alice", "bob"}


async def test_a_silent_network_is_noticed_and_the_old_session_taken_over() -> None:
    # The network goes quiet without closing anything: no answer to the
    # keepalive ping tells alice the connection is dead. The server still
    # holds it, but her reconnect sends back her welcome's resume secret and
    # takes that session over, rather than wait for her name.
    policy = chatkit.Reconnect(initial_delay=0.05, max_delay=0.1, ping_timeout=0.2)
    options = {"reconnect": policy, "keepalive": 0.1}
    async with alice_behind_proxy(client=options) as (server, proxy, _, inbox, bob):
        proxy.freeze()
        await bob.say("you will not hear this live")
        lost = await inbox.expect(chatkit.Interrupted)
        assert lost.reason == "no answer from the server in 0.2s"
        assert (await inbox.expect(chatkit.Reconnected)).missed == 1
        assert inbox.messages() == [("lobby", "you will not hear this live")]
        assert not [
            event
            for event in inbox.events
            if isinstance(event, chatkit.Reconnecting) and event.error
        ]
        assert [user.name for user in server.users].count("alice") == 1


async def test_a_name_taken_for_good_makes_the_client_give_up() -> None:
    policy = chatkit.Reconnect(initial_delay=0.01, max_delay=0.02, max_name_taken=3)
    async with alice_behind_proxy(bob=False, client={"reconnect": policy}) as (
        server,
        proxy,
        alice,
        inbox,
        _,
    ):
        await drop_alice(server, proxy)
        async with plain(server.port, "alice"):  # an impostor takes it
            proxy.up = True
            await inbox.wait_end()
        assert alice.closed and not alice.reconnecting
        # Attempts while the network was down count too, so how many
        # there were in all varies.
        assert alice.close_reason is not None
        assert re.fullmatch(
            r"gave up reconnecting after \d+ attempts: name_taken: alice is taken",
            alice.close_reason,
        )
        with pytest.raises(chatkit.ConnectionClosed):
            await alice.say("anyone?")


# --- catching up while live messages arrive ----------------------------------


class SlowHistory(chatkit.MemoryHistory):
    """Once armed, answers the first empty ``after`` page (the end of a
    catch-up) late: it is computed, then held until released while live
    messages go out, which that stale page does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.asked = trio.Event()
        self.release = trio.Event()

    async def let_back(self, proxy: Proxy) -> None:
        """Arm, bring the network back up, and return once the dropped
        client's catch-up has asked for its last page (held until
        ``release``)."""
        self.armed = True
        proxy.up = True
        await self.asked.wait()

    async def after(self, room: str, id: int, limit: int) -> Sequence[chatkit.Message]:
        page = await super().after(room, id, limit)
        if self.armed and not page:
            self.armed = False
            self.asked.set()
            await self.release.wait()
        return page


async def held_back(bob: chatkit.ChatClient, inbox: Inbox) -> None:
    """Return once alice's reader has seen everything bob said before: his
    private message comes after it on her connection and is never held."""
    await bob.dm("alice", "all said")
    await inbox.expect(chatkit.DirectMessage, text="all said")


@pytest.mark.parametrize("max_held", [1000, 2])
async def test_live_messages_during_catch_up_come_once_and_in_order(
    max_held: int,
) -> None:
    # The live messages arrive after the catch-up's last page was made:
    # they are held, then delivered after it. With max_held=2, most
    # overflow and are fetched again from history.
    slow = SlowHistory()
    policy = dataclasses.replace(FAST, max_held=max_held)
    scene = alice_behind_proxy(history=slow, client={"reconnect": policy})
    async with scene as (server, proxy, _, inbox, bob):
        await bob.say("m0")
        await inbox.expect(chatkit.Message, text="m0")
        await drop_alice(server, proxy)
        await bob.say("missed 1")
        await bob.say("missed 2")
        await slow.let_back(proxy)  # alice is back, catching up
        for n in range(5):
            await bob.say(f"live {n}")
        await held_back(bob, inbox)
        # Held back until the catch-up is done (or, past the limit,
        # dropped to be fetched again).
        assert [text for _, text in inbox.messages()] == ["m0", "missed 1", "missed 2"]
        slow.release.set()
        await inbox.expect(chatkit.Reconnected)
        await bob.say("last")
        await inbox.expect(chatkit.Message, text="last")
        unique_in_order(inbox.of(chatkit.Message))
        assert [text for _, text in inbox.messages()] == [
            "m0",
            "missed 1",
            "missed 2",
            *(f"live {n}" for n in range(5)),
            "last",
        ]


async def test_live_messages_after_an_overflow_are_not_lost() -> None:
    # Held messages overflow; while the held ones go out to a slow reader,
    # another live one comes. It must not be held (and delivered before
    # those dropped, moving the mark past them): all are fetched again.
    slow = SlowHistory()
    policy = dataclasses.replace(FAST, max_held=3)
    scene = alice_behind_proxy(
        history=slow, client={"reconnect": policy, "event_buffer": 1}
    )
    async with scene as (server, proxy, alice, inbox, bob):
        await drop_alice(server, proxy)
        await slow.let_back(proxy)  # alice is back, catching up
        for n in range(5):
            await bob.say(f"live {n}")
        await held_back(bob, inbox)  # 3 held, 2 dropped
        inbox.reading = trio.Event()  # the program reads no more, for now
        slow.release.set()
        # The held ones go out until the event buffer is full and the
        # catch-up waits for the program.
        await trio.testing.wait_all_tasks_blocked()
        await bob.say("live 5")
        await alice.ping()  # answered after live 5 reached alice
        inbox.reading.set()
        await inbox.expect(chatkit.Reconnected)
        assert [text for _, text in inbox.messages()] == [f"live {n}" for n in range(6)]


async def test_a_rate_limit_during_the_resume_is_waited_out() -> None:
    # Re-joining and catching up several rooms asks many requests at once;
    # a strict server refuses some, and the client asks again later. alice
    # comes back to a restarted server (the same port and history) that
    # allows two requests at once, then ten a second.
    rooms = ["r1", "r2", "r3"]
    store = chatkit.MemoryHistory()
    strict = chatkit.Limits(rate_limit=10.0, rate_burst=2)
    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            first = chatkit.ChatServer(port=0, history=store)
            port = await nursery.start(first.serve)
            async with (
                connect(port, "alice") as alice,
                reading(alice, nursery) as inbox,
            ):
                async with plain(port, "bob") as bob:
                    for room in rooms:
                        await alice.join(room)
                        await bob.join(room)
                    for room in ["lobby", *rooms]:
                        await bob.say(f"seen in {room}", room=room)
                        await inbox.expect(chatkit.Message, text=f"seen in {room}")
                    await first.aclose()
                    await inbox.expect(chatkit.Reconnecting)
                # What she will have missed, said on another server that
                # shares the history.
                async with (
                    chatkit.open_server(history=store) as between,
                    plain(between.port, "bob") as bob,
                ):
                    for room in rooms:
                        await bob.join(room)
                    for room in ["lobby", *rooms]:
                        await bob.say(f"missed in {room}", room=room)
                second = chatkit.ChatServer(port=port, history=store, limits=strict)
                await nursery.start(second.serve)
                assert (await inbox.expect(chatkit.Reconnected)).missed == 4
                assert alice.joined_rooms == {"lobby", *rooms}
                assert sorted(inbox.messages()) == sorted(
                    (room, f"{when} in {room}")
                    for room in ["lobby", *rooms]
                    for when in ("seen", "missed")
                )
            await second.aclose()


async def test_leaving_a_room_while_it_catches_up() -> None:
    # The program leaves a room whose catch-up has not come yet: that room's
    # catch-up stops (the server says not_in_room), the others go on.
    slow = SlowHistory()
    async with alice_behind_proxy(history=slow) as (server, proxy, alice, inbox, bob):
        await alice.join("zoo")
        await bob.join("zoo")
        await drop_alice(server, proxy)
        await bob.say("missed")
        await bob.say("missed in zoo", room="zoo")
        await slow.let_back(proxy)  # the lobby's catch-up ends late
        # Requests may go during the catch-up. (The server answers this
        # one after the held page: it reads a connection's requests in
        # order.)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alice.leave, "zoo")
            await trio.testing.wait_all_tasks_blocked()  # the leave is out
            slow.release.set()
            assert (await inbox.expect(chatkit.Reconnected)).missed == 1
        assert inbox.messages() == [("lobby", "missed")]
        assert alice.joined_rooms == {"lobby"}


async def test_a_left_lobby_stays_left_when_a_resume_is_cut_short() -> None:
    # The server joins every login to the lobby and the resume leaves it
    # again; a connection lost before that leave must not make the lobby a
    # room to be back in (and to catch up) at the next resume.
    async with alice_behind_proxy() as (server, proxy, alice, inbox, bob):
        await alice.join("dev")
        await bob.join("dev")
        await alice.leave("lobby")
        await bob.say("lobby chatter")
        await drop_alice(server, proxy)
        # The link is cut as the resume asks to re-join dev: alice is logged
        # in (in the server's lobby), not yet out of the lobby again.
        proxy.cut_before = b'"type":"join"'
        proxy.up = True
        await inbox.expect(chatkit.Reconnected)
        assert proxy.cut_before is None  # the first resume was cut short
        assert len(inbox.of(chatkit.Interrupted)) == 2
        assert alice.joined_rooms == {"dev"}
        assert "alice" not in server.rooms["lobby"]
        await bob.say("in dev", room="dev")
        await inbox.expect(chatkit.Message, text="in dev")
        assert inbox.messages() == [("dev", "in dev")]


# --- requests while reconnecting ---------------------------------------------


async def test_requests_wait_for_the_connection_or_time_out() -> None:
    policy = chatkit.Reconnect(initial_delay=0.02, max_delay=0.05, request_timeout=0.2)
    gate = HoldLogin("alice")
    history = chatkit.MemoryHistory()
    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            first = chatkit.ChatServer(port=0, history=history)
            port = await nursery.start(first.serve)
            async with (
                connect(port, "alice", reconnect=policy) as alice,
                reading(alice, nursery) as inbox,
            ):
                await first.aclose()
                await inbox.expect(chatkit.Interrupted)
                with pytest.raises(chatkit.ConnectionClosed, match="reconnecting"):
                    await alice.say("too early")
                assert alice.reconnecting  # still trying

                second = chatkit.ChatServer(
                    port=port,
                    history=history,
                    plugins=[gate],
                    limits=chatkit.Limits(hook_timeout=30),
                )
                await nursery.start(second.serve)
                said: list[chatkit.Message] = []

                async def say() -> None:
                    said.append(await alice.say("patient"))

                async with trio.open_nursery() as waiting:
                    waiting.start_soon(say)
                    await trio.sleep(0.05)
                    assert said == []
                    gate.opened.set()
                (message,) = said
                assert message.text == "patient"
                await inbox.expect(chatkit.Reconnected)
                await wait_until(lambda: inbox.messages() == [("lobby", "patient")])
            await second.aclose()


class ShortLived:
    """A server by hand: connection 1 serves until ``drop`` is set;
    connection 2 answers the re-join of a room and hangs up; later ones are
    hung up on at once."""

    def __init__(self) -> None:
        self.connections = 0
        self.drop = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        if number > 2:
            return
        async with trio.open_nursery() as nursery:
            if number == 1:

                async def drop() -> None:
                    await self.drop.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(drop)
            await self._answer(stream, number)
            nursery.cancel_scope.cancel()

    async def _answer(self, stream: trio.SocketStream, number: int) -> None:
        proto, name = chatkit.protocol.ServerConnection(), ""
        while True:
            while (request := proto.next_event()) is chatkit.protocol.NEED_DATA:
                proto.receive_data(await stream.receive_some(65536))
            match request:
                case chatkit.protocol.Hello(name=name):
                    reply: chatkit.Event = chatkit.Welcome(
                        name=name, protocol=1, server="fake", rooms=("lobby",)
                    )
                case chatkit.protocol.History(room=room, ref=ref):
                    reply = chatkit.HistoryReply(room=room, messages=(), ref=ref)
                case chatkit.protocol.Join(room=room, ref=ref):
                    reply = chatkit.Joined(room=room, name=name, ref=ref)
                case _:
                    return
            await stream.send_all(proto.send(reply))
            if number == 2 and isinstance(request, chatkit.protocol.Join):
                return  # the re-join answered, the connection ends


async def test_a_resume_cut_short_leaves_requests_waiting_bounded() -> None:
    # The connection ends right after the resume's re-join is answered.
    # Whether the reader sees the end before the resume goes on or after it
    # (trio's scheduler picks either), requests must then wait for the next
    # connection, and no longer than request_timeout.
    server = ShortLived()
    policy = chatkit.Reconnect(
        initial_delay=0.05, max_delay=0.05, jitter=0, request_timeout=0.3
    )
    async with (
        serving(server.serve) as port,
        connect(port, "alice", reconnect=policy, keepalive=None) as alice,
    ):
        await alice.join("dev")
        server.drop.set()
        await wait_until(lambda: server.connections > 2)
        assert alice.reconnecting
        start = trio.current_time()
        with (
            trio.fail_after(TIMEOUT),
            pytest.raises(chatkit.ConnectionClosed, match="reconnecting"),
        ):
            await alice.say("hello", room="dev")
        assert 0.3 <= trio.current_time() - start < 1


# --- what does not reconnect -------------------------------------------------


async def test_closing_the_client_does_not_reconnect() -> None:
    async with chatkit.open_server() as server, trio.open_nursery() as nursery:
        async with connect(server.port, "alice") as alice:
            inbox = Inbox()
            nursery.start_soon(inbox.read, alice)
        await inbox.wait_end()
        assert alice.closed
        assert alice.close_reason == "closed by the client"
        assert inbox.of(chatkit.ClientEvent) == []
        assert server.users == ()


async def test_closing_the_client_while_it_reconnects_stops_it() -> None:
    async with trio.open_nursery() as nursery:
        server = chatkit.ChatServer(port=0)
        port = await nursery.start(server.serve)
        slow = chatkit.Reconnect(initial_delay=30, max_delay=30)
        with trio.fail_after(TIMEOUT):
            async with connect(port, "alice", reconnect=slow) as alice:
                inbox = Inbox()
                nursery.start_soon(inbox.read, alice)
                await server.aclose()
                await inbox.expect(chatkit.Reconnecting, attempt=1)
            # Left the block at once, in the middle of a 15-30 s backoff.
            await inbox.wait_end()
        assert alice.closed
        assert alice.close_reason == "closed by the client"


async def test_closing_the_client_while_it_catches_up_stops_it() -> None:
    # Nobody reads: the catch-up is stuck handing over a missed message when
    # the program closes the client, which must end cleanly all the same.
    history = chatkit.MemoryHistory()
    gate = HoldLogin("alice")
    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            first = chatkit.ChatServer(port=0, history=history)
            port = await nursery.start(first.serve)
            alice = connect(port, "alice", event_buffer=1)
            async with alice:
                assert isinstance(await alice.__anext__(), chatkit.Joined)
                await first.aclose()
                second = chatkit.ChatServer(
                    port=port,
                    history=history,
                    plugins=[gate],
                    limits=chatkit.Limits(hook_timeout=30),
                )
                await nursery.start(second.serve)
                async with plain(port, "bob") as bob:
                    for n in range(3):
                        await bob.say(f"missed {n}")
                # (With nobody reading, the client would not even get as far
                # as the first attempt: its own events wait in the buffer.)
                for kind in (chatkit.Shutdown, chatkit.Interrupted):
                    assert isinstance(await alice.__anext__(), kind)
                assert await alice.__anext__() == chatkit.Reconnecting(
                    attempt=1, delay=ANY, error=None
                )
                gate.opened.set()  # and from here on, nobody reads
                await wait_until(lambda: alice.connected)
                # Catching up until the event buffer is full: the catch-up
                # waits for the program.
                await trio.testing.wait_all_tasks_blocked()
                await alice.aclose()
            assert alice.closed
            assert alice.close_reason == "closed by the client"
            await second.aclose()


async def test_a_kicked_client_does_not_reconnect() -> None:
    async with (
        chatkit.open_server() as server,
        connect(server.port, "alice") as alice,
    ):
        async with trio.open_nursery() as nursery, reading(alice, nursery) as inbox:
            server.kick("alice", "behave")
            await inbox.wait_end()
        assert inbox.events[-1] == chatkit.ErrorReply(code="kicked", message="behave")
        assert inbox.of(chatkit.ClientEvent) == []
        assert alice.closed
        assert alice.close_reason == "kicked: behave"


# --- backoff timing, on a mock clock -----------------------------------------


async def fake_server(stream: trio.abc.Stream) -> None:
    """Log one client in by hand, answer its lobby probe, then hang up."""
    proto = chatkit.protocol.ServerConnection()

    async def next_request() -> Any:
        while True:
            request = proto.next_event()
            if request is not chatkit.protocol.NEED_DATA:
                return request
            proto.receive_data(await stream.receive_some(65536))

    hello = await next_request()
    welcome = chatkit.Welcome(
        name=hello.name, protocol=1, server="fake", rooms=("lobby",), ref=hello.ref
    )
    await stream.send_all(proto.send(welcome))
    probe = await next_request()
    assert isinstance(probe, chatkit.protocol.History)
    reply = chatkit.HistoryReply(room="lobby", messages=(), ref=probe.ref)
    await stream.send_all(proto.send(reply))


class Unwelcoming:
    """A server by hand that logs the first client in (``fake_server``) and
    hangs up on every later connection at once, noting when it came: the
    client's reconnect attempts."""

    def __init__(self) -> None:
        self.first = True
        self.attempts: list[float] = []

    async def serve(self, stream: trio.SocketStream) -> None:
        if self.first:
            self.first = False
            await fake_server(stream)
        else:
            self.attempts.append(trio.current_time())


async def test_backoff_delays_are_the_policys_and_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def policy() -> chatkit.Reconnect:
        return chatkit.Reconnect(
            initial_delay=1,
            max_delay=5,
            multiplier=2,
            jitter=0.5,
            max_attempts=5,
            rng=random.Random(7).random,
        )

    reference = policy()  # the same seed: the same jitter
    expected = [reference.delay(n) for n in range(1, 6)]
    server = Unwelcoming()
    lost_at = -1.0
    async with (
        serving(server.serve) as port,
        connect(port, "alice", reconnect=policy()) as alice,
    ):
        events = []
        async for event in alice:
            if isinstance(event, chatkit.Interrupted):
                lost_at = trio.current_time()
            events.append(event)

    reconnecting = [e for e in events if isinstance(e, chatkit.Reconnecting)]
    assert [e.attempt for e in reconnecting] == [1, 2, 3, 4, 5]
    assert [e.delay for e in reconnecting] == expected
    hung_up = "server closed the connection"
    assert [e.error for e in reconnecting] == [None] + [hung_up] * 4
    # Each attempt starts exactly its delay after the previous one.
    attempts = server.attempts
    starts = [lost_at, *attempts[:-1]]
    waited = [end - start for start, end in zip(starts, attempts, strict=True)]
    assert waited == pytest.approx(expected)
    assert 1 * 0.5 <= expected[0] <= 1 and all(d <= 5 for d in expected)
    assert alice.close_reason == f"gave up reconnecting after 5 attempts: {hung_up}"


async def test_give_up_after_bounds_the_whole_outage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = chatkit.Reconnect(initial_delay=1, max_delay=4, jitter=0, give_up_after=10)
    server = Unwelcoming()
    async with (
        serving(server.serve) as port,
        connect(port, "alice", reconnect=policy) as alice,
    ):
        start = trio.current_time()
        async for _ in alice:
            pass
    # Delays 1, 2, 4 (at 7 s); the next, 4 more, would end past 10 s.
    assert [t - start for t in server.attempts] == pytest.approx([1, 3, 7])
    assert alice.close_reason == (
        "gave up reconnecting after 3 attempts: server closed the connection"
    )
