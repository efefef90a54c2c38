"""The stream-key WebSocket ingest the web page uses when WebRTC is not wanted."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest
import websockets

from media.codec import decode_image
from tests.helpers import input_frame, jpeg
from tests.test_api import api, create, wait_until_ready, worker  # noqa: F401  (fixtures)
from wire.frames import decode_frame


def ws_url(stream: dict) -> str:
    return stream["whip_url"].replace("http://", "ws://").removesuffix("/whip") + "/ws"


async def test_bare_jpeg_and_framed_messages_come_back_processed(api, worker):
    stream = await create(api, prompt="photo negative", width=512, height=512)
    await asyncio.wait_for(wait_until_ready(api, stream["id"]), 15)
    async with websockets.connect(ws_url(stream), compression=None) as ws:
        image = jpeg(512, 512, seed=4)
        await ws.send(image)
        frame = decode_frame(await asyncio.wait_for(ws.recv(), 10))
        got = decode_image(frame.payload).astype(int)
        assert np.abs(got - (255 - decode_image(image).astype(int))).mean() < 10
        await ws.send(input_frame(77, image, "whatever", 512, 512))
        assert decode_frame(await asyncio.wait_for(ws.recv(), 10)).seq == 1  # the stream numbers frames
        await ws.send(b"definitely not an image")
        error = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert error["type"] == "error" and error["code"] == "bad_image"
        await ws.send(image)  # the connection goes on
        assert decode_frame(await asyncio.wait_for(ws.recv(), 10)).kind == 2


async def test_unknown_stream_key_is_refused(api):
    url = str(api.base_url).replace("http://", "ws://") + "/live/video-to-video/stk_nope/ws"
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(url):
            pass
