"""The output process: publish a relay channel's output as H.264, pushed over RTMP or written as HLS.

    python -m media.output_encoder --relay ws://127.0.0.1:8765 --channel cam1 \\
        --rtmp rtmp://live.example.com/app/KEY      # or: --hls /tmp/hls/cam1

Why a process of its own: FFmpeg's network output can hold the GIL while it
connects and closes, which froze a server sharing the process (see
../shared/media-notes.md). :class:`~media.output_process.OutputProcess`
runs and supervises it for the API; :mod:`media.output_options` holds its
options and their checks.

Inside, the event loop only receives frames into a one-frame
:class:`~common.slots.ThreadSlot` (the newest frame wins) and an encoder
thread decodes and encodes. Timing:

* RTMP, variable rate: a frame is encoded when it arrives, pts = milliseconds
  since the connection opened (bumped by 1 on a collision); after 1 s with no
  new frame the last picture is repeated so the ingest server does not time
  out; a keyframe is forced at least every second.
* HLS, constant rate: the encoder ticks at ``--fps``, repeating the last
  picture when input is slower and dropping frames when it is faster; GOP =
  ``fps * hls_time`` so every segment is ``hls_time`` long.

The output size is the frame's (rounded down to even). When frames of another
size arrive (a stream resized, another input) the container is closed and a
new one opened at the new size, on the same clock so timestamps keep rising:
RTMP reconnects, so the server and its players get a new stream header;
HLS continues the playlist after a discontinuity (:mod:`media.hls`). Nothing
is ever scaled to an old size. A failed RTMP target is retried with backoff,
dropping frames meanwhile; so is a lost relay. SIGTERM/SIGINT flush and close
the container and exit 0. With ``--status`` one JSON line per event goes to
stdout (``ready``, ``relay_connected``, ``publishing`` (again after a size
change, with the new size), ``error``, ``relay_error``, ``stopped``); logs go
to stderr. The RTMP URL and the relay token may come from the environment
(:data:`~media.output_options.ENV_RTMP`, :data:`~media.output_options.ENV_TOKEN`)
to keep them out of ``ps``.
"""

from __future__ import annotations

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
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from common.logs import setup_logging
from common.slots import Closed, ThreadSlot
from media import hls, rtmp
from media.codec import decode_image
from media.output_options import Options, parse_args
from relay.client import RelayRefused, connect
from wire.errors import ProtocolError
from wire.frames import Frame, FrameKind, decode_frame

log = logging.getLogger("media.output")

KEYFRAME_EVERY = 1.0  # s: RTMP keyframe at least this often, whatever the input rate
REPEAT_AFTER = 1.0  # s: RTMP repeats the last picture after this long without a frame
BACKOFF = (0.5, 10.0)  # s: first and longest wait before retrying the target or the relay


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


