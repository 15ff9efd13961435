"""Issue 18, item 6: one address can hold every slot.

The attack: idle connections that never say hello, re-opened as the
handshake timeout reaps them, from one address (or from many, each within
the per-address limit), so that newcomers get ``error server_full``. The
defence: at most ``max_connections_per_address`` connections from one
address (``exempt_networks`` aside), and connections that have not logged
in make way for newcomers, so that only logged-in users can fill the
server. docs/security.md states the limits.

The attacks run against the CLI server with a bystander in its own process
(tests/attacks.py); the policy's details are tested in-process below them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import trio

import chatkit
from chatkit.server.__main__ import main
from tests.attacks import address, bystander, connect_from
from tests.conftest import OpenRaw, login
from tests.helpers import RawClient, wait_until
from tests.programs import Launch, start_server

#: The attacker's address (the bystander and the newcomers use others).
ATTACKER = "127.0.0.2"
#: The per-address limit's default (``Limits.max_connections_per_address``).
PER_ADDRESS = 16


async def closed_with(client: RawClient, within: float) -> str:
    """Wait until the server closes ``client``; the code of the first
    error it sent (``""`` if none)."""
    lines = await client.assert_closed(within)
    return str(json.loads(lines[0])["code"]) if lines else ""


async def idle_connection(
    port: int, source: str, codes: list[str], within: float = 10.0
) -> None:
    """Connect from ``source``, say nothing, and append to ``codes`` the
    error the server closes the connection with."""
    client = RawClient(await connect_from(port, source))
    try:
        codes.append(await closed_with(client, within))
    finally:
        await client.aclose()


async def newcomer(port: int, source: str, name: str) -> str:
    """Connect from ``source``, log in as ``name`` and say a line; what
    happened (``"chatted"``, or what went wrong)."""
    client = RawClient(await connect_from(port, source))
    try:
        with trio.fail_after(5):
            await client.send_json(type="hello", name=name, protocol=1)
            event = await client.receive_json()
            if event["type"] != "welcome":
                return f"{event['type']} {event.get('code')}"
            await client.send_json(type="say", room="lobby", text="hello", ref=1)
            await client.expect("message", ref=1, text="hello")
            return "chatted"
    except (EOFError, trio.BrokenResourceError) as exc:
        return f"closed: {exc}"
    finally:
        await client.aclose()


async def newcomers(port: int, sources: list[str]) -> dict[str, str]:
    """:func:`newcomer` from each of ``sources`` at once, by name."""
    results: dict[str, str] = {}

    async def one(index: int, source: str) -> None:
        name = f"newcomer{index}"
        results[name] = await newcomer(port, source, name)

    async with trio.open_nursery() as nursery:
        for index, source in enumerate(sources):
            nursery.start_soon(one, index, source)
    return results


# --- the attacks, against the CLI server ---------------------------------------


async def test_one_address_holds_at_most_its_limit_and_newcomers_get_in(
    launch: Launch,
) -> None:
    # The attack scaled down: 80 idle connections from one address
    # against 60 slots, opened again as the handshake timeout reaps them.
    _server, port = await start_server(
        launch,
        "--no-db",
        "--log-level",
        "error",
        "--max-connections",
        "60",
        "--handshake-timeout",
        "1",
    )
    waves: list[list[str]] = []  # the codes each wave's connections got
    async with bystander(port) as b:
        async with trio.open_nursery() as nursery:

            async def attacker() -> None:
                while len(waves) < 3:
                    codes: list[str] = []
                    waves.append(codes)
                    async with trio.open_nursery() as wave:
                        for _ in range(80):
                            wave.start_soon(idle_connection, port, ATTACKER, codes)

            nursery.start_soon(attacker)
            await trio.sleep(0.5)  # the first wave holds what it can
            sources = ["127.0.0.1"] * 5 + [address(i) for i in range(15)]
            results = await newcomers(port, sources)
        b.check()
    assert [result for result in results.values() if result != "chatted"] == []
    for codes in waves:
        assert len(codes) == 80
        # The handshake timeout closed the connections the server served;
        # the others were refused at once.
        assert codes.count("timeout") == PER_ADDRESS, codes
        assert codes.count("server_full") == 80 - PER_ADDRESS, codes


async def test_unauthenticated_connections_from_many_addresses_make_way(
    launch: Launch,
) -> None:
    # 40 addresses, each well within the limit, hold 80 connections that
    # never say hello against 60 slots, each opened again when closed.
    _server, port = await start_server(
        launch,
        "--no-db",
        "--log-level",
        "error",
        "--max-connections",
        "60",
        "--handshake-timeout",
        "5",
    )
    codes: list[str] = []
    async with bystander(port) as b:
        async with trio.open_nursery() as nursery:

            async def hold(source: str) -> None:
                while True:
                    await idle_connection(port, source, codes)
                    await trio.sleep(0.1)

            for index in range(80):
                nursery.start_soon(hold, address(index % 40))
            await trio.sleep(0.5)  # the attackers hold what they can
            sources = ["127.0.0.1"] * 5 + [address(100 + i) for i in range(10)]
            results = await newcomers(port, sources)
            await b.round_trips(6)  # under attack all along
            nursery.cancel_scope.cancel()
        b.check()
        print(f"bystander: worst {b.worst:.3f} s; attackers closed {len(codes)}")
    assert [result for result in results.values() if result != "chatted"] == []
    # The attackers were told why they were closed.
    assert set(codes) == {"server_full"}


async def test_an_exempt_network_is_not_limited(launch: Launch) -> None:
    # The flag replaces the default exemption (127.0.0.1 and ::1).
    _server, port = await start_server(
        launch,
        "--no-db",
        "--log-level",
        "error",
        "--max-connections-per-address",
        "4",
        "--exempt-network",
        f"{ATTACKER}/32",
    )
    async with bystander(port) as b:  # one of 127.0.0.1's four
        # A trusted proxy's (or NAT's) many clients at once.
        trusted = await newcomers(port, [ATTACKER] * 12)
        assert list(trusted.values()) == ["chatted"] * 12
        proxied = [RawClient(await connect_from(port, ATTACKER)) for _ in range(12)]
        probes: list[RawClient] = []
        try:
            for index, client in enumerate(proxied):
                await client.hello(f"proxied{index}")
            for source in [address(0)] * 6 + ["127.0.0.1"] * 5:
                probes.append(RawClient(await connect_from(port, source)))
            await trio.sleep(0.5)  # a refusal comes at once
            answers = [await answer(probe) for probe in probes]
        finally:
            for client in proxied + probes:
                await client.aclose()
        await b.round_trips(3)
        b.check()
    # address(0): 4 served; 127.0.0.1: the bystander and 3 more.
    served, full = "served", "server_full"
    assert answers == [served] * 4 + [full] * 2 + [served] * 3 + [full] * 2


async def test_exempt_network_none_limits_loopback_too(launch: Launch) -> None:
    _server, port = await start_server(
        launch,
        "--no-db",
        "--log-level",
        "error",
        "--max-connections-per-address",
        "2",
        "--exempt-network",
        "none",
    )
    clients = [RawClient(await connect_from(port, "127.0.0.1")) for _ in range(3)]
    try:
        event = await clients[2].expect("error", code="server_full")
        assert event["message"] == "too many connections from 127.0.0.1"
        for client in clients[:2]:
            await client.assert_silent()
    finally:
        for client in clients:
            await client.aclose()


async def answer(client: RawClient) -> str:
    """How the server answered a connection that said nothing: closed it
    with an error (its code), or ``"served"`` (still open, silent)."""
    with trio.move_on_after(0.1):
        return await closed_with(client, 5)
    return "served"


# --- the policy, in process ----------------------------------------------------


async def test_the_oldest_unauthenticated_connection_makes_way(
    open_raw: OpenRaw,
) -> None:
    limits = chatkit.Limits(max_unauthenticated=3)
    async with chatkit.open_server(limits=limits) as server:
        idle = [await open_raw(server.port) for _ in range(3)]
        await wait_until(lambda: server.connections == 3)
        for index in range(2):
            await open_raw(server.port)
            event = await idle[index].expect("error", code="server_full")
            assert "makes way" in event["message"]
            assert await idle[index].assert_closed() == []
        await idle[2].assert_silent()
        # Logged-in users are not counted against the bound.
        users = [await login(open_raw, server.port, f"user{i}") for i in range(3)]
        assert await idle[2].expect("error", code="server_full")
        await wait_until(lambda: server.connections == 5)
        late = await open_raw(server.port)
        await late.assert_silent()
        for user in users:
            await user.send_json(type="ping", ref=1)
            assert await user.expect("pong", ref=1)


async def test_a_full_server_makes_room_for_a_newcomer_unless_all_logged_in(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server(limits=chatkit.Limits(max_connections=3)) as server:
        alice = await login(open_raw, server.port, "alice")
        idle = [await open_raw(server.port) for _ in range(2)]
        await wait_until(lambda: server.connections == 3)
        bob = await login(open_raw, server.port, "bob")
        await idle[0].expect("error", code="server_full")
        carol = await login(open_raw, server.port, "carol")
        await idle[1].expect("error", code="server_full")
        await wait_until(lambda: server.connections == 3)
        refused = await open_raw(server.port)
        event = await refused.expect("error", code="server_full")
        assert event["message"] == "the server is full"
        assert await refused.assert_closed() == []
        assert [user.name for user in server.users] == ["alice", "bob", "carol"]
        for client in (alice, bob, carol):
            await client.send_json(type="ping", ref=2)
            await client.expect("pong", ref=2)


async def test_the_per_address_limit_counts_every_connection_until_gone(
    open_raw: OpenRaw,
) -> None:
    limits = chatkit.Limits(max_connections_per_address=2, exempt_networks=())
    async with chatkit.open_server(limits=limits) as server:
        alice = await login(open_raw, server.port, "alice")
        idle = await open_raw(server.port)
        refused = await open_raw(server.port)
        event = await refused.expect("error", code="server_full")
        assert event["message"] == "too many connections from 127.0.0.1"
        assert await refused.assert_closed() == []
        await idle.aclose()
        await wait_until(lambda: server.connections == 1)
        bob = await login(open_raw, server.port, "bob")
        await alice.send_json(type="bye")
        await alice.assert_closed()
        await wait_until(lambda: server.connections == 1)
        carol = await login(open_raw, server.port, "carol")
        assert [user.name for user in server.users] == ["bob", "carol"]
        for client in (bob, carol):
            await client.send_json(type="ping", ref=1)
            await client.expect("pong", ref=1)


async def test_ipv6_peers_are_counted_per_64() -> None:
    # Only ::1 is at hand: this shows the count and its key, not that two
    # addresses of one /64 share it.
    limits = chatkit.Limits(max_connections_per_address=2, exempt_networks=())
    async with chatkit.open_server("::1", limits=limits) as server:
        clients = [await RawClient.open(server.port, "::1") for _ in range(3)]
        try:
            event = await clients[2].expect("error", code="server_full")
            assert event["message"] == "too many connections from ::/64"
            await clients[0].hello("alice")
        finally:
            for client in clients:
                await client.aclose()
    # ::1 is exempt by default.
    async with chatkit.open_server("::1") as server:
        clients = [await RawClient.open(server.port, "::1") for _ in range(20)]
        try:
            for index, client in enumerate(clients):
                await client.hello(f"user{index}")
        finally:
            for client in clients:
                await client.aclose()


async def test_no_per_address_limit() -> None:
    limits = chatkit.Limits(max_connections_per_address=None, exempt_networks=())
    async with chatkit.open_server(limits=limits) as server:
        clients = [await RawClient.open(server.port) for _ in range(20)]
        try:
            for index, client in enumerate(clients):
                await client.hello(f"user{index}")
        finally:
            for client in clients:
                await client.aclose()


# --- configuration -----------------------------------------------------------------


def test_limits_defaults_and_normal_form() -> None:
    limits = chatkit.Limits()
    assert limits.max_connections_per_address == 16
    assert limits.max_unauthenticated == 1000
    assert limits.exempt_networks == ("127.0.0.1/32", "::1/128")
    changed = limits.replace(
        exempt_networks=["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
    )
    assert changed.exempt_networks == ("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32")
    assert hash(changed) == hash(
        limits.replace(exempt_networks=changed.exempt_networks)
    )
    assert chatkit.Limits(exempt_networks=()).exempt_networks == ()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_connections_per_address": 0}, "must be at least 1, not 0"),
        ({"max_connections_per_address": 2.5}, "must be an integer"),
        ({"max_unauthenticated": 0}, "max_unauthenticated must be at least 1"),
        ({"max_unauthenticated": None}, "max_unauthenticated must be a number"),
        ({"exempt_networks": "10.0.0.0/8"}, "must be a list of networks"),
        ({"exempt_networks": None}, "must be a list of networks"),
        (
            {"exempt_networks": ["10.0.0.1/8"]},
            "exempt_networks: '10.0.0.1/8' has host bits set (the network is "
            "10.0.0.0/8)",
        ),
        ({"exempt_networks": ["10.0.0.0/33"]}, "'10.0.0.0/33' is not a network"),
        ({"exempt_networks": ["localhost"]}, "'localhost' is not a network"),
        ({"exempt_networks": [167772160]}, "167772160 is not a network"),
    ],
)
def test_limits_refuse_bad_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        chatkit.Limits(**changes)


async def test_a_bad_exempt_network_is_a_usage_error(launch: Launch) -> None:
    server = await launch(
        "server", "--port", "0", "--no-db", "--exempt-network", "10.0.0.1/8"
    )
    assert await server.wait() == 2
    assert (
        "error: argument --exempt-network: '10.0.0.1/8' has host bits set "
        "(the network is 10.0.0.0/8)"
    ) in "\n".join(await server.rest())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--exempt-network", "nope"],
            "argument --exempt-network: 'nope' is not a network",
        ),
        (
            ["--exempt-network", "::1/129"],
            "argument --exempt-network: '::1/129' is not a network",
        ),
        (
            ["--max-connections-per-address", "-1"],
            "argument --max-connections-per-address: must be at least 0, not -1",
        ),
        (["--max-unauthenticated", "0"], "max_unauthenticated must be at least 1"),
    ],
)
def test_bad_flags_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--port", "0", "--no-db", *argv])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m chatkit.server: error: ")
    assert message in last
