"""chatkit: an embeddable, trio-based chat server and client with pluggy hooks.

The public API lives here; submodules starting with ``_`` are private.
:mod:`chatkit.hookspecs` documents the plugin hooks.
"""

from ._client import DEFAULT_PORT as DEFAULT_PORT
from ._client import ChatClient as ChatClient
from ._client import connect as connect
from ._events import LOBBY as LOBBY
from ._events import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._events import Bye as Bye
from ._events import DirectMessage as DirectMessage
from ._events import Dm as Dm
from ._events import Error as Error
from ._events import Event as Event
from ._events import Hello as Hello
from ._events import History as History
from ._events import HistoryReply as HistoryReply
from ._events import Join as Join
from ._events import Joined as Joined
from ._events import Leave as Leave
from ._events import Left as Left
from ._events import Message as Message
from ._events import Nick as Nick
from ._events import Ping as Ping
from ._events import Pong as Pong
from ._events import Renamed as Renamed
from ._events import RoomInfo as RoomInfo
from ._events import Rooms as Rooms
from ._events import RoomsReply as RoomsReply
from ._events import Say as Say
from ._events import Shutdown as Shutdown
from ._events import Welcome as Welcome
from ._events import Who as Who
from ._events import WhoReply as WhoReply
from ._exceptions import BadName as BadName
from ._exceptions import BadRequest as BadRequest
from ._exceptions import ChatError as ChatError
from ._exceptions import ConnectionClosed as ConnectionClosed
from ._exceptions import ErrorCode as ErrorCode
from ._exceptions import Kicked as Kicked
from ._exceptions import LocalProtocolError as LocalProtocolError
from ._exceptions import NameTaken as NameTaken
from ._exceptions import NoSuchUser as NoSuchUser
from ._exceptions import NotInRoom as NotInRoom
from ._exceptions import NotReady as NotReady
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import RateLimited as RateLimited
from ._exceptions import Reject as Reject
from ._exceptions import Rejected as Rejected
from ._exceptions import RemoteProtocolError as RemoteProtocolError
from ._exceptions import ServerFull as ServerFull
from ._exceptions import StartupError as StartupError
from ._exceptions import TimedOut as TimedOut
from ._exceptions import TooLarge as TooLarge
from ._exceptions import TooManyRooms as TooManyRooms
from ._exceptions import TooSlow as TooSlow
from ._exceptions import Unauthorized as Unauthorized
from ._exceptions import Unavailable as Unavailable
from ._protocol import CLOSED as CLOSED
from ._protocol import NEED_DATA as NEED_DATA
from ._protocol import ClientConnection as ClientConnection
from ._protocol import Mode as Mode
from ._protocol import ServerConnection as ServerConnection
from ._protocol import encode_json as encode_json
from ._protocol import encode_line as encode_line
from ._reconnect import ClientEvent as ClientEvent
from ._reconnect import ConnectionLost as ConnectionLost
from ._reconnect import Reconnect as Reconnect
from ._reconnect import Reconnected as Reconnected
from ._reconnect import Reconnecting as Reconnecting
from ._server import SERVER_SENDER as SERVER_SENDER
from ._server import ChatServer as ChatServer
from ._server import LeaveReason as LeaveReason
from ._server import RemoteUser as RemoteUser
from ._server import User as User
from ._server import open_server as open_server
from .hookspecs import hookimpl as hookimpl
from .hookspecs import hookspec as hookspec

__version__ = "0.1.0"

from .history import HistoryStore as HistoryStore
from .history import HistoryStoreError as HistoryStoreError
from .history import MemoryHistory as MemoryHistory
from .sqlite import SqliteHistory as SqliteHistory

__all__ = [
    "CLOSED",
    "DEFAULT_PORT",
    "LOBBY",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SERVER_SENDER",
    "BadName",
    "BadRequest",
    "Bye",
    "ChatClient",
    "ChatError",
    "ChatServer",
    "ClientConnection",
    "ClientEvent",
    "ConnectionClosed",
    "ConnectionLost",
    "DirectMessage",
    "Dm",
    "Error",
    "ErrorCode",
    "Event",
    "Hello",
    "History",
    "HistoryReply",
    "HistoryStore",
    "HistoryStoreError",
    "Join",
    "Joined",
    "Kicked",
    "Leave",
    "LeaveReason",
    "Left",
    "LocalProtocolError",
    "MemoryHistory",
    "Message",
    "Mode",
    "NameTaken",
    "Nick",
    "NoSuchUser",
    "NotInRoom",
    "NotReady",
    "Ping",
    "Pong",
    "ProtocolError",
    "RateLimited",
    "Reconnect",
    "Reconnected",
    "Reconnecting",
    "Reject",
    "Rejected",
    "RemoteProtocolError",
    "RemoteUser",
    "Renamed",
    "RoomInfo",
    "Rooms",
    "RoomsReply",
    "Say",
    "ServerConnection",
    "ServerFull",
    "Shutdown",
    "SqliteHistory",
    "StartupError",
    "TimedOut",
    "TooLarge",
    "TooManyRooms",
    "TooSlow",
    "Unauthorized",
    "Unavailable",
    "User",
    "Welcome",
    "Who",
    "WhoReply",
    "connect",
    "encode_json",
    "encode_line",
    "hookimpl",
    "hookspec",
    "open_server",
]
