"""Per-peer outgoing mailbox: latest frame wins, control messages in order.

Each peer has one :class:`~common.slots.Newest` slot per (channel, kind);
putting a frame into a full slot replaces the unsent one and returns it (the
hub counts the drop), so a slow peer holds at most one frame per slot and
never builds a backlog or slows the sender. One event wakes the peer's single
sender task for all its slots. Control messages (errors, acks, params) go
through a small bounded queue: the relay's peers queue them as models
(:mod:`wire.relay_messages`) that their transport encodes, a worker its
reports already encoded as text.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from common.slots import Newest
from wire.messages import Message

T = TypeVar("T")
#: a control message: a model (the relay's peers), or text already encoded (a worker's outbox)
Control = Message | str


class Outbox(Generic[T]):
    def __init__(self, control_limit: int = 64) -> None:
        #: optional: sends an item at once when the socket is idle; True when it did
        self.fast_send: Callable[[T], bool] | None = None
        #: the slots holding an unsent frame, in the order of their newest put
        self._frames: dict[Hashable, Newest[T]] = {}
        self._control: deque[Control] = deque(maxlen=control_limit)
        self._ready = asyncio.Event()
        self._busy = False  # the sender task holds items it has not finished sending
        self.closed = False

    def put_frame(self, slot: Hashable, item: T) -> T | None:
        """Store ``item`` in ``slot``; return the unsent item it replaced, if any."""
        if (
            self.fast_send is not None
            and not self._busy
            and not self._frames
            and not self._control
            and self.fast_send(item)
        ):
            return None  # nothing queued and the socket idle: written without the sender task
        frames = self._frames
        newest = frames.pop(slot, None)  # re-insert: oldest slot sends first
        if newest is None:
            newest = Newest()
        frames[slot] = newest
        self._ready.set()
        return newest.put(item)

    @property
    def backlogged(self) -> bool:
        """Frames wait for the sender task (the socket was busy): it needs a turn of the loop."""
        return bool(self._frames)

    def put_control(self, message: Control) -> None:
        self._control.append(message)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def take(self) -> tuple[list[Control], list[T]]:
        """Wait for something to send; return all pending control messages and frames."""
        self._busy = False
        while not (self._control or self._frames or self.closed):
            self._ready.clear()
            await self._ready.wait()
        control = list(self._control)
        self._control.clear()
        frames = [item for newest in self._frames.values() for item in newest.take()]
        self._frames.clear()
        self._busy = True  # until the next take: a direct send now could overtake these
        return control, frames

    async def drain(
        self,
        send_control: Callable[[Control], Awaitable[object]],
        send_frame: Callable[[T], Awaitable[object]],
    ) -> None:
        """Send everything put here, control messages first, until closed.

        Awaiting each send is the backpressure: while a slow socket waits, new
        frames replace older ones in their slots. The socket's own errors
        (a closed connection) propagate to the caller.
        """
        while True:
            control, frames = await self.take()
            for message in control:
                await send_control(message)
            for item in frames:
                await send_frame(item)
            if self.closed:
                return
