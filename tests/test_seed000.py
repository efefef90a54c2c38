"""Seed 000's ``/ws`` with a real WebSocket client, a real server and a real filter worker.

The client speaks the seed's protocol: JSON ``{"type", "data"}`` control
messages and binary JPEG frames; it reads strictly "send, then read the
reply", so any unexpected extra message would fail these tests.
"""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from media.codec import decode_image
from tests.api_fixtures import serving_worker
from tests.helpers import jpeg, noise_png, server_config

TIMEOUT = 15.0
SIZE = 512


@pytest.fixture
async def server():
    """(ws URL, app) with an in-process filter worker on the app's relay."""
    app = create_app(server_config("k"))
    async with running(app) as url, serving_worker(app, capacity=4, timeout=TIMEOUT):
        yield url.replace("http://", "ws://") + "/ws", app


def client(url: str):
    return connect(url, compression=None, max_size=None, open_timeout=TIMEOUT)


async def recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def recv_json(ws: ClientConnection) -> dict:
    message = await recv(ws)
    assert isinstance(message, str), f"expected JSON, got {len(message)} bytes"
    return orjson.loads(message)


async def send_json(ws: ClientConnection, message: dict) -> None:
    await ws.send(orjson.dumps(message).decode())


async def processed(ws: ClientConnection) -> tuple[dict, np.ndarray]:
    """A ``processed_frame`` message and the image that must follow it."""
    meta = await recv_json(ws)
    assert meta["type"] == "processed_frame", meta
    data = await recv(ws)
    assert isinstance(data, bytes) and len(data) == meta["data"]["size"]
    return meta["data"], decode_image(data)


async def until(predicate, timeout: float = TIMEOUT) -> None:
    """Poll a condition the server reaches on its own (cleanup after a disconnect)."""

    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(loop(), timeout)


async def test_status_settings_and_frames(server):
    url, app = server
    async with client(url) as ws:
        status = await recv_json(ws)
        assert status["type"] == "status"
        data = status["data"]
        assert data["status"] == "connected" and data["session_id"].startswith("ws000-")
        assert data["settings"]["prompt"] == "flowers" and data["settings"]["width"] == SIZE

        image = jpeg(SIZE, SIZE, seed=3)
        source = decode_image(image).astype(int)
        await ws.send(image)
        meta, cartoon = await processed(ws)
        assert (meta["width"], meta["height"], meta["format"]) == (SIZE, SIZE, "jpeg")
        assert meta["frame_id"] == 0 and meta["processing_time_ms"] >= 0
        assert np.abs(cartoon.astype(int) - source).mean() > 5  # the engine changed it

        await send_json(ws, {"type": "settings", "data": {"prompt": "photo negative", "strength": 0.5}})
        confirm = await recv_json(ws)
        assert confirm["type"] == "settings_updated" and confirm["data"]["success"] is True
        assert confirm["data"]["settings"]["prompt"] == "photo negative"
        assert confirm["data"]["ignored"] == ["strength"]
        version = confirm["data"]["params_version"]

        await ws.send(image)
        meta, inverted = await processed(ws)
        assert meta["frame_id"] == 1 and meta["params_version"] >= version
        assert np.abs(inverted.astype(int) - (255 - source)).mean() < 10

        await send_json(ws, {"type": "settings", "data": {"prompt": "photo negative"}})
        again = await recv_json(ws)  # unchanged settings are confirmed without a new version
        assert again["type"] == "settings_updated" and again["data"]["params_version"] == version

        await ws.send(noise_png(64, 48))  # PNG input, any size: the result is the session's size
        meta, _ = await processed(ws)
        assert (meta["width"], meta["height"]) == (SIZE, SIZE)
        channel = data["session_id"]
        assert channel in services(app).relay.hub.channels
    await until(lambda: channel not in services(app).relay.hub.channels)  # released on disconnect


@pytest.mark.parametrize(
    ("message", "code", "field"),
    [
        ("{not json", "bad_json", None),
        ("[1, 2]", "bad_message", None),
        ('{"data": {}}', "bad_message", None),
        ('{"type": "play", "data": {}}', "unknown_type", None),
        ('{"type": "settings", "data": {"guidance_scale": 99}}', "invalid_settings", "guidance_scale"),
        ('{"type": "settings", "data": {"prompt": 5}}', "invalid_settings", "prompt"),
        ('{"type": "settings", "data": {"width": 768}}', "invalid_settings", "width"),
        ('{"type": "settings", "data": "prompt"}', "invalid_settings", None),
        (b"definitely not an image", "bad_image", None),
        (b"\xff\xd8\xff\xe0 truncated jpeg", "bad_image", None),
    ],
)
async def test_bad_messages_get_an_error_and_the_connection_goes_on(server, message, code, field):
    url, _app = server
    async with client(url) as ws:
        assert (await recv_json(ws))["type"] == "status"
        await ws.send(message)
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["data"]["code"] == code, reply
        assert reply["data"]["message"]
        if code == "invalid_settings":
            assert reply["data"]["field"] == field
        await ws.send(jpeg(SIZE, SIZE, seed=1))
        meta, _ = await processed(ws)
        assert meta["width"] == SIZE


