"""The fan-out hot path (issue 5): direct writes, one write per recipient per
read, held-back room broadcasts, on-demand writers, and presence_limit.

What is checked is behaviour a client can see (order, completeness, timing
around a blocked plugin) plus, where the point is the number of system
calls, a count of the server's direct writes.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import chatkit
import chatkit._server as server_module
from tests.conftest import OpenRaw, crowd, line_login, login
from tests.helpers import RawClient, open_small_window, wait_until


def say(text: str, room: str = "lobby", ref: int | None = None) -> bytes:
    fields: dict[str, Any] = {"type": "say", "room": room, "text": text}
    if ref is not None:
        fields["ref"] = ref
    return json.dumps(fields).encode() + b"\n"


@asynccontextmanager
async def lazy_member(
    server: chatkit.ChatServer,
) -> AsyncIterator[tuple[RawClient, server_module.User]]:
    """``lazy``, logged in on a small receive window and not reading, and
    its user on the server."""
    lazy = await open_small_window(server.port)
    try:
        await lazy.hello("lazy")
        user = server.get_user("lazy")
        assert user is not None
        yield lazy, user
    finally:
        await lazy.aclose()


class CountingOs:
    """Stands in for chatkit._server's ``_SEND``, the socket ``send`` of
    every direct write: counts writes per descriptor, and the room-wide
    writes of the fast path (ChatServer._write_room_now), and records per
    send the sending thread and whether KeyboardInterrupt was held off
    (``sends``). With ``refuse_first``, the first write to that descriptor
    fails as if its buffer were full (``refused`` counts it)."""

    def __init__(self, refuse_first: int | None = None) -> None:
        self.writes: Counter[int] = Counter()
        self.room_writes = 0
        self.refuse_first = refuse_first
        self.refused = 0
        self.sends: list[tuple[int, int, bool]] = []  # (fd, thread, protected)

    def send(self, sock: socket.socket, data: bytes) -> int:
        fd = sock.fileno()
        thread = threading.get_ident()
        protected = thread != threading.main_thread().ident or (
            trio.lowlevel.currently_ki_protected()
        )
        self.sends.append((fd, thread, protected))
        if fd == self.refuse_first and not self.refused:
            self.refused += 1
            raise BlockingIOError
        self.writes[fd] += 1
        return sock.send(data)

    def threads(self) -> set[int]:
        """The threads that sent."""
        return {thread for _, thread, _ in self.sends}

    def writes_to(self, server: chatkit.ChatServer, *names: str) -> list[int]:
        """The direct writes counted to each of these users."""
        return [self.writes[fd_of(server, name)] for name in names]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(server_module, "_SEND", self.send)
        write_room_now = chatkit.ChatServer._write_room_now

        def counted(server: chatkit.ChatServer) -> bool:
            written = write_room_now(server)
            self.room_writes += written
            return written

        monkeypatch.setattr(chatkit.ChatServer, "_write_room_now", counted)


def fd_of(server: chatkit.ChatServer, name: str) -> int:
    user = server.get_user(name)
    assert user is not None
    fd: int = user._stream.socket.fileno()  # type: ignore[attr-defined]
    return fd


@asynccontextmanager
async def counted_room(
    open_raw: OpenRaw,
    monkeypatch: pytest.MonkeyPatch,
    *,
    refuse: str | None = None,
    names: tuple[str, ...] = ("alice", "bob", "carol"),
    **options: Any,
) -> AsyncIterator[tuple[chatkit.ChatServer, CountingOs, list[RawClient]]]:
    """A server without a rate limit (and with ``options``), ``names`` in
    its lobby, and its direct writes counted from then on; with ``refuse``,
    that user's first write is refused as if the socket were full."""
    async with chatkit.open_server(rate_limit=None, **options) as server:
        users = await crowd(open_raw, server.port, *names)
        refuse_first = None if refuse is None else fd_of(server, refuse)
        counting = CountingOs(refuse_first=refuse_first)
        counting.install(monkeypatch)
        yield server, counting, users


