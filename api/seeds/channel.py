"""A seed client's own relay channel: held open with its params, one in-process peer.

Each seed connection (a ``/ws`` socket, a ``/api/ws/{userId}`` session)
gets a channel of its own, so its params never leak into another client's
frames. The channel is held (it keeps a worker with no producer) and a
``LocalProducer`` that also receives outputs publishes the client's images;
its outbox holds at most one result (latest frame wins) plus the hub's
control messages (worker assigned, engine ready, engine errors), which the
protocol adapters translate into their seed's statuses.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from relay.hub import Channel, Hub
from relay.local import LocalProducer
from wire.frames import Frame, FrameKind
from wire.images import probe_image

_MAX_PENDING = 64  # send times kept for latency; older ones are forgotten


@dataclass(frozen=True)
class Result:
    """One output frame and how long its input took to come back."""

    frame: Frame
    latency_s: float | None


class SessionChannel:
    """Open on construction, closed by :meth:`close`; raises ``ProtocolError`` if the hub is full."""

    def __init__(self, hub: Hub, prefix: str, params: dict[str, Any]) -> None:
        self.hub = hub
        self.name = f"{prefix}-{secrets.token_hex(8)}"
        self.params = params
        hub.open_channel(self.name, params)
        try:
            self.producer = LocalProducer(hub, self.name, receive="output")
        except Exception:
            hub.close_channel(self.name)
            raise
        self._sent_at: dict[int, float] = {}
        self.last_seq = -1
        self.closed = False

    @property
    def channel(self) -> Channel | None:
        return self.hub.channels.get(self.name)

    @property
    def engine_state(self) -> str:
        channel = self.channel
        return channel.engine_state if channel is not None else "closed"

    @property
    def has_worker(self) -> bool:
        channel = self.channel
        return channel is not None and channel.worker is not None

    @property
    def params_version(self) -> int:
        channel = self.channel
        return channel.params_version if channel is not None else 0

    def set_params(self, params: dict[str, Any]) -> int:
        """Send new full params to the worker; returns their version."""
        self.params = params
        channel = self.channel
        if channel is None:
            return 0
        return self.hub.set_params(channel, params, replace=True)

    def publish(self, data: bytes) -> int:
        """Route one encoded image; non-images and oversize ones raise ``ProtocolError``."""
        fmt, width, height = probe_image(data)
        seq = self.producer.publish(data, width, height, fmt)
        self.last_seq = seq
        self._sent_at[seq] = time.monotonic()
        if len(self._sent_at) > _MAX_PENDING:
            self._sent_at.pop(next(iter(self._sent_at)))
        return seq

    async def events(self) -> tuple[list[dict[str, Any]], list[Result]]:
        """Wait for hub news: control messages (decoded) and output frames (newest only)."""
        control, deliveries = await self.producer.peer.outbox.take()
        messages = [orjson.loads(text) for text in control]
        results = [self._result(d.frame) for d in deliveries if d.frame.kind is FrameKind.OUTPUT]
        return messages, results

    @property
    def ended(self) -> bool:
        return self.producer.peer.outbox.closed

    def _result(self, frame: Frame) -> Result:
        sent = self._sent_at.get(frame.seq)
        for seq in [s for s in self._sent_at if s <= frame.seq]:
            del self._sent_at[seq]
        return Result(frame, None if sent is None else time.monotonic() - sent)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.producer.close()
        self.hub.close_channel(self.name)
