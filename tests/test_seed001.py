"""Seed 001's protocol with real clients: the ``/api/ws/{userId}`` frame loop as its
frontend runs it, ``/api/settings``, ``/api/queue`` and the ``/api/stream`` MJPEG,
over a real server with a real filter worker.

The WebSocket client reads strictly in the seed's order (``connected``,
``send_frame``, then one ``send_frame`` per frame it sent), so an extra or
missing status fails the test.
"""

from __future__ import annotations

import asyncio
import io
import uuid

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from api.seeds.settings001 import Seed001Options
from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from media.codec import decode_image, encode_image
from tests.api_fixtures import serving_worker
from tests.helpers import jpeg, server_config
from wire.frames import ImageFormat

TIMEOUT = 15.0
SIZE = 512
MAX_QUEUE = 2
SEND_FRAME = {"status": "send_frame"}


class Server:
    def __init__(self, app, url: str, http: httpx.AsyncClient) -> None:
        self.app, self.url, self.http = app, url, http

    def ws(self, user_id: str, mode: str | None = "image"):
        query = f"?mode={mode}" if mode else ""
        return connect(
            f"{self.url.replace('http://', 'ws://')}/api/ws/{user_id}{query}",
            compression=None,
            max_size=None,
            open_timeout=TIMEOUT,
        )


@pytest.fixture
async def server():
    app = create_app(server_config("k", server={"max_queue_size": MAX_QUEUE}))
    async with (
        running(app) as url,
        serving_worker(app, capacity=4, timeout=TIMEOUT),
        httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http,
    ):
        yield Server(app, url, http)


async def recv_json(ws: ClientConnection) -> dict:
    message = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(message, str), f"expected JSON, got {len(message)} bytes"
    return orjson.loads(message)


async def start(ws: ClientConnection) -> None:
    assert await recv_json(ws) == {"status": "connected"}
    assert await recv_json(ws) == SEND_FRAME


async def send_bundle(ws: ClientConnection, params: dict | str, image: bytes | None) -> None:
    """What the seed's client does on ``send_frame``: next_frame, params, image."""
    await ws.send(orjson.dumps({"status": "next_frame"}).decode())
    await ws.send(params if isinstance(params, str) else orjson.dumps(params).decode())
    if image is not None:
        await ws.send(image)


class MjpegReader:
    """Parses ``multipart/x-mixed-replace; boundary=frame`` parts off a live response."""

    def __init__(self, response: httpx.Response) -> None:
        self.chunks = response.aiter_bytes()
        self.buffer = b""

    async def _fill(self) -> None:
        self.buffer += await asyncio.wait_for(anext(self.chunks), TIMEOUT)

    async def part(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0] == "--frame", lines
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert headers["Content-Type"] == "image/jpeg"
        length = int(headers["Content-Length"])
        while len(self.buffer) < length + 2:
            await self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length + 2 :]
        return body


async def until(predicate, timeout: float = TIMEOUT) -> None:
    """Poll a state the server reaches on its own (cleanup after a disconnect)."""

    async def loop() -> None:
        while not await predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(loop(), timeout)


async def test_settings_describe_the_form_a_frontend_builds(server):
    body = (await server.http.get("/api/settings")).json()
    assert set(body) == {"info", "input_params", "max_queue_size", "page_content"}
    assert body["max_queue_size"] == MAX_QUEUE
    info = body["info"]["properties"]
    assert info["input_mode"]["default"] == "image"
    assert info["title"] == "StreamDiffusion Backend"
    assert body["page_content"].startswith("<") and info["page_content"]["default"] == body["page_content"]
    props = body["input_params"]["properties"]
    assert list(props)[:3] == ["prompt", "negative_prompt", "guidance_scale"]
    assert props["prompt"] == {
        "default": "flowers",
        "title": "Prompt",
        "type": "string",
        "id": "prompt",
        "field": "textarea",
    }
    guidance = props["guidance_scale"]
    assert (guidance["field"], guidance["min"], guidance["max"], guidance["default"]) == (
        "range",
        0.0,
        20.0,
        1.0,
    )
    assert guidance["type"] == "number" and guidance["title"] == "Guidance Scale" and "hide" not in guidance
    assert props["seed"]["field"] == "seed" and props["seed"]["type"] == "integer"
    assert props["seed"]["min"] == 0 and props["seed"]["hide"] is True
    assert props["num_inference_steps"]["step"] == 1 and props["num_inference_steps"]["max"] == 100
    assert props["width"]["hide"] is True and props["width"]["min"] == 384 and props["width"]["step"] == 64
    assert props["do_add_noise"] == {
        "default": True,
        "title": "Do Add Noise",
        "type": "boolean",
        "id": "do_add_noise",
        "field": "checkbox",
        "hide": True,
    }
    assert all(p["id"] == name and "field" in p and "title" in p for name, p in props.items())


