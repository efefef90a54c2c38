"""Four clients at once on a default server: seed 001, two WebSocket ingests and WHIP.

The server is ``python -m api`` as a user starts it (local workers, capacity
from the hardware). Each client sends a colour of its own through the
"negative" effect and reads its results back: every client must get its own
inverted colour (never another's), all four while every slot is in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import httpx
import numpy as np
import orjson
import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from media.codec import decode_image, encode_image
from tests.helpers import start_server, stop_server
from tests.test_seed001 import MjpegReader
from wire.frames import FrameKind, decode_frame

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

KEY = "sdk_many_streams_test_key"
SIZE = 384
#: results each client must get while all four run
ENOUGH = 15
FPS = 12.0


@dataclass
class Client:
    name: str
    colour: tuple[int, int, int]
    results: list[np.ndarray] = field(default_factory=list)

    @property
    def expected(self) -> np.ndarray:
        return 255 - np.array(self.colour, float)

    def add(self, jpeg: bytes) -> None:
        self.results.append(decode_image(jpeg).reshape(-1, 3).mean(axis=0))


def solid(colour: tuple[int, int, int]) -> np.ndarray:
    rgb = np.empty((SIZE, SIZE, 3), np.uint8)
    rgb[:] = colour
    return rgb


async def paced(stop: asyncio.Event) -> AsyncIterator[None]:
    """Ticks at FPS on a monotonic schedule until ``stop`` (a camera's pace, not synchronisation)."""
    start, n = time.monotonic(), 0
    while not stop.is_set():
        yield
        n += 1
        await asyncio.sleep(max(0.0, start + n / FPS - time.monotonic()))


async def create_stream(http: httpx.AsyncClient) -> dict:
    body = {"pipeline": "streamdiffusion", "params": {"prompt": "negative", "width": SIZE, "height": SIZE}}
    response = await http.post("/v1/streams", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def mjpeg_into(http: httpx.AsyncClient, path: str, client: Client, stop: asyncio.Event) -> None:
    async with http.stream("GET", path, timeout=None) as response:
        assert response.status_code == 200
        reader = MjpegReader(response)
        while not stop.is_set():
            client.add(await reader.part())


async def ws_ingest(url: str, stream: dict, client: Client, stop: asyncio.Event) -> None:
    ws_url = url.replace("http://", "ws://") + f"/live/video-to-video/{stream['stream_key']}/ws"
    image = encode_image(solid(client.colour))
    async with websockets.connect(ws_url, compression=None) as ws:

        async def read() -> None:
            async for message in ws:
                if isinstance(message, bytes) and (frame := decode_frame(message)).kind is FrameKind.OUTPUT:
                    client.add(frame.payload)

        reader = asyncio.create_task(read())
        async for _ in paced(stop):
            await ws.send(image)
        reader.cancel()


class SolidTrack(VideoStreamTrack):
    def __init__(self, colour: tuple[int, int, int]) -> None:
        super().__init__()
        self.rgb = solid(colour)

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.rgb, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


async def whip(http: httpx.AsyncClient, stream: dict, client: Client, stop: asyncio.Event) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(SolidTrack(client.colour), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    response = await http.post(
        stream["whip_url"], content=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
    )
    assert response.status_code == 201, response.text
    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    try:
        await mjpeg_into(http, f"/live/video-to-video/{stream['output_playback_id']}/mjpeg", client, stop)
    finally:
        await pc.close()


async def seed001(url: str, http: httpx.AsyncClient, client: Client, stop: asyncio.Event) -> None:
    """The seed's loop: on each ``send_frame``, next_frame + params + image; results on its MJPEG."""
    ws_url = url.replace("http://", "ws://") + f"/api/ws/{client.name}?mode=image"
    image = encode_image(solid(client.colour))
    params = orjson.dumps({"prompt": "negative"}).decode()  # the session's size is the server's
    async with websockets.connect(ws_url, compression=None) as ws:
        viewer = asyncio.create_task(mjpeg_into(http, f"/api/stream/{client.name}", client, stop))
        while not stop.is_set():
            status = orjson.loads(await ws.recv())
            if status["status"] == "send_frame":
                await ws.send('{"status": "next_frame"}')
                await ws.send(params)
                await ws.send(image)
        viewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await viewer


async def test_four_clients_at_once_each_get_their_own_frames(tmp_path: Path) -> None:
    process, text = await start_server("--api-key", KEY, data_dir=tmp_path / "data")
    url = next(w for w in text.split() if w.startswith("http://"))
    clients = [
        Client("seed001-user", (200, 40, 40)),
        Client("ingest-a", (40, 200, 40)),
        Client("ingest-b", (40, 40, 200)),
        Client("whip", (200, 200, 40)),
    ]
    stop = asyncio.Event()
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:

            async def capacity() -> dict:
                while not (found := (await http.get("/health")).json()["capacity"])["total"]:
                    await asyncio.sleep(0.1)  # the local worker is starting
                return found

            total = (await asyncio.wait_for(capacity(), 60))["total"]
            assert total >= 4, total  # the default: several streams at once
            a, b, w = [await create_stream(http) for _ in range(3)]
            tasks = [
                asyncio.create_task(seed001(url, http, clients[0], stop)),
                asyncio.create_task(ws_ingest(url, a, clients[1], stop)),
                asyncio.create_task(ws_ingest(url, b, clients[2], stop)),
                asyncio.create_task(whip(http, w, clients[3], stop)),
            ]

            async def all_served(count: int) -> None:
                while min(len(c.results) for c in clients) < count:
                    done = [t for t in tasks if t.done()]
                    if done:
                        done[0].result()  # a client failed: say why
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(all_served(1), 90)  # workers started, engines ready
            start = [len(c.results) for c in clients]
            assert (await http.get("/health")).json()["capacity"]["used"] == 4  # all at once
            await asyncio.wait_for(all_served(max(start) + ENOUGH), 90)
            stop.set()
            await asyncio.wait(tasks, timeout=10)
            for task in tasks:
                task.cancel()
    finally:
        await stop_server(process)
    for client in clients:
        got = np.array(client.results[1:])  # the first may predate the params
        error = np.abs(got - client.expected).max(axis=1)
        assert (error < 40).all(), (client.name, client.expected, got[error >= 40][:3])
        assert len(client.results) - start[clients.index(client)] >= ENOUGH, client.name
