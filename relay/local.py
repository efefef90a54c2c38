"""In-process peers: the API's WHIP ingest, WHEP, MJPEG and HLS join channels without a socket.

They are ordinary hub peers (same routing, same latest-frame-wins slots),
so everything the relay guarantees for network clients holds for them too.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator

from relay.hub import Hub, Peer
from relay.outbox import Outbox
from wire.frames import Frame, FrameKind, ImageFormat
from wire.messages import Role


class LocalPeer:
    """Base: joins ``channel`` on ``hub`` with ``role`` until ``close``."""

    def __init__(self, hub: Hub, channel: str, role: Role, receive: str) -> None:
        self.hub = hub
        self.peer = Peer(id=f"local-{secrets.token_hex(4)}", role=role, channel=channel,
                         receive=receive, outbox=Outbox())
        hub.join(self.peer)

    @property
    def channel(self) -> str:
        return self.peer.channel

    def close(self) -> None:
        self.hub.leave(self.peer)
        self.peer.outbox.close()

    async def frames(self) -> AsyncIterator[Frame]:
        """The newest frames for this peer, as they come; ends when closed."""
        outbox = self.peer.outbox
        while True:
            _control, deliveries = await outbox.take()
            for delivery in deliveries:
                yield delivery.frame
            if outbox.closed:
                return

    async def next_frame(self, timeout: float | None = None) -> Frame:
        """The next frame (output for viewers), waiting at most ``timeout`` seconds."""
        async def first() -> Frame:
            async for frame in self.frames():
                return frame
            raise ConnectionError("closed")
        return await asyncio.wait_for(first(), timeout)


class LocalProducer(LocalPeer):
    """Publishes encoded images into a channel as if from a network producer."""

    def __init__(self, hub: Hub, channel: str, receive: str = "none") -> None:
        super().__init__(hub, channel, Role.PRODUCER, receive)
        self._seq = itertools.count()

    def publish(self, payload: bytes, width: int, height: int,
                fmt: ImageFormat = ImageFormat.JPEG, timestamp: float | None = None) -> int:
        """Route one image; returns its sequence number. Bad images raise ``ProtocolError``."""
        seq = next(self._seq)
        frame = Frame(channel=self.channel, seq=seq, timestamp=time.time() if timestamp is None else timestamp,
                      width=width, height=height, format=fmt, payload=payload, kind=FrameKind.INPUT)
        self.hub.route(self.peer, frame, None)
        return seq


class LocalViewer(LocalPeer):
    """Receives a channel's output (or input) frames, newest first."""

    def __init__(self, hub: Hub, channel: str, receive: str = "output") -> None:
        super().__init__(hub, channel, Role.VIEWER, receive)
