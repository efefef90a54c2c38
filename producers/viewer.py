"""A viewer: receive a channel's frames and show them, save them, or write an MP4.

The window (SDL through pygame-ce) shows the newest frame only: a slow
display skips frames rather than falling behind. ``--save`` and ``--mp4``
keep every frame received. Disk and MP4 work runs in one helper thread, in
arrival order, so the event loop (and an in-process relay sharing it) is
never blocked by it.

When the relay goes away (it says ``shutdown`` on a restart, or the socket
is lost) the viewer joins the channel again for up to ``reconnect`` seconds,
trying after 0.25, 0.5, 1, 2, 2... s (:func:`producers.net.retrying`); the
window, files and MP4 carry on and the report counts the reconnects. When
the relay stays away the report's ``closed`` says why (the command exits 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from common.percentiles import percentiles_ms
from media.codec import decode_image, resize_rgb
from producers.meter import Rate, every_second
from producers.net import DEFAULT_RECONNECT, DEFAULT_RELAY, ConnectError, Relays, open_relay, retrying
from wire.errors import ProtocolError
from wire.frames import Frame, ImageFormat, decode_frame
from wire.messages import Role

log = logging.getLogger("producers")

LATENCY_SAMPLES = 10_000
HEADLESS_ADVICE = "run headless with --save DIR or --mp4 PATH"
#: the window's size until the first frame sets it
WAITING_SIZE = (480, 270)
#: SDL drivers that show nothing: chosen only when no real display works (unless asked for)
INVISIBLE_DRIVERS = ("offscreen", "dummy")
#: how often the window handles its events when no frame arrives
WINDOW_POLL_S = 0.05
#: MP4 timestamps count this many ticks a second (the usual video clock)
MP4_CLOCK = 90_000
MP4_TIME_BASE = Fraction(1, MP4_CLOCK)
#: a single frame has no rate: it lasts one frame at this rate in the MP4
MP4_SINGLE_FRAME_FPS = 30


class ViewerError(RuntimeError):
    """A local problem the user must fix (no display, unwritable output): no traceback."""


@dataclass
class ViewerOptions:
    relay: str = DEFAULT_RELAY
    channel: str = "default"
    token: str | None = None
    #: "output" (the worker's results), "input" (the producer's raw frames) or "both".
    receive: str = "output"
    #: show a window (needs a display: $DISPLAY or $WAYLAND_DISPLAY on Linux).
    show: bool = True
    #: write every frame's encoded bytes there as ``{seq:08d}.jpg`` (or .png).
    save_dir: Path | None = None
    #: write every frame into this H.264 MP4, stamped with its arrival time.
    mp4: Path | None = None
    max_frames: int | None = None
    duration: float | None = None
    progress: bool = False
    name: str = "viewer"
    #: seconds to keep trying to reach the relay, at start and after the connection ends
    #: early (a relay restart); 0: one try, and a lost connection ends the viewer.
    reconnect: float = DEFAULT_RECONNECT


@dataclass
class ViewerReport:
    frames: int = 0
    saved: int = 0
    mp4_frames: int = 0
    #: the MP4's length: first to last arrival plus the last frame's share.
    mp4_seconds: float = 0.0
    elapsed: float = 0.0
    #: seconds between the first and the last frame's arrival.
    span: float = 0.0
    width: int = 0
    height: int = 0
    #: capture-to-arrival age from the producer's timestamps (same clock only on one machine).
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    #: why the viewer ended early: the connection ended and could not be opened again
    #: within ``reconnect`` seconds; else None.
    closed: str | None = None
    #: times the connection was opened again after the relay went away.
    reconnects: int = 0

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def arrival_fps(self) -> float:
        """The rate while frames came (first to last arrival): the MP4's average rate."""
        return (self.frames - 1) / self.span if self.span > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.update(
            fps=round(self.fps, 2),
            arrival_fps=round(self.arrival_fps, 2),
            elapsed=round(self.elapsed, 3),
            span=round(self.span, 3),
            mp4_seconds=round(self.mp4_seconds, 3),
        )
        return data

    def summary(self) -> str:
        line = (
            f"received {self.frames} frames ({self.width}x{self.height}) in "
            f"{self.elapsed:.1f} s: {self.fps:.1f} fps"
        )
        if self.span > 0:
            line += f"; {self.arrival_fps:.1f} fps from the first to the last"
        lines = [line]
        if self.saved:
            lines.append(f"saved {self.saved} files")
        if self.mp4_frames:
            rate = self.mp4_frames / self.mp4_seconds if self.mp4_seconds > 0 else 0.0
            lines.append(
                f"wrote {self.mp4_frames} frames to the MP4 (H.264): "
                f"{self.mp4_seconds:.2f} s at {rate:.1f} fps on average"
            )
        if any(v is not None for v in self.latency_ms.values()):
            lines.append("age since capture ms: " + " ".join(f"{k} {v}" for k, v in self.latency_ms.items()))
        if self.errors:
            lines.append("relay errors: " + ", ".join(f"{k} x{v}" for k, v in self.errors.items()))
        if self.reconnects:
            lines.append(f"reconnected to the relay {self.reconnects} time(s)")
        if self.closed:
            lines.append(f"connection ended: {self.closed}")
        return "\n".join(lines)


