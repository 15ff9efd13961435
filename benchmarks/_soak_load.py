"""The load generator of ``benchmarks/soak.py``: many raw chat clients in one
trio process. Started by soak.py (``python _soak_load.py CONFIG.json``), not
by hand.

Every bot logs in, joins one extra room and reads everything it is sent.
*Talkers* also say a message at a steady rate (mostly in their room, some in
``lobby``, some as a dm to a listener of this process); *churners* now and
then leave and rejoin their room, reconnect after ``bye`` or drop their
connection without one and log in again under the same name.

Loss accounting, exact despite the churn: a bot's membership of a room is
bracketed by two ``history limit=1`` requests, one right after it joins and
one right before it leaves (or at the end). The newest id in each answer
bounds a *window*: every message acknowledged in that room with
``lo < id <= hi`` must have reached the bot, and it has, by the time the
second answer is read, since the server fans a message out before it
answers later requests. soak.py collects the windows, the acknowledged ids
(``message`` with the sender's ``ref``) and what each bot received from every
load process and counts what is missing.

Writes progress to ``progress_path`` every second and everything to
``result_path`` at the end.
"""

from __future__ import annotations

import collections
import itertools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import trio

from chatkit import LOBBY

REQUEST_TIMEOUT = 30.0
CONNECT_CONCURRENCY = 50

Event = dict[str, Any]


class Interrupted(Exception):
    """The bot's connection ended while it was waiting for an answer."""


class Load:
    """Counters and records shared by the bots of this process."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.rng = random.Random(config["seed"])
        self.port: int = config["port"]
        self.acks: list[tuple[int, str]] = []  # (id, room) of acked says
        self.dm_acks: list[tuple[int, str]] = []  # (id, recipient) of acked dms
        self.latencies: list[float] = []  # say/dm acknowledgement times, s
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.listeners: list[Bot] = []  # dm recipients
        self.connected = 0
        self.all_connected = trio.Event()
        self.phase = "connecting"


async def open_stream(port: int, source: str | None) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port``, from ``source`` if given."""
    if source is None:
        return await trio.open_tcp_stream("127.0.0.1", port)
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # TCP_NODELAY on, as open_tcp_stream's


