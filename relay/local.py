"""In-process peers: the API's WHIP and WebSocket ingest, seed channels, WHEP and MJPEG
join channels without a socket.

They are ordinary hub peers (same routing, same latest-frame-wins slots),
so everything the relay guarantees for network clients holds for them too.
RTMP and HLS outputs are not in-process: their encoder runs in a process of
its own (media.output_encoder, supervised by media.output_process.OutputProcess)
and joins the relay over a WebSocket as a viewer, so FFmpeg's network I/O
never holds the API's GIL.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Self, cast

from relay.hub import Delivery, Hub, Peer
from relay.outbox import Outbox
from wire.frames import Frame, FrameKind, ImageFormat
from wire.messages import ClientMessage, Receive, Role
from wire.relay_messages import RelayMessage


@dataclass(frozen=True, slots=True)
class Closed:
    """The last event: the session was closed."""


CLOSED = Closed()

#: what :meth:`LocalSession.events` yields
Event = Delivery | RelayMessage | Closed


class Events:
    """A session's events in order (each batch: control messages, then the newest frames).

    Cancel-safe: an ``anext`` cut short by a timeout loses nothing, so
    ``asyncio.wait_for(anext(events), timeout)`` can wait for a result with a deadline.
    """

    def __init__(self, outbox: Outbox[Delivery]) -> None:
        self._outbox = outbox
        self._pending: deque[Event] = deque()
        self._done = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while not self._pending:
            if self._done:
                raise StopAsyncIteration
            control, deliveries = await self._outbox.take()
            # a local session is sent models only (text is for the network sessions)
            self._pending.extend(cast("list[RelayMessage]", control))
            self._pending.extend(deliveries)
            if self._outbox.closed:
                self._pending.append(CLOSED)
                self._done = True
        return self._pending.popleft()


class LocalSession:
    """Joins ``channel`` on ``hub`` as ``role`` until :meth:`close` (or the ``with`` block ends).

    The API itself: no token is asked. ``anonymous``: a channel this session
    creates serves a client with no credential (a seed client), so it gets a
    worker only within the relay's ``anonymous_share``.
    Raises ``ProtocolError`` when the hub refuses it (channel limits).
    """

    def __init__(
        self,
        hub: Hub,
        channel: str,
        role: Role,
        receive: Receive | str = Receive.OUTPUT,
        *,
        anonymous: bool = False,
    ) -> None:
        self.hub = hub
        self.peer = Peer(
            id=f"local-{secrets.token_hex(4)}",
            role=role,
            channel=channel,
            receive=Receive(receive),
            outbox=Outbox(),
            anonymous=anonymous,
        )
        self._next_seq = 0
        hub.join(self.peer)

    @property
    def channel(self) -> str:
        return self.peer.channel

    @property
    def closed(self) -> bool:
        return self.peer.outbox.closed

    def publish(
        self,
        payload: bytes,
        width: int | None = None,
        height: int | None = None,
        fmt: ImageFormat = ImageFormat.JPEG,
        timestamp: float | None = None,
    ) -> int:
        """Route one encoded image as this session's next frame; returns its sequence number.

        With no ``width``/``height`` the hub reads format and size from the
        image; given them (a frame header's claims), the image must agree.
        A refused image raises ``ProtocolError`` and takes no sequence number.
        """
        seq = self._next_seq
        if width is None or height is None:
            self.hub.route_image(self.peer, payload, timestamp, seq)
        else:
            frame = Frame(
                channel=self.channel,
                seq=seq,
                width=width,
                height=height,
                format=fmt,
                timestamp=time.time() if timestamp is None else timestamp,
                payload=payload,
                kind=FrameKind.INPUT,
            )
            self.hub.route(self.peer, frame, None)
        self._next_seq = seq + 1
        return seq

    def send(self, message: ClientMessage) -> None:
        """A control message (params, stats, ping...), handled as the relay handles a client's."""
        self.hub.on_message(self.peer, message)

    def post(self, message: RelayMessage) -> None:
        """Queue a message for this session's own reader, in order with the hub's (an adapter's reply)."""
        self.peer.send(message)

    def events(self) -> Events:
        """Everything the hub sends this session, until :data:`CLOSED`; use one iterator per session."""
        return Events(self.peer.outbox)

    async def frames(self) -> AsyncIterator[Frame]:
        """The newest frames for this session, as they come; ends when closed."""
        async for event in self.events():
            if isinstance(event, Delivery):
                yield event.frame

    async def next_frame(self, timeout: float | None = None) -> Frame:
        """The next frame (output for viewers), waiting at most ``timeout`` seconds."""

        async def first() -> Frame:
            async for frame in self.frames():
                return frame
            raise ConnectionError("closed")

        return await asyncio.wait_for(first(), timeout)

    def close(self) -> None:
        """Leave the channel; the events end with :data:`CLOSED`. Idempotent."""
        if not self.peer.outbox.closed:
            self.hub.leave(self.peer)
            self.peer.outbox.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalProducer(LocalSession):
    """A producer session (gets no frames unless ``receive`` says so)."""

    def __init__(self, hub: Hub, channel: str, receive: Receive | str = Receive.NONE) -> None:
        super().__init__(hub, channel, Role.PRODUCER, receive)


class LocalViewer(LocalSession):
    """A viewer session: a channel's output (or input) frames, newest first."""

    def __init__(self, hub: Hub, channel: str, receive: Receive | str = Receive.OUTPUT) -> None:
        super().__init__(hub, channel, Role.VIEWER, receive)
