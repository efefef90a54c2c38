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

A connection that ends before the run does (the relay restarts: it says
``shutdown`` first; or the socket is lost) is opened again on the same
channel, with the same params, for up to ``reconnect`` seconds, trying again
after 0.25, 0.5, 1, 2, 2... s (:func:`producers.net.retrying`); sending
resumes on a fresh schedule and the report counts the reconnects. Frames
awaiting results on the lost connection count as unanswered. When the relay
stays away the report's ``closed`` says why (the command exits 1).
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
from producers.net import (
    DEFAULT_RECONNECT,
    DEFAULT_RELAY,
    ConnectError,
    Relays,
    open_legacy,
    open_relay,
    retrying,
)
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
    #: seconds to keep trying to reach the relay, at start and after the connection ends
    #: early (a relay restart); 0: one try, and a lost connection ends the run.
    reconnect: float = DEFAULT_RECONNECT


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
    #: round trip per result (p50, p90, p99, max); values are None when no result came back.
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    #: why the run ended early: the connection ended (relay shut down, socket lost) and
    #: could not be opened again within ``reconnect`` seconds; else None.
    closed: str | None = None
    params_version: int | None = None
    #: times the connection was opened again after the relay went away.
    reconnects: int = 0

    @property
    def send_fps(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def receive_fps(self) -> float:
        return self.received / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.update(
            send_fps=round(self.send_fps, 2),
            receive_fps=round(self.receive_fps, 2),
            elapsed=round(self.elapsed, 3),
        )
        return data

    def summary(self) -> str:
        lines = [
            (
                f"sent {self.sent} frames ({self.width}x{self.height}, "
                f"{self.bytes_sent / 1e6:.1f} MB) in {self.elapsed:.1f} s: {self.send_fps:.1f} fps"
            ),
            (
                f"received {self.received} results: {self.receive_fps:.1f} fps; dropped "
                f"{self.dropped}, unanswered {self.unanswered}, late ticks {self.late}"
            ),
        ]
        if self.acks:
            lines.append(f"acks {self.acks}")
        if any(v is not None for v in self.latency_ms.values()):
            lines.append("round trip ms: " + " ".join(f"{k} {v}" for k, v in self.latency_ms.items()))
        if self.errors:
            lines.append(
                "relay errors: "
                + ", ".join(f"{k} x{v}" for k, v in self.errors.items())
                + f" (last: {self.last_error})"
            )
        if self.reconnects:
            lines.append(f"reconnected to the relay {self.reconnects} time(s)")
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


async def run_producer(
    source: Source,
    options: ProducerOptions,
    *,
    stop: asyncio.Event | None = None,
    on_result: Callable[[Frame], None] | None = None,
) -> ProducerReport:
    """Stream ``source`` to the relay until it ends, ``options`` limits, or ``stop`` is set.

    Raises :class:`producers.net.ConnectError` when the relay cannot be reached
    (within ``options.reconnect`` seconds) or refuses the producer;
    :class:`producers.sources.SourceError` from the source propagates. The caller
    owns (and closes) ``source``. ``on_result`` sees every result frame.
    """
    return await _Producer(source, options, stop, on_result).run()


class _Producer:
    def __init__(
        self,
        source: Source,
        options: ProducerOptions,
        stop: asyncio.Event | None,
        on_result: Callable[[Frame], None] | None,
    ) -> None:
        self.source = source
        self.opts = options
        self.relays = Relays(options.relay)
        self.stop = stop
        self.on_result = on_result
        self.report = ProducerReport()
        self.sent = Rate()
        self.received = Rate()
        self.outstanding: dict[int, float] = {}  # seq -> capture time, in seq order
        # counted unanswered while a result may still come (no worker said, or timed out): a
        # late result moves it back to received
        self.written_off: dict[int, float] = {}
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.changed = asyncio.Event()  # a result, an ack or the end of the connection
        self.connection_over = False
        self.has_worker: bool | None = None  # from the relay's status messages; None: not told
        # per connection: why it ended (None while up, or when we closed it) and our own close
        self.lost: str | None = None
        self.closing = False
        self.session_sent = 0
        self.session_base = 0  # frames sent before this connection
        self.awaiting_acks = 0  # legacy mode: frames sent on this connection not acked yet
        self.started = 0.0
        self.deadline: float | None = None
        self.sending_ended: float | None = None
        self._last_raw: np.ndarray | None = None
        self._last_encoded: tuple[bytes, int, int] | None = None
        self._warned: set[str] = set()

    # -- the run ------------------------------------------------------------

    async def run(self) -> ProducerReport:
        o = self.opts
        self.started = time.monotonic()
        self.deadline = self.started + o.duration if o.duration is not None else None
        ws = await retrying(self._open, o.reconnect, self.stop)
        if ws is None:
            raise ConnectError(f"stopped before the relay at {self.relays.current} answered")
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture")
        try:
            async with every_second(self._progress_line if o.progress else None):
                while ws is not None:
                    lost = await self._session(ws, pool)
                    ws = await self._reconnect(lost) if lost is not None else None
        finally:
            self.report.elapsed = (self.sending_ended or time.monotonic()) - self.started
            # a read may still run after a cancel: let it end before the caller closes the source
            pool.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(pool.shutdown, True), 2.0)
        return self._finish()

    async def _open(self, timeout: float) -> ClientConnection:
        return await self.relays.open(self._open_url, timeout)

    async def _open_url(self, url: str, timeout: float) -> ClientConnection:
        o = self.opts
        receive = Receive.OUTPUT if o.receive else Receive.NONE
        if o.legacy:
            return await open_legacy(url, o.channel, o.token, receive, timeout=timeout)
        ws, _welcome = await open_relay(
            url, Role.PRODUCER, o.channel, o.token, timeout=timeout, receive=receive, name=o.name
        )
        return ws

    async def _session(self, ws: ClientConnection, pool: ThreadPoolExecutor) -> str | None:
        """Send on one connection until the run is over (None) or the connection is (why)."""
        o = self.opts
        self.connection_over, self.closing, self.lost = False, False, None
        self.has_worker, self.session_sent, self.awaiting_acks = None, 0, 0
        self.session_base = self.sent.total
        receiver = asyncio.create_task(self._receive(ws))
        try:
            if o.params is not None and not o.legacy:
                await ws.send(_params_text(o.params))
            if await self._send_loop(ws, pool):
                self.sending_ended = time.monotonic()
                await self._drain()
                if self.connection_over and self.lost:  # the relay went away with results owed
                    self.report.closed = self.lost
                return None
        except ConnectionClosed as exc:
            self.lost = self.lost or _close_reason(exc)
        finally:
            self.closing = True
            await ws.close()
            await receiver
        return self.lost or "the connection to the relay ended"

    async def _reconnect(self, lost: str) -> ClientConnection | None:
        """A new connection after ``lost`` one, within the ``reconnect`` window; None: the run ends."""
        o, r = self.opts, self.report
        r.unanswered += len(self.outstanding)  # their results went with the old connection
        self.outstanding.clear()
        self.written_off.clear()
        window = o.reconnect
        if self.deadline is not None:
            window = min(window, self.deadline - time.monotonic())
        if window <= 0 or self._done():
            r.closed = lost
            return None
        self.relays.lost()
        log.warning("%s; reconnecting to %s (trying for up to %.1f s)", lost, self.relays.current, window)
        try:
            ws = await retrying(self._open, window, self.stop)
        except ConnectError as exc:
            r.closed = f"{lost}; {exc}"
            return None
        if ws is None:
            r.closed = f"{lost}; stopped while reconnecting"
            return None
        r.reconnects += 1
        log.warning("reconnected to %s; sending on channel %s again", self.relays.current, o.channel)
        return ws

    async def _send_loop(self, ws: ClientConnection, pool: ThreadPoolExecutor) -> bool:
        """Send frames on schedule; True when the run is over, False when the connection is."""
        o = self.opts
        loop = asyncio.get_running_loop()
        interval = 1.0 / o.fps if o.fps > 0 else 0.0
        t0 = time.monotonic()
        window = o.max_in_flight if o.receive else 0
        tick = 0
        while not self._should_stop():
            now = time.monotonic()
            due = t0 + tick * interval if interval else now
            if self.deadline is not None and due >= self.deadline:
                return True
            if due > now:
                if await self._wait(due - now):
                    return True
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
                return False
            captured = await loop.run_in_executor(pool, self._capture)
            if captured is None:
                return True  # the source has ended
            await self._send(ws, captured)
            tick += 1
        return self._done()

    def _done(self) -> bool:
        """The run is over: stopped, or ``max_frames`` sent."""
        o = self.opts
        return (self.stop is not None and self.stop.is_set()) or (
            o.max_frames is not None and self.sent.total >= o.max_frames
        )

    def _should_stop(self) -> bool:
        return self._done() or self.connection_over

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
        while len(self.outstanding) >= size and not self.connection_over and self.has_worker is not False:
            now = time.monotonic()
            oldest = next(iter(self.outstanding.values()))
            if now - oldest >= self.opts.in_flight_timeout:
                seq = next(iter(self.outstanding))
                self._write_off({seq: self.outstanding.pop(seq)})
                continue
            limit = oldest + self.opts.in_flight_timeout
            if until is not None:
                if now >= until:
                    return False
                limit = min(limit, until)
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), max(0.0, limit - now))
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
            data = encode_frame(
                Frame(
                    channel=o.channel,
                    seq=seq,
                    timestamp=c.wall,
                    width=c.width,
                    height=c.height,
                    format=o.format,
                    payload=c.payload,
                )
            )
        if o.receive and self.has_worker is not False:
            self.outstanding[seq] = c.mono
        try:
            await ws.send(data)
        except ConnectionClosed:
            self.outstanding.pop(seq, None)  # never sent: the seq goes out on the next connection
            raise
        if o.legacy:
            self.awaiting_acks += 1
            if self.session_sent == 0 and o.params is not None:
                # a seed-002 connection is registered by its first image: params only after it
                await ws.send(_params_text(o.params))
        self.session_sent += 1
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
        acks = self.opts.legacy and self.awaiting_acks > 0
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
        except ConnectionClosed:
            pass
        finally:
            if not self.closing:  # not our own close: the relay went away (``shutdown`` says why first)
                self.lost = self.lost or (
                    _close_reason(ws.close_exc)
                    if ws.close_code is not None
                    else "the connection to the relay ended"
                )
            self.connection_over = True
            self.changed.set()

    def _result(self, frame: Frame) -> None:
        now = time.monotonic()
        self.received.add()
        started = self.outstanding.pop(frame.seq, None)
        if started is None and frame.seq in self.written_off:  # late after all: not unanswered
            started = self.written_off.pop(frame.seq)
            self.report.unanswered -= 1
        for seq in [s for s in self.written_off if s < frame.seq]:  # results come in order: gone
            del self.written_off[seq]
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
                self.awaiting_acks = max(0, self.awaiting_acks - 1)
                self.changed.set()
            case LegacyResult(kind="output"):
                self._legacy_result(message)
            case Error():
                self._error(message.code.value, message.message)
            case Shutdown():  # a restart, maybe: the connection is tried again (``reconnect``)
                self.lost = f"relay shutting down: {message.message}".strip()
            case ParamsAck():
                self.report.params_version = message.version
            case Status(state=ChannelState.ASSIGNED):
                self.has_worker = True
            case Status(state=ChannelState.WAITING_FOR_WORKER):
                self.has_worker = False  # frames in flight went to a worker that is gone, or nowhere
                self._write_off(self.outstanding)
                self.outstanding = {}
                self.changed.set()
                self._warn_once(
                    "no_worker",
                    "no worker serves channel %s yet: frames are dropped until one joins",
                    message.channel,
                )
            case Report(event=ReportEvent.ERROR):
                self._error("engine_error", message.message)

    def _write_off(self, frames: dict[int, float]) -> None:
        self.report.unanswered += len(frames)
        self.written_off.update(frames)
        while len(self.written_off) > LATENCY_SAMPLES:
            del self.written_off[next(iter(self.written_off))]

    def _legacy_result(self, message: LegacyResult) -> None:
        try:
            fmt, width, height = probe_image(message.data)
        except ProtocolError as exc:
            self._error("bad_image", f"undecodable image message from the relay: {exc}")
            return
        # the relay numbers a seed-002 producer's images from 0 on each connection
        seq = self.session_base + message.seq if message.seq is not None else self.received.total
        frame = Frame(
            channel=message.channel or self.opts.channel,
            seq=seq,
            timestamp=message.timestamp or time.time(),
            width=width,
            height=height,
            format=fmt,
            payload=message.data,
            kind=FrameKind.OUTPUT,
        )
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
        line = (
            f"sent {self.sent.delta() / seconds:5.1f} fps | received "
            f"{self.received.delta() / seconds:5.1f} fps | dropped {r.dropped} | late {r.late}"
        )
        recent = list(self.latencies)[-100:]
        if recent:
            line += f" | rtt p50 {percentiles_ms(recent)['p50']} ms"
        return line


def _params_text(params: dict[str, Any]) -> str:
    return encode_control(Params(params=params).model_dump(include={"type", "params"}))


def _close_reason(exc: ConnectionClosed) -> str:
    if exc.rcvd is not None:
        return f"closed by the relay ({exc.rcvd.code} {exc.rcvd.reason})".strip()
    return "connection to the relay lost"
