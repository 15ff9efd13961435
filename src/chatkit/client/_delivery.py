"""Where a client's events go: ``async for event in client`` and the
client hooks.

Both routes are bounded channels: when nobody consumes events, delivering
waits, so the reader stops reading (backpressure, as in trio-websocket) and
the server eventually drops the client as too slow. The hooks run in a task
of their own, in the order events arrive, so that an implementation may
await the client.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Final

import trio

from .._events import DirectMessage, Joined, Left, Message, Welcome
from .._hooks import HookDispatcher
from ._reconnect import ClientEvent, ClientItem, Interrupted, Reconnected, Reconnecting

__all__ = ["Delivery"]

# The client hook of each ClientEvent; the event's fields are its arguments.
_CLIENT_EVENT_HOOKS: Final = MappingProxyType(
    {
        Interrupted: "chatkit_client_interrupted",
        Reconnecting: "chatkit_client_reconnecting",
        Reconnected: "chatkit_client_reconnected",
    }
)


class Delivery:
    """Hands a client's events to ``async for`` and to the hook task.

    Args:
        event_buffer: how many events wait for ``async for``; ``None``
            keeps none.
        hooks: the client's hooks (``client`` bound), if any plugin
            implements one.
    """

    def __init__(
        self, *, event_buffer: int | None, hooks: HookDispatcher | None
    ) -> None:
        self._event_buffer = event_buffer
        self._hooks = hooks
        self._closed = False
        self._close_reason = "closed"
        self._events_send: trio.MemorySendChannel[ClientItem] | None = None
        self._events_receive: trio.MemoryReceiveChannel[ClientItem] | None = None
        self._hook_send: trio.MemorySendChannel[ClientItem] | None = None
        self._hook_receive: trio.MemoryReceiveChannel[ClientItem] | None = None
        self._hooks_done: trio.Event | None = None

    @property
    def has_hooks(self) -> bool:
        """True if events go to hooks (:meth:`run_hooks` must run)."""
        return self._hooks is not None

    def open(self) -> None:
        """Open the channels (when the client is entered)."""
        if self._event_buffer is not None:
            self._events_send, self._events_receive = trio.open_memory_channel(
                self._event_buffer
            )
        if self._hooks is not None:
            self._hook_send, self._hook_receive = trio.open_memory_channel(
                self._event_buffer or 256
            )
            self._hooks_done = trio.Event()

    async def deliver(self, event: ClientItem) -> bool:
        """Hand ``event`` to the hooks, then to ``async for``, waiting for
        room in each; False if it was dropped (the client has ended)."""
        if self._closed:
            return False
        try:
            if self._hook_send is not None:
                await self._hook_send.send(event)
            if self._events_send is not None:
                await self._events_send.send(event)
        except trio.ClosedResourceError:
            return False  # the client ended meanwhile
        return True

    def close(self, reason: str) -> None:
        """No more events: ``async for`` ends, and the hook task after
        ``chatkit_client_disconnected`` (given ``reason``)."""
        self._closed = True
        self._close_reason = reason or "closed"
        if self._events_send is not None:
            self._events_send.close()
        if self._hook_send is not None:
            self._hook_send.close()

    async def next(self) -> ClientItem:
        """The next event for ``async for``.

        Raises:
            StopAsyncIteration: the client has ended.
            RuntimeError: the client keeps no events (``event_buffer=None``).
        """
        if self._events_receive is None:
            raise RuntimeError(
                "this client keeps no events (event_buffer=None); use hooks"
            )
        try:
            return await self._events_receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def wait_hooks(self) -> None:
        """Return once the hook task has ended (at once if none runs)."""
        if self._hooks_done is not None:
            await self._hooks_done.wait()

    async def run_hooks(self, welcome: Welcome) -> None:
        """The hook task: calls the hooks of each event, starting with
        ``welcome``; ends after ``chatkit_client_disconnected``."""
        hooks, receive, done = self._hooks, self._hook_receive, self._hooks_done
        assert hooks is not None and receive is not None and done is not None
        try:
            await hooks.notify("chatkit_client_connected", welcome=welcome)
            async for event in receive:
                match event:
                    case ClientEvent():
                        # Each one's fields are its hook's arguments.
                        await hooks.notify(
                            _CLIENT_EVENT_HOOKS[type(event)],
                            **dataclasses.asdict(event),
                        )
                        continue
                await hooks.notify("chatkit_client_event", event=event)
                match event:
                    case Message():
                        await hooks.notify("chatkit_client_message", message=event)
                    case DirectMessage():
                        await hooks.notify("chatkit_client_dm", message=event)
                    case Joined(room=room, name=name):
                        await hooks.notify(
                            "chatkit_client_joined", room=room, name=name
                        )
                    case Left(room=room, name=name, reason=reason):
                        await hooks.notify(
                            "chatkit_client_left", room=room, name=name, reason=reason
                        )
            await hooks.notify("chatkit_client_disconnected", reason=self._close_reason)
        finally:
            done.set()
