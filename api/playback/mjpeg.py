"""MJPEG playback: a stream's newest output JPEGs as ``multipart/x-mixed-replace``.

Works in any ``<img src>``, no player needed. Frames are relayed as the
engine made them (no re-encode) unless ``quality`` asks for one; ``max_fps``
caps the rate by waiting between parts while the relay's one-frame slot
keeps only the newest, so skipped frames are never queued.

The response watches for the client's disconnect itself: Starlette's
``StreamingResponse`` notices it only when a write fails, and a stream with
no new output never writes, which would leave its relay viewer behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.server.errors import not_found
from api.server.services import services
from common.tasks import first_done
from media.codec import decode_image, encode_image
from relay.hub import Hub
from relay.local import LocalViewer
from wire.frames import Frame, ImageFormat

router = APIRouter(tags=["mjpeg"])

BOUNDARY = "frame"
MEDIA_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"


def part(jpeg: bytes) -> bytes:
    """One multipart part: boundary, headers, the JPEG."""
    head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n").encode()
    return head + jpeg + b"\r\n"


def _jpeg(frame: Frame, quality: int | None) -> bytes:
    """The frame as JPEG: its own bytes when possible, else decoded and encoded (in a thread)."""
    rgb = decode_image(frame.payload, frame.format)
    return encode_image(rgb, ImageFormat.JPEG, quality if quality is not None else 85)


class MjpegStream:
    """Async iterator of multipart parts from a channel's output.

    The relay viewer joins at construction (so frames from then on count)
    and leaves in :meth:`aclose`, which is safe to call whether or not
    iteration ever started.
    """

    def __init__(
        self, hub: Hub, channel: str, quality: int | None = None, max_fps: float | None = None
    ) -> None:
        self.viewer = LocalViewer(hub, channel)
        self.quality = quality
        self.interval = 1.0 / max_fps if max_fps else 0.0
        self.sent = 0
        self._parts = self._generate()

    def __aiter__(self) -> MjpegStream:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._parts)

    async def _generate(self) -> AsyncIterator[bytes]:
        async for frame in self.viewer.frames():
            taken = time.monotonic()
            if self.quality is None and frame.format == ImageFormat.JPEG:
                payload = frame.payload
            else:
                payload = await asyncio.to_thread(_jpeg, frame, self.quality)
            yield part(payload)
            self.sent += 1
            if self.interval:
                # at most one part per interval; meanwhile the viewer's slot keeps the newest frame
                await asyncio.sleep(max(0.0, taken + self.interval - time.monotonic()))

    async def aclose(self) -> None:
        self.viewer.close()
        with contextlib.suppress(RuntimeError):  # already running elsewhere: the close ends it
            await self._parts.aclose()


def mjpeg_stream(
    hub: Hub, channel: str, quality: int | None = None, max_fps: float | None = None
) -> MjpegStream:
    """The reusable generator (also behind seed 001's ``GET /api/stream/{userId}``)."""
    return MjpegStream(hub, channel, quality, max_fps)


class MjpegResponse(StreamingResponse):
    """Streams an :class:`MjpegStream` until it ends or the client goes away, then closes it."""

    def __init__(self, stream: MjpegStream, headers: dict[str, str] | None = None) -> None:
        super().__init__(
            stream,
            media_type=MEDIA_TYPE,
            headers={
                "Cache-Control": "no-cache, no-store, must-revalidate",
                "Pragma": "no-cache",
                "X-Accel-Buffering": "no",
                "Access-Control-Allow-Origin": "*",
                **(headers or {}),
            },
        )
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in self.stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            results = await first_done(pump(), disconnected())
        finally:
            await self.stream.aclose()
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, OSError):
                raise result  # a write to a gone client raises OSError: that is just the end


@router.get("/live/video-to-video/{playback_id}/mjpeg", response_class=StreamingResponse)
async def mjpeg(
    playback_id: str,
    request: Request,
    quality: int | None = Query(default=None, ge=1, le=100, description="re-encode at this JPEG quality"),
    max_fps: float | None = Query(
        default=None, gt=0, le=120, description="at most this many frames a second"
    ),
) -> MjpegResponse:
    """The stream's output as MJPEG: ``<img src=".../mjpeg">``."""
    found = services(request)
    stream = found.streams.by_playback_id(playback_id)
    if stream is None:
        raise not_found()
    return MjpegResponse(mjpeg_stream(found.hub, stream.channel, quality, max_fps))
