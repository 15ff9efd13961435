"""The chat server: :class:`ChatServer` and what it is made of.

``python -m chatkit.server`` runs it from the command line (see
``chatkit/server/__main__.py``). The parts, each in a module of its own and
importing only the ones listed after it:

* ``_run``: :func:`open_server` (a server for an ``async with`` block),
  and serving until a signal;
* ``_server``: :class:`ChatServer`, the facade (lifecycle, public API) and
  ``ServerSpec``, the hooks it calls;
* ``_rules``: what each request does, and what leaving does;
* ``_session``: one connection's reading (handshake, timeouts, rate limit);
* ``_fanout``: every output, in batches, stored before seen;
* ``_batch``: what a batch holds, and its hand-over to the outboxes;
* ``_rooms``: who is in which room;
* ``_outbox``: one connection's bounded buffer and its writes;
* ``_web``: browsers: HTTP and WebSocket on the web port;
* ``_transport``: how connections arrive (TCP, TLS);
* ``_limits``: :class:`Limits`.
"""

from ._limits import Limits as Limits
from ._outbox import Stats as Stats
from ._run import open_server as open_server
from ._run import serve_until_stopped as serve_until_stopped
from ._server import ChatServer as ChatServer
from ._server import ServerSpec as ServerSpec
from ._session import SERVER_SENDER as SERVER_SENDER
from ._session import LeaveReason as LeaveReason
from ._session import Login as Login
from ._session import RemoteUser as RemoteUser
from ._session import User as User
from ._transport import Link as Link
from ._transport import TcpLink as TcpLink
from ._transport import TcpTransport as TcpTransport
from ._transport import TlsLink as TlsLink
from ._transport import Transport as Transport
from ._web import WebSocketLink as WebSocketLink
from ._web import WebTransport as WebTransport

__all__ = [
    "SERVER_SENDER",
    "ChatServer",
    "LeaveReason",
    "Limits",
    "Link",
    "Login",
    "RemoteUser",
    "ServerSpec",
    "Stats",
    "TcpLink",
    "TcpTransport",
    "TlsLink",
    "Transport",
    "User",
    "WebSocketLink",
    "WebTransport",
    "open_server",
    "serve_until_stopped",
]