async def test_image_mode_loop_with_params_changing_the_output(server):
    form = (await server.http.get("/api/settings")).json()["input_params"]["properties"]
    values = {name: prop["default"] for name, prop in form.items()}  # what the frontend sends
    user = str(uuid.uuid4())
    image = jpeg(SIZE, SIZE, seed=4)
    source = decode_image(image).astype(int)
    async with server.ws(user) as ws:
        await start(ws)
        assert (await server.http.get("/api/queue")).json() == {"queue_size": 1}
        async with server.http.stream("GET", f"/api/stream/{user}?quality=85&max_fps=30") as response:
            assert response.status_code == 200
            content_type = response.headers["content-type"].replace(" ", "")
            assert content_type == "multipart/x-mixed-replace;boundary=frame"
            mjpeg = MjpegReader(response)
            outputs = []
            for prompt in ("flowers", "photo negative", "a pencil sketch", "photo negative"):
                await send_bundle(ws, {**values, "prompt": prompt}, image)
                assert await recv_json(ws) == SEND_FRAME  # its result is out: the next frame
                outputs.append(decode_image(await mjpeg.part()).astype(int))
            cartoon, negative, sketch, negative_again = outputs
            assert cartoon.shape == (SIZE, SIZE, 3)
            assert np.abs(negative - (255 - source)).mean() < 10
            assert np.abs(negative_again - negative).mean() < 2
            assert np.abs(cartoon - source).mean() > 5  # posterized with dark edges
            for a, b in ((cartoon, negative), (sketch, negative), (sketch, cartoon)):
                assert np.abs(a - b).mean() > 10
            # the seed's own example params: steps 4 makes the t_index_list follow
            await send_bundle(
                ws, {"prompt": "photo negative", "guidance_scale": 7.5, "num_inference_steps": 4}, image
            )
            assert await recv_json(ws) == SEND_FRAME
            assert np.abs(decode_image(await mjpeg.part()).astype(int) - (255 - source)).mean() < 10
            # a lower quality is re-encoded, a smaller JPEG of the same picture
            async with server.http.stream("GET", f"/api/stream/{user}?quality=20") as low:
                await send_bundle(ws, {"prompt": "photo negative"}, image)
                assert await recv_json(ws) == SEND_FRAME
                small = await MjpegReader(low).part()
            big = await mjpeg.part()
            assert len(small) < len(big)
            assert np.abs(decode_image(small).astype(int) - decode_image(big)).mean() < 10
            # an empty image (no camera frame yet) is answered by send_frame, as in the seed
            await send_bundle(ws, values, b"")
            assert await recv_json(ws) == SEND_FRAME
    await until(lambda: _queue_is(server, 0))


async def _queue_is(server: Server, size: int) -> bool:
    return (await server.http.get("/api/queue")).json()["queue_size"] == size


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"guidance_scale": 99}, "guidance_scale"),
        ({"prompt": 5}, "prompt"),
        ({"seed": -1}, "seed"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"width": 768}, "width"),
        ({"model_id": "other/model"}, "model_id"),
        ("{broken", "JSON"),
        ([1, 2], "object"),
    ],
)
async def test_invalid_params_get_a_warning_and_the_loop_goes_on(server, params, needle):
    image = jpeg(SIZE, SIZE, seed=1)
    async with server.ws(str(uuid.uuid4())) as ws:
        await start(ws)
        await send_bundle(ws, params, image)
        reply = await recv_json(ws)
        assert reply["status"] == "warning" and needle in reply["message"], reply
        assert await recv_json(ws) == SEND_FRAME  # that frame is dropped; send the next one
        await send_bundle(ws, {"prompt": "negative"}, image)
        assert await recv_json(ws) == SEND_FRAME