class Sink:
    """One open container with one H.264 stream; pts given in ``time_base`` units, kept increasing."""

    def __init__(
        self,
        target: str,
        fmt: str,
        size: tuple[int, int],
        rate: Fraction,
        time_base: Fraction,
        gop: int,
        codec_options: dict[str, str],
        container_options: dict[str, str] | None = None,
        epoch: float | None = None,
    ) -> None:
        """``epoch``: the monotonic time of pts 0 (a previous sink's, to keep timestamps rising)."""
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
        self.started = time.monotonic() if epoch is None else epoch
        self.last_pts = -1
        self.frames = 0

    def write(self, rgb: np.ndarray, keyframe: bool = False) -> None:
        """Encode and mux one picture at the clock's pts (connects on the first call for RTMP)."""
        pts = max(round((time.monotonic() - self.started) / self.time_base), self.last_pts + 1)
        width, height = self.size
        rgb = rgb[:height, :width]  # an odd side loses its last pixel: H.264 4:2:0 needs even sides
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
            format="yuv420p"
        )
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
    """The encoder thread: takes frames from the slot and keeps a :class:`Sink` open."""

    def __init__(self, options: Options, frames: ThreadSlot[Frame]) -> None:
        self.opts, self.frames = options, frames
        self.rate = Fraction(options.fps).limit_denominator(1001)
        self.sink: Sink | None = None
        self.retry_at = 0.0
        self.backoff = BACKOFF[0]
        self.last_key = 0.0
        #: pts 0 of every sink this process opens: timestamps rise across reopenings
        self.epoch: float | None = None
        self.exit_code = 0
        self.label = rtmp.mask_url(options.rtmp) if options.rtmp else str(options.hls)

    def run(self) -> None:
        """Encode until the slot closes; an unexpected error sets ``exit_code`` 1."""
        try:
            self._loop()
        except Closed:
            pass
        except Exception:
            log.exception("the encoder failed")
            self.exit_code = 1
        finally:
            self._close()

    def _loop(self) -> None:
        """Publish the newest picture: at each tick (HLS), or as frames come and every
        ``REPEAT_AFTER`` without one (RTMP); returns or raises :class:`Closed` when closed."""
        constant = self.opts.hls is not None
        period = 1.0 / self.opts.fps
        picture: np.ndarray | None = None
        tick = time.monotonic()
        while True:
            if constant:
                tick += period
                delay = tick - time.monotonic()
                if delay < -period:  # fell behind: skip ticks (the clock's pts leave a gap)
                    tick = time.monotonic()
                if self.frames.wait_closed(max(0.0, delay)):
                    return
                frames = self.frames.take(timeout=0)
            else:
                frames = self.frames.take(timeout=REPEAT_AFTER)
            if frames:  # one at most: the slot holds the newest frame only
                frame = frames[-1]
                try:
                    picture = decode_image(frame.payload, frame.format)
                except ProtocolError as exc:
                    log.warning("skipping frame %d: %s", frame.seq, exc)
                    continue
            if picture is not None:  # nothing new: the last picture again
                self._publish(picture)

    def _publish(self, picture: np.ndarray) -> None:
        now = time.monotonic()
        if now < self.retry_at:
            return  # waiting before a retry: drop the frame
        try:
            with watchdog(self.opts.stall_timeout):
                if self.sink is not None and self.sink.size != even_size(picture):
                    self._resized(self.sink.size, even_size(picture))
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
            emit(
                self.opts, "publishing", target=self.label, width=self.sink.size[0], height=self.sink.size[1]
            )
            self.backoff = BACKOFF[0]

    def _resized(self, old: tuple[int, int], new: tuple[int, int]) -> None:
        """Close the sink made for ``old``; the caller opens one for ``new`` (a new RTMP stream
        header, a new HLS muxer continuing the playlist)."""
        log.info("the picture went from %dx%d to %dx%d: reopening %s", *old, *new, self.label)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.close()

    def _open(self, picture: np.ndarray) -> Sink:
        size = even_size(picture)
        if self.epoch is None:
            self.epoch = time.monotonic()
        if self.opts.rtmp is not None:
            rtmp.probe(self.opts.rtmp, timeout=min(5.0, self.opts.stall_timeout))
            return Sink(
                self.opts.rtmp,
                rtmp.FORMAT,
                size,
                self.rate,
                Fraction(1, 1000),
                max(1, round(self.opts.fps * 2)),
                rtmp.codec_options(),
                epoch=self.epoch,
            )
        assert self.opts.hls is not None
        options = hls.container_options(self.opts.hls, self.opts.hls_time, self.opts.hls_list_size)
        return Sink(
            str(self.opts.hls / hls.PLAYLIST),
            hls.FORMAT,
            size,
            self.rate,
            1 / self.rate,
            max(1, round(self.opts.fps * self.opts.hls_time)),
            hls.codec_options(),
            options,
            epoch=self.epoch,
        )

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


def even_size(picture: np.ndarray) -> tuple[int, int]:
    """``(width, height)`` of ``picture`` rounded down to even (at least 2), as H.264 4:2:0 needs."""
    height, width = picture.shape[:2]
    return max(2, width - width % 2), max(2, height - height % 2)


async def read_relay(options: Options, frames: ThreadSlot[Frame]) -> None:
    """Receive the channel's output frames into ``frames`` forever, reconnecting with backoff."""
    delay = BACKOFF[0]
    while True:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel (SIGTERM) that lands
            # as the connection is refused, and this loop would outlive the stop
            async with asyncio.timeout(10):
                ws, _ = await connect(
                    options.relay,
                    "viewer",
                    options.channel,
                    options.token,
                    receive="output",
                    name="output",
                    max_queue=4,
                )
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
                                frames.put(frame)
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
    frames: ThreadSlot[Frame] = ThreadSlot()
    encoder = Encoder(options, frames)

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
    reader = asyncio.create_task(read_relay(options, frames))
    await stop.wait()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    frames.close()
    await asyncio.to_thread(thread.join)
    emit(options, "stopped", code=encoder.exit_code)
    return encoder.exit_code


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv, description=__doc__.split("\n")[0])
    setup_logging("info" if options.verbose else None)
    return asyncio.run(run(options))


if __name__ == "__main__":
    sys.exit(main())
