"""MJPEG playback over real HTTP: parts, sizes, re-encoding, rate cap, validation, clean disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from api.playback.mjpeg import mjpeg_stream
from api.server.services import services
from media.codec import decode_image, encode_image
from relay.local import LocalProducer
from tests.api_fixtures import api, create_stream, eventually, multipart_parts, worker  # noqa: F401

COLOR = (200, 60, 30)
WIDTH, HEIGHT = 384, 448


@contextlib.asynccontextmanager
async def producing(api, channel: str) -> AsyncIterator[LocalProducer]:
    """Feed the channel flat-colour 320x240 input frames at about 30 fps until the block ends."""
    producer = LocalProducer(services(api.app).relay.hub, channel)
    rgb = np.empty((240, 320, 3), np.uint8)
    rgb[:] = COLOR
    payload = encode_image(rgb)

    async def feed() -> None:
        while True:
            producer.publish(payload, 320, 240)
            await asyncio.sleep(1 / 30)  # the source's frame rate, not synchronisation

    task = asyncio.create_task(feed())
    try:
        yield producer
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        producer.close()


def viewers(api, channel: str) -> int:
    found = services(api.app).relay.hub.channels.get(channel)
    return len(found.viewers) if found else 0


async def read_parts(api, url: str, count: int) -> tuple[list[bytes], dict[str, str]]:
    parts: list[bytes] = []
    async with api.stream("GET", url) as response:
        assert response.status_code == 200
        async for body in multipart_parts(response):
            parts.append(body)
            if len(parts) == count:
                break
        return parts, dict(response.headers)


async def test_parts_are_inverted_frames_at_stream_size(api, worker):
    stream = await create_stream(api, width=WIDTH, height=HEIGHT)
    url = stream["mjpeg_url"]
    assert url.endswith(f"/live/video-to-video/{stream['output_playback_id']}/mjpeg")
    async with producing(api, stream["id"]):
        parts, headers = await read_parts(api, url, 3)
        assert headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
        assert "no-cache" in headers["cache-control"]
        for body in parts:
            rgb = decode_image(body)
            assert rgb.shape == (HEIGHT, WIDTH, 3)
            assert np.all(np.abs(rgb.reshape(-1, 3).mean(axis=0) - (255 - np.array(COLOR))) < 8)
        await eventually(lambda: viewers(api, stream["id"]) == 0, 5, "the viewer to leave")

        low, _ = await read_parts(api, f"{url}?quality=5", 2)
        assert decode_image(low[-1]).shape == (HEIGHT, WIDTH, 3)
        assert len(low[-1]) < len(parts[-1])  # re-encoded at quality 5
        await eventually(lambda: viewers(api, stream["id"]) == 0, 5, "the viewer to leave")


async def test_max_fps_caps_the_rate(api, worker):
    stream = await create_stream(api)
    async with producing(api, stream["id"]):
        await read_parts(api, stream["mjpeg_url"], 1)  # the pipeline is warm
        started = time.monotonic()
        parts, _ = await read_parts(api, f"{stream['mjpeg_url']}?max_fps=5", 4)
        elapsed = time.monotonic() - started
    assert len(parts) == 4
    assert elapsed >= 3 * 0.2 * 0.95, elapsed  # three gaps of at least 1/5 s


@pytest.mark.parametrize(
    "query",
    ["quality=0", "quality=101", "quality=x", "max_fps=0", "max_fps=-1", "max_fps=121", "max_fps=fast"],
)
async def test_validation(api, query):
    stream = await create_stream(api)
    response = await api.get(f"{stream['mjpeg_url']}?{query}")
    assert response.status_code == 422
    body = response.json()
    assert body["success"] is False and body["code"] == "REQUEST/VALIDATION"
    assert query.split("=")[0] in body["error"]
    assert viewers(api, stream["id"]) == 0


async def test_unknown_playback_id(api):
    response = await api.get("/live/video-to-video/nope/mjpeg")
    assert response.status_code == 404 and response.json()["code"] == "STREAMS/NOT_FOUND"


async def test_disconnect_without_frames_frees_the_viewer(api):
    """No worker, no output: the response never writes, yet a disconnect must end it."""
    stream = await create_stream(api)
    async with api.stream("GET", stream["mjpeg_url"]) as response:
        assert response.status_code == 200
        assert viewers(api, stream["id"]) == 1
    await eventually(lambda: viewers(api, stream["id"]) == 0, 5, "the viewer to leave")


async def test_generator_closes_without_being_started(api):
    stream = await create_stream(api)
    parts = mjpeg_stream(services(api.app).relay.hub, stream["id"], quality=50, max_fps=10)
    assert viewers(api, stream["id"]) == 1
    await parts.aclose()
    assert viewers(api, stream["id"]) == 0
    with pytest.raises(StopAsyncIteration):
        await anext(parts)