async def test_bad_frames_and_out_of_order_messages(server):
    """Every recoverable problem is a warning followed by send_frame: a client that only follows
    the seed's loop (answer send_frame with a bundle) never stalls."""
    async with server.ws(str(uuid.uuid4())) as ws:
        await start(ws)
        await send_bundle(ws, {"prompt": "x"}, b"not an image at all")
        reply = await recv_json(ws)
        assert reply["status"] == "warning" and "JPEG" in reply["message"]
        assert await recv_json(ws) == SEND_FRAME
        for out_of_turn in (
            jpeg(SIZE, SIZE),  # bytes without next_frame and params
            '{"status": "hello"}',  # an unknown status
            '{"prompt": "x"}',  # params before next_frame
            "{not json",
        ):
            await ws.send(out_of_turn)
            assert (await recv_json(ws))["status"] == "warning"
            assert await recv_json(ws) == SEND_FRAME
        await send_bundle(ws, {"prompt": "x"}, jpeg(SIZE, SIZE))  # back in step
        assert await recv_json(ws) == SEND_FRAME


async def test_a_missing_image_does_not_stall_the_loop(server):
    services(server.app).seeds.options = Seed001Options(image_wait_s=0.3)
    async with server.ws(str(uuid.uuid4())) as ws:
        await start(ws)
        await ws.send('{"status": "next_frame"}')
        await ws.send('{"prompt": "x"}')  # and the image never comes
        reply = await recv_json(ws)
        assert reply["status"] == "warning" and "no image" in reply["message"]
        assert await recv_json(ws) == SEND_FRAME
        await send_bundle(ws, {"prompt": "x"}, jpeg(SIZE, SIZE))
        assert await recv_json(ws) == SEND_FRAME


async def test_video_mode_needs_no_image(server):
    user = "user123"
    async with server.ws(user, mode="video") as ws:
        await start(ws)
        channel = services(server.app).seeds.sessions[user].channel
        assert channel.params["mode"] == "txt2img"
        async with server.http.stream("GET", f"/api/stream/{user}") as response:
            await send_bundle(ws, {"prompt": "a pencil sketch"}, None)
            assert await recv_json(ws) == SEND_FRAME
            mjpeg = MjpegReader(response)
            assert decode_image(await mjpeg.part()).shape == (SIZE, SIZE, 3)
            await ws.close()
            with pytest.raises(StopAsyncIteration):  # the stream ends with the session
                await mjpeg.part()


async def test_wait_while_no_worker_is_free_then_send_frame():
    app = create_app(server_config("k"))
    async with (
        running(app) as url,
        connect(url.replace("http://", "ws://") + "/api/ws/early", compression=None) as ws,
    ):
        assert await recv_json(ws) == {"status": "connected"}
        assert await recv_json(ws) == {
            "status": "wait",
            "message": "waiting for a worker: none is connected",
            "queue_position": 1,
        }
        async with serving_worker(app, timeout=TIMEOUT):
            assert await recv_json(ws) == SEND_FRAME  # a worker took the session
            await send_bundle(ws, {"prompt": "negative"}, jpeg(SIZE, SIZE))
            assert await recv_json(ws) == SEND_FRAME


async def test_queue_limit_and_duplicate_users(server):
    assert await _queue_is(server, 0)
    async with server.ws("first") as first, server.ws("second") as second:
        await start(first)
        await start(second)
        assert await _queue_is(server, 2)
        async with server.ws("third") as third:
            assert await recv_json(third) == {"status": "error", "message": "Server is full"}
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(third.recv(), TIMEOUT)
        await second.close()
        await until(lambda: _queue_is(server, 1))
        async with server.ws("first") as again:
            assert await recv_json(again) == {"status": "error", "message": "User already connected"}
        async with server.ws("fourth") as fourth:
            await start(fourth)
        await send_bundle(first, {"prompt": "x"}, jpeg(SIZE, SIZE))  # the first one never noticed
        assert await recv_json(first) == SEND_FRAME


async def test_stream_and_mode_errors(server):
    response = await server.http.get("/api/stream/nobody")
    assert response.status_code == 404 and response.json() == {"detail": "User not found"}
    async with server.ws("u1") as ws:
        await start(ws)
        assert (await server.http.get("/api/stream/u1?quality=0")).status_code == 422
        assert (await server.http.get("/api/stream/u1?max_fps=0")).status_code == 422
    async with server.ws("u2", mode="audio") as ws:
        reply = await recv_json(ws)
        assert reply["status"] == "error" and "mode" in reply["message"]


