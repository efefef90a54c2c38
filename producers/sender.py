"""The producer's sending loop: pace, capture, encode, send; count results concurrently.

Sending never waits on receiving: a separate task reads results, acks and
control messages while the loop keeps its schedule. The schedule is
absolute (frame ``n`` is due at ``start + n / fps`` on the monotonic
clock), so per-frame costs do not accumulate into drift; when the loop
falls more than a frame behind it skips the missed ticks ("late") rather
than bursting to catch up.

Results are matched to sent frames by sequence number. Outputs come back
in order, so when the result for ``seq`` arrives every older frame still
outstanding was dropped somewhere in the pipeline (the relay keeps only the
newest frame per receiver).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from media.codec import DEFAULT_QUALITY, encode_image, resize_rgb
from producers.meter import Rate, every_second, percentiles_ms
from producers.net import DEFAULT_RELAY, open_legacy, open_relay
from producers.sources import Source
from wire.errors import ErrorCode, ProtocolError, UnknownMessageType
from wire.frames import Frame, FrameKind, ImageFormat, decode_frame, encode_frame
from wire.images import probe_image
from wire.messages import Params, Receive, Report, ReportEvent, Role, encode_control, legacy_image_message
from wire.relay_messages import (
    Ack,
    ChannelState,
    Error,
    LegacyResult,
    ParamsAck,
    RelayMessage,
    Shutdown,
    Status,
    decode_relay_message,
)

log = logging.getLogger("producers")

LATENCY_SAMPLES = 10_000


@dataclass
class ProducerOptions:
    relay: str = DEFAULT_RELAY
    channel: str = "default"
    token: str | None = None
    #: frames per second; 0 sends as fast as capture, encoding and the socket allow.
    fps: float = 30.0
    #: seconds to send for; None: until the source ends, ``max_frames`` or ``stop``.
    duration: float | None = None
    max_frames: int | None = None
    format: ImageFormat = ImageFormat.JPEG
    quality: int = DEFAULT_QUALITY
    #: ``(width, height)`` to resize every frame to before encoding.
    resize: tuple[int, int] | None = None
    #: speak seed 002's base64 JSON messages with no hello (compatibility check).
    legacy: bool = False
    #: sent as a ``params`` message once connected (a prompt, a filter...).
    params: dict[str, Any] | None = None
    #: ask the relay for the worker's results (needed for received fps and latency).
    receive: bool = True
    #: at most this many frames awaiting their result; 0: no limit. When full the
    #: frame due is skipped (counted "late"), or with fps=0 the loop waits for a slot.
    #: No limit applies while the relay says the channel has no worker.
    max_in_flight: int = 0
    #: a frame with no result after this long stops counting against ``max_in_flight``.
    in_flight_timeout: float = 5.0
    #: after the last frame, how long to wait for the outstanding results.
    drain_timeout: float = 2.0
    #: print a line of rates once a second to stderr.
    progress: bool = False
    name: str = "producer"


@dataclass
class ProducerReport:
    sent: int = 0
    received: int = 0
    #: frames passed over by the pipeline: a newer result arrived first.
    dropped: int = 0
    #: frames whose result never came back (in flight at the end, or timed out).
    unanswered: int = 0
    #: ticks skipped because capture/encoding/sending fell behind, or the window was full.
    late: int = 0
    acks: int = 0
    bytes_sent: int = 0
    #: seconds spent sending (rates are over this); draining the last results is not included.
    elapsed: float = 0.0
    width: int = 0
    height: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    #: why the connection ended early (relay shut down, socket closed), else None.
    closed: str | None = None
    params_version: int | None = None

    @property
    def send_fps(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def receive_fps(self) -> float:
        return self.received / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.update(send_fps=round(self.send_fps, 2), receive_fps=round(self.receive_fps, 2),
                    elapsed=round(self.elapsed, 3))
        return data

    def summary(self) -> str:
        lines = [(f"sent {self.sent} frames ({self.width}x{self.height}, "
                  f"{self.bytes_sent / 1e6:.1f} MB) in {self.elapsed:.1f} s: {self.send_fps:.1f} fps"),
                 (f"received {self.received} results: {self.receive_fps:.1f} fps; dropped "
                  f"{self.dropped}, unanswered {self.unanswered}, late ticks {self.late}")]
        if self.acks:
            lines.append(f"acks {self.acks}")
        if self.latency_ms:
            lines.append("round trip ms: " + " ".join(f"{k} {v}" for k, v in self.latency_ms.items()))
        if self.errors:
            lines.append("relay errors: " + ", ".join(f"{k} x{v}" for k, v in self.errors.items())
                         + f" (last: {self.last_error})")
        if self.closed:
            lines.append(f"connection ended early: {self.closed}")
        return "\n".join(lines)


@dataclass
class _Captured:
    payload: bytes
    width: int
    height: int
    wall: float
    mono: float


async def run_producer(source: Source, options: ProducerOptions, *,
                       stop: asyncio.Event | None = None,
                       on_result: Callable[[Frame], None] | None = None) -> ProducerReport:
    """Stream ``source`` to the relay until it ends, ``options`` limits, or ``stop`` is set.

    Raises :class:`producers.net.ConnectError` when the relay cannot be reached;
    :class:`producers.sources.SourceError` from the source propagates. The caller
    owns (and closes) ``source``. ``on_result`` sees every result frame.
    """
    return await _Producer(source, options, stop, on_result).run()


class _Producer:
    def __init__(self, source: Source, options: ProducerOptions, stop: asyncio.Event | None,
                 on_result: Callable[[Frame], None] | None) -> None:
        self.source = source
        self.opts = options
        self.stop = stop
        self.on_result = on_result
        self.report = ProducerReport()
        self.sent = Rate()
        self.received = Rate()
        self.outstanding: dict[int, float] = {}  # seq -> capture time, in seq order
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.changed = asyncio.Event()  # a result, an ack or the end of the connection
        self.connection_over = False
        self.has_worker: bool | None = None  # from the relay's status messages; None: not told
        self._last_raw: np.ndarray | None = None
        self._last_encoded: tuple[bytes, int, int] | None = None
        self._warned: set[str] = set()

    # -- the run ------------------------------------------------------------

    async def run(self) -> ProducerReport:
        o = self.opts
        if o.legacy:
            ws = await open_legacy(o.relay, o.channel, o.token, Receive.OUTPUT if o.receive else Receive.NONE)
        else:
            ws, _welcome = await open_relay(o.relay, Role.PRODUCER, o.channel, o.token,
                                            receive=Receive.OUTPUT if o.receive else Receive.NONE,
                                            name=o.name)
        receiver = asyncio.create_task(self._receive(ws))
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture")
        started = time.monotonic()
        try:
            if o.params is not None and not o.legacy:
                await ws.send(_params_text(o.params))
            async with every_second(self._progress_line if o.progress else None):
                try:
                    await self._send_loop(ws, pool)
                finally:
                    self.report.elapsed = time.monotonic() - started
                await self._drain()
        except ConnectionClosed as exc:
            self.report.closed = self.report.closed or _close_reason(exc)
        finally:
            await ws.close()
            await receiver
            # a read may still run after a cancel: let it end before the caller closes the source
            pool.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(pool.shutdown, True), 2.0)
        return self._finish()

    async def _send_loop(self, ws: ClientConnection, pool: ThreadPoolExecutor) -> None:
        o = self.opts
        loop = asyncio.get_running_loop()
        interval = 1.0 / o.fps if o.fps > 0 else 0.0
        t0 = time.monotonic()
        deadline = t0 + o.duration if o.duration is not None else None
        window = o.max_in_flight if o.receive else 0
        tick = 0
        while not self._should_stop():
            now = time.monotonic()
            due = t0 + tick * interval if interval else now
            if deadline is not None and due >= deadline:
                return
            if due > now:
                if await self._wait(due - now):
                    return
            elif interval and now - due >= interval:  # a whole frame behind: skip, don't burst
                missed = int((now - due) / interval)
                tick += missed
                self.report.late += missed
                continue
            if window and not await self._wait_window(window, due + interval if interval else None):
                self.report.late += 1
                tick += 1
                continue
            if self.connection_over:
                return
            captured = await loop.run_in_executor(pool, self._capture)
            if captured is None:
                return  # the source has ended
            await self._send(ws, captured)
            tick += 1

    def _should_stop(self) -> bool:
        o = self.opts
        return ((self.stop is not None and self.stop.is_set()) or self.connection_over
                or (o.max_frames is not None and self.sent.total >= o.max_frames))

    async def _wait(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; True if ``stop`` was set meanwhile."""
        if self.stop is None:
            await asyncio.sleep(delay)
            return False
        try:
            await asyncio.wait_for(self.stop.wait(), delay)
        except TimeoutError:
            return False
        return True

    async def _wait_window(self, size: int, until: float | None) -> bool:
        """Wait until fewer than ``size`` results are outstanding; False if ``until`` passes."""
        while len(self.outstanding) >= size and not self.connection_over \
                and self.has_worker is not False:
            now = time.monotonic()
            oldest = next(iter(self.outstanding.values()))
            if now - oldest >= self.opts.in_flight_timeout:
                self.outstanding.pop(next(iter(self.outstanding)))
                self.report.unanswered += 1
                continue
            limit = oldest + self.opts.in_flight_timeout
            if until is not None:
                if now >= until:
                    return False
                limit = min(limit, until)
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, limit - now))
            except TimeoutError:
                pass
        return True

    def _capture(self) -> _Captured | None:
        """Read and encode one frame (runs in the capture thread)."""
        raw = self.source.read()
        mono, wall = time.monotonic(), time.time()
        if raw is None:
            return None
        if raw is not self._last_raw or self._last_encoded is None:
            img = resize_rgb(raw, *self.opts.resize) if self.opts.resize else raw
            height, width = img.shape[:2]
            self._last_encoded = (encode_image(img, self.opts.format, self.opts.quality), width, height)
            self._last_raw = raw  # a static source hands back the same array: encode it once
        payload, width, height = self._last_encoded
        return _Captured(payload, width, height, wall, mono)

    async def _send(self, ws: ClientConnection, c: _Captured) -> None:
        o = self.opts
        seq = self.sent.total
        if o.legacy:
            data: str | bytes = encode_control(legacy_image_message(o.format, c.payload, c.wall))
        else:
            data = encode_frame(Frame(channel=o.channel, seq=seq, timestamp=c.wall, width=c.width,
                                      height=c.height, format=o.format, payload=c.payload))
        if o.receive and self.has_worker is not False:
            self.outstanding[seq] = c.mono
        await ws.send(data)
        if o.legacy and seq == 0 and o.params is not None:
            # a seed-002 connection is registered by its first image: params only after it
            await ws.send(_params_text(o.params))
        self.sent.add()
        self.report.bytes_sent += len(data)
        self.report.width, self.report.height = c.width, c.height

    async def _drain(self) -> None:
        """Wait (bounded) for the results and acks of the frames already sent."""
        end = time.monotonic() + self.opts.drain_timeout
        while self._expecting():
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                return

    def _expecting(self) -> bool:
        """Whether results or acks may still come (none do with no worker on the channel)."""
        results = bool(self.outstanding) and self.has_worker is not False
        acks = self.opts.legacy and self.report.acks < self.sent.total
        return (results or acks) and not self.connection_over

    def _finish(self) -> ProducerReport:
        r = self.report
        r.sent = self.sent.total
        r.received = self.received.total
        r.unanswered += len(self.outstanding)
        self.outstanding.clear()
        r.latency_ms = percentiles_ms(list(self.latencies))
        return r

    # -- receiving ----------------------------------------------------------

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    try:
                        frame = decode_frame(message)
                    except ProtocolError as exc:
                        self._error("bad_message", f"undecodable frame from the relay: {exc}")
                        continue
                    if frame.kind is FrameKind.OUTPUT:
                        self._result(frame)
                else:
                    self._control(message)
        except ConnectionClosed as exc:
            if not self.report.closed and exc.rcvd is not None and exc.rcvd.code != 1000:
                self.report.closed = _close_reason(exc)
        finally:
            self.connection_over = True
            self.changed.set()

    def _result(self, frame: Frame) -> None:
        now = time.monotonic()
        self.received.add()
        started = self.outstanding.pop(frame.seq, None)
        if started is not None:
            self.latencies.append(now - started)
        while self.outstanding:
            oldest = next(iter(self.outstanding))
            if oldest >= frame.seq:
                break
            del self.outstanding[oldest]
            self.report.dropped += 1
        self.changed.set()
        if self.on_result is not None:
            self.on_result(frame)

    def _control(self, text: str) -> None:
        try:
            message = decode_relay_message(text)
        except UnknownMessageType:
            return  # a newer relay's addition
        except ProtocolError as exc:
            if exc.code is ErrorCode.BAD_IMAGE:
                self._error("bad_image", f"undecodable image message from the relay: {exc}")
            else:
                self._error("bad_message", f"unparseable text from the relay: {text[:80]!r} ({exc})")
            return
        self._on_message(message)

    def _on_message(self, message: RelayMessage) -> None:
        match message:
            case Ack():
                self.report.acks += 1
                self.changed.set()
            case LegacyResult(kind="output"):
                self._legacy_result(message)
            case Error():
                self._error(message.code.value, message.message)
            case Shutdown():
                self.report.closed = f"relay shutting down: {message.message}".strip()
            case ParamsAck():
                self.report.params_version = message.version
            case Status(state=ChannelState.ASSIGNED):
                self.has_worker = True
            case Status(state=ChannelState.WAITING_FOR_WORKER):
                self.has_worker = False  # frames in flight went to a worker that is gone, or nowhere
                self.report.unanswered += len(self.outstanding)
                self.outstanding.clear()
                self.changed.set()
                self._warn_once("no_worker", "no worker serves channel %s yet: frames are dropped "
                                "until one joins", message.channel)
            case Report(event=ReportEvent.ERROR):
                self._error("engine_error", message.message)

    def _legacy_result(self, message: LegacyResult) -> None:
        try:
            fmt, width, height = probe_image(message.data)
        except ProtocolError as exc:
            self._error("bad_image", f"undecodable image message from the relay: {exc}")
            return
        seq = message.seq if message.seq is not None else self.received.total
        frame = Frame(channel=message.channel or self.opts.channel, seq=seq,
                      timestamp=message.timestamp or time.time(), width=width, height=height,
                      format=fmt, payload=message.data, kind=FrameKind.OUTPUT)
        self._result(frame)

    def _error(self, code: str, message: str) -> None:
        self.report.errors[code] = self.report.errors.get(code, 0) + 1
        self.report.last_error = message
        self._warn_once(code, "relay error %s: %s", code, message)

    def _warn_once(self, key: str, fmt: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(fmt, *args)

    def _progress_line(self, seconds: float) -> str:
        r = self.report
        line = (f"sent {self.sent.delta() / seconds:5.1f} fps | received "
                f"{self.received.delta() / seconds:5.1f} fps | dropped {r.dropped} | late {r.late}")
        recent = list(self.latencies)[-100:]
        if recent:
            line += f" | rtt p50 {percentiles_ms(recent)['p50']} ms"
        return line


def _params_text(params: dict[str, Any]) -> str:
    return encode_control(Params(params=params).model_dump(include={"type", "params"}))


def _close_reason(exc: ConnectionClosed) -> str:
    if exc.rcvd is not None:
        return f"closed by the relay ({exc.rcvd.code} {exc.rcvd.reason})".strip()
    return "connection lost"
