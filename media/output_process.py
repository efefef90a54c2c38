"""Publish a relay channel's output as H.264: pushed over RTMP, or written as HLS files.

    python -m media.output_process --relay ws://127.0.0.1:8765 --channel cam1 \\
        --rtmp rtmp://live.example.com/app/KEY      # or: --hls /tmp/hls/cam1

Why a process of its own: FFmpeg's network output can hold the GIL while it
connects and closes, which froze a server sharing the process (see
../shared/media-notes.md). :class:`OutputProcess` runs it for the API.

Inside, the event loop only receives frames into a one-slot mailbox (the
newest frame wins) and an encoder thread decodes and encodes. Timing:

* RTMP, variable rate: a frame is encoded when it arrives, pts = milliseconds
  since the connection opened (bumped by 1 on a collision); after 1 s with no
  new frame the last picture is repeated so the ingest server does not time
  out; a keyframe is forced at least every second.
* HLS, constant rate: the encoder ticks at ``--fps``, repeating the last
  picture when input is slower and dropping frames when it is faster; GOP =
  ``fps * hls_time`` so every segment is ``hls_time`` long.

The output size is the first frame's (rounded down to even); later frames of
another size are scaled to it. A failed RTMP target is retried with backoff,
dropping frames meanwhile; so is a lost relay. SIGTERM/SIGINT flush and close
the container and exit 0. With ``--status`` one JSON line per event goes to
stdout (``ready``, ``relay_connected``, ``publishing``, ``error``, ``relay_error``,
``stopped``); logs go to stderr. The RTMP URL and the relay token may come
from the environment (:data:`ENV_RTMP`, :data:`ENV_TOKEN`) to keep them out of ``ps``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from common.logs import setup_logging
from media import hls, rtmp
from media.codec import decode_image
from relay.client import RelayRefused, connect
from wire.errors import ProtocolError
from wire.frames import Frame, FrameKind, decode_frame

log = logging.getLogger("media.output")

ENV_RTMP = "OUTPUT_RTMP_URL"
ENV_TOKEN = "OUTPUT_RELAY_TOKEN"
KEYFRAME_EVERY = 1.0  # s: RTMP keyframe at least this often, whatever the input rate
REPEAT_AFTER = 1.0  # s: RTMP repeats the last picture after this long without a frame
BACKOFF = (0.5, 10.0)  # s: first and longest wait before retrying the target or the relay


@dataclass
class Options:
    relay: str
    channel: str
    token: str | None = None
    rtmp: str | None = None
    hls: Path | None = None
    fps: float = 30.0
    hls_time: float = 1.0
    hls_list_size: int = 6
    status: bool = False
    #: exit when stdin closes: the parent (the API) died without stopping us.
    watch_stdin: bool = False
    #: a connect, write or close blocked this long kills the process (a hung server).
    stall_timeout: float = 20.0


_status_lock = threading.Lock()


def emit(options: Options, event: str, **fields: Any) -> None:
    """Write one JSON status line to stdout (for :class:`OutputProcess`) when asked to."""
    if not options.status:
        return
    with _status_lock, contextlib.suppress(BrokenPipeError, ValueError):
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Kill the process if the block takes longer than ``seconds``.

    faulthandler's timer is a C thread that needs no GIL, so it fires even
    when FFmpeg blocks in a network call while holding the GIL.
    """
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class Mailbox:
    """One slot between the relay reader and the encoder thread: the newest frame wins."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._count = 0
        self.closed = False

    def put(self, frame: Frame) -> None:
        with self._cond:
            self._frame, self._count = frame, self._count + 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_newer(self, seen: int, timeout: float) -> tuple[int, Frame | None]:
        """The newest frame once there is one after ``seen``, or the current one at timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._count != seen or self.closed, timeout)
            return self._count, self._frame

    def sleep(self, timeout: float) -> None:
        """Wait ``timeout`` seconds (the encoder's pacing), waking at once when closed."""
        with self._cond:
            self._cond.wait_for(lambda: self.closed, timeout)


