"""Adversarial tests: each attack on a running server is one test.

Every test asserts the documented outcome for the attacker *and* that the
others were unaffected: two bystanders, alice and bob, chat in the room
``quiet`` before, during and after the attack (:func:`watch`). Every message
between them must arrive exactly once, in order, within a sane round-trip
time; they must never see an error nor be disconnected; and the server must
still know them afterwards.

Only 127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import gc
import json
import math
import random
import socket
import ssl
import statistics
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trustme

import chatkit
import chatkit.auth
from tests.conftest import OpenRaw, login
from tests.helpers import RawClient, open_small_window, wait_until

#: A single bystander round trip slower than this fails the test (seconds).
#: Generous: it catches a stalled server, not a busy CI machine.
LATENCY_LIMIT: Final = 1.0
#: A round trip that has not completed after this long is a lost message.
ROUND_TRIP_TIMEOUT: Final = 5.0
#: Pause between two round trips while the bystanders chat in the background:
#: each of them then sends about 12 messages a second, within the server's
#: default rate limit (20 a second).
CHAT_INTERVAL: Final = 0.04
#: Round trips before and after each attack.
EDGE_ROUND_TRIPS: Final = 5
#: Short handshake/idle timeout for the slowloris tests (seconds).
SHORT_TIMEOUT: Final = 0.5


# --- bystanders --------------------------------------------------------------


class Bystanders:
    """alice and bob, chatting in ``quiet`` while someone attacks the server.

    A pump task per client reads everything it receives: the bystanders'
    own chat is checked message by message, everything else (join and
    leave notices of the attacker, its messages in ``lobby``) is kept in
    :attr:`events` for the test to look at.
    """

    NAMES: Final = ("alice", "bob")

    def __init__(
        self,
        server: chatkit.ChatServer,
        alice: RawClient,
        bob: RawClient,
        keep_events: bool = True,
    ) -> None:
        self.server = server
        self.keep_events = keep_events
        self.clients = {"alice": alice, "bob": bob}
        self.events: dict[str, list[dict[str, Any]]] = {n: [] for n in self.NAMES}
        self.sent: dict[str, list[str]] = {n: [] for n in self.NAMES}
        self.heard: dict[str, list[str]] = {n: [] for n in self.NAMES}
        self._heard_set: dict[str, set[str]] = {n: set() for n in self.NAMES}
        self.acked: dict[str, list[int]] = {n: [] for n in self.NAMES}
        self._acked_set: dict[str, set[int]] = {n: set() for n in self.NAMES}
        self.ended: dict[str, str] = {}
        self.before: list[float] = []
        self.during: list[float] = []
        self.after: list[float] = []
        self._phase = self.before
        self._count = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._stop = False
        self._chat_done = trio.Event()

    async def pump(self, name: str) -> None:
        client = self.clients[name]
        try:
            while True:
                event = await client.receive_json(within=math.inf)
                if event["type"] == "message" and event["room"] == "quiet":
                    if event["from"] == name:
                        self.acked[name].append(event["ref"])
                        self._acked_set[name].add(event["ref"])
                    else:
                        self.heard[name].append(event["text"])
                        self._heard_set[name].add(event["text"])
                elif self.keep_events or event["type"] == "error":
                    self.events[name].append(event)
                self._lot.unpark_all()
        except (EOFError, trio.BrokenResourceError) as exc:
            self.ended[name] = repr(exc)
            self._lot.unpark_all()

    async def round_trip(self) -> float:
        """One message, alternately from alice and from bob; returns the
        time until the sender has its acknowledgement and the other the
        message."""
        n = self._count
        self._count += 1
        sender, receiver = self.NAMES if n % 2 == 0 else self.NAMES[::-1]
        text = f"{sender} {n}"
        self.sent[sender].append(text)
        start = trio.current_time()
        await self.clients[sender].send_json(type="say", room="quiet", text=text, ref=n)
        try:
            with trio.fail_after(ROUND_TRIP_TIMEOUT):
                while not (
                    n in self._acked_set[sender] and text in self._heard_set[receiver]
                ):
                    if self.ended:
                        raise AssertionError(
                            f"a bystander was disconnected: {self.ended}"
                        )
                    await self._lot.park()
        except trio.TooSlowError:
            raise AssertionError(
                f"bystander message {text!r} lost: acked={n in self._acked_set[sender]}"
                f" heard={text in self._heard_set[receiver]}"
            ) from None
        elapsed = trio.current_time() - start
        self._phase.append(elapsed)
        return elapsed

    async def chat(self, *, task_status: trio.TaskStatus[None]) -> None:
        self._phase = self.during
        task_status.started()
        try:
            while not self._stop:
                await self.round_trip()
                await trio.sleep(CHAT_INTERVAL)
        finally:
            self._chat_done.set()

    async def finish(self, chatting: bool) -> None:
        if chatting:
            self._stop = True
            await self._chat_done.wait()
        self._phase = self.after
        for _ in range(EDGE_ROUND_TRIPS):
            await self.round_trip()

    def check(self) -> None:
        """Everything the bystanders said arrived once, in order, in time."""
        assert not self.ended, self.ended
        for sender, receiver in (self.NAMES, self.NAMES[::-1]):
            assert self.heard[receiver] == self.sent[sender]
            refs = [int(text.split()[1]) for text in self.sent[sender]]
            assert self.acked[sender] == refs
        for name in self.NAMES:
            errors = [e for e in self.events[name] if e["type"] == "error"]
            assert errors == [], f"{name} got errors: {errors}"
            user = self.server.get_user(name)
            assert user is not None and user.rooms == {"lobby", "quiet"}
        worst = max(self.before + self.during + self.after)
        assert worst < LATENCY_LIMIT, self.summary()
        print(self.summary())

    def summary(self) -> str:
        def ms(samples: list[float]) -> str:
            if not samples:
                return "-"
            median = statistics.median(samples) * 1000
            worst = max(samples) * 1000
            return f"n={len(samples)} median={median:.2f}ms max={worst:.2f}ms"

        return (
            f"bystanders: before {ms(self.before)}; during {ms(self.during)};"
            f" after {ms(self.after)}"
        )

    def lobby_events(self, name: str, type: str) -> list[dict[str, Any]]:
        """What ``name`` received of ``type`` in ``lobby`` (the bystanders'
        own logins excluded)."""
        return [
            e
            for e in self.events[name]
            if e["type"] == type
            and e.get("room") == "lobby"
            and e.get("name") not in self.NAMES
        ]

    async def wait_for(
        self, predicate: Callable[[], bool], within: float = ROUND_TRIP_TIMEOUT
    ) -> None:
        """Until ``predicate()`` holds (re-checked whenever a bystander
        receives something)."""
        with trio.fail_after(within):
            while not predicate():
                await self._lot.park()


Connect = Callable[[], Awaitable[RawClient]]


@asynccontextmanager
async def watch(
    server: chatkit.ChatServer,
    *,
    connect: Connect | None = None,
    chatting: bool = True,
    keep_events: bool = True,
    **hello_fields: Any,
) -> AsyncIterator[Bystanders]:
    """Log alice and bob in, have them chat in ``quiet`` (in the background
    unless ``chatting`` is false) for the duration of the block, then check
    that nothing they said was lost or late.

    ``keep_events=False`` keeps only the errors the bystanders receive, not
    every join or leave notice (for tests that measure memory).
    """

    async def default_connect() -> RawClient:
        return await RawClient.open(server.port)

    connect = connect or default_connect
    opened: list[RawClient] = []
    try:
        for name in Bystanders.NAMES:
            client = await connect()
            opened.append(client)
            await client.hello(name, **hello_fields)
            await client.send_json(type="join", room="quiet", ref="j")
            await client.expect("joined", room="quiet", name=name)
        alice, bob = opened
        by = Bystanders(server, alice, bob, keep_events)
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            for name in Bystanders.NAMES:
                nursery.start_soon(by.pump, name)
            try:
                for _ in range(EDGE_ROUND_TRIPS):
                    await by.round_trip()
                if chatting:
                    await nursery.start(by.chat)
                yield by
                await by.finish(chatting)
            except BaseException as exc:
                # Re-raised outside the nursery, so it is not grouped.
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        by.check()
    finally:
        for client in opened:
            await client.aclose()


# --- helpers -----------------------------------------------------------------


def connections(server: chatkit.ChatServer) -> int:
    return server.connections


async def read_until_closed(client: RawClient, within: float = 5.0) -> list[bytes]:
    """Every line received until EOF (or a reset), as raw bytes."""
    buf = bytearray()
    with trio.fail_after(within):
        while True:
            try:
                data = await client.stream.receive_some(1 << 20)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            buf += data
    return [line for line in bytes(buf).split(b"\n") if line]


def reset(client: RawClient) -> None:
    """Make the next close send RST instead of FIN (SO_LINGER 0)."""
    sock = client.stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def count_tasks() -> int:
    """Every task alive in this trio run."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child)
            for nursery in task.child_nurseries
            for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