async def test_a_fast_sender_gets_the_newest_frames_not_a_backlog(server):
    url, _app = server
    async with client(url) as ws:
        await recv_json(ws)
        frames = [jpeg(SIZE, SIZE, seed=s) for s in range(30)]
        for frame in frames:  # no waiting between frames
            await ws.send(frame)
        ids = []
        while not ids or ids[-1] != len(frames) - 1:
            meta, _ = await processed(ws)
            ids.append(meta["frame_id"])
        assert ids == sorted(set(ids))  # in order, none twice, the last one always processed


async def test_sessions_are_independent(server):
    url, _app = server
    async with client(url) as a, client(url) as b:
        ida = (await recv_json(a))["data"]["session_id"]
        idb = (await recv_json(b))["data"]["session_id"]
        assert ida != idb
        await send_json(a, {"type": "settings", "data": {"prompt": "negative"}})
        assert (await recv_json(a))["type"] == "settings_updated"
        image = jpeg(SIZE, SIZE, seed=5)
        source = decode_image(image).astype(int)
        await a.send(image)
        await b.send(image)
        _, out_a = await processed(a)
        _, out_b = await processed(b)
        assert np.abs(out_a.astype(int) - (255 - source)).mean() < 10
        assert np.abs(out_b.astype(int) - (255 - source)).mean() > 40  # b keeps its own prompt


async def test_frames_without_a_worker_get_an_error():
    app = create_app(server_config("k"))
    async with running(app) as url, client(url.replace("http://", "ws://") + "/ws") as ws:
        status = await recv_json(ws)
        assert status["data"]["engine_state"] == "waiting_for_worker"
        await ws.send(jpeg(SIZE, SIZE))
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["data"]["code"] == "waiting_for_worker"
        await send_json(ws, {"type": "settings", "data": {"prompt": "sepia"}})
        assert (await recv_json(ws))["data"]["settings"]["prompt"] == "sepia"  # kept for the worker


async def test_an_oversized_frame_gets_an_error_naming_the_limit_then_a_close():
    app = create_app(server_config("k", relay={"max_frame_bytes": 64 * 1024}))
    async with running(app) as url, client(url.replace("http://", "ws://") + "/ws") as ws:
        await recv_json(ws)  # connected
        await ws.send(b"\xff" * (64 * 1024 + 1))
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["data"]["code"] == "frame_too_large"
        assert reply["data"]["max_frame_bytes"] == 64 * 1024 and "65536" in reply["data"]["message"]
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd.code == 1009


async def test_a_full_server_tells_the_newcomer_its_place_and_serves_it_when_a_slot_frees(server):
    """4 worker slots, half for anonymous sessions: two /ws clients are served at once, the third
    waits, knows why, and is served as soon as one leaves."""
    url, _app = server
    async with client(url) as a, client(url) as b:
        for ws in (a, b):
            assert "queue_position" not in (await recv_json(ws))["data"]
        image = jpeg(SIZE, SIZE, seed=2)
        await a.send(image)
        await b.send(image)
        await processed(a)
        await processed(b)  # both served at once, each its own session
        async with client(url) as c:
            hello = (await recv_json(c))["data"]
            assert hello["engine_state"] == "waiting_for_worker"
            assert (hello["queue_position"], hello["slots_in_use"], hello["slots"]) == (1, 2, 2)
            await c.send(image)
            refused = (await recv_json(c))["data"]
            assert refused["code"] == "waiting_for_worker" and refused["queue_position"] == 1
            assert refused["message"] == "waiting for a slot: 2 of 2 in use (1st in the queue); frame dropped"
            await a.close()
            ready = (await recv_json(c))["data"]
            assert ready["status"] == "ready"
            await c.send(image)
            meta, _ = await processed(c)
            assert meta["width"] == SIZE


@pytest.mark.parametrize("frame_first", [True, False], ids=["after-a-frame", "first-frame-late"])
async def test_an_idle_released_session_gets_a_worker_back_with_its_next_frame(frame_first):
    """No input for ``relay.idle_release_s`` gives the worker back; the next frame must bring one
    again and be processed (it was once dropped as ``waiting_for_worker`` forever)."""
    app = create_app(server_config("k", relay={"idle_release_s": 0.2}))
    async with running(app) as url, serving_worker(app, capacity=4, timeout=TIMEOUT):
        hub = services(app).hub
        async with client(url.replace("http://", "ws://") + "/ws") as ws:
            session = (await recv_json(ws))["data"]["session_id"]
            image = jpeg(SIZE, SIZE, seed=3)
            if frame_first:
                await ws.send(image)
                await processed(ws)
            await until(lambda: hub.channels[session].idle and hub.channels[session].worker is None)
            for _ in range(2):  # served again, and it stays served
                await ws.send(image)
                meta, _ = await processed(ws)
                assert meta["width"] == SIZE
            assert hub.channels[session].worker is not None
