"""A viewer: receive a channel's frames and show them, save them, or write an MP4.

The window shows the newest frame only (a slow display skips frames rather
than falling behind); ``--save`` and ``--mp4`` keep every frame received.
Disk and MP4 work runs in one helper thread, in arrival order, so the event
loop (and an in-process relay sharing it) is never blocked by it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from media.codec import decode_image, resize_rgb
from producers.meter import Rate, every_second, percentiles_ms
from producers.net import DEFAULT_RELAY, open_relay
from wire.errors import ProtocolError
from wire.frames import Frame, ImageFormat, decode_frame
from wire.messages import Role

log = logging.getLogger("producers")

WINDOW = "stream"
LATENCY_SAMPLES = 10_000


class ViewerError(RuntimeError):
    """A local problem the user must fix (no GUI, unwritable output): no traceback."""


@dataclass
class ViewerOptions:
    relay: str = DEFAULT_RELAY
    channel: str = "default"
    token: str | None = None
    #: "output" (the worker's results), "input" (the producer's raw frames) or "both".
    receive: str = "output"
    #: show a window (needs opencv-python with GUI support and a display).
    show: bool = True
    #: write every frame's encoded bytes there as ``{seq:08d}.jpg`` (or .png).
    save_dir: Path | None = None
    #: write every frame into this MP4 (mp4v) at ``fps``.
    mp4: Path | None = None
    fps: float = 30.0
    max_frames: int | None = None
    duration: float | None = None
    progress: bool = False
    name: str = "viewer"


@dataclass
class ViewerReport:
    frames: int = 0
    saved: int = 0
    mp4_frames: int = 0
    elapsed: float = 0.0
    width: int = 0
    height: int = 0
    #: capture-to-arrival age from the producer's timestamps (same clock only on one machine).
    latency_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    closed: str | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.update(fps=round(self.fps, 2), elapsed=round(self.elapsed, 3))
        return data

    def summary(self) -> str:
        lines = [(f"received {self.frames} frames ({self.width}x{self.height}) in "
                  f"{self.elapsed:.1f} s: {self.fps:.1f} fps")]
        if self.saved:
            lines.append(f"saved {self.saved} files")
        if self.mp4_frames:
            lines.append(f"wrote {self.mp4_frames} frames to the MP4")
        if self.latency_ms:
            lines.append("age since capture ms: "
                         + " ".join(f"{k} {v}" for k, v in self.latency_ms.items()))
        if self.errors:
            lines.append("relay errors: " + ", ".join(f"{k} x{v}" for k, v in self.errors.items()))
        if self.closed:
            lines.append(f"connection ended: {self.closed}")
        return "\n".join(lines)


def check_display() -> None:
    """Raise :class:`ViewerError` unless ``cv2.imshow`` can work here."""
    advice = "or run headless with --save DIR or --mp4 PATH"
    if re.search(r"GUI:\s+NONE", cv2.getBuildInformation()):
        raise ViewerError("this OpenCV has no GUI support (opencv-python-headless is installed): "
                          f"pip install opencv-python to show a window, {advice}")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        raise ViewerError(f"no display to show a window on ($DISPLAY is not set): {advice}")
    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
    except cv2.error as exc:
        raise ViewerError(f"cannot open a window ({str(exc).strip().splitlines()[-1]}): "
                          f"pip install opencv-python, {advice}") from None


class _Mp4:
    """An OpenCV mp4v writer opened at the first frame's size; later sizes are resized to it."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, fps
        self.writer: cv2.VideoWriter | None = None
        self.size = (0, 0)
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        if self.writer is None:
            self.size = (rgb.shape[1], rgb.shape[0])
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter.fourcc(*"mp4v"),
                                          self.fps, self.size)
            if not self.writer.isOpened():
                raise ViewerError(f"cannot write an MP4 at {self.path} (mp4v encoder unavailable "
                                  "or the path is not writable)")
        self.writer.write(cv2.cvtColor(resize_rgb(rgb, *self.size), cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


async def run_viewer(options: ViewerOptions, *, ready: asyncio.Event | None = None,
                     stop: asyncio.Event | None = None,
                     on_frame: Callable[[Frame], None] | None = None) -> ViewerReport:
    """Receive the channel until ``max_frames``, ``duration``, ``stop`` or the relay closes.

    ``ready`` is set once the relay has welcomed the viewer (frames sent from
    then on reach it). Raises :class:`ViewerError` for local problems (checked
    before connecting) and :class:`producers.net.ConnectError`.
    """
    o = options
    if o.receive not in ("output", "input", "both"):
        raise ViewerError(f"receive must be output, input or both, not {o.receive!r}")
    if o.show:
        check_display()
    if o.save_dir is not None:
        try:
            o.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ViewerError(f"cannot create {o.save_dir}: {exc.strerror}") from None
    if o.mp4 is not None and not o.mp4.parent.is_dir():
        raise ViewerError(f"cannot write {o.mp4}: directory {o.mp4.parent} does not exist")
    ws, _welcome = await open_relay(o.relay, Role.VIEWER.value, o.channel, o.token,
                                    receive=o.receive, name=o.name)
    if ready is not None:
        ready.set()
    return await _Viewer(o, ws, on_frame).run(stop)


class _Viewer:
    def __init__(self, options: ViewerOptions, ws: ClientConnection,
                 on_frame: Callable[[Frame], None] | None) -> None:
        self.opts = options
        self.ws = ws
        self.on_frame = on_frame
        self.report = ViewerReport()
        self.count = Rate()
        self.arrivals: deque[float] = deque(maxlen=30)
        self.ages: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.mp4 = _Mp4(options.mp4, options.fps) if options.mp4 is not None else None
        self.latest: Frame | None = None
        self.fresh = asyncio.Event()
        self.done = False

    async def run(self, stop: asyncio.Event | None) -> ViewerReport:
        started = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="viewer-io")
        closer = asyncio.create_task(self._close_when(stop))
        window = asyncio.create_task(self._display()) if self.opts.show else None
        try:
            async with every_second(self._progress_line if self.opts.progress else None):
                await self._receive(pool)
        finally:
            self.done = True
            self.fresh.set()
            self.report.elapsed = time.monotonic() - started
            closer.cancel()
            await asyncio.gather(closer, return_exceptions=True)
            await self.ws.close()
            if window is not None:
                await asyncio.gather(window, return_exceptions=True)
            pool.shutdown(wait=True)
            if self.mp4 is not None:
                self.mp4.close()
                self.report.mp4_frames = self.mp4.frames
        self.report.frames = self.count.total
        self.report.latency_ms = percentiles_ms(list(self.ages))
        return self.report

    async def _close_when(self, stop: asyncio.Event | None) -> None:
        """Close the socket at ``stop`` or after ``duration``: that ends the receive loop."""
        waiter = stop.wait() if stop is not None else asyncio.Event().wait()
        try:
            await asyncio.wait_for(waiter, self.opts.duration)
        except TimeoutError:
            pass
        await self.ws.close()

    async def _receive(self, pool: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for message in self.ws:
                if isinstance(message, str):
                    self._control(message)
                    continue
                try:
                    frame = decode_frame(message)
                except ProtocolError as exc:
                    self._error("bad_message", str(exc))
                    continue
                self._arrived(frame)
                if self.opts.save_dir is not None or self.mp4 is not None:
                    await loop.run_in_executor(pool, self._store, frame)
                if self.on_frame is not None:
                    self.on_frame(frame)
                if self.opts.max_frames is not None and self.count.total >= self.opts.max_frames:
                    return
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code not in (1000, 1001):
                self.report.closed = f"closed by the relay ({exc.rcvd.code} {exc.rcvd.reason})"

    def _arrived(self, frame: Frame) -> None:
        now = time.monotonic()
        self.count.add()
        self.arrivals.append(now)
        self.ages.append(max(0.0, time.time() - frame.timestamp))
        self.report.width, self.report.height = frame.width, frame.height
        self.latest = frame
        self.fresh.set()

    def _store(self, frame: Frame) -> None:
        """Save and/or encode one frame (runs in the I/O thread, in arrival order)."""
        if self.opts.save_dir is not None:
            ext = "jpg" if frame.format is ImageFormat.JPEG else "png"
            suffix = f"_{frame.kind.name.lower()}" if self.opts.receive == "both" else ""
            (self.opts.save_dir / f"{frame.seq:08d}{suffix}.{ext}").write_bytes(frame.payload)
            self.report.saved += 1
        if self.mp4 is not None:
            self.mp4.write(decode_image(frame.payload, frame.format))

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
        elif msg.get("type") == "shutdown":
            self.report.closed = f"relay shutting down: {msg.get('message', '')}".strip()

    def _error(self, code: str, message: str) -> None:
        if code not in self.report.errors:
            log.warning("relay error %s: %s", code, message)
        self.report.errors[code] = self.report.errors.get(code, 0) + 1

    def _recent_fps(self) -> float:
        if len(self.arrivals) < 2 or time.monotonic() - self.arrivals[-1] > 1.0:
            return 0.0
        return (len(self.arrivals) - 1) / max(1e-6, self.arrivals[-1] - self.arrivals[0])

    async def _display(self) -> None:
        """Show the newest frame with an fps overlay; q, Esc or closing the window stops."""
        shown: Frame | None = None
        while not self.done:
            try:
                await asyncio.wait_for(self.fresh.wait(), 0.05)  # keep the window responsive
            except TimeoutError:
                pass
            self.fresh.clear()
            frame = self.latest
            if frame is not None and frame is not shown:
                shown = frame
                try:
                    rgb = decode_image(frame.payload, frame.format)
                except ProtocolError:
                    continue
                bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
                label = f"{self._recent_fps():.1f} fps  #{frame.seq}"
                cv2.putText(bgr, label, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 4,
                            cv2.LINE_AA)
                cv2.putText(bgr, label, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 1,
                            cv2.LINE_AA)
                cv2.imshow(WINDOW, bgr)
            key = cv2.waitKey(1) & 0xFF
            closed = cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) < 1
            if key in (ord("q"), 27) or closed:
                await self.ws.close()
                break
        cv2.destroyAllWindows()

    def _progress_line(self, seconds: float) -> str:
        line = f"received {self.count.delta() / seconds:5.1f} fps | total {self.count.total}"
        if self.ages:
            line += f" | age p50 {percentiles_ms(list(self.ages)[-100:])['p50']} ms"
        return line


if __name__ == "__main__":
    from producers.cli import main

    sys.exit(main(["view", *sys.argv[1:]]))
