"""A minimal trio chat server: the floor for chatkit's single-threaded model.

The baseline's line protocol (benchmarks/threaded_server.py: the first line
is the user name, each later line is a message to everyone else, joins and
leaves are announced, ``exit`` leaves) served from one trio thread, with
none of chatkit's features: no JSON, hooks, history, rooms, rate limits,
timeouts or batching. A message is fanned out as chatkit's room fast path
does it, with one C-level ``map`` of ``socket.send`` over the other clients'
sockets; what a socket does not take waits in that client's buffer for its
writer task, so that nothing is lost in the throughput mode either.

It is not in the default run (``--servers ...,trio-minimal``): it tells how
much of a gap to the thread-per-client baseline is chatkit's code and how
much is a single event-loop thread doing every fan-out.

Run: ``python benchmarks/trio_minimal_server.py --port 0``; it prints
``Server started on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
from functools import partial
from itertools import repeat

import trio
from loadgen import raise_file_limit

_SEND = socket.socket.send


class Client:
    """One connection: its standard-library socket and what it has not taken."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock: socket.socket = stream.socket._sock  # type: ignore[attr-defined]
        self.name: bytes | None = None
        self.out = bytearray()
        self.wake = trio.Event()


class Server:
    """Every registered client, in joining order, and the fan-out to them."""

    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.socks: list[socket.socket] = []  # the clients' sockets, same order
        self.busy: set[Client] = set()  # output pending: their writers send

    def join(self, client: Client) -> None:
        self.clients.append(client)
        self.socks.append(client.sock)

    def leave(self, client: Client) -> None:
        i = self.clients.index(client)
        del self.clients[i], self.socks[i]
        self.busy.discard(client)

    def broadcast(self, data: bytes, sender: Client | None = None) -> None:
        """Send ``data`` to every client but ``sender``, without awaiting."""
        clients, socks = self.clients, self.socks
        if self.busy:  # the slow path: behind pending output, in order
            for client in clients:
                if client is not sender:
                    self.send(client, data)
            return
        if sender is not None:
            i = clients.index(sender)
            clients = clients[:i] + clients[i + 1 :]
            socks = socks[:i] + socks[i + 1 :]
        sent: list[int | None] = []
        rest = iter(socks)
        while True:
            try:
                sent.extend(map(_SEND, rest, repeat(data)))
                break
            except OSError:  # its buffer is full (or it is gone)
                sent.append(None)
        if sent.count(len(data)) != len(sent):
            for client, count in zip(clients, sent, strict=True):
                if count != len(data):
                    self.pend(client, data[count or 0 :])

    def send(self, client: Client, data: bytes) -> None:
        """Send ``data`` to one client, after what it has pending."""
        if client in self.busy:
            self.pend(client, data)
            return
        try:
            count = _SEND(client.sock, data)
        except OSError:
            count = 0
        if count != len(data):
            self.pend(client, data[count:])

    def pend(self, client: Client, data: bytes) -> None:
        client.out += data
        self.busy.add(client)
        client.wake.set()

    async def write_loop(self, client: Client) -> None:
        """Send what ``client`` did not take at once, as it takes it."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await client.wake.wait()
                client.wake = trio.Event()
                while client.out:
                    data = bytes(client.out)
                    client.out.clear()
                    await client.stream.send_all(data)
                self.busy.discard(client)

    async def read_loop(self, client: Client) -> None:
        """Act on the client's lines until it leaves or goes."""
        buf = b""
        while True:
            try:
                data = await client.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            *lines, buf = (buf + data).split(b"\n")
            for raw in lines:
                line = raw.rstrip(b"\r")
                if client.name is None:
                    client.name = line
                    self.broadcast(line + b" has joined the chat.\n")
                    self.join(client)
                elif line == b"exit":
                    return
                else:
                    self.broadcast(client.name + b": " + line + b"\n", client)

    async def serve(self, stream: trio.SocketStream) -> None:
        """Serve one client until it leaves."""
        client = Client(stream)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.write_loop, client)
                await self.read_loop(client)
                nursery.cancel_scope.cancel()
        finally:
            if client.name is not None:  # it had joined
                self.leave(client)
                self.broadcast(client.name + b" has left the chat.\n")
            await trio.aclose_forcefully(stream)


async def main(host: str, port: int) -> None:
    """Serve until killed."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
    bound = listeners[0].socket.getsockname()[1]
    print(f"Server started on {host}:{bound}", flush=True)
    await trio.serve_listeners(Server().serve, listeners)  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    raise_file_limit()
    trio.run(partial(main, args.host, args.port))
