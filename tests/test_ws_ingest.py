"""The stream-key WebSocket ingest the web page uses when WebRTC is not wanted."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import orjson
import pytest
import websockets

from api.server.services import services
from media.codec import decode_image
from tests.api_fixtures import eventually
from tests.helpers import input_frame, jpeg
from tests.test_api import api, create, wait_until_ready, worker  # noqa: F401  (fixtures)
from wire.frames import FrameKind, decode_frame


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


async def test_delete_ends_the_ingest_socket_and_frees_the_worker(api, worker):
    """DELETE while a client streams: no result after it, an error naming the end, close 1001,
    and the worker slot free again (it used to stay taken, results flowing, until the client left)."""
    stream = await create(api, prompt="photo negative", width=512, height=512)
    sid = stream["id"]
    await asyncio.wait_for(wait_until_ready(api, sid), 15)
    async with websockets.connect(ws_url(stream), compression=None) as ws:
        image = jpeg(512, 512, seed=4)
        await ws.send(image)
        assert decode_frame(await asyncio.wait_for(ws.recv(), 10)).kind == FrameKind.OUTPUT
        assert (await api.get("/health")).json()["capacity"]["used"] == 1
        assert (await api.delete(f"/v1/streams/{sid}")).status_code == 200
        after: list[str | bytes] = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:  # keep streaming as a client that did not notice would
                    with contextlib.suppress(websockets.ConnectionClosed):  # read what came first
                        await ws.send(image)
                    after.append(await ws.recv())
                    assert sum(isinstance(m, bytes) for m in after) <= 1, "results after the DELETE"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    error = orjson.loads(after[-1])
    assert error["type"] == "error" and error["code"] == "unknown_channel" and "ended" in error["message"]
    health = (await api.get("/health")).json()
    assert health["capacity"]["used"] == 0
    hub = services(api.app).relay.hub
    assert sid not in hub.channels and all(sid not in w.assigned for w in hub.workers)
    await eventually(lambda: sid not in worker.pipelines, what="the worker to release the channel")


async def test_a_stream_that_ended_while_the_socket_opened_is_not_brought_back(api):
    stream = await create(api)
    services(api.app).streams.by_stream_key(stream["stream_key"]).ended.set()  # as DELETE does first
    hub = services(api.app).relay.hub
    async with websockets.connect(ws_url(stream), compression=None) as ws:
        error = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert error["code"] == "unknown_channel" and closed.value.rcvd.code == 1001
    assert not hub.channels[stream["id"]].producers  # the session never joined the channel


async def next_error(ws: websockets.ClientConnection) -> dict:
    """The next ``error`` message, past the status messages the session sends as well."""
    async with asyncio.timeout(10):
        while (message := orjson.loads(await ws.recv()))["type"] != "error":
            pass
    return message


async def test_text_gets_an_error_and_an_oversized_frame_an_error_then_close_1009(api):
    stream = await create(api, prompt="photo negative", width=512, height=512)
    async with websockets.connect(ws_url(stream), compression=None) as ws:
        await ws.send('{"type": "params"}')
        assert (await next_error(ws))["code"] == "bad_message"  # and the connection goes on
        await ws.send(b"\xff" * (9 * 2**20))
        error = await next_error(ws)
        assert error["code"] == "frame_too_large" and str(8 * 2**20) in error["message"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
