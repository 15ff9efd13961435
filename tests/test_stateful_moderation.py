"""Random sequences of moderation against a model (hypothesis stateful).

Four users: ``root`` (a server operator, and the observer: in every room),
``alice`` (who creates ``r2`` and so owns it), ``bob`` and ``carol``. Steps
are joins, messages, kicks, bans, mutes and op/deop by any of them on any
other, each checked against the model's expectation (done, or refused with
the right code), and after every step:

* no banned or kicked user is ever a member (the members ``who`` reports
  are exactly the model's);
* no muted member's message is ever delivered (root sees every message of
  both rooms, and nothing else arrives);
* roles never escalate: an action by someone without the role is always
  ``forbidden``, and a role is had only once granted.

The server runs in this process (a trio thread of its own), fresh for each
example; the clients are blocking sockets, as in tests/test_stateful.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

import chatkit
from tests.test_stateful import Conn, Event

USERS = ("root", "alice", "bob", "carol")
TARGETS = ("alice", "bob", "carol")
ROOMS = ("lobby", "r1", "r2")  # lobby: everyone, no owner

actors = st.sampled_from(USERS)
targets = st.sampled_from(TARGETS)
rooms = st.sampled_from(ROOMS)
scopes = st.sampled_from((*ROOMS, None))  # None: the whole server


class ThreadServer:
    """A ChatServer in a thread of its own (its own trio run)."""

    def __init__(self) -> None:
        self.port = 0
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._done: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,))
        self._thread.start()
        assert self._started.wait(10), "the server did not start"

    async def _main(self) -> None:
        limits = chatkit.Limits(rate_limit=None, rename_interval=None)
        async with chatkit.open_server(operators=["root"], limits=limits) as server:
            self.port = server.port
            self._done = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._done.wait()  # until stop(); then the server closes

    def status(self) -> str:
        return "running" if self._thread.is_alive() else "stopped"

    def stop(self) -> None:
        done, token = self._done, self._token
        if done is not None and token is not None:
            trio.from_thread.run_sync(done.set, trio_token=token)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the server did not stop"


class ModerationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.server = ThreadServer()
        self.conns: dict[str, Conn] = {}
        self.seq = 0
        # The model.
        self.online: set[str] = set()
        self.members: dict[str, set[str]] = {room: set() for room in ROOMS}
        self.owner: dict[str, str | None] = {"lobby": None, "r1": "root", "r2": "alice"}
        self.ops: dict[str, set[str]] = {room: set() for room in ROOMS}
        self.bans: set[tuple[str, str | None]] = set()  # (name, room or None)
        self.mutes: set[tuple[str, str | None]] = set()
        for name in USERS:
            self.log_in(name)
        self.join_ok("root", "r1")  # root creates r1
        self.join_ok("alice", "r2")  # alice creates r2
        self.join_ok("root", "r2")

    # --- plumbing -----------------------------------------------------------

    def ref(self) -> str:
        self.seq += 1
        return f"q{self.seq}"

    def log_in(self, name: str) -> list[Event]:
        conn = Conn(self.server)  # type: ignore[arg-type]
        conn.send(type="hello", name=name, protocol=1)
        first = conn.receive()
        if first["type"] == "error":  # refused: the server closes
            events = [first, *conn.read_to_eof()]
            conn.close()
            return events
        events = [first, *conn.sync(self.ref())]
        self.conns[name] = conn
        self.online.add(name)
        self.members["lobby"].add(name)
        self.drain()
        return events

    def ask(self, actor: str, **request: Any) -> list[Event]:
        """Send ``request`` from ``actor``; everything before its pong."""
        ref = self.ref()
        conn = self.conns[actor]
        conn.send(**request, ref=ref)
        return conn.sync(self.ref())

    def answer(self, events: list[Event]) -> Event:
        """The reply to the request (the event carrying a ref)."""
        replies = [e for e in events if "ref" in e]
        assert len(replies) == 1, events
        return replies[0]

    def drain(self) -> list[Event]:
        """What root (the observer) received since the last step."""
        return self.conns["root"].sync(self.ref()) if "root" in self.conns else []

    def join_ok(self, name: str, room: str) -> None:
        events = self.ask(name, type="join", room=room)
        assert self.answer(events)["type"] == "joined", events
        self.members[room].add(name)
        self.drain()

    def may(self, actor: str, room: str | None) -> bool:
        if actor == "root":
            return True
        return room is not None and (
            actor == self.owner[room] or actor in self.ops[room]
        )

    def gone(self, name: str) -> None:
        """``name`` was disconnected by the server."""
        conn = self.conns.pop(name)
        conn.read_to_eof()
        conn.close()
        self.online.discard(name)
        for members in self.members.values():
            members.discard(name)

    # --- rules ----------------------------------------------------------------

    @rule(name=targets, room=rooms)
    def join(self, name: str, room: str) -> None:
        if name not in self.online or name in self.members[room]:
            return
        reply = self.answer(self.ask(name, type="join", room=room))
        if (name, room) in self.bans or (name, None) in self.bans:
            assert reply["code"] == "banned", reply
        else:
            assert reply["type"] == "joined", reply
            self.members[room].add(name)
        self.drain()

    @rule(name=targets)
    def reconnect(self, name: str) -> None:
        if name in self.online:
            return
        events = self.log_in(name)
        if (name, None) in self.bans:
            assert events[-1]["code"] == "banned", events
            assert name not in self.online
        else:
            assert name in self.online, events

    @rule(name=targets, room=rooms)
    def say(self, name: str, room: str) -> None:
        if name not in self.online:
            return
        reply = self.answer(self.ask(name, type="say", room=room, text="hi"))
        if name not in self.members[room]:
            assert reply["code"] == "not_in_room", reply
        elif (name, room) in self.mutes or (name, None) in self.mutes:
            assert reply["code"] == "muted", reply
        else:
            assert reply["type"] == "message", reply
            seen = [e for e in self.drain() if e.get("type") == "message"]
            assert [(e["from"], e["room"]) for e in seen] == [(name, room)]

    @rule(actor=actors, name=targets, scope=scopes)
    def kick(self, actor: str, name: str, scope: str | None) -> None:
        if actor not in self.online or actor == name:
            return
        events = self.ask(actor, type="kick", name=name, **_room(scope))
        reply = self.answer(events)
        if not self.may(actor, scope):
            assert reply["code"] == "forbidden", reply
        elif name not in self.online or (scope and name not in self.members[scope]):
            assert reply["code"] == "no_such_user", reply
        else:
            assert (reply["type"], reply["action"]) == ("moderated", "kick"), reply
            if scope is None:
                self.gone(name)
            else:
                self.members[scope].discard(name)
        self.drain()

    @rule(actor=actors, name=targets, scope=scopes, lift=st.booleans())
    def ban(self, actor: str, name: str, scope: str | None, lift: bool) -> None:
        if actor not in self.online or actor == name:
            return
        kind = "unban" if lift else "ban"
        reply = self.answer(self.ask(actor, type=kind, name=name, **_room(scope)))
        if not self.may(actor, scope):
            assert reply["code"] == "forbidden", reply
        elif lift:
            if (name, scope) in self.bans:
                assert reply["action"] == "unban", reply
                self.bans.discard((name, scope))
            else:
                assert reply["code"] == "bad_request", reply
        else:
            assert reply["action"] == "ban", reply
            self.bans.add((name, scope))
            if scope is None and name in self.online:
                self.gone(name)
            elif scope is not None:
                self.members[scope].discard(name)
        self.drain()

    @rule(actor=actors, name=targets, scope=scopes, lift=st.booleans())
    def mute(self, actor: str, name: str, scope: str | None, lift: bool) -> None:
        if actor not in self.online:
            return
        kind = "unmute" if lift else "mute"
        reply = self.answer(self.ask(actor, type=kind, name=name, **_room(scope)))
        if not self.may(actor, scope):
            assert reply["code"] == "forbidden", reply
        elif lift:
            if (name, scope) in self.mutes:
                assert reply["action"] == "unmute", reply
                self.mutes.discard((name, scope))
            else:
                assert reply["code"] == "bad_request", reply
        else:
            assert reply["action"] == "mute", reply
            self.mutes.add((name, scope))
            self.drain()
            self.say(name, scope or "lobby")  # and it holds at once
        self.drain()

    @rule(actor=actors, name=targets, room=rooms, on=st.booleans())
    def op(self, actor: str, name: str, room: str, on: bool) -> None:
        if actor not in self.online:
            return
        kind = "op" if on else "deop"
        reply = self.answer(self.ask(actor, type=kind, room=room, name=name))
        if actor != "root" and actor != self.owner[room]:
            assert reply["code"] == "forbidden", reply
        else:
            assert reply["action"] == kind, reply
            if on:
                self.ops[room].add(name)
            else:
                self.ops[room].discard(name)
        self.drain()

    # --- invariants -------------------------------------------------------------

    @invariant()
    def members_are_the_models(self) -> None:
        for room in ROOMS:
            reply = self.answer(self.ask("root", type="who", room=room))
            assert set(reply["names"]) == self.members[room], (room, reply)
            banned = {n for n, r in self.bans if r in (room, None)}
            assert not banned & set(reply["names"])

    @invariant()
    def nothing_else_arrived(self) -> None:
        stray = [e for e in self.drain() if e.get("type") == "message"]
        assert stray == []

    def teardown(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.server.stop()


def _room(scope: str | None) -> dict[str, str]:
    return {} if scope is None else {"room": scope}


@pytest.fixture
def quiet_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level("WARNING", "chatkit")
    yield


def test_random_moderation_keeps_the_invariants(quiet_logs: None) -> None:
    run_state_machine_as_test(
        ModerationMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