async def test_each_recipient_gets_one_write_per_read(
    open_raw: OpenRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with counted_room(open_raw, monkeypatch) as (server, counting, users):
        alice, bob, carol = users
        # Twenty messages in one packet: one read, one batch.
        await alice.send_bytes(b"".join(say(f"m{i}", ref=i) for i in range(20)))
        for client in (bob, carol):
            for i in range(20):
                assert (await client.receive_json())["text"] == f"m{i}"
        for i in range(20):
            assert (await alice.receive_json())["ref"] == i
        assert counting.writes_to(server, "alice", "bob", "carol") == [1, 1, 1]


async def test_an_idle_room_is_written_by_the_fast_path(
    open_raw: OpenRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with counted_room(open_raw, monkeypatch) as (server, counting, users):
        alice, bob, carol = users
        await alice.send_bytes(say("hi", ref=1))
        for client in (bob, carol):
            assert (await client.receive_json())["text"] == "hi"
        assert (await alice.receive_json())["ref"] == 1
        # The others' copies went out in one room-wide write, the sender's
        # own copy (with its ref) on its own: one write each.
        assert counting.room_writes == 1
        assert counting.writes_to(server, "alice", "bob", "carol") == [1, 1, 1]


async def test_senders_woken_together_share_one_fast_path_write(
    open_raw: OpenRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with counted_room(open_raw, monkeypatch) as (server, counting, users):
        alice, bob, carol = users
        # Both requests are in the kernel before the server runs again: one
        # epoll wakes both readers in one scheduler round, one batch.
        for client, text, ref in ((alice, "from alice", 1), (bob, "from bob", 2)):
            plain = server_module._plain_socket(client.stream.socket)
            assert plain is not None
            plain.sendall(say(text, ref=ref))
        seen = [await carol.receive_json() for _ in range(2)]
        assert sorted(m["text"] for m in seen) == ["from alice", "from bob"]
        # Each sender gets both, in the order everyone else got them, with a
        # ref on its own message only.
        for client, name, ref in ((alice, "alice", 1), (bob, "bob", 2)):
            got = [await client.receive_json() for _ in range(2)]
            assert [m["text"] for m in got] == [m["text"] for m in seen]
            assert [m.get("ref") for m in got] == [
                ref if m["from"] == name else None for m in seen
            ]
        assert counting.room_writes == 1
        assert counting.writes_to(server, "alice", "bob", "carol") == [1, 1, 1]


async def test_senders_woken_together_reach_a_mixed_room_with_one_append_each(
    open_raw: OpenRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A line-mode member (dave) keeps the room off the fast path: the batch
    # of two senders' messages (alice in JSON mode, bob in line mode) is
    # handed to each member in one append, in one order for all; alice
    # gets her ref back, bob (as in the original program) not his own line.
    async with chatkit.open_server(rate_limit=None) as server:
        alice, carol = await crowd(open_raw, server.port, "alice", "carol")
        bob = await line_login(open_raw, server.port, "bob", alice, carol)
        dave = await line_login(open_raw, server.port, "dave", alice, carol)
        assert await bob.receive_line() == "dave has joined the chat."
        appends: Counter[str] = Counter()
        enqueue = server_module.User._enqueue

        def counted(user: server_module.User, data: bytes, frames: int = 1) -> None:
            appends[user.name] += 1
            enqueue(user, data, frames)

        monkeypatch.setattr(server_module.User, "_enqueue", counted)
        for client, request in (
            (alice, say("from alice", ref=1)),
            (bob, b"from bob\n"),
        ):
            plain = server_module._plain_socket(client.stream.socket)
            assert plain is not None
            plain.sendall(request)
        seen = [await carol.receive_json() for _ in range(2)]
        assert sorted(m["text"] for m in seen) == ["from alice", "from bob"]
        got = [await alice.receive_json() for _ in range(2)]
        assert [(m["text"], m.get("ref")) for m in got] == [
            (m["text"], 1 if m["from"] == "alice" else None) for m in seen
        ]
        lines = [f"{m['from']}: {m['text']}" for m in seen]
        assert [await dave.receive_line() for _ in range(2)] == lines
        assert await bob.receive_line() == "alice: from alice"
        await bob.assert_silent()
        assert appends == {"alice": 1, "bob": 1, "carol": 1, "dave": 1}


async def test_a_full_socket_in_the_fast_path_keeps_the_rest(
    open_raw: OpenRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bob's socket takes nothing (as if full), carol's all: bob's copy is
    # kept in his buffer and written later, in order, by his writer.
    async with counted_room(open_raw, monkeypatch, refuse="bob") as (
        _,
        counting,
        users,
    ):
        alice, bob, carol = users
        await alice.send_bytes(say("one", ref=1))
        await alice.send_bytes(say("two", ref=2))
        for client in (bob, carol):
            assert (await client.receive_json())["text"] == "one"
            assert (await client.receive_json())["text"] == "two"
        assert counting.refused == 1


async def test_a_member_whose_writer_is_running_is_not_written_directly(
    open_raw: OpenRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bob's socket refuses the first message (as if full): it goes to his
    # writer, held here until released. The next message must queue behind
    # it, not overtake it by the room fast path; once his writer is done,
    # the fast path is back.
    async with counted_room(open_raw, monkeypatch, refuse="bob") as (
        server,
        counting,
        users,
    ):
        alice, bob, carol = users
        user = server.get_user("bob")
        assert user is not None
        release = trio.Event()
        send_all = user._stream.send_all

        async def held_send_all(data: bytes) -> None:
            await release.wait()
            await send_all(data)

        monkeypatch.setattr(user._stream, "send_all", held_send_all)
        for text, ref in (("one", 1), ("two", 2)):
            await alice.send_bytes(say(text, ref=ref))
            assert (await carol.receive_json())["text"] == text
            assert (await alice.receive_json())["ref"] == ref
            await trio.testing.wait_all_tasks_blocked()
            assert user._writing
        assert counting.room_writes == 1  # "one"; "two" went through buffers
        release.set()
        assert [(await bob.receive_json())["text"] for _ in range(2)] == ["one", "two"]
        await trio.testing.wait_all_tasks_blocked()
        assert not user._writing
        await alice.send_bytes(say("three", ref=3))
        for client in (bob, carol):
            assert (await client.receive_json())["text"] == "three"
        assert (await alice.receive_json())["ref"] == 3
        assert counting.room_writes == 2


async def test_busy_users_are_forgotten_when_their_connection_ends(
    open_raw: OpenRaw,
) -> None:
    # A member with a writer running or its output ended is in the server's
    # busy set (the fast path skips its rooms); once its connection is over
    # it must not stay there.
    async with chatkit.open_server(rate_limit=None) as server:
        alice = await login(open_raw, server.port, "alice")
        async with lazy_member(server) as (_, user):
            await alice.expect("joined", name="lazy")
            text = "x" * 2000
            for i in range(50):
                await alice.send_bytes(say(f"{i} {text}", ref=i))
            for i in range(50):
                await alice.expect("message", ref=i)
            assert user._writing and user in server._busy
            assert server.kick("lazy")
            await wait_until(lambda: server.get_user("lazy") is None)
        await wait_until(lambda: not server._busy)


async def test_order_is_kept_across_rooms_replies_and_membership_changes(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server(rate_limit=None) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        for client in (alice, bob):
            await client.send_json(type="join", room="dev", ref="j")
            await client.expect("joined", room="dev", ref="j")
        await alice.expect("joined", room="dev", name="bob")
        # One packet mixing broadcasts to two rooms, a DM, a leave and a
        # join (membership changes mid-batch) and a reply to alice alone.
        await alice.send_bytes(
            say("m1", ref=1)
            + say("d1", room="dev", ref=2)
            + b'{"type":"dm","to":"bob","text":"p1","ref":3}\n'
            + say("m2", ref=4)
            + b'{"type":"leave","room":"dev","ref":5}\n'
            + say("m3", ref=6)
            + b'{"type":"join","room":"dev","ref":7}\n'
            + say("d2", room="dev", ref=8)
            + b'{"type":"ping","ref":9}\n'
        )
        seen = []
        for _ in range(8):
            event = await bob.receive_json()
            seen.append((event["type"], event.get("room"), event.get("text")))
        assert seen == [
            ("message", "lobby", "m1"),
            ("message", "dev", "d1"),
            ("dm", None, "p1"),
            ("message", "lobby", "m2"),
            ("left", "dev", None),
            ("message", "lobby", "m3"),
            ("joined", "dev", None),
            ("message", "dev", "d2"),
        ]
        refs = [(await alice.receive_json()).get("ref") for _ in range(9)]
        assert refs == [1, 2, 3, 4, 5, 6, 7, 8, 9]
        await bob.assert_silent()


async def test_a_batch_ending_in_bye_is_delivered_before_the_leave(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server(rate_limit=None) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        await alice.send_bytes(
            b"".join(say(f"m{i}", ref=i) for i in range(50)) + b'{"type":"bye"}\n'
        )
        for i in range(50):
            assert (await bob.receive_json())["text"] == f"m{i}"
        assert (await bob.receive_json())["type"] == "left"
        lines = await alice.assert_closed()
        assert [json.loads(line)["ref"] for line in lines] == list(range(50))


class Blocked:
    """A plugin whose delivered hook blocks until released."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()

    @chatkit.hookimpl
    async def chatkit_message_delivered(self) -> None:
        self.entered.set()
        await self.release.wait()


async def test_output_is_written_before_the_reader_waits_for_a_plugin(
    open_raw: OpenRaw,
) -> None:
    blocked = Blocked()
    async with chatkit.open_server(rate_limit=None, plugins=[blocked]) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        await alice.send_bytes(say("hi", ref=1))
        with trio.fail_after(2):
            await blocked.entered.wait()
        # The reader is stuck in the plugin; what it broadcast is out.
        assert (await bob.receive_json(within=2))["text"] == "hi"
        assert (await alice.receive_json(within=2))["ref"] == 1
        blocked.release.set()


async def test_a_full_socket_hands_the_rest_to_a_writer_in_order(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server(rate_limit=None) as server:
        alice = await login(open_raw, server.port, "alice")
        # A client with a small receive buffer that does not read for now:
        # direct writes soon find the kernel buffer full.
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", server.port))
        lazy = RawClient(trio.SocketStream(sock))
        try:
            await lazy.hello("lazy")
            await alice.expect("joined", name="lazy")
            text = "x" * 2000
            for i in range(100):
                await alice.send_bytes(say(f"{i} {text}", ref=i))
            for i in range(100):
                assert (await alice.expect("message", ref=i))["ref"] == i
            user = server.get_user("lazy")
            assert user is not None and user._writing  # the kernel said "full"
            for i in range(100):
                event = await lazy.expect("message")
                assert event["text"] == f"{i} {text}"
            await trio.testing.wait_all_tasks_blocked()
            assert not user._writing  # the writer ended once drained
        finally:
            await lazy.aclose()


@pytest.mark.parametrize(
    ("limits", "texts"),
    [
        # One packet: more messages than a buffer may hold frames...
        ({"max_queued_messages": 10}, [f"m{i}" for i in range(11)]),
        # ... or bytes (12 KB: far less than any kernel socket buffer).
        ({"max_queued_bytes": 10_000}, [f"{i}" + "x" * 4000 for i in range(3)]),
    ],
)
async def test_a_batch_bigger_than_a_buffer_does_not_drop_readers(
    open_raw: OpenRaw, limits: dict[str, int], texts: list[str]
) -> None:
    # A batch is held back by the server, not by its readers: it is written
    # in parts, and only what a socket refuses counts towards the bounds.
    async with chatkit.open_server(rate_limit=None, **limits) as server:
        alice = await login(open_raw, server.port, "alice")
        bob = await login(open_raw, server.port, "bob")
        await alice.expect("joined", name="bob")
        await alice.send_bytes(
            b"".join(say(text, ref=i) for i, text in enumerate(texts))
        )
        for i, text in enumerate(texts):
            assert (await bob.receive_json())["text"] == text
            assert (await alice.receive_json())["ref"] == i


async def test_a_too_slow_error_never_follows_half_a_frame() -> None:
    async with (
        chatkit.open_server(rate_limit=None, max_queued_bytes=64 * 1024) as server,
        lazy_member(server) as (lazy, user),
    ):
        # No checkpoint between the posts: a partial direct write leaves
        # the rest of a frame in the buffer, and the writer it started
        # has not run when the buffer overflows.
        for i in range(200):
            await server.post("lobby", f"{i:04d}" + "x" * 3000)
            if user._output_ended:
                break
        assert user._output_ended
        lines = await lazy.assert_closed(within=10)
        frames = [json.loads(line) for line in lines]  # none torn
        assert frames[-1]["code"] == "too_slow"


async def test_tls_connections_are_written_by_their_writer_only(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    async with chatkit.open_server(rate_limit=None, ssl_context=server_tls) as server:
        alice = await RawClient.open_tls(server.port, client_tls)
        bob = await RawClient.open_tls(server.port, client_tls)
        try:
            await alice.hello("alice")
            await bob.hello("bob")
            for name in ("alice", "bob"):
                user = server.get_user(name)
                assert user is not None and user._sock is None
            await alice.send_bytes(b"".join(say(f"m{i}") for i in range(30)))
            for i in range(30):
                assert (await bob.expect("message"))["text"] == f"m{i}"
        finally:
            await alice.aclose()
            await bob.aclose()


async def test_an_idle_connection_holds_no_writer_task(open_raw: OpenRaw) -> None:
    async with chatkit.open_server() as server:
        alice, _bob = await crowd(open_raw, server.port, "alice", "bob")
        await alice.send_bytes(say("hi", ref=1))
        await alice.expect("message", ref=1)
        for user in server.users:
            assert not user._writing


# --- split_fanout_at: the fan-out from two threads ----------------------------


@asynccontextmanager
async def split_room(
    open_raw: OpenRaw,
    monkeypatch: pytest.MonkeyPatch,
    *,
    split_fanout_at: int | None = 2,
    refuse: str | None = None,
) -> AsyncIterator[tuple[chatkit.ChatServer, CountingOs, list[RawClient]]]:
    """:func:`counted_room` with alice, bob, carol and dave, on a server
    splitting fan-outs to ``split_fanout_at`` others."""
    async with counted_room(
        open_raw,
        monkeypatch,
        refuse=refuse,
        names=("alice", "bob", "carol", "dave"),
        split_fanout_at=split_fanout_at,
    ) as room:
        yield room


async def test_a_lone_message_to_a_large_room_is_sent_from_two_threads(
    open_raw: OpenRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three others, split_fanout_at=3: the smallest room that is split.
    async with split_room(open_raw, monkeypatch, split_fanout_at=3) as (
        server,
        counting,
        users,
    ):
        alice, *others = users
        for i in range(5):  # one at a time: each is alone in its batch
            await alice.send_bytes(say(f"m{i}", ref=i))
            assert (await alice.receive_json())["ref"] == i
        for client in others:
            assert [(await client.receive_json())["text"] for _ in range(5)] == [
                f"m{i}" for i in range(5)
            ]
        # alice's own copies are sent after the join, from the event loop.
        own = fd_of(server, "alice")
        fan_out = [(fd, thread) for fd, thread, _ in counting.sends if fd != own]
        loop = threading.get_ident()
        # Every message: bob from the event loop, carol and dave from the
        # other thread (the second half).
        by_name = {
            name: {thread for fd, thread in fan_out if fd == fd_of(server, name)}
            for name in ("bob", "carol", "dave")
        }
        assert by_name["bob"] == {loop}
        (helper,) = by_name["carol"]
        assert helper != loop and by_name["dave"] == {helper}
        # The event loop's thread waits for the other with KeyboardInterrupt
        # held off: it cannot leave the other thread sending on its own.
        assert all(
            protected
            for fd, thread, protected in counting.sends
            if fd != own and thread == loop
        )


def test_the_split_joins_its_thread_whatever_happens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = object(), object()
    second_done = threading.Event()

    def send(sock: object, data: bytes) -> int:
        if sock is first:
            raise ValueError("not an OSError: it propagates")
        time.sleep(0.05)
        second_done.set()
        return len(data)

    monkeypatch.setattr(server_module, "_SEND", send)
    with pytest.raises(ValueError, match="not an OSError"):
        server_module._send_each_split([first, second], b"x")  # type: ignore[list-item]
    assert second_done.is_set()  # joined before the error left the call


@pytest.mark.parametrize(
    ("split_fanout_at", "texts"),
    [
        (4, ["to three others"]),  # a room too small to split
        (2, ["one", "two"]),  # two messages from one read: a batch, under load
        (None, ["never split"]),  # would be split with split_fanout_at=2
    ],
)
async def test_a_batch_or_a_small_room_is_sent_from_the_event_loop(
    open_raw: OpenRaw,
    monkeypatch: pytest.MonkeyPatch,
    split_fanout_at: int | None,
    texts: list[str],
) -> None:
    async with split_room(open_raw, monkeypatch, split_fanout_at=split_fanout_at) as (
        _,
        counting,
        users,
    ):
        alice, *others = users
        await alice.send_bytes(b"".join(say(text) for text in texts))
        for client in others:
            assert [(await client.receive_json())["text"] for _ in texts] == texts
        assert counting.threads() == {threading.get_ident()}


@pytest.mark.parametrize("refuse", ["bob", "dave"])  # each half
async def test_a_full_socket_in_either_half_keeps_its_copy(
    open_raw: OpenRaw, monkeypatch: pytest.MonkeyPatch, refuse: str
) -> None:
    async with split_room(open_raw, monkeypatch, refuse=refuse) as (
        _,
        counting,
        users,
    ):
        alice, *others = users
        await alice.send_bytes(say("one", ref=1))
        await alice.expect("message", ref=1)
        await alice.send_bytes(say("two", ref=2))
        for client in others:
            assert (await client.receive_json())["text"] == "one"
            assert (await client.receive_json())["text"] == "two"
        assert counting.refused == 1
        assert len(counting.threads()) == 2


async def test_with_no_thread_to_be_had_the_event_loop_sends_all(
    open_raw: OpenRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_thread(*args: object, **kwargs: object) -> None:
        raise RuntimeError("can't start new thread")

    async with split_room(open_raw, monkeypatch) as (_, counting, users):
        monkeypatch.setattr(trio.lowlevel, "start_thread_soon", no_thread)
        alice, *others = users
        await alice.send_bytes(say("hi", ref=1))
        for client in others:
            assert (await client.receive_json())["text"] == "hi"
        assert counting.threads() == {threading.get_ident()}
        assert len(counting.sends) == 4  # three others, then alice


@pytest.mark.parametrize("at", [1, 0, -5])
def test_split_fanout_at_is_checked(at: int) -> None:
    assert chatkit.ChatServer().split_fanout_at == 256
    with pytest.raises(ValueError, match="split_fanout_at must be at least 2"):
        chatkit.ChatServer(split_fanout_at=at)


# --- presence_limit -----------------------------------------------------------


async def test_joins_and_leaves_are_not_announced_above_the_presence_limit(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server(presence_limit=2) as server:
        alice, bob = await crowd(open_raw, server.port, "alice", "bob")
        # The third member: only carol hears of her own join (login checks).
        carol = await login(open_raw, server.port, "carol")
        await carol.send_json(type="join", room="lobby", ref="again")
        assert await carol.receive_json() == {
            "type": "joined",
            "room": "lobby",
            "name": "carol",
            "ref": "again",
        }
        await carol.send_json(type="bye")
        await carol.assert_closed()
        # The room had three members when carol left: no notice either.
        await alice.send_json(type="ping", ref=1)
        assert await alice.receive_json() == {"type": "pong", "ref": 1}
        await bob.assert_silent()
        # Two members before bob leaves: announced again.
        await bob.send_json(type="bye")
        assert await alice.expect("left", name="bob") == {
            "type": "left",
            "room": "lobby",
            "name": "bob",
            "reason": "bye",
        }


async def test_a_big_room_takes_a_line_mode_joiner_quietly(open_raw: OpenRaw) -> None:
    async with chatkit.open_server(presence_limit=1) as server:
        alice = await login(open_raw, server.port, "alice")
        dave = await open_raw(server.port)
        await dave.send_line("dave")
        await alice.send_json(type="say", text="hello dave", ref=1)
        await alice.expect("message", ref=1)
        assert await dave.receive_line() == "alice: hello dave"


@pytest.mark.parametrize("limit", [-1, -100])
def test_presence_limit_is_checked(limit: int) -> None:
    with pytest.raises(ValueError, match="presence_limit"):
        chatkit.ChatServer(presence_limit=limit)


async def test_presence_limit_none_always_announces(open_raw: OpenRaw) -> None:
    assert chatkit.ChatServer().presence_limit == 1000
    async with chatkit.open_server(presence_limit=None) as server:
        # crowd() checks that every earlier member hears of each later join.
        clients = await crowd(open_raw, server.port, *(f"u{n}" for n in range(5)))
        await clients[-1].send_json(type="leave", room="lobby")
        for client in clients[:-1]:
            await client.expect("left", name="u4")
