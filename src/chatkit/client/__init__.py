"""The chat client: :class:`ChatClient`, its reconnect policy and events.

``python -m chatkit.client`` runs the command-line client
(:mod:`chatkit.client.__main__`). Everything here is also importable from
:mod:`chatkit` itself.
"""

from ._client import DEFAULT_PORT as DEFAULT_PORT
from ._client import ChatClient as ChatClient
from ._client import open_client as open_client
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
    "open_client",
]
