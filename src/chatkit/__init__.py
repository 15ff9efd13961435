"""chatkit: an embeddable, trio-based chat server and client with pluggy hooks.

The public API lives here; submodules starting with ``_`` are private.
:mod:`chatkit.hookspecs` documents the plugin hooks, :mod:`chatkit.protocol`
is the sans-IO wire protocol (requests, framing, encoders) and
:mod:`chatkit.testing` has fixtures for plugin authors' tests.
"""

from ._events import LOBBY as LOBBY
from ._events import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._events import BanInfo as BanInfo
from ._events import BansReply as BansReply
from ._events import CommandReply as CommandReply
from ._events import DirectMessage as DirectMessage
from ._events import ErrorReply as ErrorReply
from ._events import Event as Event
from ._events import HistoryReply as HistoryReply
from ._events import Joined as Joined
from ._events import Left as Left
from ._events import Message as Message
from ._events import Moderated as Moderated
from ._events import ModesReply as ModesReply
from ._events import Pong as Pong
from ._events import Renamed as Renamed
from ._events import RoomInfo as RoomInfo
from ._events import RoomsReply as RoomsReply
from ._events import Shutdown as Shutdown
from ._events import TopicReply as TopicReply
from ._events import Welcome as Welcome
from ._events import WhoReply as WhoReply
from ._exceptions import BadName as BadName
from ._exceptions import BadRequest as BadRequest
from ._exceptions import Banned as Banned
from ._exceptions import ChatkitError as ChatkitError
from ._exceptions import ConnectionClosed as ConnectionClosed
from ._exceptions import ErrorCode as ErrorCode
from ._exceptions import Forbidden as Forbidden
from ._exceptions import Kicked as Kicked
from ._exceptions import Muted as Muted
from ._exceptions import NameTaken as NameTaken
from ._exceptions import NoSuchUser as NoSuchUser
from ._exceptions import NotInRoom as NotInRoom
from ._exceptions import NotReady as NotReady
from ._exceptions import RateLimited as RateLimited
from ._exceptions import Rejected as Rejected
from ._exceptions import Replaced as Replaced
from ._exceptions import RequestError as RequestError
from ._exceptions import RoomFull as RoomFull
from ._exceptions import ServerFull as ServerFull
from ._exceptions import StartupError as StartupError
from ._exceptions import TimedOut as TimedOut
from ._exceptions import TooLarge as TooLarge
from ._exceptions import TooManyRooms as TooManyRooms
from ._exceptions import TooSlow as TooSlow
from ._exceptions import Unauthorized as Unauthorized
from ._exceptions import Unavailable as Unavailable
from ._exceptions import Veto as Veto
from ._hooks import hookimpl as hookimpl
from .client import DEFAULT_PORT as DEFAULT_PORT
from .client import ChatClient as ChatClient
from .client import ClientEvent as ClientEvent
from .client import Interrupted as Interrupted
from .client import Reconnect as Reconnect
from .client import Reconnected as Reconnected
from .client import Reconnecting as Reconnecting
from .client import open_client as open_client
from .client import open_stream as open_stream
from .history import HistoryStore as HistoryStore
from .history import HistoryStoreError as HistoryStoreError
from .history import MemoryHistory as MemoryHistory
from .server import SERVER_SENDER as SERVER_SENDER
from .server import ChatServer as ChatServer
from .server import LeaveReason as LeaveReason
from .server import Limits as Limits
from .server import Login as Login
from .server import RemoteUser as RemoteUser
from .server import User as User
from .server import open_server as open_server
from .sqlite import SqliteHistory as SqliteHistory

__version__ = "0.2.0.dev0"

__all__ = [
    "DEFAULT_PORT",
    "LOBBY",
    "PROTOCOL_VERSION",
    "SERVER_SENDER",
    "BadName",
    "BadRequest",
    "BanInfo",
    "Banned",
    "BansReply",
    "ChatClient",
    "ChatServer",
    "ChatkitError",
    "ClientEvent",
    "CommandReply",
    "ConnectionClosed",
    "DirectMessage",
    "ErrorCode",
    "ErrorReply",
    "Event",
    "Forbidden",
    "HistoryReply",
    "HistoryStore",
    "HistoryStoreError",
    "Interrupted",
    "Joined",
    "Kicked",
    "LeaveReason",
    "Left",
    "Limits",
    "Login",
    "MemoryHistory",
    "Message",
    "Moderated",
    "ModesReply",
    "Muted",
    "NameTaken",
    "NoSuchUser",
    "NotInRoom",
    "NotReady",
    "Pong",
    "RateLimited",
    "Reconnect",
    "Reconnected",
    "Reconnecting",
    "Rejected",
    "RemoteUser",
    "Renamed",
    "Replaced",
    "RequestError",
    "RoomFull",
    "RoomInfo",
    "RoomsReply",
    "ServerFull",
    "Shutdown",
    "SqliteHistory",
    "StartupError",
    "TimedOut",
    "TooLarge",
    "TooManyRooms",
    "TooSlow",
    "TopicReply",
    "Unauthorized",
    "Unavailable",
    "User",
    "Veto",
    "Welcome",
    "WhoReply",
    "hookimpl",
    "open_client",
    "open_server",
    "open_stream",
]
