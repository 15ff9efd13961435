"""The chat client: :class:`ChatClient`, its reconnect policy and events.

``python -m chatkit.client`` runs the command-line client
(:mod:`chatkit.client.__main__`). Everything here is also importable from
:mod:`chatkit` itself.
"""

from ._client import DEFAULT_PORT as DEFAULT_PORT
from ._client import ChatClient as ChatClient
from ._client import open_client as open_client
from ._connection import describe_error as describe_error
from ._connection import open_stream as open_stream
from ._reconnect import ClientEvent as ClientEvent
from ._reconnect import Interrupted as Interrupted
from ._reconnect import Reconnect as Reconnect
from ._reconnect import Reconnected as Reconnected
from ._reconnect import Reconnecting as Reconnecting

__all__ = [
    "DEFAULT_PORT",
    "ChatClient",
    "ClientEvent",
    "Interrupted",
    "Reconnect",
    "Reconnected",
    "Reconnecting",
    "describe_error",
    "open_client",
    "open_stream",
]
