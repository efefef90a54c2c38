"""A worker's connection to a relay: takes channel assignments, runs a pipeline per channel.

The asyncio side only moves bytes: it hands each input frame to its
channel's pipeline (latest wins) and sends results through an
:class:`~relay.outbox.Outbox`, so a slow relay link drops old results rather
than queueing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from common.backoff import RETRY_FIRST, RETRY_MAX, retry_delays
from relay.client import RelayRefused, connect
from relay.outbox import Outbox
from wire.errors import ProtocolError, UnknownMessageType
from wire.frames import Frame, ImageFormat, decode_frame, encode_frame
from wire.messages import Report, ReportEvent, Role, encode_control
from wire.relay_messages import (
    Assign,
    ChannelParams,
    Error,
    RelayMessage,
    Release,
    Shutdown,
    decode_relay_message,
)
from worker.pipeline import (
    LOAD_RETRY_FIRST,
    LOAD_RETRY_MAX,
    ChannelPipeline,
    EngineFactory,
    Events,
    PipelineOptions,
    engine_factory,
)

log = logging.getLogger("worker")

STATS_INTERVAL = 2.0


@dataclass
class WorkerOptions:
    relay_url: str = "ws://127.0.0.1:8765"
    engine: str = "filter"
    token: str | None = None
    capacity: int = 1
    channels: list[str] = field(default_factory=list)
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # defaults under each channel's params
    output_format: ImageFormat = ImageFormat.JPEG
    quality: int = 85
    #: a channel whose engine failed to load retries after this many seconds, doubling up to the max
    load_retry_first: float = LOAD_RETRY_FIRST
    load_retry_max: float = LOAD_RETRY_MAX


class Worker:
    """Serve channels for one relay connection; ``run`` returns when the relay closes it."""

    def __init__(self, options: WorkerOptions, factory: EngineFactory | None = None) -> None:
        self.options = options
        self.factory = factory or engine_factory(options.engine)
        self.pipelines: dict[str, ChannelPipeline] = {}
        self.connected = asyncio.Event()
        self._outbox: Outbox[bytes] = Outbox()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        ws, welcome = await connect(
            self.options.relay_url,
            Role.WORKER,
            token=self.options.token,
            capacity=self.options.capacity,
            channels=self.options.channels,
            name=self.options.name,
            engine=self.options.engine,
        )
        log.info("worker %s connected to %s", welcome.get("session"), self.options.relay_url)
        self.connected.set()
        sender = asyncio.create_task(self._send_loop(ws))
        reporter = asyncio.create_task(self._stats_loop())
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self._on_frame(message)
                else:
                    self._on_text(message)
        except ConnectionClosed:
            pass
        finally:
            reporter.cancel()
            self._outbox.close()
            await sender
            await ws.close()
            await asyncio.to_thread(self._stop_all)

    # -- incoming -------------------------------------------------------------

    def _on_frame(self, data: bytes) -> None:
        try:
            frame = decode_frame(data)
        except ProtocolError as exc:
            log.warning("dropping a malformed frame from the relay: %s", exc)
            return
        pipeline = self.pipelines.get(frame.channel)
        if pipeline is not None:
            pipeline.submit(frame)

    def _on_text(self, text: str) -> None:
        try:
            message = decode_relay_message(text)
        except UnknownMessageType:
            return  # a newer relay's addition: nothing for this worker
        except ProtocolError as exc:
            log.warning("ignoring a malformed message from the relay: %s", exc)
            return
        self._on_control(message)

    def _on_control(self, message: RelayMessage) -> None:
        match message:
            case Assign():
                self._assign(message.channel, message.params, message.version)
            case Release():
                self._release(message.channel)
            case ChannelParams() if message.channel in self.pipelines:
                self.pipelines[message.channel].update(message.params, message.version)
            case Error():
                log.warning("relay says: %s: %s", message.code, message.message)
            case Shutdown():
                log.info("relay is shutting down; this worker will reconnect")

    def _assign(self, channel: str, params: dict[str, Any], version: int) -> None:
        self._release(channel)
        log.info("serving channel %s with engine %s", channel, self.options.engine)
        events = Events(
            output=self._deliver, report=lambda event, msg, data: self._report(channel, event, msg, data)
        )
        options = PipelineOptions(
            self.options.output_format,
            self.options.quality,
            dict(self.options.params),
            self.options.load_retry_first,
            self.options.load_retry_max,
        )
        pipeline = ChannelPipeline(channel, self.factory, params, version, events, options)
        self.pipelines[channel] = pipeline
        pipeline.start()

    def _release(self, channel: str) -> None:
        pipeline = self.pipelines.pop(channel, None)
        if pipeline is not None:
            pipeline.stop()

    def _stop_all(self) -> None:
        for channel in list(self.pipelines):
            pipeline = self.pipelines.pop(channel)
            pipeline.stop()
            pipeline.join(timeout=5)

    # -- outgoing (called from pipeline threads) -----------------------------

    def _deliver(self, frame: Frame) -> None:
        data = encode_frame(frame)
        self._call_soon(self._outbox.put_frame, frame.channel, data)

    def _report(self, channel: str, event: ReportEvent, message: str, data: dict[str, Any]) -> None:
        text = encode_control(Report(channel=channel, event=event, message=message, data=data))
        self._call_soon(self._outbox.put_control, text)

    def _call_soon(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing during shutdown
                loop.call_soon_threadsafe(fn, *args)

    async def _send_loop(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            # websockets types send() for every kind of Data, the outbox hands it str or bytes
            await self._outbox.drain(ws.send, ws.send)  # type: ignore[arg-type]

    async def _stats_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(STATS_INTERVAL)  # a reporting period, not synchronisation
            now = time.monotonic()
            for channel, pipeline in list(self.pipelines.items()):
                self._report(
                    channel, ReportEvent.STATS, "", {**pipeline.stats(), "interval_s": round(now - last, 3)}
                )
            last = now


async def run_forever(
    options: WorkerOptions,
    factory: EngineFactory | None = None,
    *,
    retry_delay: float = RETRY_FIRST,
    max_delay: float = RETRY_MAX,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Keep a worker connected, announcing itself again after each reconnection.

    When the relay closes the connection (a ``shutdown`` on restart, or a lost
    socket) or cannot be reached, the next try comes after ``retry_delay``
    seconds, doubling up to ``max_delay`` (0.25, 0.5, 1, 2, 2... s); once
    connected the schedule starts over. A refusal (wrong token) is final:
    :class:`RelayRefused` propagates. ``sleep`` is the wait between tries (tests).
    """
    delays = retry_delays(retry_delay, max_delay)
    while True:
        worker = Worker(options, factory)
        try:
            await worker.run()
            reason = "the connection to the relay ended"
        except RelayRefused:
            raise  # a wrong token or limit will not fix itself
        except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
            reason = f"cannot reach the relay ({exc or type(exc).__name__})"
        if worker.connected.is_set():
            delays = retry_delays(retry_delay, max_delay)  # it was up: a quick first try again
        delay = next(delays)
        log.warning("%s at %s; reconnecting in %g s", reason, options.relay_url, delay)
        await sleep(delay)