class Sink:
    """One open container with one H.264 stream; pts given in ``time_base`` units, kept increasing."""

    def __init__(self, target: str, fmt: str, size: tuple[int, int], rate: Fraction,
                 time_base: Fraction, gop: int, codec_options: dict[str, str],
                 container_options: dict[str, str] | None = None) -> None:
        self.size, self.time_base = size, time_base
        self.container = av.open(target, "w", format=fmt, container_options=container_options or {})
        try:
            stream = self.container.add_stream("libx264", rate=rate, options=codec_options)
            stream.width, stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
            stream.codec_context.gop_size = gop
            stream.codec_context.max_b_frames = 0
        except BaseException:
            self.container.close()
            raise
        self.stream = stream
        self.started = time.monotonic()
        self.last_pts = -1
        self.frames = 0

    def write(self, rgb: np.ndarray, keyframe: bool = False) -> None:
        """Encode and mux one picture at the clock's pts (connects on the first call for RTMP)."""
        pts = max(round((time.monotonic() - self.started) / self.time_base), self.last_pts + 1)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(*self.size, "yuv420p")
        frame.pts, frame.time_base = pts, self.time_base
        if keyframe:
            frame.pict_type = av.video.frame.PictureType.I
        self.container.mux(self.stream.encode(frame))
        self.last_pts = pts
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and write the trailer (HLS: the final playlist)."""
        try:
            if self.frames:
                self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()


class Encoder:
    """The encoder thread: takes frames from the mailbox and keeps a :class:`Sink` open."""

    def __init__(self, options: Options, mailbox: Mailbox) -> None:
        self.opts, self.mailbox = options, mailbox
        self.rate = Fraction(options.fps).limit_denominator(1001)
        self.sink: Sink | None = None
        self.retry_at = 0.0
        self.backoff = BACKOFF[0]
        self.last_key = 0.0
        self.exit_code = 0
        self.label = rtmp.mask_url(options.rtmp) if options.rtmp else str(options.hls)

    def run(self) -> None:
        """Encode until the mailbox closes; an unexpected error sets ``exit_code`` 1."""
        try:
            self._loop()
        except Exception:
            log.exception("the encoder failed")
            self.exit_code = 1
        finally:
            self._close()

    def _loop(self) -> None:
        constant = self.opts.hls is not None
        period = 1.0 / self.opts.fps
        seen, decoded, picture = 0, None, None
        tick = time.monotonic()
        while not self.mailbox.closed:
            if constant:
                tick += period
                delay = tick - time.monotonic()
                if delay < -period:  # fell behind: skip ticks (the clock's pts leave a gap)
                    tick = time.monotonic()
                self.mailbox.sleep(max(0.0, delay))
                seen, frame = self.mailbox.wait_newer(seen, 0)
            else:
                seen, frame = self.mailbox.wait_newer(seen, REPEAT_AFTER)
            if self.mailbox.closed or frame is None:
                continue
            if frame is not decoded:
                decoded = frame
                try:
                    picture = decode_image(frame.payload, frame.format)
                except ProtocolError as exc:
                    log.warning("skipping frame %d: %s", frame.seq, exc)
                    continue
            if picture is not None:
                self._publish(picture)

    def _publish(self, picture: np.ndarray) -> None:
        now = time.monotonic()
        if now < self.retry_at:
            return  # waiting before a retry: drop the frame
        try:
            with watchdog(self.opts.stall_timeout):
                if self.sink is None:
                    self.sink = self._open(picture)
                    self.last_key = 0.0
                keyframe = self.opts.rtmp is not None and now - self.last_key >= KEYFRAME_EVERY
                self.sink.write(picture, keyframe)
        except (OSError, av.FFmpegError) as exc:
            self._failed(exc)
            return
        if keyframe:
            self.last_key = now
        if self.sink.frames == 1:
            log.info("publishing %dx%d to %s", *self.sink.size, self.label)
            emit(self.opts, "publishing", target=self.label, width=self.sink.size[0],
                 height=self.sink.size[1])
            self.backoff = BACKOFF[0]

    def _open(self, picture: np.ndarray) -> Sink:
        height, width = picture.shape[:2]
        size = (max(2, width - width % 2), max(2, height - height % 2))
        if self.opts.rtmp is not None:
            rtmp.probe(self.opts.rtmp, timeout=min(5.0, self.opts.stall_timeout))
            return Sink(self.opts.rtmp, rtmp.FORMAT, size, self.rate, Fraction(1, 1000),
                        max(1, round(self.opts.fps * 2)), rtmp.codec_options())
        assert self.opts.hls is not None
        options = hls.container_options(self.opts.hls, self.opts.hls_time, self.opts.hls_list_size)
        return Sink(str(self.opts.hls / hls.PLAYLIST), hls.FORMAT, size, self.rate, 1 / self.rate,
                    max(1, round(self.opts.fps * self.opts.hls_time)), hls.codec_options(), options)

    def _failed(self, exc: BaseException) -> None:
        if self.opts.rtmp is not None:
            message = rtmp.describe_error(self.opts.rtmp, exc)
        else:
            message = f"writing HLS into {self.opts.hls} failed: {exc}"
        log.error("%s; retrying in %.1f s", message, self.backoff)
        emit(self.opts, "error", message=message, retry_in=self.backoff)
        self._close()
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF[1])

    def _close(self) -> None:
        sink, self.sink = self.sink, None
        if sink is None:
            return
        try:
            with watchdog(self.opts.stall_timeout):
                sink.close()
        except (OSError, av.FFmpegError) as exc:
            log.info("closing %s: %s", self.label, exc)


async def read_relay(options: Options, mailbox: Mailbox) -> None:
    """Receive the channel's output frames into ``mailbox`` forever, reconnecting with backoff."""
    delay = BACKOFF[0]
    while True:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel (SIGTERM) that lands
            # as the connection is refused, and this loop would outlive the stop
            async with asyncio.timeout(10):
                ws, _ = await connect(options.relay, "viewer", options.channel, options.token,
                                      receive="output", name="output", max_queue=4)
        except RelayRefused as exc:
            problem = f"the relay refused the output viewer: {exc}"
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            problem = f"cannot connect to the relay at {options.relay}: {exc or type(exc).__name__}"
        else:
            delay = BACKOFF[0]
            emit(options, "relay_connected", channel=options.channel)
            try:
                async for message in ws:
                    if isinstance(message, bytes):
                        with contextlib.suppress(ProtocolError):
                            frame = decode_frame(message)
                            if frame.kind is FrameKind.OUTPUT:
                                mailbox.put(frame)
                problem = "the relay closed the connection"
            except ConnectionClosed as exc:
                problem = f"lost the relay connection: {exc}"
            finally:
                await ws.close()
        log.warning("%s; reconnecting in %.1f s", problem, delay)
        emit(options, "relay_error", message=problem, retry_in=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, BACKOFF[1])


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Block until stdin reaches EOF (the parent died or closed it), then stop."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):  # raw fd: a buffered reader's lock aborts the interpreter at exit
            pass
    loop.call_soon_threadsafe(stop.set)