async def test_session_timeout(server):
    services(server.app).seeds.options = Seed001Options(timeout_s=0.2)
    async with server.ws("short") as ws:
        await start(ws)
        assert await recv_json(ws) == {"status": "timeout", "message": "Your session has ended"}
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), TIMEOUT)


async def test_several_users_are_served_at_once_and_the_next_one_waits_with_its_place():
    """4 worker slots, half for anonymous sessions: two users at once, the third hears its place
    in the queue and gets ``send_frame`` when a slot frees."""
    app = create_app(server_config("k"))
    async with running(app) as url, serving_worker(app, capacity=4, timeout=TIMEOUT):
        server = Server(app, url, None)
        async with server.ws("ann") as ann, server.ws("bob") as bob:
            for ws in (ann, bob):
                await start(ws)
                await send_bundle(ws, {"prompt": "x"}, jpeg(SIZE, SIZE))
            for ws in (ann, bob):
                assert await recv_json(ws) == SEND_FRAME  # each one's frame came back
            async with server.ws("cyd") as cyd:
                assert await recv_json(cyd) == {"status": "connected"}
                assert await recv_json(cyd) == {
                    "status": "wait",
                    "message": "waiting for a slot: 2 of 2 in use (1st in the queue)",
                    "queue_position": 1,
                }
                await ann.close()
                assert await recv_json(cyd) == SEND_FRAME
                await send_bundle(cyd, {"prompt": "x"}, jpeg(SIZE, SIZE))
                assert await recv_json(cyd) == SEND_FRAME


async def test_an_idle_released_session_gets_a_worker_back_with_its_next_frame():
    """No input for ``relay.idle_release_s`` gives the worker back; the loop's next frame brings
    one again, and its results reach the MJPEG stream."""
    app = create_app(server_config("k", relay={"idle_release_s": 0.2}))
    async with (
        running(app) as url,
        serving_worker(app, capacity=4, timeout=TIMEOUT),
        httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http,
    ):
        server, hub = Server(app, url, http), services(app).hub
        user, image = str(uuid.uuid4()), jpeg(SIZE, SIZE, seed=6)
        async with server.ws(user) as ws, http.stream("GET", f"/api/stream/{user}") as response:
            await start(ws)
            mjpeg = MjpegReader(response)
            await send_bundle(ws, {"prompt": "flowers"}, image)
            assert await recv_json(ws) == SEND_FRAME
            await mjpeg.part()
            channel = next(c for c in hub.channels.values() if c.name.startswith("ws001-"))

            async def released() -> bool:
                return channel.idle and channel.worker is None

            await until(released)
            for _ in range(2):  # whichever of the new worker or the result answers first
                await send_bundle(ws, {"prompt": "photo negative"}, image)
                assert await recv_json(ws) == SEND_FRAME
            negative = decode_image(await mjpeg.part()).astype(int)
            assert np.abs(negative - (255 - decode_image(image).astype(int))).mean() < 10
            assert channel.worker is not None


def _quantization(jpeg_bytes: bytes) -> dict:
    with Image.open(io.BytesIO(jpeg_bytes)) as image:
        return image.quantization


async def test_the_stream_quality_defaults_to_the_configured_jpeg_quality():
    """``performance.jpeg_quality`` is the MJPEG's quality when the URL names none (the route's own
    default once won); ``?quality=`` still picks another."""
    app = create_app(server_config("k", performance={"jpeg_quality": 30}))
    async with (
        running(app) as url,
        serving_worker(app, capacity=4, timeout=TIMEOUT),
        httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http,
    ):
        server, user, image = Server(app, url, http), str(uuid.uuid4()), jpeg(SIZE, SIZE, seed=7)
        async with (
            server.ws(user) as ws,
            http.stream("GET", f"/api/stream/{user}") as default,
            http.stream("GET", f"/api/stream/{user}?quality=85") as asked,
        ):
            await start(ws)
            await send_bundle(ws, {"prompt": "photo negative"}, image)
            assert await recv_json(ws) == SEND_FRAME
            plain, high = await MjpegReader(default).part(), await MjpegReader(asked).part()
        picture = decode_image(plain)
        assert _quantization(plain) == _quantization(encode_image(picture, ImageFormat.JPEG, 30))
        assert _quantization(high) == _quantization(encode_image(picture, ImageFormat.JPEG, 85))
