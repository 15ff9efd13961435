"""The WebSocket reference: a chat server written as a user of the
``websockets`` library would, for benchmarks/fanout.py (issue 20).

asyncio on uvloop, ``websockets.asyncio.server.serve`` with its defaults
except ``compression=None`` (chatkit does not compress either), one handler
coroutine per connection iterating over its messages, rooms as sets of
connections, and ``websockets.asyncio.server.broadcast`` to fan a message
out: the library's own helper, which frames and writes the message to
every connection in turn, without backpressure.

It speaks the part of chatkit's protocol v1 (``shared/protocol-v1.md``) that
the benchmark uses, one JSON object per text frame: ``hello`` -> ``welcome``
and ``joined`` in ``lobby``; ``join``, ``leave``, ``say`` -> ``message``
(id, ts, room, from, text; the sender's own copy carries its ``ref``),
``who``, ``history``, ``ping`` -> ``pong``, ``bye``; ``error`` for the rest.
History stays in memory (the last 1,000 messages of each room). Like
benchmarks/chatkit_server.py, ``joined`` goes to every member up to
``--presence-limit`` members, and only to the newcomer beyond.

Run: ``python benchmarks/ws_reference_server.py --port 0``; it prints
``Server started on HOST:PORT`` and stops on SIGTERM. Clients connect to
``ws://HOST:PORT/`` (any path).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import re
import signal
import time
from collections import defaultdict, deque
from typing import Any

from loadgen import raise_file_limit
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosedError

NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
ROOM = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HISTORY = 1000


def encode(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


class Chat:
    """The server's state: who is connected, the rooms, their history."""

    def __init__(self, presence_limit: int | None) -> None:
        self.presence_limit = presence_limit
        self.taken: set[str] = set()  # casefolded names
        self.users: dict[ServerConnection, str] = {}
        self.rooms: dict[str, set[ServerConnection]] = defaultdict(set)
        self.history: dict[str, deque[dict[str, Any]]] = defaultdict(
            lambda: deque(maxlen=HISTORY)
        )
        self.ids = itertools.count(1)

    def join(self, ws: ServerConnection, name: str, room: str) -> None:
        members = self.rooms[room]
        members.add(ws)
        joined = encode({"type": "joined", "room": room, "name": name})
        if self.presence_limit is None or len(members) <= self.presence_limit:
            broadcast(members, joined)
        else:
            broadcast([ws], joined)

    def leave(self, ws: ServerConnection, name: str, room: str, reason: str) -> None:
        members = self.rooms.get(room)
        if members is None or ws not in members:
            return
        members.discard(ws)
        if not members:
            del self.rooms[room]
        elif self.presence_limit is None or len(members) < self.presence_limit:
            left = {"type": "left", "room": room, "name": name, "reason": reason}
            broadcast(members, encode(left))

    async def handler(self, ws: ServerConnection) -> None:
        name: str | None = None
        rooms: set[str] = set()

        async def error(code: str, message: str, ref: Any = None) -> None:
            reply = {"type": "error", "code": code, "message": message}
            if ref is not None:
                reply["ref"] = ref
            await ws.send(encode(reply))

        try:
            async for raw in ws:
                try:
                    request = json.loads(raw)
                    kind = request["type"]
                except (ValueError, TypeError, KeyError):
                    await error("bad_request", "not a JSON object with a type")
                    continue
                ref = request.get("ref")
                if name is None:
                    if kind != "hello":
                        await error("not_ready", "hello first", ref)
                        continue
                    wanted = request.get("name")
                    if not isinstance(wanted, str) or not NAME.fullmatch(wanted):
                        await error("bad_name", "1-32 letters, digits, _ - .", ref)
                        continue
                    if wanted.casefold() in self.taken:
                        await error("name_taken", f"{wanted} is taken", ref)
                        continue
                    name = wanted
                    self.taken.add(name.casefold())
                    self.users[ws] = name
                    welcome = {
                        "type": "welcome",
                        "name": name,
                        "protocol": 1,
                        "server": "websockets-reference",
                        "rooms": ["lobby"],
                    }
                    await ws.send(encode(welcome))
                    rooms.add("lobby")
                    self.join(ws, name, "lobby")
                elif kind == "say":
                    room = request.get("room", "lobby")
                    text = request.get("text")
                    if not isinstance(text, str) or not isinstance(room, str):
                        await error("bad_request", "say needs a text", ref)
                        continue
                    if room not in rooms:
                        await error("not_in_room", f"not in {room}", ref)
                        continue
                    message = {
                        "type": "message",
                        "id": next(self.ids),
                        "ts": time.time(),
                        "room": room,
                        "from": name,
                        "text": text,
                    }
                    self.history[room].append(message)
                    members = self.rooms[room]
                    if ref is None:
                        broadcast(members, encode(message))
                    else:
                        broadcast(members - {ws}, encode(message))
                        await ws.send(encode({**message, "ref": ref}))
                elif kind == "join":
                    room = request.get("room")
                    if not isinstance(room, str) or not ROOM.fullmatch(room):
                        await error("bad_request", "join needs a room name", ref)
                    elif room not in rooms:
                        rooms.add(room)
                        self.join(ws, name, room)
                elif kind == "leave":
                    room = request.get("room")
                    if room not in rooms:
                        await error("not_in_room", f"not in {room}", ref)
                    else:
                        rooms.discard(room)
                        self.leave(ws, name, room, "left")
                elif kind == "who":
                    room = request.get("room", "lobby")
                    names = [self.users[m] for m in self.rooms.get(room, ())]
                    await ws.send(encode({"type": "who", "room": room, "names": names}))
                elif kind == "history":
                    room = request.get("room", "lobby")
                    limit = request.get("limit", 50)
                    if not isinstance(limit, int) or limit < 0:
                        await error("bad_request", "limit: a count", ref)
                        continue
                    if room not in rooms:
                        await error("not_in_room", f"not in {room}", ref)
                        continue
                    messages = list(self.history[room])[-limit:] if limit else []
                    reply = {"type": "history", "room": room, "messages": messages}
                    await ws.send(encode(reply))
                elif kind == "ping":
                    pong: dict[str, Any] = {"type": "pong"}
                    if ref is not None:
                        pong["ref"] = ref
                    await ws.send(encode(pong))
                elif kind == "bye":
                    break
                else:
                    await error("bad_request", f"unknown type {kind!r}", ref)
        except ConnectionClosedError:
            pass  # the client went away without a closing handshake
        finally:
            if name is not None:
                self.taken.discard(name.casefold())
                del self.users[ws]
                for room in rooms:
                    self.leave(ws, name, room, "quit")


async def main(host: str, port: int, presence_limit: int | None) -> None:
    chat = Chat(presence_limit)
    async with serve(chat.handler, host, port, compression=None) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"Server started on {host}:{bound}", flush=True)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, server.close)
        await server.wait_closed()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--presence-limit",
        type=int,
        default=1000,
        help="joined goes to every member up to this many; -1: no limit",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raise_file_limit()
    limit = None if args.presence_limit < 0 else args.presence_limit
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the bench extra installs it
        asyncio.run(main(args.host, args.port, limit))
    else:
        uvloop.run(main(args.host, args.port, limit))


if __name__ == "__main__":
    run()
