from __future__ import annotations

import chatkit
from tests.conftest import OpenRaw


async def test_json_and_line_clients_share_the_lobby(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    alice = await open_raw(server.port)
    await alice.hello("alice")
    bob = await open_raw(server.port)
    await bob.send_line("bob")
    await alice.expect("joined", room="lobby", name="bob")
    await bob.send_line("hi from nc")
    await alice.expect("message", text="hi from nc", **{"from": "bob"})
    await alice.send_json(type="say", text="hi bob")
    assert await bob.receive_line() == "alice: hi bob"