async def run(options: Options) -> int:
    """Publish until SIGTERM/SIGINT (or stdin EOF, or an encoder crash); return the exit code."""
    if options.hls is not None:
        hls.prepare_dir(options.hls)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    mailbox = Mailbox()
    encoder = Encoder(options, mailbox)

    def encode() -> None:
        encoder.run()
        loop.call_soon_threadsafe(stop.set)

    thread = threading.Thread(target=encode, name="encoder", daemon=True)
    thread.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if options.watch_stdin:
        threading.Thread(target=_watch_stdin, args=(loop, stop), name="stdin", daemon=True).start()
    emit(options, "ready", pid=os.getpid())
    reader = asyncio.create_task(read_relay(options, mailbox))
    await stop.wait()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    mailbox.close()
    await asyncio.to_thread(thread.join)
    emit(options, "stopped", code=encoder.exit_code)
    return encoder.exit_code


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m media.output_process", description=__doc__.split("\n")[0])
    p.add_argument("--relay", required=True, help="relay WebSocket URL, ws://host:port")
    p.add_argument("--channel", required=True, help="the channel whose output to publish")
    p.add_argument("--token", default=os.environ.get(ENV_TOKEN), help=f"relay token (or ${ENV_TOKEN})")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--rtmp", default=os.environ.get(ENV_RTMP),
                        help=f"push to rtmp[s]://host/app/key (or ${ENV_RTMP})")
    target.add_argument("--hls", type=Path, help="write DIR/index.m3u8 and its segments")
    p.add_argument("--fps", type=float, default=30.0, help="RTMP: GOP hint; HLS: the output frame rate")
    p.add_argument("--hls-time", type=float, default=1.0, help="HLS segment length, seconds")
    p.add_argument("--hls-list-size", type=int, default=6, help="segments listed in the playlist")
    p.add_argument("--status", action="store_true", help="JSON status lines on stdout")
    p.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    p.add_argument("--stall-timeout", type=float, default=20.0,
                   help="exit when a network write blocks this long")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.hls is not None:
        a.rtmp = None
    if (a.rtmp is None) == (a.hls is None):
        p.error(f"give one of --rtmp URL (or ${ENV_RTMP}) or --hls DIR")
    if a.rtmp is not None:
        try:
            rtmp.validate_rtmp_url(a.rtmp)
        except rtmp.TargetError as exc:
            p.error(str(exc))
    if a.fps <= 0 or a.hls_time < 1 or a.hls_list_size < 1 or a.stall_timeout <= 0:
        p.error("--fps and --stall-timeout must be > 0, --hls-time and --hls-list-size >= 1")
    setup_logging("info" if a.verbose else None)
    return Options(relay=a.relay, channel=a.channel, token=a.token, rtmp=a.rtmp, hls=a.hls, fps=a.fps,
                   hls_time=a.hls_time, hls_list_size=a.hls_list_size, status=a.status,
                   watch_stdin=a.watch_stdin, stall_timeout=a.stall_timeout)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