def check_display() -> None:
    """Raise :class:`ViewerError` when this Linux session has no display to open a window on."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        raise ViewerError(
            f"no display to show a window on ($DISPLAY and $WAYLAND_DISPLAY are not set); {HEADLESS_ADVICE}"
        )


def draw_label(rgb: np.ndarray, text: str) -> None:
    """Write ``text`` in the top-left corner, white on a black outline (readable on any image)."""
    for color, thickness in (((0, 0, 0), 4), ((255, 255, 255), 1)):
        cv2.putText(rgb, text, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, color, thickness, cv2.LINE_AA)


def labelled(frame: Frame, text: str) -> np.ndarray | None:
    """The frame decoded with ``text`` drawn on it; None when it does not decode.

    Pure NumPy/OpenCV work, so it can run off the event loop."""
    try:
        rgb = decode_image(frame.payload, frame.format)
    except ProtocolError:
        return None
    if not (rgb.flags.writeable and rgb.flags.c_contiguous):
        rgb = np.ascontiguousarray(rgb).copy()
    draw_label(rgb, text)
    return rgb


def fit(width: int, height: int, box_w: int, box_h: int) -> tuple[int, int]:
    """The largest size with the frame's aspect that fits the box (at least 1x1)."""
    scale = min(box_w / width, box_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class Window:
    """An SDL window (pygame-ce) showing RGB frames, letterboxed when resized.

    pygame is imported here, not at module import: headless viewers never load
    SDL. All calls must come from the thread that opened it (SDL's rule; the
    event loop's thread, which is the main thread under ``asyncio.run``).
    """

    def __init__(self, title: str) -> None:
        check_display()
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame

        self.pg = pygame
        try:
            pygame.display.init()
            invisible = pygame.display.get_driver() in INVISIBLE_DRIVERS
            if invisible and not os.environ.get("SDL_VIDEODRIVER"):
                raise pygame.error(
                    f"no display answered; SDL fell back to its {pygame.display.get_driver()} driver"
                )
            pygame.display.set_mode(WAITING_SIZE, pygame.RESIZABLE)
        except pygame.error as exc:
            pygame.display.quit()
            raise ViewerError(f"cannot open a window ({exc}); {HEADLESS_ADVICE}") from None
        pygame.display.set_caption(title)
        self.frame_size = (0, 0)
        self.pixels: np.ndarray | None = None  # keeps the buffer under ``image`` alive
        self.image: Any = None
        waiting = np.zeros((WAITING_SIZE[1], WAITING_SIZE[0], 3), np.uint8)
        draw_label(waiting, "waiting for frames")
        self._set_image(waiting)
        self.draw()

    def show(self, rgb: np.ndarray) -> None:
        """Show a frame; a new frame size refits the window (within the desktop)."""
        height, width = rgb.shape[:2]
        if (width, height) != self.frame_size:
            self.frame_size = (width, height)
            desk_w, desk_h = self.pg.display.get_desktop_sizes()[0]
            box_w, box_h = int(desk_w * 0.9), int(desk_h * 0.9)
            fits = width <= box_w and height <= box_h
            size = (width, height) if fits else fit(width, height, box_w, box_h)
            self.pg.display.set_mode(size, self.pg.RESIZABLE)
        self._set_image(rgb)
        self.draw()

    def _set_image(self, rgb: np.ndarray) -> None:
        self.pixels = rgb
        self.image = self.pg.image.frombuffer(rgb, (rgb.shape[1], rgb.shape[0]), "RGB")

    def draw(self) -> None:
        screen = self.pg.display.get_surface()
        (sw, sh), (iw, ih) = screen.get_size(), self.image.get_size()
        w, h = fit(iw, ih, sw, sh)
        image = self.image if (w, h) == (iw, ih) else self.pg.transform.smoothscale(self.image, (w, h))
        if (w, h) != (sw, sh):
            screen.fill((0, 0, 0))
        screen.blit(image, ((sw - w) // 2, (sh - h) // 2))
        self.pg.display.flip()

    def closed_by_user(self) -> bool:
        """Handle pending events; True once the window was closed or q / Esc pressed."""
        pg = self.pg
        redraw = False
        for event in pg.event.get():
            if event.type in (pg.QUIT, pg.WINDOWCLOSE):
                return True
            if event.type == pg.KEYDOWN and event.key in (pg.K_q, pg.K_ESCAPE):
                return True
            if event.type in (pg.WINDOWEXPOSED, pg.WINDOWSIZECHANGED, pg.VIDEORESIZE):
                redraw = True
        if redraw:
            self.draw()
        return False

    def close(self) -> None:
        self.pg.display.quit()


def _even(n: int) -> int:
    return max(2, n - n % 2)


class _Mp4:
    """H.264 (yuv420p) in an MP4, each frame stamped with the time it arrived.

    The file lasts as long as the frames took to arrive and its average rate is
    the received rate. A frame's duration is only known when the next one
    comes, so each packet is held back one step; the last frame gets the mean
    interval. No B-frames: packets then leave the encoder in arrival order.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.container: Any = None
        self.stream: Any = None
        self.size = (0, 0)
        self.frames = 0
        self.first = 0.0
        self.last_pts = -1
        self.held: Any = None
        self.end_pts = 0

    @property
    def seconds(self) -> float:
        return self.end_pts / MP4_CLOCK

    def write(self, rgb: np.ndarray, arrival: float) -> None:
        if self.container is None:
            self._open(rgb, arrival)
        pts = max(round((arrival - self.first) * MP4_CLOCK), self.last_pts + 1)
        frame = av.VideoFrame.from_ndarray(self._sized(rgb), format="rgb24")
        frame.pts, frame.time_base = pts, MP4_TIME_BASE
        self._mux(self.stream.encode(frame))
        self.last_pts = pts
        self.frames += 1

    def _open(self, rgb: np.ndarray, arrival: float) -> None:
        """Open at the first frame's size (made even, as yuv420p needs)."""
        self.size = (_even(rgb.shape[1]), _even(rgb.shape[0]))
        self.first = arrival
        try:
            container = av.open(str(self.path), "w", format="mp4")
        except (OSError, av.FFmpegError) as exc:
            raise ViewerError(f"cannot write an MP4 at {self.path}: {exc}") from None
        stream = container.add_stream("libx264")
        stream.width, stream.height = self.size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = MP4_TIME_BASE
        stream.options = {"preset": "veryfast", "bf": "0"}
        self.container, self.stream = container, stream

    def _sized(self, rgb: np.ndarray) -> np.ndarray:
        """Crop an odd row/column away; resize other sizes to the file's."""
        width, height = self.size
        if rgb.shape[1] - width in (0, 1) and rgb.shape[0] - height in (0, 1):
            return np.ascontiguousarray(rgb[:height, :width])
        return resize_rgb(rgb, width, height)

    def _mux(self, packets: list[Any]) -> None:
        for packet in packets:
            if self.held is not None:
                self.held.duration = packet.pts - self.held.pts
                self.container.mux(self.held)
            self.held = packet

    def close(self) -> None:
        """Flush the encoder and finish the file (no file when no frame came)."""
        if self.container is None:
            return
        try:
            self._mux(self.stream.encode(None))
            if self.held is not None:
                last = (
                    self.last_pts // (self.frames - 1)
                    if self.frames > 1
                    else MP4_CLOCK // MP4_SINGLE_FRAME_FPS
                )
                self.held.duration = max(1, last)
                self.end_pts = self.held.pts + self.held.duration
                self.container.mux(self.held)
                self.held = None
        finally:
            self.container.close()
            self.container = None


async def run_viewer(
    options: ViewerOptions,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    on_frame: Callable[[Frame], None] | None = None,
) -> ViewerReport:
    """Receive the channel until ``max_frames``, ``duration``, ``stop``, the relay closes
    or the user closes the window.

    ``ready`` is set once the relay has welcomed the viewer (frames sent from
    then on reach it). Raises :class:`ViewerError` for local problems (checked
    before connecting: the window opens first) and :class:`producers.net.ConnectError`
    when the relay cannot be reached within ``reconnect`` seconds or refuses the viewer.
    """
    o = options
    if o.receive not in ("output", "input", "both"):
        raise ViewerError(f"receive must be output, input or both, not {o.receive!r}")
    _check_outputs(o)
    window = Window(f"{o.channel} - stream viewer") if o.show else None
    relays = Relays(o.relay)
    try:
        ws = await retrying(lambda timeout: _open(o, relays, timeout), o.reconnect, stop)
        if ws is None:
            raise ConnectError(f"stopped before the relay at {relays.current} answered")
    except BaseException:
        if window is not None:
            window.close()
        raise
    if ready is not None:
        ready.set()
    return await _Viewer(o, relays, ws, on_frame, window).run(stop)


async def _open(o: ViewerOptions, relays: Relays, timeout: float) -> ClientConnection:
    async def open_url(url: str, timeout: float) -> ClientConnection:
        ws, _welcome = await open_relay(
            url, Role.VIEWER.value, o.channel, o.token, timeout=timeout, receive=o.receive, name=o.name
        )
        return ws

    return await relays.open(open_url, timeout)


def _check_outputs(o: ViewerOptions) -> None:
    """Fail before connecting when ``--save`` or ``--mp4`` cannot be written."""
    if o.save_dir is not None:
        try:
            o.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ViewerError(f"cannot create {o.save_dir}: {exc.strerror}") from None
    if o.mp4 is not None:
        if not o.mp4.parent.is_dir():
            raise ViewerError(f"cannot write {o.mp4}: directory {o.mp4.parent} does not exist")
        try:
            av.codec.Codec("libx264", "w")
        except (ValueError, av.FFmpegError):
            raise ViewerError("this PyAV has no libx264 encoder to write --mp4 with") from None


class _Viewer:
    def __init__(
        self,
        options: ViewerOptions,
        relays: Relays,
        ws: ClientConnection,
        on_frame: Callable[[Frame], None] | None,
        window: Window | None,
    ) -> None:
        self.opts = options
        self.relays = relays
        self.ws = ws
        self.on_frame = on_frame
        self.window = window
        self.report = ViewerReport()
        self.count = Rate()
        self.arrivals: deque[float] = deque(maxlen=30)
        self.first_arrival: float | None = None
        self.ages: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.mp4 = _Mp4(options.mp4) if options.mp4 is not None else None
        self.latest: Frame | None = None
        self.fresh = asyncio.Event()
        self.done = False
        #: set when the viewer is to end (stop, duration, max_frames, window closed): a
        #: connection closing after it is no loss
        self.finish = asyncio.Event()
        #: why the current connection is ending, as the relay said it (``shutdown``)
        self.lost: str | None = None

    async def run(self, stop: asyncio.Event | None) -> ViewerReport:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="viewer-io")
        closer = asyncio.create_task(self._close_when(stop))
        display = asyncio.create_task(self._display(self.window)) if self.window else None
        try:
            async with every_second(self._progress_line if self.opts.progress else None):
                while (lost := await self._receive(pool)) is not None and await self._reconnect(lost):
                    pass
        finally:
            self.done = True
            self.fresh.set()
            self.report.elapsed = time.monotonic() - started
            closer.cancel()
            await asyncio.gather(closer, return_exceptions=True)
            await self.ws.close()
            if display is not None:
                await asyncio.gather(display, return_exceptions=True)
            if self.mp4 is not None:
                await loop.run_in_executor(pool, self.mp4.close)  # flushing encodes: off the loop
                self.report.mp4_frames = self.mp4.frames
                self.report.mp4_seconds = self.mp4.seconds
            pool.shutdown(wait=True)
        self.report.frames = self.count.total
        self.report.latency_ms = percentiles_ms(list(self.ages))
        return self.report

    async def _close_when(self, stop: asyncio.Event | None) -> None:
        """Close the socket at ``stop`` or after ``duration``: that ends the receive loop."""
        waiter = stop.wait() if stop is not None else asyncio.Event().wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, self.opts.duration)
        await self._end()

    async def _end(self) -> None:
        """End the viewer: no reconnecting from now on, and the receive loop stops."""
        self.finish.set()
        await self.ws.close()

    async def _reconnect(self, lost: str) -> bool:
        """Open the channel again after ``lost`` connection; False when the viewer ends instead."""
        o = self.opts
        self.lost = None
        if o.reconnect <= 0:
            self.report.closed = lost
            return False
        self.relays.lost()
        log.warning(
            "%s; reconnecting to %s (trying for up to %.1f s)", lost, self.relays.current, o.reconnect
        )
        try:
            ws = await retrying(lambda timeout: _open(o, self.relays, timeout), o.reconnect, self.finish)
        except ConnectError as exc:
            self.report.closed = f"{lost}; {exc}"
            return False
        if ws is None:
            self.report.closed = f"{lost}; ended while reconnecting"
            return False
        self.ws = ws
        self.report.reconnects += 1
        log.warning("reconnected to %s; receiving channel %s again", self.relays.current, o.channel)
        return True

    async def _receive(self, pool: ThreadPoolExecutor) -> str | None:
        """Read the current connection; None when the viewer is done, else why the connection ended."""
        loop = asyncio.get_running_loop()
        ws = self.ws
        try:
            async for message in ws:
                if isinstance(message, str):
                    self._control(message)
                    continue
                try:
                    frame = decode_frame(message)
                except ProtocolError as exc:
                    self._error("bad_message", str(exc))
                    continue
                arrival = self._arrived(frame)
                if self.opts.save_dir is not None or self.mp4 is not None:
                    await loop.run_in_executor(pool, self._store, frame, arrival)
                if self.on_frame is not None:
                    self.on_frame(frame)
                if self.opts.max_frames is not None and self.count.total >= self.opts.max_frames:
                    self.finish.set()
                    return None
        except ConnectionClosed:
            pass
        if self.finish.is_set():
            return None
        if self.lost:
            return self.lost
        rcvd = ws.close_exc.rcvd if ws.close_code is not None else None
        if rcvd is None:
            return "connection to the relay lost"
        return f"closed by the relay ({rcvd.code} {rcvd.reason})".strip()

    def _arrived(self, frame: Frame) -> float:
        """Count the frame and return its arrival time (the MP4's clock)."""
        now = time.monotonic()
        if self.first_arrival is None:
            self.first_arrival = now
        self.report.span = now - self.first_arrival
        self.count.add()
        self.arrivals.append(now)
        self.ages.append(max(0.0, time.time() - frame.timestamp))
        self.report.width, self.report.height = frame.width, frame.height
        self.latest = frame
        self.fresh.set()
        return now

    def _store(self, frame: Frame, arrival: float) -> None:
        """Save and/or encode one frame (runs in the I/O thread, in arrival order)."""
        if self.opts.save_dir is not None:
            ext = "jpg" if frame.format is ImageFormat.JPEG else "png"
            suffix = f"_{frame.kind.name.lower()}" if self.opts.receive == "both" else ""
            (self.opts.save_dir / f"{frame.seq:08d}{suffix}.{ext}").write_bytes(frame.payload)
            self.report.saved += 1
        if self.mp4 is not None:
            self.mp4.write(decode_image(frame.payload, frame.format), arrival)

    def _control(self, text: str) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            return
        if not isinstance(msg, dict):
            return
        if msg.get("type") == "error":
            code = str(msg.get("code", "error"))
            self._error(code, str(msg.get("message", "")))
        elif msg.get("type") == "shutdown":  # a restart, maybe: the channel is joined again (``reconnect``)
            self.lost = f"relay shutting down: {msg.get('message', '')}".strip()

    def _error(self, code: str, message: str) -> None:
        if code not in self.report.errors:
            log.warning("relay error %s: %s", code, message)
        self.report.errors[code] = self.report.errors.get(code, 0) + 1

    def _recent_fps(self) -> float:
        if len(self.arrivals) < 2 or time.monotonic() - self.arrivals[-1] > 1.0:
            return 0.0
        return (len(self.arrivals) - 1) / max(1e-6, self.arrivals[-1] - self.arrivals[0])

    async def _display(self, window: Window) -> None:
        """Show the newest frame with an fps overlay; q, Esc or closing the window stops.

        SDL calls stay on this (the loop's) thread, a few milliseconds each;
        decoding and drawing the label run in a worker thread.
        """
        shown: Frame | None = None
        try:
            while not self.done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.fresh.wait(), WINDOW_POLL_S)
                self.fresh.clear()
                if window.closed_by_user():
                    await self._end()  # ends the receive loop: a clean end, like Ctrl-C
                    return
                frame = self.latest
                if frame is None or frame is shown:
                    continue
                shown = frame
                label = f"{self._recent_fps():.1f} fps  #{frame.seq}"
                rgb = await asyncio.to_thread(labelled, frame, label)
                if rgb is not None and not self.done:
                    window.show(rgb)
        finally:
            window.close()

    def _progress_line(self, seconds: float) -> str:
        line = f"received {self.count.delta() / seconds:5.1f} fps | total {self.count.total}"
        if self.ages:
            line += f" | age p50 {percentiles_ms(list(self.ages)[-100:])['p50']} ms"
        return line


if __name__ == "__main__":  # the command is in producers.cli, which imports this module: no cycle back
    print("usage: python -m producers view [options] (or sd-view)", file=sys.stderr)
    sys.exit(2)
