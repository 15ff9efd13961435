"""A hypothesis state machine drives random client sessions against a real
server and checks, after every step, what every client received.

The server runs as ``python -m chatkit.server`` in a subprocess (hypothesis
state machines are synchronous) and the clients are blocking sockets. The
machine keeps a model of who is connected under which name and who is in
which room; after each action every connected client sends a ``ping`` and
reads up to its ``pong``. The server handles one connection's requests in
order and fans out synchronously, so once the actor has its answer and each
client its ``pong``, everything the action caused has been received: the
events read are compared, as a multiset, with what the model predicts.

Invariants checked:

- an accepted ``say`` (the sender's copy with its ``ref``) reaches each
  member of the room at delivery time exactly once, and nobody else; a
  ``dm`` reaches exactly its recipient; ids increase;
- names are unique regardless of case: ``hello`` and ``nick`` are refused
  with ``name_taken`` exactly when the model says so, and the name of a
  user who left (``bye`` or a dropped connection) is free again;
- ``who`` and ``rooms`` list exactly the connected members: no ghosts, nobody
  missing, empty rooms gone;
- every refused action gets its documented error code and nothing else:
  ``bad_name``, ``name_taken``, ``not_in_room``, ``no_such_user``, and the
  server's limits (run small here), ``too_many_rooms`` and ``too_large``.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

TIMEOUT = 5.0  # any single read or connect; a hang is a failure
MAX_CLIENTS = 6
MAX_ROOMS = 3  # per user, lobby included
MAX_TEXT = 12  # characters in a say or dm
LOBBY = "lobby"
PROBE = "zz.probe"  # the start-of-example cleanliness check logs in as this

ROOMS = ("lobby", "r1", "R1", "dev.ops", "x-2")  # room names are case-sensitive
BAD_ROOMS = ("", "two words", "caf\u00e9", "r" * 65, "a/b")
NAMES = ("alice", "Bob", "carol_1", "d.e-f", "Z9")
BAD_NAMES = ("", "a b", "\u00e9mile", "n" * 33, "x*y", "*server*")
CASES: tuple[Callable[[str], str], ...] = (
    str.lower,
    str.upper,
    str.swapcase,
    str.title,
)

Event = dict[str, Any]
Expected = dict["Client", list[Event]]  # what each client must receive

# --- strategies -------------------------------------------------------------


def recase(name: str, case: Callable[[str], str]) -> str:
    return case(name)


# Mostly a few names, in any case, so that collisions are frequent.
names = st.one_of(
    st.sampled_from(NAMES),
    st.builds(recase, st.sampled_from(NAMES), st.sampled_from(CASES)),
    st.from_regex(r"[A-Za-z0-9_.\-]{1,32}", fullmatch=True),
    st.sampled_from(BAD_NAMES),
)
rooms = st.sampled_from(ROOMS)
join_rooms = st.one_of(
    rooms,
    st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True),
    st.sampled_from(BAD_ROOMS),
)
texts = st.text(st.characters(codec="utf-8"), max_size=MAX_TEXT + 4)
cases = st.sampled_from(CASES)
burst_actions = st.one_of(
    st.tuples(st.just("say"), rooms, texts),
    st.tuples(st.just("join"), rooms, st.just("")),
    st.tuples(st.just("leave"), rooms, st.just("")),
    st.tuples(st.just("dm"), st.sampled_from(NAMES), texts),
)


def is_valid_name(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_.\-]{1,32}", name) is not None


def is_valid_room(room: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", room) is not None


# --- wire helpers -------------------------------------------------------------

# The fields compared, per event type: extra fields a later protocol version
# may add are ignored; ``ts`` is checked separately, error texts are free.
FIELDS: dict[str, tuple[str, ...]] = {
    "welcome": ("name", "protocol", "rooms", "ref"),
    "message": ("id", "room", "from", "text", "ref"),
    "dm": ("id", "from", "to", "text", "ref"),
    "joined": ("room", "name", "ref"),
    "left": ("room", "name", "reason", "ref"),
    "renamed": ("old", "new", "ref"),
    "who": ("room", "names", "ref"),
    "rooms": ("rooms", "ref"),
    "pong": ("ref",),
    "error": ("code", "ref"),
}


def canon(event: Event) -> str:
    """A comparable form of ``event``: its type and the fields that matter."""
    keys = FIELDS.get(event.get("type", ""))
    if keys is None:
        return json.dumps(event, sort_keys=True)  # unexpected: shown in full
    return json.dumps({k: event.get(k) for k in ("type", *keys)}, sort_keys=True)


def ev(type: str, **fields: Any) -> Event:
    return {"type": type, **fields}


class Interrupted(AssertionError):
    """The server closed, reset or stopped answering a connection."""


class Conn:
    """A blocking JSON-mode connection to ``server`` that reads whole lines.

    Any I/O failure is raised as one Interrupted from one place, without
    the OSError as context: whether the server's socket says EOF or RST
    may vary between runs, and hypothesis would take that for a flaky test.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self._buf = bytearray()
        problem = None
        try:
            self.sock = socket.create_connection(
                ("127.0.0.1", server.port), timeout=TIMEOUT
            )
        except OSError as exc:
            problem = f"cannot connect: {exc!r}"
        if problem is not None:
            self._lost(problem)

    def _lost(self, problem: str) -> NoReturn:
        raise Interrupted(f"{problem} ({self.server.status()})")

    def send(self, **fields: Any) -> None:
        self.send_bytes(json.dumps(fields).encode() + b"\n")

    def send_bytes(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
            return
        except OSError as exc:
            problem = f"send failed: {exc!r}"
        self._lost(problem)

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            problem = f"nothing received for {TIMEOUT} s"
        except OSError as exc:
            problem = f"receive failed: {exc!r}"
        self._lost(f"{problem}; pending {bytes(self._buf)!r}")

    def receive(self) -> Event:
        """The next event."""
        while b"\n" not in self._buf:
            data = self._recv()
            if not data:
                self._lost(f"connection closed; pending {bytes(self._buf)!r}")
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        event: Event = json.loads(line)
        return event

    def sync(self, ref: str, before: bytes = b"") -> list[Event]:
        """Send ``ping`` (after ``before``, in the same write) and return
        everything received before its ``pong``."""
        self.send_bytes(
            before + json.dumps({"type": "ping", "ref": ref}).encode() + b"\n"
        )
        events = []
        while True:
            event = self.receive()
            if event.get("type") == "pong" and event.get("ref") == ref:
                return events
            events.append(event)

    def read_to_eof(self) -> list[Event]:
        """Everything received until the server closes the connection (a
        reset counts as a close: the server may close with unread input)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except OSError as exc:
                problem = f"waiting for the close: {exc!r}"
                break
            if not data:
                lines, self._buf = bytes(self._buf).split(b"\n"), bytearray()
                return [json.loads(line) for line in lines if line]
            self._buf += data
        self._lost(problem)

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.sock.close()


# --- the server ---------------------------------------------------------------


class ServerProcess:
    """``python -m chatkit.server`` on a free loopback port, in a subprocess."""

    def __init__(self, log_dir: Path, command: list[str] | None = None) -> None:
        self.log_dir = log_dir
        self.command = command or [sys.executable, "-m", "chatkit.server"]
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._log_path = log_dir / "server-0.log"

    def start(self) -> None:
        self._starts += 1
        # A file, not a pipe: nobody reads the log while the server runs,
        # and a full pipe would block the server.
        log_path = self._log_path = self.log_dir / f"server-{self._starts}.log"
        with log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    *self.command,
                    "--port=0",
                    "--no-interactive",
                    # History (SQLite, the default store) kept with the logs.
                    f"--db={self.log_dir / 'history.sqlite3'}",
                    "--no-entry-points",
                    "--log-level=warning",
                    # The machine sends a burst of requests per step.
                    "--rate-limit=0",
                    "--rename-interval=0",  # and renames many
                    # Small limits, so that steps run into them.
                    f"--max-rooms-per-user={MAX_ROOMS}",
                    f"--max-message-length={MAX_TEXT}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            text = log_path.read_text(errors="replace")
            found = re.search(r"Server started on 127\.0\.0\.1:(\d+)", text)
            if found:
                self.port = int(found.group(1))
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: a graceful shutdown
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def status(self) -> str:
        """How the server is, for failure messages."""
        code = None if self._proc is None else self._proc.poll()
        if self._proc is not None and code is None:
            return "the server is still running"
        try:
            output = self._log_path.read_text(errors="replace")[-3000:]
        except OSError as exc:
            output = repr(exc)
        return f"the server exited with status {code}; its output ends:\n{output}"

    def is_clean(self) -> bool:
        """True if the server is up with nobody logged in and no room but an
        empty lobby (checked by logging in as PROBE)."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            conn = Conn(self)
        except Interrupted:
            return False
        try:
            conn.send(type="hello", name=PROBE, protocol=1)
            if conn.receive().get("type") != "welcome":
                return False
            conn.send(type="rooms", ref="clean")
            events = conn.sync("clean-sync")
            conn.send(type="bye")
            conn.read_to_eof()  # our name is free once the server closes
        except (Interrupted, ValueError):
            return False
        finally:
            conn.close()
        return [canon(e) for e in events] == [
            canon(ev("joined", room=LOBBY, name=PROBE)),
            canon(ev("rooms", rooms=[{"name": LOBBY, "members": 1}], ref="clean")),
        ]

    def ensure_clean(self) -> None:
        """Make sure an example starts from a fresh state: a failed example
        (or a bug) may leave users behind, which would make the next one
        fail for the wrong reason; then the server is restarted."""
        if not self.is_clean():
            self.stop()
            self.start()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("stateful"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- the model and the machine -------------------------------------------------


class Client:
    """A logged-in connection, as the model sees it."""

    def __init__(self, key: int, conn: Conn, name: str) -> None:
        self.key = key
        self.conn = conn
        self.name = name
        self.rooms: dict[str, None] = {LOBBY: None}  # join order
        self.last_id = 0

    def __repr__(self) -> str:
        return f"<client {self.key} {self.name!r}>"


class ChatMachine(RuleBasedStateMachine):
    clients = Bundle("clients")

    def __init__(self, server: ServerProcess) -> None:
        super().__init__()
        server.ensure_clean()
        self.server = server
        self.opened: list[Conn] = []
        self.connected: dict[Client, None] = {}  # login order
        self.members: dict[str, dict[Client, None]] = {LOBBY: {}}
        self.keys = 0
        self.refs = 0
        self.last_id = 0

    # --- model helpers ----------------------------------------------------

    def open(self) -> Conn:
        """A new connection, closed at teardown at the latest."""
        conn = Conn(self.server)
        self.opened.append(conn)
        return conn

    def ref(self, kind: str) -> str:
        self.refs += 1
        return f"{kind}-{self.refs}"

    def holder(self, name: str) -> Client | None:
        folded = name.casefold()
        return next((c for c in self.connected if c.name.casefold() == folded), None)

    def add_member(self, client: Client, room: str) -> None:
        self.members.setdefault(room, {})[client] = None
        client.rooms[room] = None

    def remove_member(self, client: Client, room: str) -> None:
        del self.members[room][client]
        del client.rooms[room]
        if not self.members[room] and room != LOBBY:
            del self.members[room]

    def neighbours(self, client: Client) -> list[Client]:
        seen: dict[Client, None] = {}
        for room in client.rooms:
            seen.update(self.members[room])
        seen.pop(client, None)
        return list(seen)

    def settle(
        self,
        expected: dict[Client, list[Event]],
        received: dict[Client, list[Event]] | None = None,
        *,
        ordered: bool = False,
    ) -> None:
        """Read every connected client up to a fresh ``pong`` and compare
        what it got (plus ``received``: the actor's answer, read first) with
        ``expected``: as a multiset, or in order if ``ordered``."""
        received = dict(received or {})
        arrange = list if ordered else sorted
        for client in self.connected:
            got = received.get(client, []) + client.conn.sync(self.ref("sync"))
            want = expected.get(client, [])
            assert arrange(map(canon, got)) == arrange(map(canon, want)), (
                f"{client} received {got}, expected {want}"
            )
            for event in got:
                if event["type"] in ("message", "dm"):
                    assert isinstance(event.get("ts"), int | float), event
                    assert event["id"] > client.last_id, (
                        f"{client}: ids must increase: {event} after {client.last_id}"
                    )
                    client.last_id = event["id"]

    def ack_id(self, client: Client, got: list[Event], type: str, ref: str) -> int:
        """The id of the one acknowledgement of ``ref`` in ``got``."""
        acks = [e for e in got if e.get("type") == type and e.get("ref") == ref]
        assert len(acks) == 1, f"{client}: {ref} acknowledged {len(acks)} times: {got}"
        ack_id = acks[0].get("id")
        assert isinstance(ack_id, int) and ack_id > self.last_id, (
            f"ids must increase: {acks[0]} after {self.last_id}"
        )
        self.last_id = ack_id
        return ack_id

    def ask(self, client: Client, **request: Any) -> list[Event]:
        """Send ``request`` and read up to a ``pong`` after it: the server
        has handled it (and fanned it out) once this returns. Always ask the
        actor first: another client's ``ping`` could overtake the request."""
        client.conn.send(**request)
        return client.conn.sync(self.ref("ack"))

    def left_everywhere(self, client: Client, reason: str) -> dict[Client, list[Event]]:
        """Remove ``client`` from the model; what the others are told."""
        expected: dict[Client, list[Event]] = {}
        for room in list(client.rooms):
            self.remove_member(client, room)
            for member in self.members.get(room, ()):
                expected.setdefault(member, []).append(
                    ev("left", room=room, name=client.name, reason=reason)
                )
        del self.connected[client]
        return expected

    # --- rules: connecting --------------------------------------------------

    def log_in(self, name: str) -> Client | None:
        conn = self.open()
        conn.send(type="hello", name=name, protocol=1)
        first = conn.receive()
        refusal = (
            "bad_name"
            if not is_valid_name(name)
            else "name_taken"
            if self.holder(name)
            else None
        )
        if refusal is not None:
            conn.close()
            assert canon(first) == canon(ev("error", code=refusal)), (
                f"hello {name!r}: {first}"
            )
            # Nobody else hears of a refused login.
            self.settle({})
            return None
        assert canon(first) == canon(
            ev("welcome", name=name, protocol=1, rooms=[LOBBY])
        ), first
        self.keys += 1
        client = Client(self.keys, conn, name)
        expected = {
            m: [ev("joined", room=LOBBY, name=name)] for m in self.members[LOBBY]
        }
        expected[client] = [ev("joined", room=LOBBY, name=name)]
        self.connected[client] = None
        self.add_member(client, LOBBY)
        self.settle(expected)
        return client

    @initialize(
        target=clients,
        first=st.lists(
            st.sampled_from(NAMES), min_size=1, max_size=3, unique_by=str.casefold
        ),
    )
    def crowd(self, first: list[str]) -> Any:
        # Start every example with a few users, so most steps have an audience.
        clients = [self.log_in(name) for name in first]
        return multiple(*(c for c in clients if c is not None))

    @precondition(lambda self: len(self.connected) < MAX_CLIENTS)
    @rule(target=clients, name=names)
    def connect(self, name: str) -> Any:
        client = self.log_in(name)
        return multiple() if client is None else client

    @rule(other=clients, case=cases)
    def connect_as_taken_name(self, other: Client, case: Callable[[str], str]) -> None:
        assert self.log_in(case(other.name)) is None

    # --- what a request does ------------------------------------------------
    # Each plan_* applies one request to the model and returns what every
    # client must receive because of it; ``got`` is what the actor received
    # (for the ids of acknowledgements, and which refusal came first).

    def refusal(
        self, client: Client, ref: str, got: list[Event], code: str, *also: str
    ) -> Expected:
        """Only ``client`` hears of the refusal: ``error`` with ``code``, or
        with one of ``also`` when several refusals apply (the protocol does
        not say which is reported)."""
        for event in got:
            if event.get("ref") == ref and event.get("code") in also:
                code = event["code"]
        return {client: [ev("error", code=code, ref=ref)]}

    def plan_join(
        self, client: Client, room: str, ref: str, got: list[Event]
    ) -> Expected:
        if not is_valid_room(room):
            return self.refusal(client, ref, got, "bad_name")
        joined = ev("joined", room=room, name=client.name)
        if room in client.rooms:
            # Already in: only the joiner hears it again.
            return {client: [{**joined, "ref": ref}]}
        if len(client.rooms) >= MAX_ROOMS:
            return self.refusal(client, ref, got, "too_many_rooms")
        self.add_member(client, room)
        expected = {m: [joined] for m in self.members[room]}
        expected[client] = [{**joined, "ref": ref}]
        return expected

    def plan_leave(
        self, client: Client, room: str, ref: str, got: list[Event]
    ) -> Expected:
        if room not in client.rooms:
            return self.refusal(client, ref, got, "not_in_room")
        self.remove_member(client, room)
        left = ev("left", room=room, name=client.name, reason="leave")
        expected = {m: [left] for m in self.members.get(room, ())}
        expected[client] = [{**left, "ref": ref}]
        return expected

    def plan_say(
        self, client: Client, room: str, text: str, ref: str, got: list[Event]
    ) -> Expected:
        too_long = ("too_large",) if len(text) > MAX_TEXT else ()
        if room not in client.rooms:
            return self.refusal(client, ref, got, "not_in_room", *too_long)
        if too_long:
            return self.refusal(client, ref, got, "too_large")
        message = ev(
            "message",
            id=self.ack_id(client, got, "message", ref),
            room=room,
            **{"from": client.name},
            text=text,
        )
        # The members at delivery time: each once, nobody else.
        expected = {m: [message] for m in self.members[room]}
        expected[client] = [{**message, "ref": ref}]
        return expected

    def plan_dm(
        self, client: Client, to: str, text: str, ref: str, got: list[Event]
    ) -> Expected:
        recipient = self.holder(to)
        too_long = ("too_large",) if len(text) > MAX_TEXT else ()
        if recipient is None:
            return self.refusal(client, ref, got, "no_such_user", *too_long)
        if too_long:
            return self.refusal(client, ref, got, "too_large")
        message = ev(
            "dm",
            id=self.ack_id(client, got, "dm", ref),
            **{"from": client.name},
            to=recipient.name,  # the recipient's own spelling
            text=text,
        )
        expected = {recipient: [message]}
        expected[client] = [{**message, "ref": ref}]  # a dm to oneself: once
        return expected

    def plan_nick(
        self, client: Client, new: str, ref: str, got: list[Event]
    ) -> Expected:
        if not is_valid_name(new):
            return self.refusal(client, ref, got, "bad_name")
        holder = self.holder(new)
        if holder is not None and holder is not client:
            return self.refusal(client, ref, got, "name_taken")
        renamed = ev("renamed", old=client.name, new=new)
        expected = {n: [renamed] for n in self.neighbours(client)}
        expected[client] = [{**renamed, "ref": ref}]
        client.name = new
        return expected

    # --- rules: one request ------------------------------------------------------

    @rule(client=clients, room=join_rooms)
    def join(self, client: Client, room: str) -> None:
        ref = self.ref("join")
        got = self.ask(client, type="join", room=room, ref=ref)
        self.settle(self.plan_join(client, room, ref, got), {client: got})

    @rule(client=clients, room=rooms)
    def leave(self, client: Client, room: str) -> None:
        ref = self.ref("leave")
        got = self.ask(client, type="leave", room=room, ref=ref)
        self.settle(self.plan_leave(client, room, ref, got), {client: got})

    @rule(client=clients, pick=st.integers(0, 7))
    def leave_own_room(self, client: Client, pick: int) -> None:
        own = list(client.rooms) or [LOBBY]
        self.leave(client, own[pick % len(own)])

    @rule(client=clients, room=rooms, text=texts)
    def say(self, client: Client, room: str, text: str) -> None:
        ref = self.ref("say")
        got = self.ask(client, type="say", room=room, text=text, ref=ref)
        self.settle(self.plan_say(client, room, text, ref, got), {client: got})

    @rule(client=clients, pick=st.integers(0, 7), text=texts)
    def say_in_own_room(self, client: Client, pick: int, text: str) -> None:
        # Most random rooms are not the client's: speak where it is, too.
        own = list(client.rooms) or [LOBBY]
        self.say(client, own[pick % len(own)], text)

    def send_dm(self, client: Client, to: str, text: str) -> None:
        ref = self.ref("dm")
        got = self.ask(client, type="dm", to=to, text=text, ref=ref)
        self.settle(self.plan_dm(client, to, text, ref, got), {client: got})

    @rule(client=clients, recipient=clients, case=cases, text=texts)
    def dm(
        self, client: Client, recipient: Client, case: Callable[[str], str], text: str
    ) -> None:
        self.send_dm(client, case(recipient.name), text)

    @rule(client=clients, to=names, text=texts)
    def dm_by_name(self, client: Client, to: str, text: str) -> None:
        self.send_dm(client, to, text)

    def rename(self, client: Client, new: str) -> None:
        ref = self.ref("nick")
        got = self.ask(client, type="nick", name=new, ref=ref)
        self.settle(self.plan_nick(client, new, ref, got), {client: got})

    @rule(client=clients, name=names)
    def nick(self, client: Client, name: str) -> None:
        self.rename(client, name)

    @rule(client=clients, other=clients, case=cases)
    def nick_to_taken_name(
        self, client: Client, other: Client, case: Callable[[str], str]
    ) -> None:
        # Refused unless other is client: then a case change of one's own name.
        self.rename(client, case(other.name))

    # --- rules: several requests at once -------------------------------------------

    @rule(client=clients, actions=st.lists(burst_actions, min_size=2, max_size=8))
    def burst(self, client: Client, actions: list[tuple[str, str, str]]) -> None:
        """Several requests (and the ``ping``) in one write: the server reads
        them in one batch. Everyone must see the outcome, in order."""
        requests = []
        for kind, target, text in actions:
            ref = self.ref(kind)
            if kind == "say":
                requests.append(
                    {"type": kind, "room": target, "text": text, "ref": ref}
                )
            elif kind == "dm":
                requests.append({"type": kind, "to": target, "text": text, "ref": ref})
            else:
                requests.append({"type": kind, "room": target, "ref": ref})
        lines = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
        got = client.conn.sync(self.ref("ack"), before=lines)
        expected: Expected = {}
        for r in requests:
            if r["type"] == "say":
                plan = self.plan_say(client, r["room"], r["text"], r["ref"], got)
            elif r["type"] == "dm":
                plan = self.plan_dm(client, r["to"], r["text"], r["ref"], got)
            elif r["type"] == "join":
                plan = self.plan_join(client, r["room"], r["ref"], got)
            else:
                plan = self.plan_leave(client, r["room"], r["ref"], got)
            for member, events in plan.items():
                expected.setdefault(member, []).extend(events)
        self.settle(expected, {client: got}, ordered=True)

    # --- rules: leaving --------------------------------------------------------

    @rule(
        client=consumes(clients),
        how=st.sampled_from(["bye", "close", "reset", "mid-line"]),
    )
    def disconnect(self, client: Client, how: str) -> None:
        if how == "bye":
            client.conn.send(type="bye")
            # The server closes the connection once the user is gone.
            leftover = client.conn.read_to_eof()
            client.conn.close()
            assert leftover == [], f"{client} after bye: {leftover}"
            return self.settle(self.left_everywhere(client, "bye"))
        # The connection ends without a goodbye: a FIN, an RST, or a FIN in
        # the middle of a line.
        if how == "mid-line":
            client.conn.send_bytes(b'{"type": "say", "text": "cut sh')
        if how == "reset":
            client.conn.reset()
        else:
            client.conn.close()
        expected = self.left_everywhere(client, "disconnect")
        # Nothing tells us when the server notices; logging in again under
        # the same name does (the name is freed with the rooms, at once). The
        # probe is a short visit to the lobby, which the others see.
        probe = self.wait_for_name(client.name)
        for member in self.members[LOBBY]:
            expected.setdefault(member, []).extend(
                [
                    ev("joined", room=LOBBY, name=client.name),
                    ev("left", room=LOBBY, name=client.name, reason="bye"),
                ]
            )
        probe.send(type="bye")
        leftover = probe.read_to_eof()
        probe.close()
        assert leftover == [], leftover
        self.settle(expected)

    def wait_for_name(self, name: str) -> Conn:
        """Log in as ``name`` as soon as it is free; returns the connection."""
        conn = self.open()
        deadline = time.monotonic() + TIMEOUT
        while True:
            conn.send(type="hello", name=name, protocol=1)
            answer = conn.receive()
            if answer.get("type") == "welcome":
                break
            assert canon(answer) == canon(ev("error", code="name_taken")), answer
            assert time.monotonic() < deadline, f"{name} was never freed"
            time.sleep(0.005)
        assert conn.sync("probe") == [ev("joined", room=LOBBY, name=name)]
        return conn

    # --- invariants --------------------------------------------------------------

    @invariant()
    def directory_has_no_ghosts(self) -> None:
        """``rooms`` and ``who`` list exactly the model's members."""
        if not self.connected:
            return
        observer = next(iter(self.connected))
        asked = sorted(set(ROOMS) | set(self.members))
        observer.conn.send(type="rooms", ref="rooms")
        for room in asked:
            observer.conn.send(type="who", room=room, ref=f"who {room}")
        got = observer.conn.sync(self.ref("sync"))
        assert len(got) == 1 + len(asked), got
        rooms_reply, *who_replies = got
        assert rooms_reply.get("type") == "rooms", rooms_reply
        listed = {r["name"]: r["members"] for r in rooms_reply["rooms"]}
        want = {room: len(m) for room, m in self.members.items()}
        assert listed == want, f"rooms: {listed}, expected {want}"
        for room, reply in zip(asked, who_replies, strict=True):
            assert reply.get("type") == "who" and reply.get("room") == room, reply
            names = reply["names"]
            members = [c.name for c in self.members.get(room, ())]
            assert sorted(names) == sorted(members), (
                f"who {room}: {names}, expected {members}"
            )
        # No two users in any room share a name, regardless of case.
        everyone = {n.casefold() for r in who_replies for n in r["names"]}
        in_rooms = {c for m in self.members.values() for c in m}
        assert len(everyone) == len(in_rooms), f"names clash: {who_replies}"

    def teardown(self) -> None:
        # Leave the server clean for the next example: bye, then wait for
        # the close, which comes once the server has forgotten the user.
        for client in self.connected:
            try:
                client.conn.send(type="bye")
                client.conn.read_to_eof()
            except Interrupted:
                pass  # the next example checks the server is clean anyway
            finally:
                client.conn.close()
        self.connected.clear()
        for conn in self.opened:
            conn.close()  # idempotent


def test_random_sessions_keep_the_invariants(chat_server: ServerProcess) -> None:
    run_state_machine_as_test(
        lambda: ChatMachine(chat_server),
        settings=settings(
            max_examples=60,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