class OutputProcess:
    """Runs one output process for the API and restarts it (with backoff) when it dies.

    State comes from the child's status lines: ``publishing`` once its first
    packet went out; ``last_error`` is the latest failure, kept after a
    recovery (``publishing`` says whether it recovered). The RTMP URL and the
    relay token travel in the environment, not argv, so ``ps`` shows no stream key.
    """

    def __init__(self, relay_url: str, channel: str, *, rtmp_url: str | None = None,
                 hls_dir: Path | None = None, token: str | None = None, fps: float = 30.0,
                 hls_time: float = 1.0, hls_list_size: int = 6, verbose: bool = False,
                 restart_delay: float = 1.0, max_restart_delay: float = 30.0,
                 stop_timeout: float = 5.0, stall_timeout: float = 20.0) -> None:
        if (rtmp_url is None) == (hls_dir is None):
            raise ValueError("give exactly one of rtmp_url and hls_dir")
        if rtmp_url is not None:
            rtmp.validate_rtmp_url(rtmp_url)
        if hls_time < 1 or hls_list_size < 1 or fps <= 0:
            raise ValueError("hls_time (players need a target duration >= 1 s) and hls_list_size "
                             "must be >= 1, fps > 0")
        self.relay_url, self.channel, self.token = relay_url, channel, token
        self.rtmp_url, self.hls_dir = rtmp_url, hls_dir
        self.fps, self.hls_time, self.hls_list_size = fps, hls_time, hls_list_size
        self.verbose = verbose
        self.restart_delay, self.max_restart_delay = restart_delay, max_restart_delay
        self.stop_timeout, self.stall_timeout = stop_timeout, stall_timeout
        self.target = rtmp.mask_url(rtmp_url) if rtmp_url else str(hls_dir)
        self.ready = False  # the child's signal handlers are installed (SIGTERM before: exit -15)
        self.publishing = False
        self.last_error: str | None = None
        self.restarts = 0
        self.returncode: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()

    @property
    def running(self) -> bool:
        """Whether the child process is alive now."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def state(self) -> dict[str, Any]:
        """For the API's stream status."""
        return {"target": self.target, "running": self.running, "publishing": self.publishing,
                "last_error": self.last_error, "restarts": self.restarts}

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "media.output_process", "--relay", self.relay_url,
               "--channel", self.channel, "--fps", f"{self.fps:g}", "--stall-timeout", f"{self.stall_timeout:g}",
               "--status", "--watch-stdin"]
        if self.hls_dir is not None:
            cmd += ["--hls", str(self.hls_dir), "--hls-time", f"{self.hls_time:g}",
                    "--hls-list-size", str(self.hls_list_size)]
        return cmd + (["-v"] if self.verbose else [])

    async def start(self) -> None:
        """Start the child (returns once it is spawned) and its supervisor."""
        if self._task is not None:
            return
        self._stopping.clear()
        await self._spawn()
        self._task = asyncio.create_task(self._supervise())
        if self._stopping.is_set():  # stop() ran while we spawned, before there was a child to stop
            await self.stop()

    async def stop(self) -> None:
        """SIGTERM the child, SIGKILL it after ``stop_timeout``, and stop restarting it."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning("output process %d ignored SIGTERM for %.0f s: killing it",
                            proc.pid, self.stop_timeout)
                proc.kill()
                await proc.wait()
        if self._task is not None:
            await self._task
            self._task = None
        await self._notify()

    async def wait_for(self, predicate: Callable[[OutputProcess], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds (re-checked at every state change); False at timeout."""
        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))
        try:
            await asyncio.wait_for(check(), timeout)
        except TimeoutError:
            return False
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _spawn(self) -> None:
        env = dict(os.environ)  # the package is installed: ``-m`` finds it without PYTHONPATH
        env.pop(ENV_RTMP, None)
        env.pop(ENV_TOKEN, None)
        if self.rtmp_url is not None:
            env[ENV_RTMP] = self.rtmp_url
        if self.token:
            env[ENV_TOKEN] = self.token
        self.ready = self.publishing = False
        self.returncode = None
        self._proc = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            start_new_session=True)  # a terminal's Ctrl-C reaches the API, which stops us
        await self._notify()

    async def _supervise(self) -> None:
        delay = self.restart_delay
        while True:
            proc = self._proc
            assert proc is not None and proc.stdout is not None
            started = time.monotonic()
            async for line in proc.stdout:
                await self._on_status(line)
            self.returncode = await proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
            self.ready = self.publishing = False
            if self._stopping.is_set():
                return
            if time.monotonic() - started > 60:
                delay = self.restart_delay
            self.last_error = (f"output process for {self.target} exited with code "
                               f"{self.returncode}; restarting in {delay:.1f} s")
            log.warning("%s", self.last_error)
            await self._notify()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            delay = min(delay * 2, self.max_restart_delay)
            self.restarts += 1
            try:
                await self._spawn()
            except OSError as exc:
                self.last_error = f"cannot start the output process: {exc}"
                log.error("%s", self.last_error)
                return

    async def _on_status(self, line: bytes) -> None:
        try:
            status = json.loads(line)
        except ValueError:
            return
        event = status.get("event")
        if event == "ready":
            self.ready = True
        elif event == "publishing":
            self.publishing = True
        elif event in ("error", "relay_error"):
            if event == "error":  # the target failed; a lost relay leaves RTMP repeating frames
                self.publishing = False
            self.last_error = str(status.get("message", event))
        await self._notify()


if __name__ == "__main__":
    sys.exit(main())
