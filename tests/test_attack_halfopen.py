"""Attack (issue 18, item 4): half-open connections, and taking a stale
session over.

A peer that vanishes without a FIN (a laptop lid closed, a phone out of
coverage) while the server has data in flight to it is never probed by
keepalive, which only runs on an idle connection: without
``TCP_USER_TIMEOUT`` the kernel retransmits for about 15 minutes, and the
user's name stays taken all that time while its client, reconnecting, is
refused with ``name_taken``. The tests make a peer vanish with an
``iptables`` rule on loopback that drops every packet to and from its port
(added and removed by the test itself; it needs iptables and root, and fails
loudly without them), and check that the server reaps it within the user
timeout, and that the same user (its ``resume`` secret, or its password)
takes its session over at once while anyone else still gets ``name_taken``.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import trio

import chatkit
from chatkit.auth import add_user
from chatkit.testing import HookRecorder
from tests.attacks import address, bystander, connect_from
from tests.helpers import RawClient, wait_until
from tests.programs import Launch, start_server

#: The server's ``--tcp-user-timeout`` in the reaping test (seconds).
USER_TIMEOUT: Final = 2.0
#: What the reaping may take beyond the user timeout: the kernel's last
#: retransmission timer, and the server's own turn (seconds).
REAP_SLACK: Final = 1.5


# --- making a peer vanish ------------------------------------------------------


async def _iptables(*args: str) -> None:
    """Run iptables; fail the test (never skip it) if it cannot."""
    program = shutil.which("iptables")
    if program is None:
        pytest.fail(
            "iptables is not installed: the half-open tests need it (as root) "
            "to make a peer vanish without a FIN",
            pytrace=False,
        )
    with trio.fail_after(10):
        result = await trio.run_process(
            [program, "-w", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if result.returncode != 0:
        pytest.fail(
            f"iptables {' '.join(args)} failed ({result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()} -- the half-open "
            "tests need root (CAP_NET_ADMIN) to make a peer vanish",
            pytrace=False,
        )


@asynccontextmanager
async def vanished(host: str, port: int) -> AsyncIterator[None]:
    """For the block, every packet to and from ``host:port`` (a client's end
    of a connection on loopback) is dropped: the peer is gone without a FIN
    or a reset, as a machine that lost its network."""
    rules = [
        ["INPUT", "-i", "lo", "-p", "tcp", "-d", host, "--dport", str(port)],
        ["INPUT", "-i", "lo", "-p", "tcp", "-s", host, "--sport", str(port)],
    ]
    added: list[list[str]] = []
    try:
        for rule in rules:
            await _iptables("-I", *rule, "-j", "DROP")
            added.append(rule)
        yield
    finally:
        with trio.CancelScope(shield=True):
            for rule in added:
                await _iptables("-D", *rule, "-j", "DROP")


async def raw_from(port: int, index: int) -> RawClient:
    """A raw JSON-lines connection from attacker address ``index``."""
    return RawClient(await connect_from(port, address(index)))


def local_end(client: RawClient) -> tuple[str, int]:
    """The client's own address and port."""
    host, port = client.stream.socket.getsockname()[:2]
    return host, port


async def refused_name(client: RawClient, name: str, **fields: Any) -> None:
    """``hello`` as ``name`` (with ``fields``) gets ``name_taken``."""
    await client.send_json(type="hello", name=name, protocol=1, **fields)
    error = await client.expect("error")
    assert error["code"] == "name_taken", error


# --- (a) reaping ------------------------------------------------------------------