def rss() -> int:
    """This process's resident memory, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def live(kind: type[Any]) -> int:
    """How many objects of ``kind`` exist."""
    return sum(isinstance(o, kind) for o in gc.get_objects())


def server_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "chatkit.server"]


# --- hostile bytes -----------------------------------------------------------


async def test_an_oversized_line_is_too_large_and_the_connection_stays_usable(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server() as server, watch(server) as by:
        mallory = await login(open_raw, server.port, "mallory")
        with trio.fail_after(5):
            # 4 MiB in one line, sent in one go, then a request after it.
            huge = b'{"type":"say","text":"' + b"x" * (4 << 20) + b'"}\n'
            await mallory.send_bytes(huge + b'{"type":"ping","ref":1}\n')
            error = await mallory.receive_json()
            assert error["type"] == "error"
            assert error["code"] == "too_large"
            assert await mallory.receive_json() == {"type": "pong", "ref": 1}
            # Dribbled: the line grows past the limit across many reads.
            chunk = b"y" * 8192
            await mallory.send_bytes(b'{"type":"say","text":"')
            for _ in range(20):
                await mallory.send_bytes(chunk)
            await mallory.send_bytes(
                b'"}\n{"type":"say","text":"still here","ref":2}\n'
            )
            assert (await mallory.receive_json())["code"] == "too_large"
            ack = await mallory.expect("message", ref=2)
            assert ack["text"] == "still here"
    # The others saw none of the oversized text.
    for name in Bystanders.NAMES:
        texts = [e["text"] for e in by.lobby_events(name, "message")]
        assert texts == ["still here"]


async def test_an_oversized_first_line_is_answered_and_hello_still_works(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server() as server, watch(server) as by:
        mallory = await open_raw(server.port)
        await mallory.send_bytes(b"{" + b"z" * (1 << 20) + b"\n")
        assert (await mallory.receive_json())["code"] == "too_large"
        await mallory.hello("mallory")
        # Line mode: the answer is a text line, and the connection goes on.
        trudy = await open_raw(server.port)
        await trudy.send_bytes(b"trudy\n" + b"w" * (1 << 20) + b"\nhi all\n")
        line = await trudy.receive_line()
        assert line.startswith("error (too_large): ")
        await by.wait_for(
            lambda: any(e.get("text") == "hi all" for e in by.events["alice"])
        )
        for name in Bystanders.NAMES:
            texts = [e["text"] for e in by.lobby_events(name, "message")]
            assert texts == ["hi all"]


async def test_binary_garbage_gets_one_bad_request_per_line(open_raw: OpenRaw) -> None:
    rng = random.Random(4)
    garbage = rng.randbytes(256 * 1024)
    lines = garbage.count(b"\n") + 1  # the last one is ended below
    # ~1,000 bad lines at once: past any rate limit (a garbage flood is
    # rate limited like any other: see test_a_garbage_flooder_...).
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(rate_limit=None),
        ) as server,
        watch(server) as by,
    ):
        mallory = await login(open_raw, server.port, "mallory")
        with trio.fail_after(5):
            await mallory.send_bytes(garbage + b'\n{"type":"ping","ref":"after"}\n')
            codes: list[str] = []
            while (event := await mallory.receive_json())["type"] == "error":
                codes.append(event["code"])
            assert event == {"type": "pong", "ref": "after"}
        # Never a silent drop: one error per line.
        assert len(codes) == lines
        assert set(codes) <= {"bad_request", "too_large"}
        # Garbage before any hello, in JSON mode and as one binary line (line
        # mode: no line of it can be a valid name), then the peer vanishes.
        for seed in range(5):
            noise = random.Random(seed).randbytes(32 * 1024)
            for attack in (b"{" + noise, noise.replace(b"\n", b"\x00") + b"\n"):
                stranger = await open_raw(server.port)
                await stranger.send_bytes(attack)
                await stranger.aclose()
        await wait_until(lambda: connections(server) == 3)
        assert [u.name for u in server.users] == ["alice", "bob", "mallory"]
    assert by.lobby_events("alice", "message") == []


INVALID_UTF8: Final = [
    b"\xff\xfe",  # never valid
    b"\xc0\xaf",  # overlong '/'
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xe2\x82",  # truncated sequence
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
]


async def test_invalid_utf8_is_bad_request_in_both_modes(open_raw: OpenRaw) -> None:
    async with chatkit.open_server() as server, watch(server) as by:
        mallory = await login(open_raw, server.port, "mallory")
        for i, bad in enumerate(INVALID_UTF8):
            # In a field that is read, in one that is skipped, and bare.
            await mallory.send_bytes(
                b'{"type":"say","text":"a'
                + bad
                + b'","ref":%d}\n' % i
                + b'{"type":"ping","junk":"'
                + bad
                + b'","ref":%d}\n' % i
                + bad
                + b"\n"
            )
            for expected_ref in (i, i, None):
                error = await mallory.receive_json()
                assert error["type"] == "error"
                assert error["code"] == "bad_request"
                assert error.get("ref") == expected_ref
        await mallory.send_json(type="ping", ref="ok")
        assert await mallory.receive_json() == {"type": "pong", "ref": "ok"}

        trudy = await open_raw(server.port)
        await trudy.send_bytes(b"trudy\n")
        for bad in INVALID_UTF8:
            await trudy.send_bytes(b"hi " + bad + b"\n")
            line = await trudy.receive_line()
            assert line.startswith("error (bad_request): ")
        await trudy.send_bytes(b"clean\n")
        await by.wait_for(
            lambda: any(e.get("text") == "clean" for e in by.events["bob"])
        )
        for name in Bystanders.NAMES:
            texts = [e["text"] for e in by.lobby_events(name, "message")]
            assert texts == ["clean"]


async def test_deeply_nested_json_is_bad_request(open_raw: OpenRaw) -> None:
    depth = 100_000
    nested = [
        b"[" * depth,
        b"[" * depth + b"]" * depth,
        b'{"type":"say","text":"x","junk":' + b"[" * depth + b"]" * depth + b"}",
        b'{"type":"ping","ref":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}",
        b'{"type":"hello","name":"x","protocol":1,"token":' + b"[" * depth + b"}",
    ]
    # Limits above the payloads (before hello too), so they are parsed, not
    # just discarded.
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(max_line_length=1 << 20, max_hello_length=1 << 20),
        ) as server,
        watch(server),
    ):
        mallory = await login(open_raw, server.port, "mallory")
        with trio.fail_after(5):
            for payload in nested:
                await mallory.send_bytes(payload + b"\n")
                error = await mallory.receive_json()
                assert error["type"] == "error"
                assert error["code"] == "bad_request"
            await mallory.send_json(type="ping", ref="alive")
            assert await mallory.receive_json() == {"type": "pong", "ref": "alive"}
            # As the very first line, too.
            stranger = await open_raw(server.port)
            await stranger.send_bytes(b"{" + b'"a":{' * depth + b"\n")
            assert (await stranger.receive_json())["code"] == "bad_request"
            await stranger.hello("stranger")


async def test_ten_thousand_frames_in_one_packet_are_all_answered_in_order(
    open_raw: OpenRaw,
) -> None:
    count = 10_000
    # Rate limiting off: this is about framing and fairness, not abuse.
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(rate_limit=None),
        ) as server,
        watch(server) as by,
    ):
        mallory = await login(open_raw, server.port, "mallory")
        await mallory.send_json(type="join", room="den")
        await mallory.expect("joined", room="den")
        frames = b"".join(
            b'{"type":"ping","ref":%d}\n' % i
            if i % 2
            else b'{"type":"say","room":"den","text":"f%d","ref":%d}\n' % (i, i)
            for i in range(count)
        )
        start = trio.current_time()
        with trio.fail_after(10):
            await mallory.send_bytes(frames)
            received = bytearray(mallory._buf)
            while received.count(b"\n") < count:
                data = await mallory.stream.receive_some(1 << 20)
                assert data, "closed"
                received += data
        elapsed = trio.current_time() - start
        print(f"10,000 frames answered in {elapsed:.3f}s; {by.summary()}")
        assert elapsed < 5.0
        events = [json.loads(line) for line in received.splitlines()]
        assert [e["ref"] for e in events] == list(range(count))
        for i, event in enumerate(events):
            assert event["type"] == ("pong" if i % 2 else "message")
        # Nothing from den reached the lobby.
        assert by.lobby_events("alice", "message") == []


# --- slow and silent ---------------------------------------------------------


async def slowloris(port: int, kind: str) -> tuple[float, list[bytes]]:
    """Connect and never complete a handshake; return how long the server
    took to close the connection, and what it sent."""
    client = await RawClient.open(port)
    start = trio.current_time()
    try:

        async def dribble() -> None:
            try:
                match kind:
                    case "silent":
                        await trio.sleep_forever()
                    case "json":
                        await client.stream.send_all(b'{"type":"hello","name":"')
                        while True:
                            await client.stream.send_all(b"m")
                            await trio.sleep(0.05)
                    case "line":
                        while True:
                            await client.stream.send_all(b"m")
                            await trio.sleep(0.05)
                    case "retry":
                        # A taken name, again and again: each attempt is a
                        # complete line, but the handshake never completes.
                        while True:
                            await client.stream.send_all(b"alice\n")
                            await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            lines = await read_until_closed(client, within=5)
            nursery.cancel_scope.cancel()
        return trio.current_time() - start, lines
    finally:
        await client.aclose()


async def test_slowloris_handshakes_are_closed_after_the_handshake_timeout() -> None:
    kinds = ["silent", "json", "line", "retry"]
    results: dict[str, list[tuple[float, list[bytes]]]] = {k: [] for k in kinds}
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(handshake_timeout=SHORT_TIMEOUT),
        ) as server,
        watch(server) as by,
    ):

        async def attack(kind: str) -> None:
            results[kind].append(await slowloris(server.port, kind))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for kind in kinds:
                    for _ in range(5):
                        nursery.start_soon(attack, kind)
        await wait_until(lambda: connections(server) == 2)
        assert [u.name for u in server.users] == ["alice", "bob"]
    json_timeout = {
        "type": "error",
        "code": "timeout",
        "message": f"no hello within {SHORT_TIMEOUT}s",
    }
    line_timeout = f"error (timeout): no hello within {SHORT_TIMEOUT}s".encode()
    for kind, runs in results.items():
        assert len(runs) == 5
        for elapsed, lines in runs:
            # Dribbling bytes does not extend the deadline.
            assert SHORT_TIMEOUT - 0.05 <= elapsed < SHORT_TIMEOUT + 1.0, (
                kind,
                elapsed,
            )
            if kind in ("silent", "json"):
                assert [json.loads(line) for line in lines] == [json_timeout]
            elif kind == "line":
                # No line was completed, so the mode is not known yet: either
                # form is fine.
                assert lines in (
                    [json.dumps(json_timeout, separators=(",", ":")).encode()],
                    [line_timeout],
                )
            else:
                assert lines[-1] == line_timeout
                assert all(b"name_taken" in line for line in lines[:-1])
    # The bystanders never heard of any of them.
    assert by.lobby_events("alice", "joined") == []


async def test_an_idle_connection_is_reaped_after_the_idle_timeout(
    open_raw: OpenRaw,
) -> None:
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(idle_timeout=SHORT_TIMEOUT),
        ) as server,
        watch(server) as by,  # chatting, so never idle
    ):
        mallory = await login(open_raw, server.port, "mallory")
        start = trio.current_time()
        lines = await read_until_closed(mallory, within=3)
        elapsed = trio.current_time() - start
        assert SHORT_TIMEOUT - 0.05 <= elapsed < SHORT_TIMEOUT + 1.0
        assert json.loads(lines[-1])["code"] == "timeout"
        await by.wait_for(lambda: len(by.lobby_events("bob", "left")) == 1)
        assert server.get_user("mallory") is None
    for name in Bystanders.NAMES:
        assert by.lobby_events(name, "left") == [
            {"type": "left", "room": "lobby", "name": "mallory", "reason": "timeout"}
        ]


async def test_a_reader_that_never_reads_is_dropped_as_too_slow(
    open_raw: OpenRaw,
) -> None:
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(
                max_queued_bytes=32 * 1024, close_timeout=0.5, rate_limit=None
            ),
        ) as server,
        watch(server) as by,
    ):
        lazy = await open_small_window(server.port)
        try:
            await lazy.hello("lazy")
            await lazy.send_json(type="join", room="den", ref=1)
            await lazy.expect("joined", ref=1)
            carol = await login(open_raw, server.port, "carol")
            await carol.send_json(type="join", room="den", ref=1)
            await carol.expect("joined", ref=1)
            # lazy never reads again; carol talks in den until it is dropped.
            left: list[dict[str, Any]] = []
            with trio.fail_after(5):
                for i in range(500):
                    await carol.send_json(
                        type="say", room="den", text="x" * 4000, ref=i
                    )
                    while (event := await carol.receive_json()).get("ref") != i:
                        left.append(event)
                    if left:
                        break
                else:
                    raise AssertionError("lazy was never dropped")
            while len(left) < 2:  # lazy leaves lobby and den
                left.append(await carol.receive_json())
            assert sorted(left, key=lambda e: e["room"]) == [
                {"type": "left", "room": room, "name": "lazy", "reason": "too_slow"}
                for room in ("den", "lobby")
            ]
            await by.wait_for(lambda: len(by.lobby_events("alice", "left")) == 1)
            lines = await read_until_closed(lazy, within=3)
            if lines and lines[-1].startswith(b'{"type":"error"'):
                assert json.loads(lines[-1])["code"] == "too_slow"
        finally:
            await lazy.aclose()
    for name in Bystanders.NAMES:
        assert by.lobby_events(name, "left") == [
            {"type": "left", "room": "lobby", "name": "lazy", "reason": "too_slow"}
        ]


# --- floods ------------------------------------------------------------------


class Flooder:
    """Sends one batch of lines again and again as fast as the socket takes
    it, and reads (and counts) the answers."""

    def __init__(self, client: RawClient, batch: bytes) -> None:
        self.client = client
        self.batch = batch
        self.sent = 0
        self.replies = 0
        self.limited = 0
        self.received = bytearray()
        self.closed = trio.Event()

    async def send(self) -> None:
        try:
            while True:
                await self.client.stream.send_all(self.batch)
                self.sent += self.batch.count(b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def read(self, keep: bool = False) -> None:
        tail = b""
        try:
            while data := await self.client.stream.receive_some(1 << 20):
                self.replies += data.count(b"\n")
                # Count across read boundaries.
                chunk = tail + data
                self.limited += chunk.count(b'"rate_limited"') - tail.count(
                    b'"rate_limited"'
                )
                tail = chunk[-32:]
                if keep:
                    self.received += data
        except trio.BrokenResourceError:
            pass
        self.closed.set()


#: Round trips measured without and with the flood.
SAMPLES: Final = 100
#: The flood test's per-connection rate limit: high enough for bystanders
#: measuring round trips back to back, a throttle all the same for a flood.
FLOOD_TEST_RATE: Final = 200.0
#: Pause between measured round trips: each bystander sends 50 a second.
SAMPLE_INTERVAL: Final = 0.01

FLOODS: Final = {
    # Requests, which the rate limit answers with rate_limited.
    "say": b"".join(b'{"type":"say","text":"flood %d"}\n' % i for i in range(1000)),
    # Lines that do not parse: each one is answered with bad_request.
    "garbage": b"".join(b"{garbage %d\n" % i for i in range(1000)),
}


async def test_a_flood_does_not_slow_the_others_down(open_raw: OpenRaw) -> None:
    flood = "say"
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(rate_limit=FLOOD_TEST_RATE, flood_limit=10**9),
        ) as server,
        watch(server, chatting=False) as by,
    ):

        async def sample() -> list[float]:
            samples = []
            for _ in range(SAMPLES):
                samples.append(await by.round_trip())
                await trio.sleep(SAMPLE_INTERVAL)
            return samples

        unloaded = await sample()
        mallory = await login(open_raw, server.port, "mallory")
        flooder = Flooder(mallory, FLOODS[flood])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flooder.read)
            nursery.start_soon(flooder.send)
            # Measure once the flood is in full swing, and check that it
            # still is at the end.
            await wait_until(lambda: flooder.replies >= 2000)
            replies_before = flooder.replies
            loaded = await sample()
            replies_during = flooder.replies - replies_before
            nursery.cancel_scope.cancel()
        assert not flooder.closed.is_set()
        flood_heard = [
            e for e in by.lobby_events("alice", "message") if e["from"] == "mallory"
        ]
    by.during[:] = loaded
    unloaded_median = statistics.median(unloaded)
    loaded_median = statistics.median(loaded)
    bound = max(2 * unloaded_median, unloaded_median + 0.020)
    print(
        f"{flood} flood: {flooder.sent} lines sent, {flooder.replies} answered"
        f" ({replies_during} while measuring), {flooder.limited} rate_limited,"
        f" {len(flood_heard)} delivered; bystander round trip median unloaded"
        f" {unloaded_median * 1000:.2f}ms (max {max(unloaded) * 1000:.2f}ms),"
        f" flooded {loaded_median * 1000:.2f}ms (max {max(loaded) * 1000:.2f}ms),"
        f" bound {bound * 1000:.2f}ms"
    )
    assert replies_during > 1000, "the flood stopped while we measured"
    assert loaded_median <= bound
    # Bystanders heard only what the bucket let through.
    assert flooder.limited > 1000
    duration = SAMPLES * SAMPLE_INTERVAL + sum(loaded) + 1.0
    assert len(flood_heard) <= server.limits.rate_burst + FLOOD_TEST_RATE * duration


@pytest.mark.parametrize("mode", ["json", "line"])
async def test_a_flooder_is_rate_limited_then_disconnected(
    open_raw: OpenRaw, mode: str
) -> None:
    async with chatkit.open_server() as server, watch(server) as by:
        burst, limit = server.limits.rate_burst, server.limits.flood_limit
        if mode == "json":
            mallory = await login(open_raw, server.port, "mallory")
            batch = b"".join(
                b'{"type":"say","text":"f%d","ref":%d}\n' % (i, i) for i in range(500)
            )
        else:
            mallory = await open_raw(server.port)
            await mallory.send_line("mallory")
            batch = b"".join(b"f%d\n" % i for i in range(500))
        await by.wait_for(lambda: len(by.lobby_events("bob", "joined")) == 1)
        flooder = Flooder(mallory, batch)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flooder.read, True)
                nursery.start_soon(flooder.send)
                await flooder.closed.wait()
                nursery.cancel_scope.cancel()
            await by.wait_for(lambda: len(by.lobby_events("alice", "left")) == 1)
        assert server.get_user("mallory") is None
        lines = bytes(flooder.received).split(b"\n")
        assert lines[-1] == b""
        if mode == "json":
            events = [json.loads(line) for line in lines[:-1]]
            acks = [e for e in events if e["type"] == "message"]
            errors = [e for e in events if e["type"] == "error"]
            assert events == acks + errors  # the bucket empties, then no more
            assert {e["code"] for e in errors} == {"rate_limited"}
            assert errors[-1]["message"] == "too many requests; disconnecting"
        else:
            acks = []
            errors = [line for line in lines[:-1] if line]
            assert all(e.startswith(b"error (rate_limited): ") for e in errors)
            assert errors[-1].endswith(b"too many requests; disconnecting")
        assert len(errors) == limit
        heard = [e for e in by.lobby_events("bob", "message") if e["from"] == "mallory"]
        # The burst (less the token the login took, plus what trickled in
        # meanwhile) got through, no more.
        assert burst - 1 <= len(heard) <= burst + 5
        if mode == "json":
            assert [a["text"] for a in acks] == [h["text"] for h in heard]
    for name in Bystanders.NAMES:
        assert by.lobby_events(name, "left") == [
            {"type": "left", "room": "lobby", "name": "mallory", "reason": "flood"}
        ]


async def test_a_flooders_last_message_reaches_a_quiet_room(
    open_raw: OpenRaw,
) -> None:
    # No bystanders chatting: nobody else's read ends a batch. The flooder's
    # batch is paused (refused lines pause it) when it is cut off, and what
    # it held back must still be written.
    async with chatkit.open_server(
        limits=chatkit.Limits(rate_burst=2, flood_limit=20),
    ) as server:
        bob = await login(open_raw, server.port, "bob")
        mallory = await login(open_raw, server.port, "mallory")
        await bob.expect("joined", name="mallory")
        say = b'{"type":"say","text":"hi","ref":1}\n'
        await mallory.send_bytes(say + b'{"type":"ping"}\n' * 30)
        lines = await mallory.assert_closed()
        assert json.loads(lines[-1])["code"] == "rate_limited"
        await bob.expect("message", text="hi", **{"from": "mallory"})
        await bob.expect("left", name="mallory", reason="flood")


async def test_a_garbage_flooder_is_rate_limited_then_disconnected(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server() as server, watch(server) as by:
        mallory = await login(open_raw, server.port, "mallory")
        await mallory.send_bytes(FLOODS["garbage"] + b'{"type":"ping","ref":"end"}\n')
        codes: list[str] = []
        with trio.fail_after(5):
            try:
                while (event := await mallory.receive_json())["type"] == "error":
                    codes.append(event["code"])
            except EOFError:
                pass  # disconnected, as it should be
        assert "rate_limited" in codes
        assert len(codes) < len(FLOODS["garbage"].splitlines())
        await by.wait_for(lambda: len(by.lobby_events("alice", "left")) == 1)
    assert by.lobby_events("alice", "left") == [
        {"type": "left", "room": "lobby", "name": "mallory", "reason": "flood"}
    ]


# --- hit and run -------------------------------------------------------------

HIT_AND_RUN: Final = ("bye", "close", "reset", "mid-line", "garbage", "silent", "line")


async def hit_and_run(port: int, i: int) -> None:
    """One connection that behaves badly in one of several ways, then goes."""
    kind = HIT_AND_RUN[i % len(HIT_AND_RUN)]
    client = await RawClient.open(port)
    hello = b'{"type":"hello","name":"v%d","protocol":1}\n' % i
    try:
        match kind:
            case "bye":
                await client.send_bytes(hello + b'{"type":"bye"}\n')
                await read_until_closed(client)
            case "close":
                await client.send_bytes(hello)
                await client.receive_line()
            case "reset":
                await client.send_bytes(hello)
                await client.receive_line()
                reset(client)
            case "mid-line":
                await client.send_bytes(hello + b'{"type":"say","te')
            case "garbage":
                # JSON mode, so that no line of it can log in.
                await client.send_bytes(b"{" + random.Random(i).randbytes(2000))
                reset(client)
            case "silent":
                pass
            case "line":
                await client.send_bytes(b"v%d\nhello\nhalf a li" % i)
    finally:
        await client.aclose()


async def test_hit_and_run_connections_leave_nothing_behind() -> None:
    async with chatkit.open_server() as server, watch(server) as by:
        for i in range(len(HIT_AND_RUN)):
            await hit_and_run(server.port, i)
        await wait_until(lambda: connections(server) == 2)
        assert [u.name for u in server.users] == ["alice", "bob"]
        assert server.rooms == {"lobby": ("alice", "bob"), "quiet": ("alice", "bob")}
        # Every name is free again.
        for i in range(len(HIT_AND_RUN)):
            assert server.get_user(f"v{i}") is None
    # The ones that logged in were seen to leave, with the right reason.
    left = {e["name"]: e["reason"] for e in by.lobby_events("alice", "left")}
    assert left == {
        "v0": "bye",
        "v1": "disconnect",
        "v2": "disconnect",
        "v3": "disconnect",
        "v6": "disconnect",
    }


CYCLES: Final = 1000
WORKERS: Final = 4


async def test_a_thousand_connect_disconnect_cycles_leak_nothing() -> None:
    # Bounded state that legitimately fills up would blur the measure: keep
    # one message of history per room. trio forgets the deadline of a cancel
    # scope that exited early only once the deadline passes (or in batches
    # of a thousand), so short handshake and close timeouts let every
    # connection's deadlines lapse before the final snapshot.
    timeout = 0.5
    async with (
        chatkit.open_server(
            history=chatkit.MemoryHistory(1),
            limits=chatkit.Limits(handshake_timeout=timeout, close_timeout=timeout),
        ) as server,
        watch(server, keep_events=False) as by,
    ):
        # The bystanders, their pumps and chat, and the server: nothing else.
        baseline = count_tasks()

        async def worker(cycles: range) -> None:
            for i in cycles:
                await hit_and_run(server.port, i)

        async def cycles(first: int, count: int) -> None:
            async with trio.open_nursery() as nursery:
                for w in range(WORKERS):
                    nursery.start_soon(worker, range(first + w, first + count, WORKERS))
            # Every connection task ends (bounded: a leaked one fails here).
            await wait_until(lambda: count_tasks() == baseline)
            await trio.sleep(timeout + 0.1)
            gc.collect()

        # Trace from the start, and warm up every code path (and trio's and
        # the allocator's caches) before the first snapshot.
        tracemalloc.start()
        try:
            await cycles(0, 200)
            memory_before = tracemalloc.take_snapshot()
            rss_before = rss()
            start = trio.current_time()
            with trio.fail_after(30):
                await cycles(200, CYCLES)
            elapsed = trio.current_time() - start
            memory_after = tracemalloc.take_snapshot()
            rss_after = rss()
        finally:
            tracemalloc.stop()
        assert count_tasks() == baseline
        assert connections(server) == 2
        assert [u.name for u in server.users] == ["alice", "bob"]
        assert server.rooms == {"lobby": ("alice", "bob"), "quiet": ("alice", "bob")}
        # The bystanders' objects, no more (trio's accept loop keeps the last
        # accepted link, closed, in a local variable).
        assert live(chatkit.User) == 2
        open_links = [
            o
            for o in gc.get_objects()
            if isinstance(o, chatkit.server.TcpLink) and o.sock is not None
        ]
        assert len(open_links) == 2
        client_sides = [
            o
            for o in gc.get_objects()
            if isinstance(o, trio.SocketStream) and o.socket.fileno() != -1
        ]
        assert len(client_sides) == 2

    # Memory allocated by chatkit's own code during the cycles and still
    # held: a User and everything it owns (its cancel scopes, buffers,
    # protocol state) is allocated there. (Allocations inside trio are left
    # out: trio keeps the cancel scopes of expired deadlines, the test
    # clients' included, until it prunes them in batches of a thousand.)
    chatkit_code = [tracemalloc.Filter(True, "*/chatkit/*")]
    growth = sum(
        stat.size_diff
        for stat in memory_after.filter_traces(chatkit_code).compare_to(
            memory_before.filter_traces(chatkit_code), "filename"
        )
    )
    total = sum(
        stat.size_diff for stat in memory_after.compare_to(memory_before, "filename")
    )
    print(
        f"{CYCLES} cycles in {elapsed:.2f}s; {baseline} tasks before and after;"
        f" memory allocated by chatkit {growth:+d} bytes (all traced: {total:+d}),"
        f" RSS {rss_after - rss_before:+d} KiB; {by.summary()}"
    )
    # A leak of 16 bytes a connection would be over this (a leaked User
    # with its buffers and scopes is over a kilobyte).
    assert growth < 16 * 1024
    assert rss_after - rss_before < 1024


# --- limits ------------------------------------------------------------------


async def test_connections_beyond_max_connections_are_refused_server_full(
    open_raw: OpenRaw,
) -> None:
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(max_connections=4),
        ) as server,
        watch(server),
    ):
        # Logged in: a connection that has not said hello would make way
        # for a newcomer (tests/test_attack_addresses.py).
        idle = [await login(open_raw, server.port, f"idle{i}") for i in range(2)]
        await wait_until(lambda: connections(server) == 4)
        with trio.fail_after(5):
            for _ in range(20):
                refused = await open_raw(server.port)
                lines = await read_until_closed(refused)
                assert [json.loads(line)["code"] for line in lines] == ["server_full"]
                await refused.aclose()
        assert connections(server) == 4
        # A freed slot is usable again.
        await idle[0].aclose()
        await wait_until(lambda: connections(server) == 3)
        newcomer = await open_raw(server.port)
        await newcomer.hello("newcomer")


async def test_joining_too_many_rooms_is_refused(open_raw: OpenRaw) -> None:
    async with (
        chatkit.open_server(
            limits=chatkit.Limits(max_rooms_per_user=3),
        ) as server,
        watch(server),
    ):
        mallory = await login(open_raw, server.port, "mallory")
        for room in ("a", "b"):
            await mallory.send_json(type="join", room=room, ref=room)
            await mallory.expect("joined", ref=room)
        for i in range(30):  # within the rate limit's burst
            await mallory.send_json(type="join", room=f"r{i}", ref=i)
            error = await mallory.receive_json()
            assert error["code"] == "too_many_rooms"
            assert error["ref"] == i
        # No room was created by a refused join.
        assert set(server.rooms) == {"lobby", "quiet", "a", "b"}
        await mallory.send_json(type="leave", room="a")
        await mallory.expect("left", room="a")
        await mallory.send_json(type="join", room="c", ref="c")
        await mallory.expect("joined", ref="c")


async def test_a_message_too_long_is_too_large_and_not_delivered(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server() as server, watch(server) as by:
        limit = server.limits.max_message_length
        mallory = await login(open_raw, server.port, "mallory")
        for i, text in enumerate(["x" * (limit + 1), "é" * (limit + 1)]):
            await mallory.send_json(type="say", text=text, ref=i)
            error = await mallory.receive_json()
            assert (error["code"], error["ref"]) == ("too_large", i)
            await mallory.send_json(type="dm", to="alice", text=text, ref=i)
            error = await mallory.receive_json()
            assert (error["code"], error["ref"]) == ("too_large", i)
        # Exactly the limit, in characters (not bytes), is fine.
        for text in ("y" * limit, "😀" * limit):
            await mallory.send_json(type="say", text=text, ref="ok")
            assert (await mallory.expect("message", ref="ok"))["text"] == text
        await by.wait_for(lambda: len(by.lobby_events("bob", "message")) == 2)
        assert [len(e["text"]) for e in by.lobby_events("bob", "message")] == [
            limit,
            limit,
        ]
        assert not [e for e in by.events["alice"] if e["type"] == "dm"]


# --- plugins -----------------------------------------------------------------


class Crashy:
    """Raises in every hook it can without refusing logins."""

    def _boom(self) -> None:
        raise RuntimeError("crashy plugin")

    @chatkit.hookimpl
    def chatkit_user_connected(self) -> None:
        self._boom()

    @chatkit.hookimpl
    async def chatkit_user_joined(self) -> None:
        await trio.lowlevel.checkpoint()
        self._boom()

    @chatkit.hookimpl
    def chatkit_message(self) -> str:
        raise RuntimeError("crashy plugin")

    @chatkit.hookimpl
    async def chatkit_message_delivered(self) -> None:
        self._boom()

    @chatkit.hookimpl
    def chatkit_dm(self) -> str:
        raise RuntimeError("crashy plugin")

    @chatkit.hookimpl
    def chatkit_user_left(self) -> None:
        self._boom()

    @chatkit.hookimpl
    def chatkit_user_disconnected(self) -> None:
        self._boom()


async def test_a_raising_plugin_is_logged_and_nobody_is_affected(
    open_raw: OpenRaw, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        chatkit.open_server(plugins=[Crashy()]) as server,
        watch(server) as by,
    ):
        mallory = await login(open_raw, server.port, "mallory")
        await mallory.send_json(type="say", text="hi", ref=1)
        assert (await mallory.expect("message", ref=1))["text"] == "hi"
        await mallory.send_json(type="dm", to="bob", text="psst", ref=2)
        assert (await mallory.expect("dm", ref=2))["text"] == "psst"
        await mallory.send_json(type="bye")
        await read_until_closed(mallory)
        await by.wait_for(lambda: len(by.lobby_events("alice", "left")) == 1)
        assert [e["text"] for e in by.events["bob"] if e["type"] == "dm"] == ["psst"]
    logs = server_logs(caplog)
    for hook in (
        "chatkit_user_connected",
        "chatkit_user_joined",
        "chatkit_message",
        "chatkit_message_delivered",
        "chatkit_dm",
        "chatkit_user_left",
        "chatkit_user_disconnected",
    ):
        assert f"plugin 'Crashy' raised in {hook}" in logs, hook
    # The bystanders' own messages went through the raising hook each time.
    assert logs.count("plugin 'Crashy' raised in chatkit_message") > len(
        by.sent["alice"]
    )


class Hang:
    """Hangs forever in one user's ``say`` and in another one's login."""

    def __init__(self, say: str, login: str) -> None:
        self.say = say
        self.login = login

    @chatkit.hookimpl
    async def chatkit_authenticate(self, name: str) -> None:
        if name == self.login:
            await trio.sleep_forever()

    @chatkit.hookimpl
    async def chatkit_message(self, user: chatkit.User) -> None:
        if user.name == self.say:
            await trio.sleep_forever()


async def test_a_hanging_plugin_is_bounded_and_stalls_nobody_else(
    open_raw: OpenRaw, caplog: pytest.LogCaptureFixture
) -> None:
    timeout = SHORT_TIMEOUT
    async with (
        chatkit.open_server(
            plugins=[Hang(say="mallory", login="intruder")],
            limits=chatkit.Limits(hook_timeout=timeout),
        ) as server,
        watch(server) as by,
    ):
        mallory = await login(open_raw, server.port, "mallory")
        # mallory's say hangs in the plugin until hook_timeout; then the hook
        # is skipped and the message delivered. Meanwhile a newcomer logs in
        # and the bystanders chat on at full speed.
        during = len(by.during)
        start = trio.current_time()
        await mallory.send_json(type="say", text="stuck?", ref=1)
        carol = await login(open_raw, server.port, "carol")
        carol_in = trio.current_time() - start
        ack = await mallory.expect("message", ref=1, within=timeout + 2)
        elapsed = trio.current_time() - start
        assert ack["text"] == "stuck?"
        await by.wait_for(
            lambda: any(
                e["text"] == "stuck?" for e in by.lobby_events("bob", "message")
            )
        )
        meanwhile = by.during[during:]
        assert timeout - 0.05 <= elapsed < timeout + 1.0
        assert carol_in < timeout / 2
        # The bystanders chat every CHAT_INTERVAL: about a dozen round trips.
        assert len(meanwhile) >= 6, by.summary()
        assert max(meanwhile) < 0.2, by.summary()

        # A login hanging in the plugin fails closed after hook_timeout;
        # carol chats on meanwhile.
        start = trio.current_time()
        intruder = await open_raw(server.port)
        await intruder.send_json(type="hello", name="intruder", protocol=1)
        await carol.send_json(type="say", text="hi", ref="c")
        await carol.expect("message", ref="c", within=timeout / 2)
        lines = await read_until_closed(intruder, within=timeout + 2)
        assert [json.loads(line)["code"] for line in lines] == ["unauthorized"]
        assert timeout - 0.05 <= trio.current_time() - start < timeout + 1.0
        await wait_until(lambda: connections(server) == 4)
    logs = server_logs(caplog)
    for hook in ("chatkit_message", "chatkit_authenticate"):
        message = f"plugin 'Hang' timed out in {hook} after {timeout}s; skipped"
        assert logs.count(message) == 1, hook


# --- authentication ----------------------------------------------------------


class SharedToken:
    """The simplest authenticator a plugin author could write."""

    def __init__(self, token: str) -> None:
        self.token = token

    @chatkit.hookimpl
    def chatkit_authenticate(self, token: str | None) -> None:
        if token != self.token:
            raise chatkit.Veto("bad token")


def authenticator(kind: str, secret: str, path: Path) -> tuple[object, str]:
    """A plugin accepting ``secret`` (from alice and bob), and the reason it
    gives when it refuses."""
    match kind:
        case "plugin":
            return SharedToken(secret), "bad token"
        case "token":
            return chatkit.auth.TokenAuth(secret), chatkit.auth.INVALID_TOKEN
        case _:
            path.write_text(
                "".join(
                    f"{name}:{chatkit.auth.hash_password(secret)}\n"
                    for name in ("alice", "bob", "mallory")
                )
            )
            return chatkit.auth.PasswordFileAuth(path), chatkit.auth.INVALID_LOGIN


@pytest.mark.parametrize("kind", ["plugin", "token", "password"])
async def test_a_wrong_token_is_unauthorized_and_sees_nothing(
    open_raw: OpenRaw, tmp_path: Path, kind: str
) -> None:
    secret = "s3cret-Tr0ub4dor"
    plugin, reason = authenticator(kind, secret, tmp_path / "passwd")
    refusal = {"type": "error", "code": "unauthorized", "message": reason}
    wrong = ["wrong", "", secret + " ", secret.upper(), secret[:-1], None]
    async with (
        chatkit.open_server(plugins=[plugin]) as server,
        watch(server, token=secret) as by,
    ):
        for token in wrong:
            mallory = await open_raw(server.port)
            fields = {} if token is None else {"token": token}
            hello = {"type": "hello", "name": "mallory", "protocol": 1, **fields}
            # Pipelined: nothing after a refused hello is acted upon.
            await mallory.send_bytes(
                json.dumps(hello).encode()
                + b'\n{"type":"say","text":"let me in"}\n'
                + b'{"type":"history","room":"quiet"}\n'
            )
            lines = await read_until_closed(mallory)
            assert [json.loads(line) for line in lines] == [refusal]
        # Line mode has no token at all.
        trudy = await open_raw(server.port)
        await trudy.send_bytes(b"mallory\nlet me in\n")
        line = f"error (unauthorized): {reason}".encode()
        assert await read_until_closed(trudy) == [line]

        # A storm of wrong guesses at once (each password check blocks the
        # event loop for milliseconds): refused, and the others chat on.
        async def guess(i: int) -> None:
            client = await open_raw(server.port)
            await client.send_json(
                type="hello", name="mallory", protocol=1, token=f"guess{i}"
            )
            lines = await read_until_closed(client)
            assert [json.loads(line)["code"] for line in lines] == ["unauthorized"]

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(guess, i)
        assert server.get_user("mallory") is None
        await wait_until(lambda: connections(server) == 2)
    assert by.lobby_events("alice", "joined") == []
    assert by.lobby_events("alice", "message") == []


# --- TLS ---------------------------------------------------------------------


async def test_tls_with_the_wrong_ca_is_rejected_and_others_are_served(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    wrong = ssl.create_default_context()  # trusts another CA
    trustme.CA().configure_trust(wrong)
    async with chatkit.open_server(
        ssl_context=server_tls,
        limits=chatkit.Limits(handshake_timeout=SHORT_TIMEOUT),
    ) as server:

        async def connect() -> RawClient:
            return await RawClient.open_tls(server.port, client_tls)

        async with watch(server, connect=connect) as by:
            with trio.fail_after(5):
                # A client that does not trust the server's CA refuses it.
                for _ in range(5):
                    stream = await trio.open_ssl_over_tcp_stream(
                        "127.0.0.1", server.port, ssl_context=wrong
                    )
                    with pytest.raises(trio.BrokenResourceError) as failed:
                        await stream.do_handshake()
                    assert isinstance(
                        failed.value.__cause__, ssl.SSLCertVerificationError
                    )
                    await trio.aclose_forcefully(stream)
                # Plain text to a TLS port: the server's handshake fails.
                plain = await RawClient.open(server.port)
                await plain.send_json(type="hello", name="plain", protocol=1)
                await read_until_closed(plain)
                await plain.aclose()
                # A TLS handshake never started: closed by handshake_timeout.
                silent = await RawClient.open(server.port)
                start = trio.current_time()
                await read_until_closed(silent)
                assert trio.current_time() - start < SHORT_TIMEOUT + 1.0
                await silent.aclose()
            await wait_until(lambda: connections(server) == 2)
            assert [u.name for u in server.users] == ["alice", "bob"]
        assert by.lobby_events("alice", "joined") == []


# --- graceful shutdown under load --------------------------------------------


async def test_shutdown_under_load_delivers_everything_acknowledged() -> None:
    senders = [f"s{i}" for i in range(4)]
    listeners = ["l0", "l1"]
    server = chatkit.ChatServer(
        limits=chatkit.Limits(rate_limit=None),
    )
    received: dict[str, bytearray] = {}
    acked: dict[str, list[str]] = {name: [] for name in senders}
    clients: list[RawClient] = []
    snapshot: list[str] = []

    async def record(name: str, client: RawClient) -> None:
        buf = received[name] = bytearray(client._buf)
        client._buf.clear()
        parsed = 0
        try:
            while data := await client.stream.receive_some(1 << 20):
                buf += data
                if name not in acked:
                    continue
                # Acknowledgements: this sender's own messages, with a ref.
                end = buf.rfind(b"\n") + 1
                for line in bytes(buf[parsed:end]).splitlines():
                    event = json.loads(line)
                    if event["type"] == "message" and "ref" in event:
                        acked[name].append(event["text"])
                parsed = end
        except trio.BrokenResourceError:
            pass

    async def send(name: str, client: RawClient) -> None:
        k = 0
        try:
            while True:
                batch = b"".join(
                    b'{"type":"say","text":"%s %d","ref":%d}\n'
                    % (name.encode(), k + j, k + j)
                    for j in range(50)
                )
                k += 50
                await client.stream.send_all(batch)
                await trio.lowlevel.checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            for name in [*senders, *listeners]:
                client = await RawClient.open(port)
                clients.append(client)
                await client.hello(name)
            line_client = await RawClient.open(port)
            clients.append(line_client)
            await line_client.send_line("liner")
            await clients[0].expect("joined", name="liner")
            names = [*senders, *listeners, "liner"]
            with trio.fail_after(10):
                async with trio.open_nursery() as readers:
                    for name, client in zip(names, clients, strict=True):
                        readers.start_soon(record, name, client)
                    with trio.CancelScope() as sending:
                        async with trio.open_nursery() as writers:
                            for name, client in zip(senders, clients, strict=False):
                                writers.start_soon(send, name, client)
                            await wait_until(
                                lambda: sum(map(len, acked.values())) >= 2000
                            )
                            # Everything acknowledged so far must reach
                            # everyone, while more is still in flight.
                            snapshot = [t for a in acked.values() for t in a]
                            await server.aclose()
                            sending.cancel()
    finally:
        for client in clients:
            await client.aclose()

    assert len(snapshot) >= 2000
    for name in [*senders, *listeners]:
        events = [json.loads(line) for line in bytes(received[name]).splitlines()]
        assert events[-1] == {"type": "shutdown", "reason": "server shutting down"}
        texts = [e["text"] for e in events if e["type"] == "message"]
        assert len(texts) == len(set(texts)), name
        assert set(snapshot) <= set(texts), name
        for sender in senders:
            mine = [t for t in texts if t.split()[0] == sender]
            assert mine == [f"{sender} {k}" for k in range(len(mine))]
    lines = bytes(received["liner"]).decode().splitlines()
    assert lines[-1] == "Server is shutting down: server shutting down"
    heard = {line.split(": ", 1)[1] for line in lines if line.startswith("s")}
    assert set(snapshot) <= heard
    total = sum(len(a) for a in acked.values())
    print(
        f"shutdown: {len(snapshot)} acknowledged before aclose, all delivered;"
        f" {total} acknowledged in all"
    )
