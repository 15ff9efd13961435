"""Accepting connections: out of file descriptors, the server waits and
accepts again once some close (it neither dies nor spins)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import trio

from tests.helpers import TIMEOUT, RawClient
from tests.programs import Program


def _few_files() -> None:  # runs in the child, before exec
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))


async def test_out_of_file_descriptors_the_server_waits_and_accepts_again(
    tmp_path: os.PathLike[str],
) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "chatkit.server", "--port", "0", "--no-db"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        preexec_fn=_few_files,
    )
    server = Program(process)
    try:
        match = await server.expect(r"^Server started on 127\.0\.0\.1:(\d+)$")
        port = int(match.group(1))
        # More connections than the server has descriptors for: the kernel
        # queues the rest, which the server cannot accept yet.
        clients = [await RawClient.open(port) for _ in range(60)]
        served: list[RawClient] = []
        waiting: list[RawClient] = []
        for n, client in enumerate(clients):
            await client.send_json(type="hello", name=f"user{n}", protocol=1)
        await trio.sleep(1.0)  # the server's turn
        for client in clients:
            try:
                reply = await client.receive_json(within=0.05)
            except trio.TooSlowError:
                waiting.append(client)
            else:
                assert reply["type"] == "welcome", reply
                served.append(client)
        assert served and waiting, (len(served), len(waiting))
        await server.expect(r"accept failed: EMFILE")
        # Descriptors come back: every one that waited is served.
        for client in served:
            await client.aclose()
        with trio.fail_after(TIMEOUT):
            for client in waiting:
                reply = await client.receive_json()
                assert reply["type"] == "welcome", reply
        assert process.returncode is None
        for client in waiting:
            await client.aclose()
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                await stream.aclose()