async def test_a_vanished_peer_with_data_in_flight_is_reaped_within_the_user_timeout(
    launch: Launch,
) -> None:
    """A peer vanishes while the bystander's lines keep going out to it: the
    server drops it within ``--tcp-user-timeout`` (others see it leave with
    reason ``disconnect``; its name is free again), not after the ~15
    minutes of TCP retransmissions, and the bystander never notices."""
    _, port = await start_server(
        launch, "--no-db", "--tcp-user-timeout", str(USER_TIMEOUT)
    )
    watcher = await raw_from(port, 1)
    victim = await raw_from(port, 0)
    again = await raw_from(port, 2)
    try:
        await watcher.hello("watcher")
        await victim.hello("victim")
        await watcher.expect("joined", name="victim")
        async with bystander(port) as by:
            await by.round_trips(2)
            async with vanished(*local_end(victim)):
                vanished_at = trio.current_time()
                # The bystander's lines, every 0.2 s, go to the victim too:
                # data in flight that nobody acknowledges.
                left = await watcher.expect(
                    "left", within=USER_TIMEOUT + REAP_SLACK + 5, name="victim"
                )
                took = trio.current_time() - vanished_at
            assert left["reason"] == "disconnect", left
            assert took < USER_TIMEOUT + REAP_SLACK, (
                f"reaped after {took:.2f} s (user timeout {USER_TIMEOUT} s)"
            )
            await again.hello("victim")  # the name is free
            await by.round_trips(3)
        by.check()
    finally:
        for client in (watcher, victim, again):
            await client.aclose()


# --- (b) taking a session over ---------------------------------------------------


async def test_the_resume_secret_takes_over_a_half_open_session_and_nothing_else_does(
    launch: Launch,
) -> None:
    """alice vanishes with data in flight (the server, at its default user
    timeout, still holds her): her reconnect with her welcome's ``resume``
    secret gets her name at once, the others see her leave (``replaced``)
    and come back; a stranger without the secret, with a wrong one, or with
    her old one after the takeover, gets ``name_taken``."""
    _, port = await start_server(launch, "--no-db")
    clients = [await raw_from(port, index) for index in range(6)]
    watcher, old, stranger, guesser, new, late = clients
    try:
        await watcher.hello("watcher")
        secret = (await old.hello("alice"))["resume"]
        assert isinstance(secret, str) and len(secret) >= 20, secret
        await watcher.expect("joined", name="alice")
        async with bystander(port) as by, vanished(*local_end(old)):
            await by.round_trips(2)  # her share of them is in flight to her
            await refused_name(stranger, "alice")
            await refused_name(guesser, "alice", resume="not-her-secret")
            welcome = await new.hello("alice", resume=secret)
            assert welcome["resume"] != secret  # a new session, a new secret
            left = await watcher.expect("left", name="alice")
            assert left == {
                "type": "left",
                "room": "lobby",
                "name": "alice",
                "reason": "replaced",
            }
            await watcher.expect("joined", name="alice")
            await refused_name(late, "alice", resume=secret)  # used up
            await new.send_json(type="say", text="back", ref=1)
            await new.expect("message", ref=1, text="back")
            await by.round_trips(3)
        by.check()
    finally:
        for client in clients:
            await client.aclose()


async def test_the_right_password_takes_over_and_a_wrong_one_does_not(
    launch: Launch, tmp_path: Path
) -> None:
    """With a password file the password is the identity: a second login
    with alice's password (no secret needed) takes her session over, and the
    old connection is told ``replaced`` and closed; a wrong password is
    ``unauthorized``, and alice keeps her session."""
    passwords = tmp_path / "passwd"
    add_user(passwords, "alice", "right horse", n=2)
    add_user(passwords, "watcher", "watching", n=2)
    _, port = await start_server(launch, "--no-db", "--password-file", str(passwords))
    clients = [await raw_from(port, index) for index in range(4)]
    watcher, old, wrong, new = clients
    try:
        await watcher.hello("watcher", token="watching")
        await old.hello("alice", token="right horse")
        await watcher.expect("joined", name="alice")
        await wrong.send_json(type="hello", name="alice", protocol=1, token="wrong")
        assert (await wrong.expect("error"))["code"] == "unauthorized"
        await wrong.assert_closed()
        await old.send_json(type="ping", ref="still")
        await old.expect("pong", ref="still")  # untouched
        await new.hello("alice", token="right horse")
        lines = await old.assert_closed()
        assert any('"replaced"' in line for line in lines), lines
        left = await watcher.expect("left", name="alice")
        assert left["reason"] == "replaced", left
        await watcher.expect("joined", name="alice")
    finally:
        for client in clients:
            await client.aclose()


