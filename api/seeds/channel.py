"""A seed client's own relay channel: held open with its params, one in-process session.

Each seed connection (a ``/ws`` socket, a ``/api/ws/{userId}`` session)
gets a channel of its own, so its params never leak into another client's
frames. The channel is held (it keeps a worker with no producer) and a
producer :class:`~relay.local.LocalSession` that also receives outputs
publishes the client's images as they came (the hub reads their format and
size). Its events are the hub's typed messages (worker assigned, engine
ready, engine errors), which the protocol adapters translate into their
seed's statuses, and the results, here as :class:`Result` with their latency.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Self

from relay.hub import Channel, Delivery, Hub
from relay.local import Closed, LocalSession
from wire.frames import Frame
from wire.messages import Receive, Role
from wire.relay_messages import EngineState, RelayMessage, Status

_MAX_PENDING = 64  # send times kept for latency; older ones are forgotten


@dataclass(frozen=True)
class Result:
    """One output frame and how long its input took to come back."""

    frame: Frame
    latency_s: float | None


#: what :meth:`SessionChannel.events` yields
SessionEvent = Result | RelayMessage | Closed


class SessionChannel:
    """Open on construction, closed by :meth:`close`; raises ``ProtocolError`` if the hub is full."""

    def __init__(self, hub: Hub, prefix: str, params: dict[str, Any]) -> None:
        self.hub = hub
        self.name = f"{prefix}-{secrets.token_hex(8)}"
        self.params = params
        hub.open_channel(self.name, params)
        try:
            self.session = LocalSession(hub, self.name, Role.PRODUCER, Receive.OUTPUT)
        except Exception:
            hub.close_channel(self.name)
            raise
        self._sent_at: dict[int, float] = {}
        self.last_seq = -1

    @property
    def channel(self) -> Channel | None:
        return self.hub.channels.get(self.name)

    @property
    def engine_state(self) -> EngineState:
        channel = self.channel
        return channel.engine_state if channel is not None else EngineState.CLOSED

    @property
    def has_worker(self) -> bool:
        channel = self.channel
        return channel is not None and channel.worker is not None

    @property
    def idle(self) -> bool:
        """Its worker was given back for lack of input: the next frame asks for one again."""
        channel = self.channel
        return channel is not None and channel.idle

    @property
    def queue_status(self) -> Status | None:
        """While the channel waits for a worker: its place in the queue and the slots (else None)."""
        channel = self.channel
        return channel.announced if channel is not None and channel.worker is None else None

    @property
    def params_version(self) -> int:
        channel = self.channel
        return channel.params_version if channel is not None else 0

    @property
    def ended(self) -> bool:
        return self.session.closed

    def set_params(self, params: dict[str, Any]) -> int:
        """Send new full params to the worker; returns their version."""
        self.params = params
        channel = self.channel
        if channel is None:
            return 0
        return self.hub.set_params(channel, params, replace=True)

    def publish(self, data: bytes) -> int:
        """Route one encoded image; non-images and oversize ones raise ``ProtocolError``."""
        seq = self.session.publish(data)
        self.last_seq = seq
        self._sent_at[seq] = time.monotonic()
        if len(self._sent_at) > _MAX_PENDING:
            self._sent_at.pop(next(iter(self._sent_at)))
        return seq

    def events(self, told: Status | None = None) -> SessionEvents:
        """The hub's messages and the results, in order, until :data:`relay.local.CLOSED`.

        A ``status`` equal to the last one is left out (the hub repeats the queue news it
        sent when the channel opened); ``told``: the one the client got already, at connect.
        Cancel-safe like :class:`relay.local.Events`; use one iterator per session.
        """
        return SessionEvents(self, told)

    def result(self, frame: Frame) -> Result:
        """``frame`` with its round trip, forgetting the send times of it and older frames."""
        sent = self._sent_at.get(frame.seq)
        for seq in [s for s in self._sent_at if s <= frame.seq]:
            del self._sent_at[seq]
        return Result(frame, None if sent is None else time.monotonic() - sent)

    def close(self) -> None:
        if self.session.closed:
            return
        self.session.close()
        self.hub.close_channel(self.name)


class SessionEvents:
    """The session's events with each delivered frame turned into a :class:`Result`."""

    def __init__(self, channel: SessionChannel, told: Status | None) -> None:
        self._channel = channel
        self._events = channel.session.events()
        self._status = told

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionEvent:
        while True:
            event = await anext(self._events)
            if isinstance(event, Delivery):
                return self._channel.result(event.frame)
            if isinstance(event, Status):
                if event == self._status:
                    continue  # news the client has
                self._status = event
            return event