class Bot:
    def __init__(self, load: Load, name: str, role: str, room: str) -> None:
        self.load = load
        self.name = name
        self.role = role
        self.room = room
        # Clients spread over loopback source addresses (``per_address``
        # each), as real ones come from many: within the server's
        # per-address connection limit.
        per_address = load.config.get("per_address")
        if per_address:
            slot = int(name.removeprefix("soak")) // per_address
            self.source: str | None = f"127.2.{slot // 250}.{slot % 250 + 1}"
        else:
            self.source = None
        self.rng = random.Random(f"{load.config['seed']}-{name}")
        self.stream: trio.SocketStream | None = None
        self.send_lock = trio.Lock()
        self.refs = itertools.count()
        self.waiting: dict[str, list[Any]] = {}  # ref -> [trio.Event, reply]
        self.eof = trio.Event()
        self.member: set[str] = set()  # rooms, from our own joined/left
        self.seen: set[int] = set()
        self.received: dict[str, list[int]] = collections.defaultdict(list)
        self.dms: list[int] = []
        self.windows: list[tuple[str, int, int]] = []
        self.open_windows: dict[str, int] = {}
        self.duplicates = 0
        self.strays = 0  # room messages received while not a member

    # --- wire -----------------------------------------------------------

    async def send(self, **fields: Any) -> None:
        assert self.stream is not None
        data = json.dumps(fields).encode() + b"\n"
        async with self.send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise Interrupted(self.name) from None

    async def request(self, **fields: Any) -> Event:
        """Send a request with a fresh ``ref``; return the answer with it."""
        ref = f"{self.name}:{next(self.refs)}"
        slot: list[Any] = [trio.Event(), None]
        self.waiting[ref] = slot
        try:
            await self.send(**fields, ref=ref)
            with trio.fail_after(REQUEST_TIMEOUT):
                await slot[0].wait()
        finally:
            del self.waiting[ref]
        if slot[1] is None:
            raise Interrupted(self.name)
        reply: Event = slot[1]
        return reply

    async def read(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    break
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    self.handle(json.loads(line))
        finally:
            self.eof.set()
            for slot in self.waiting.values():
                slot[0].set()  # the reply stays None: connection lost

    def handle(self, event: Event) -> None:
        kind = event.get("type")
        if kind == "message":
            self.load.counts["received"] += 1
            message_id, room = event["id"], event["room"]
            if message_id in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(message_id)
            self.received[room].append(message_id)
            if room not in self.member:
                self.strays += 1
        elif kind == "dm":
            self.load.counts["received"] += 1
            if event.get("to") == self.name and event.get("from") != self.name:
                if event["id"] in self.seen:
                    self.duplicates += 1
                self.seen.add(event["id"])
                self.dms.append(event["id"])
        elif kind == "joined" and event.get("name") == self.name:
            self.member.add(event["room"])
        elif kind == "left" and event.get("name") == self.name:
            self.member.discard(event["room"])
        elif kind == "error" and "ref" not in event:
            self.load.errors[event.get("code", "?")] += 1
        ref = event.get("ref")
        if ref is not None and ref in self.waiting:
            slot = self.waiting[ref]
            slot[1] = event
            slot[0].set()

    # --- lifecycle --------------------------------------------------------

    async def connect(self, nursery: trio.Nursery) -> None:
        """Connect, log in (retrying while our old connection still holds
        the name), join our room and open a window in each room."""
        self.stream = await open_stream(self.load.port, self.source)
        self.eof = trio.Event()
        self.member = set()
        nursery.start_soon(self.read, self.stream)
        with trio.fail_after(REQUEST_TIMEOUT):
            while True:
                answer = await self.request(type="hello", name=self.name, protocol=1)
                if answer["type"] == "welcome":
                    break
                if answer.get("code") != "name_taken":
                    raise RuntimeError(f"{self.name}: hello refused: {answer}")
                self.load.counts["hello_retries"] += 1
                await trio.sleep(0.05)
        await self.join(self.room)
        await self.open_window(LOBBY)

    async def join(self, room: str) -> None:
        answer = await self.request(type="join", room=room)
        if answer["type"] != "joined":
            raise RuntimeError(f"{self.name}: join {room} refused: {answer}")
        await self.open_window(room)

    async def newest_id(self, room: str) -> int:
        answer = await self.request(type="history", room=room, limit=1)
        if answer["type"] != "history":
            raise RuntimeError(f"{self.name}: history {room} refused: {answer}")
        messages = answer["messages"]
        return int(messages[-1]["id"]) if messages else 0

    async def open_window(self, room: str) -> None:
        self.open_windows[room] = await self.newest_id(room)

    async def close_window(self, room: str) -> None:
        hi = await self.newest_id(room)
        self.windows.append((room, self.open_windows.pop(room), hi))

    async def close_all_windows(self) -> None:
        for room in list(self.open_windows):
            await self.close_window(room)

    async def disconnect(self, how: str) -> None:
        assert self.stream is not None
        if how == "bye":
            await self.send(type="bye")
            with trio.fail_after(REQUEST_TIMEOUT):
                await self.eof.wait()  # the server closes once we are gone
            await self.stream.aclose()
        else:
            await trio.aclose_forcefully(self.stream)

    async def run(self, end: float, limiter: trio.CapacityLimiter) -> None:
        final = False
        first = True
        while not final:
            async with trio.open_nursery() as nursery:
                if first:
                    async with limiter:
                        await self.connect(nursery)
                    self.load.connected += 1
                    if self.load.connected == len(self.load.config["bots"]):
                        self.load.all_connected.set()
                    first = False
                else:
                    await self.connect(nursery)
                await self.load.all_connected.wait()
                how = await self.live(end)
                final = how == "final"
                await self.close_all_windows()
                await self.disconnect("bye" if final else how)
                nursery.cancel_scope.cancel()  # the reader, after a drop

    async def live(self, end: float) -> str:
        """Act out the role until ``end`` (then ``"final"``) or until the
        connection is to be dropped (``"bye"`` or ``"drop"``)."""
        if self.role == "talker":
            await self.talk(end)
        elif self.role == "churner":
            while True:
                wait = self.rng.uniform(*self.load.config["churn_every"])
                if trio.current_time() + wait >= end:
                    break
                await trio.sleep(wait)
                action = self.rng.choice(["rejoin", "bye", "drop"])
                self.load.counts[f"churn_{action}"] += 1
                if action != "rejoin":
                    return action
                await self.close_window(self.room)
                answer = await self.request(type="leave", room=self.room)
                if answer["type"] != "left":
                    raise RuntimeError(f"{self.name}: leave refused: {answer}")
                await trio.sleep(self.rng.uniform(0.1, 1.0))
                await self.join(self.room)
        await trio.sleep_until(end)
        return "final"

    async def talk(self, end: float) -> None:
        config = self.load.config
        period = 1.0 / config["rate"]
        next_at = trio.current_time() + self.rng.uniform(0, period)
        sequence = itertools.count()
        while next_at < end:
            await trio.sleep_until(next_at)
            next_at += period
            text = f"{self.name} #{next(sequence)} " + "x" * self.rng.randint(10, 150)
            roll = self.rng.random()
            started = time.monotonic()
            self.load.counts["sent"] += 1
            if roll < config["dm_share"] and self.load.listeners:
                to = self.rng.choice(self.load.listeners).name
                answer = await self.request(type="dm", to=to, text=text)
                if answer["type"] == "dm":
                    self.load.dm_acks.append((answer["id"], to))
            else:
                room = (
                    LOBBY
                    if roll < config["dm_share"] + config["lobby_share"]
                    else self.room
                )
                answer = await self.request(type="say", room=room, text=text)
                if answer["type"] == "message":
                    self.load.acks.append((answer["id"], room))
            if answer["type"] == "error":
                self.load.counts["refused"] += 1
                self.load.errors[answer.get("code", "?")] += 1
            else:
                self.load.counts["acked"] += 1
                self.load.latencies.append(time.monotonic() - started)

    def result(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "windows": self.windows,
            "received": dict(self.received),
            "dms": self.dms,
            "duplicates": self.duplicates,
            "strays": self.strays,
        }


async def write_progress(load: Load, path: trio.Path) -> None:
    while True:
        progress = {
            "phase": load.phase,
            "connected": load.connected,
            **load.counts,
            "errors": sum(load.errors.values()),
        }
        partial = trio.Path(f"{path}.tmp")
        await partial.write_text(json.dumps(progress))
        await partial.replace(path)
        await trio.sleep(1)


async def main(config: dict[str, Any]) -> None:
    load = Load(config)
    bots = [Bot(load, name, role, room) for name, role, room in config["bots"]]
    load.listeners = [bot for bot in bots if bot.role == "listener"]
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
    async with trio.open_nursery() as progress_nursery:
        progress_nursery.start_soon(write_progress, load, Path(config["progress_path"]))
        with trio.fail_after(config["timeout"]):
            async with trio.open_nursery() as nursery:
                started = trio.current_time()
                end = started + config["seconds"]

                async def start_running() -> None:
                    await load.all_connected.wait()
                    load.phase = "running"
                    await trio.sleep_until(end)
                    load.phase = "draining"

                nursery.start_soon(start_running)
                for bot in bots:
                    # The run's length counts from the start, connecting
                    # included, so that every load process stops together.
                    nursery.start_soon(bot.run, end, limiter)
        load.phase = "done"
        result = {
            "acks": load.acks,
            "dm_acks": load.dm_acks,
            "latencies": load.latencies,
            "counts": dict(load.counts),
            "errors": dict(load.errors),
            "bots": [bot.result() for bot in bots],
        }
        await trio.Path(config["result_path"]).write_text(json.dumps(result))
        progress_nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, json.loads(Path(sys.argv[1]).read_text()))
