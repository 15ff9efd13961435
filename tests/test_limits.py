"""Timeouts, rate limiting, keepalive and TLS: the knobs of issue 4 that the
adversarial suite does not already exercise end to end."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

import chatkit
from tests.conftest import OpenRaw, login
from tests.helpers import next_event, wait_until

ROOT = Path(__file__).resolve().parent.parent


async def test_tls_round_trip(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    async with (
        chatkit.open_server(ssl_context=server_tls) as server,
        chatkit.open_client(
            "127.0.0.1", server.port, name="alice", ssl_context=client_tls
        ) as alice,
        chatkit.open_client(
            "127.0.0.1", server.port, name="bob", ssl_context=client_tls
        ) as bob,
    ):
        sent = await alice.say("over TLS")
        assert await next_event(bob, chatkit.Message) == chatkit.Message(
            id=sent.id, ts=sent.ts, room="lobby", sender="alice", text="over TLS"
        )
        assert [u.address.split(":")[0] for u in server.users] == ["127.0.0.1"] * 2


async def test_plain_client_cannot_talk_to_a_tls_server(
    server_tls: ssl.SSLContext, open_raw: OpenRaw
) -> None:
    async with chatkit.open_server(
        ssl_context=server_tls,
        limits=chatkit.Limits(handshake_timeout=1),
    ) as server:
        raw = await open_raw(server.port)
        await raw.send_json(type="hello", name="alice", protocol=1)
        await raw.assert_closed()  # the TLS layer rejects plain text
        assert server.users == ()


async def test_idle_timeout_closes_silent_connections_but_not_pinging_clients(
    open_raw: OpenRaw,
) -> None:
    async with chatkit.open_server(
        limits=chatkit.Limits(idle_timeout=0.3),
    ) as server:
        silent = await login(open_raw, server.port, "silent")
        async with chatkit.open_client(
            "127.0.0.1", server.port, name="chatty", keepalive=0.1
        ) as chatty:
            with trio.fail_after(3):
                event = await silent.expect("error", code="timeout")
            assert event["message"] == "nothing received for 0.3s"
            assert await silent.assert_closed() == []
            await trio.sleep(0.5)  # well past the idle timeout
            assert await chatty.who() == ("chatty",)


async def test_the_handshake_deadline_stops_at_hello(open_raw: OpenRaw) -> None:
    async with chatkit.open_server(
        limits=chatkit.Limits(handshake_timeout=0.3),
    ) as server:
        alice = await login(open_raw, server.port, "alice")
        await trio.sleep(0.6)
        await alice.send_json(type="ping", ref=1)
        assert await alice.receive_json() == {"type": "pong", "ref": 1}


async def test_rate_limit_refills(open_raw: OpenRaw) -> None:
    async with chatkit.open_server(
        limits=chatkit.Limits(rate_limit=20, rate_burst=5),
    ) as server:
        alice = await login(open_raw, server.port, "alice")  # hello: 1 token
        await alice.send_bytes(
            b"".join(b'{"type":"ping","ref":%d}\n' % i for i in range(5))
        )
        replies = [await alice.receive_json() for _ in range(5)]
        assert replies[:4] == [{"type": "pong", "ref": i} for i in range(4)]
        assert replies[4] == {
            "type": "error",
            "code": "rate_limited",
            "message": "slow down",
            "ref": 4,
        }
        await trio.sleep(0.1)  # two tokens come back
        await alice.send_json(type="ping", ref=5)
        assert await alice.receive_json() == {"type": "pong", "ref": 5}


async def test_tcp_keepalive_and_user_timeout_are_on_for_every_connection() -> None:
    # What the TCP transport makes of every accepted connection (the
    # handler owns the link, and closes it).
    seen: list[tuple[str, int, int, int]] = []

    async def handler(link: chatkit.server.Link) -> None:
        assert isinstance(link, chatkit.server.TcpLink)
        sock = link.sock
        assert sock is not None
        seen.append(
            (
                link.address,
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )
        )
        await link.abort()

    transport = chatkit.server.TcpTransport("127.0.0.1", 0, user_timeout=2.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, handler, nursery)
        client = await trio.open_tcp_stream("127.0.0.1", transport.port)
        await wait_until(lambda: bool(seen))
        nursery.cancel_scope.cancel()
    local = client.socket.getsockname()
    await client.aclose()
    assert seen == [(f"127.0.0.1:{local[1]}", 1, 60, 2500)]
    assert chatkit.Limits().tcp_user_timeout == 90.0
    with pytest.raises(ValueError, match="tcp_user_timeout must be positive"):
        chatkit.Limits(tcp_user_timeout=0)


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile, cafile = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem"))
    cert.private_key_pem.write_to_path(str(keyfile))
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    ca.cert_pem.write_to_path(str(cafile))
    yield certfile, keyfile, cafile


def test_cli_tls_round_trip(cert_files: tuple[Path, Path, Path]) -> None:
    certfile, keyfile, cafile = cert_files
    server = subprocess.Popen(
        [sys.executable, "-m", "chatkit.server", "--port", "0", "--no-interactive",
         "--certfile", str(certfile), "--keyfile", str(keyfile),
         "--db", str(certfile.with_name("history.sqlite3"))],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip().rsplit(":", 1)[1]
        client = subprocess.run(
            [sys.executable, "-m", "chatkit.client", "--port", port, "--name", "alice",
             "--cafile", str(cafile)],
            input="hello over tls\n", capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert client.returncode == 0, client.stdout
        assert "alice: hello over tls" in client.stdout.splitlines()
        wrong_ca = trustme.CA()
        wrong = cert_files[2].with_name("wrong.pem")
        wrong_ca.cert_pem.write_to_path(str(wrong))
        refused = subprocess.run(
            [sys.executable, "-m", "chatkit.client", "--port", port, "--name", "bob",
             "--cafile", str(wrong)],
            input="", capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert refused.returncode == 1
        assert "Error: cannot connect to 127.0.0.1:" in refused.stdout
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0
        assert server.stdout is not None
        server.stdout.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--keyfile", "k.pem"],
        ["--certfile", "/nonexistent.pem"],
        ["--password-file", "/nonexistent"],
        ["--auth-token", "x", "--password-file", "y"],
        ["--operator-token", "y"],
        ["--password-file", "y", "--operator-token", "z"],
        ["--auth-token", "x", "--operator-token", "x"],
        ["--auth-token", "x", "--operator-token", ""],
        ["--rate-burst", "0"],
        ["--tcp-user-timeout", "-1"],
    ],
)
def test_cli_rejects_bad_security_options(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatkit.server", "--port", "0", *args],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    assert "python -m chatkit.server: error:" in result.stderr
