"""Media glue between aiortc tracks and the relay's JPEG frames.

Two directions, both built so that a slow consumer never builds a backlog:

* ingest: :class:`LatestFrame` reads a received track as fast as aiortc
  decodes it and keeps only the newest frame (aiortc's own receive queue is
  unbounded, so latency would grow whenever conversion is slower than the
  decoder); :func:`api.webrtc.ingest.fitted_jpeg` turns one into the stream's input JPEG.
* playback: :class:`OutputTrack` hands aiortc the newest output frame of a
  channel, time-stamped from a monotonic clock and never sleep-paced (the
  stock ``VideoStreamTrack.next_timestamp`` assumes and enforces 30 fps).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from fractions import Fraction

import av
from aiortc import MediaStreamTrack, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError

from common.slots import AsyncSlot, Closed
from media.codec import decode_image
from relay.local import LocalViewer
from wire.frames import Frame

#: RTP video clock: 90 kHz
VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK)


class LatestFrame:
    """Drain a received track into a one-frame :class:`~common.slots.AsyncSlot`:
    :meth:`get` returns the newest frame.

    ``received`` counts decoded frames, ``dropped`` those replaced before
    anyone took them (the consumer was busy: dropping is the point).
    """

    def __init__(self, track: MediaStreamTrack) -> None:
        self._track = track
        self._slot: AsyncSlot[av.VideoFrame] = AsyncSlot()
        self.received = 0
        self._task = asyncio.create_task(self._run(), name=f"drain-{track.id}")

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    async def _run(self) -> None:
        try:
            while True:
                self._slot.put(await self._track.recv())
                self.received += 1
        except MediaStreamError:
            pass
        finally:
            self._slot.close()

    async def get(self) -> av.VideoFrame:
        """The newest frame not yet taken; ``MediaStreamError`` once the track has ended."""
        try:
            (frame,) = await self._slot.take()
        except Closed:
            raise MediaStreamError from None
        return frame

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def discard(track: MediaStreamTrack) -> None:
    """Consume a track we do not use (a publisher's audio) so its queue stays empty."""
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


class MonotonicPts:
    """90 kHz presentation times from a monotonic clock, strictly increasing.

    Output runs at whatever rate the engine delivers; the receiver's jitter
    buffer plays frames by these times, so they must reflect real spacing.
    """

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._last = -1

    def next(self) -> int:
        pts = int((time.monotonic() - self._start) * VIDEO_CLOCK)
        self._last = max(pts, self._last + 1)
        return self._last


class OutputTrack(VideoStreamTrack):
    """A channel's output frames as a WebRTC video track, newest frame first.

    aiortc's sender calls :meth:`recv` only after the previous frame went out,
    and the viewer's relay slot keeps just the newest frame meanwhile, so a
    slow encoder or network skips frames instead of delaying them.
    """

    def __init__(self, viewer: LocalViewer) -> None:
        super().__init__()
        self._viewer = viewer
        self._frames: AsyncIterator[Frame] = viewer.frames()
        self._pts = MonotonicPts()

    async def recv(self) -> av.VideoFrame:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        try:
            frame = await anext(self._frames)
        except StopAsyncIteration:
            self.stop()
            raise MediaStreamError from None
        rgb = await asyncio.to_thread(decode_image, frame.payload)
        video = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        video.pts = self._pts.next()
        video.time_base = VIDEO_TIME_BASE
        return video

    def stop(self) -> None:
        super().stop()
        self._viewer.close()  # ends the frame iterator; idempotent for the hub