async def test_a_shared_token_alone_takes_no_session_over(launch: Launch) -> None:
    """A shared token says who may connect, not who one is: a second login
    as alice with the token gets ``name_taken``; with the token and alice's
    ``resume`` secret it takes her session over."""
    _, port = await start_server(launch, "--no-db", "--auth-token", "shared")
    clients = [await raw_from(port, index) for index in range(3)]
    old, stranger, new = clients
    try:
        secret = (await old.hello("alice", token="shared"))["resume"]
        await refused_name(stranger, "alice", token="shared")
        await new.hello("alice", token="shared", resume=secret)
        assert any('"replaced"' in line for line in await old.assert_closed())
    finally:
        for client in clients:
            await client.aclose()


async def test_plugins_hear_the_old_session_end_before_the_new_one_begins() -> None:
    """A takeover is, to plugins, the old session leaving (reason
    ``replaced``, once) and then the new one arriving, in that order."""
    hooks = HookRecorder()
    async with chatkit.open_server(plugins=[hooks.server]) as server:
        old, new = await RawClient.open(server.port), await RawClient.open(server.port)
        try:
            secret = (await old.hello("alice"))["resume"]
            await hooks.wait("chatkit_user_connected")
            await new.hello("alice", resume=secret)
            await hooks.wait("chatkit_user_connected", 2)
            await old.assert_closed()
            await wait_until(lambda: server.connections == 1)
            calls = list(hooks.calls)
            second_login = len(calls) - 1 - calls[::-1].index("chatkit_user_connected")
            assert calls.index("chatkit_user_disconnected") < second_login, calls
            assert hooks.count("chatkit_user_disconnected") == 1, calls
            assert [user.name for user in server.users] == ["alice"]
        finally:
            await old.aclose()
            await new.aclose()


# --- (c) the bundled client -----------------------------------------------------


async def test_chat_client_gets_its_name_back_after_its_connection_vanished(
    launch: Launch,
) -> None:
    """carol's connection vanishes while dave talks to her room: her
    ``ChatClient`` notices (no pong), reconnects, takes her old session over
    (the server still holds it) instead of being refused ``name_taken``,
    and delivers what dave said meanwhile, once each, before
    ``Reconnected``."""
    server, port = await start_server(launch, "--no-db")
    policy = chatkit.Reconnect(
        initial_delay=0.1, max_delay=0.5, ping_timeout=0.5, max_name_taken=3
    )
    dave = await raw_from(port, 1)
    try:
        async with chatkit.open_client(
            "127.0.0.1", port, name="carol", keepalive=0.2, reconnect=policy
        ) as carol:
            # Only carol connects from 127.0.0.1 (dave from 127.1.0.2).
            match = await server.expect(
                r"New connection from \('127\.0\.0\.1', (\d+)\)"
            )
            carol_end = "127.0.0.1", int(match.group(1))
            await carol.join("side")
            await dave.hello("dave")
            await dave.send_json(type="join", room="side")
            await dave.expect("joined", room="side", name="dave")
            seen: list[chatkit.ClientItem] = []
            async with vanished(*carol_end):
                for number in range(3):
                    await dave.send_json(type="say", room="side", text=f"m{number}")
                    await dave.expect("message", room="side", text=f"m{number}")
                with trio.fail_after(10):
                    async for event in carol:
                        seen.append(event)
                        if isinstance(event, chatkit.Reconnected):
                            break
            refusals = [
                event
                for event in seen
                if isinstance(event, chatkit.Reconnecting) and event.error
            ]
            assert not refusals, refusals
            said = [
                event.text
                for event in seen
                if isinstance(event, chatkit.Message) and event.room == "side"
            ]
            assert said == ["m0", "m1", "m2"], seen
            assert carol.name == "carol"
            assert carol.joined_rooms == {"lobby", "side"}
            left = await dave.expect("left", room="side", name="carol")
            assert left["reason"] == "replaced", left
            await dave.expect("joined", room="side", name="carol")
            await carol.say("back", room="side")
            await dave.expect("message", room="side", text="back")
    finally:
        await dave.aclose()
