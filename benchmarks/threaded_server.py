"""The thread-per-client baseline: a chat server written like the original
program (shared/original: ``chat_server.py``), so that chatkit is measured
against what it replaces.

Blocking sockets, one thread per client, a global client list, and a
broadcast that ``sendall``\\ s to every other client in turn under one lock.
The only changes from the original are the ones a benchmark needs to be
correct: lines are framed (a read may hold several lines, or part of one),
the port is chosen by the command line, and the file limit is raised.

Line protocol as in the original: the first line is the user name, each
later line is a message (``name: text`` to everyone else), ``exit`` leaves;
joins and leaves are announced to everyone else.

Run: ``python benchmarks/threaded_server.py --port 0``; it prints
``Server started on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import socket
import threading

from loadgen import raise_file_limit

# Global state, as in the original program (chatkit itself never does this).
clients: list[socket.socket] = []
clients_lock = threading.Lock()


def broadcast(message: bytes, client_socket: socket.socket | None = None) -> None:
    """Send ``message`` to every client but ``client_socket``."""
    with clients_lock:
        for client in clients:
            if client is not client_socket:
                try:
                    client.sendall(message)
                except OSError:
                    # The original closes and forgets a client it cannot
                    # write to; its own thread notices on its next read.
                    client.close()


def handle_client(client_socket: socket.socket, reader: object, username: str) -> None:
    """Serve one client until it leaves: each line is a message."""
    assert hasattr(reader, "readline")
    try:
        while True:
            try:
                line = reader.readline()
            except OSError:
                break
            if not line:
                break
            text = line.rstrip(b"\r\n")
            if text == b"exit":
                break
            broadcast(username.encode() + b": " + text + b"\n", client_socket)
    finally:
        with clients_lock:
            if client_socket in clients:
                clients.remove(client_socket)
        broadcast(f"{username} has left the chat.\n".encode())
        client_socket.close()


def start_server(host: str, port: int, nodelay: bool = False) -> None:
    """Accept clients forever, one thread each (like the original)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(4096)
    print(f"Server started on {host}:{server.getsockname()[1]}", flush=True)
    while True:
        client_socket, _addr = server.accept()
        if nodelay:  # not in the original: for a comparison only
            client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = client_socket.makefile("rb")
        # The original reads the user name in the accept loop, too.
        username = reader.readline().rstrip(b"\r\n").decode(errors="replace")
        if not username:
            client_socket.close()
            continue
        with clients_lock:
            clients.append(client_socket)
        thread = threading.Thread(
            target=handle_client, args=(client_socket, reader, username), daemon=True
        )
        thread.start()
        broadcast(f"{username} has joined the chat.\n".encode(), client_socket)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--nodelay",
        action="store_true",
        help="set TCP_NODELAY on client sockets (the original does not)",
    )
    args = parser.parse_args()
    raise_file_limit()
    start_server(args.host, args.port, args.nodelay)


if __name__ == "__main__":
    main()
