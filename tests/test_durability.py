"""State that survives restarts and processes that come back, with the real server command."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import websockets

from api.streams.store import StreamStore
from tests.helpers import child_pids, jpeg, start_server, stop_server
from wire.frames import FrameKind, decode_frame

KEY = "durable-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Server:
    process: asyncio.subprocess.Process
    url: str

    @property
    def worker_pids(self) -> list[int]:
        return child_pids(self.process.pid)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@asynccontextmanager
async def server(data_dir: Path) -> AsyncIterator[Server]:
    """``python -m api`` with a filter worker, its streams kept in ``data_dir``; stopped with SIGTERM
    unless the test killed it."""
    process, text = await start_server("--api-key", KEY, "--engine", "filter", data_dir=data_dir)
    try:
        yield Server(process, re.search(r"api ready at (http://\S+)", text).group(1))
    finally:
        await stop_server(process)


async def processed_frames(url: str, stream_key: str, count: int) -> list[int]:
    """Send JPEGs over the stream-key WebSocket ingest until ``count`` results came back; their seqs."""
    ws_url = url.replace("http://", "ws://") + f"/live/video-to-video/{stream_key}/ws"
    seqs: list[int] = []
    async with asyncio.timeout(60), websockets.connect(ws_url, compression=None) as ws:
        image = jpeg(64, 64, seed=3)
        while len(seqs) < count:
            await ws.send(image)
            with suppress(TimeoutError):
                message = await asyncio.wait_for(ws.recv(), 1)  # a worker may still be starting
                if isinstance(message, bytes) and decode_frame(message).kind == FrameKind.OUTPUT:
                    seqs.append(decode_frame(message).seq)
    return seqs


async def first_mjpeg_frame(api: httpx.AsyncClient, playback_id: str) -> bytes:
    """The first JPEG of the stream's MJPEG playback URL."""
    buffer = b""
    async with (
        asyncio.timeout(60),
        api.stream("GET", f"/live/video-to-video/{playback_id}/mjpeg") as response,
    ):
        assert response.status_code == 200
        async for chunk in response.aiter_bytes():
            buffer += chunk
            start = buffer.find(b"\xff\xd8")
            end = buffer.find(b"\xff\xd9", start)
            if start >= 0 and end > start:
                return buffer[start : end + 2]
    raise AssertionError("the MJPEG response ended without a frame")


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_streams_survive_a_restart(tmp_path, stop):
    async with server(tmp_path) as first, httpx.AsyncClient(base_url=first.url, headers=AUTH) as api:
        created = (
            await api.post(
                "/v1/streams", json={"pipeline": "streamdiffusion", "params": {"prompt": "photo negative"}}
            )
        ).json()
        await api.patch(f"/v1/streams/{created['id']}", json={"params": {"prompt": "a pencil sketch"}})
        assert len(await processed_frames(first.url, created["stream_key"], 2)) == 2
        workers = first.worker_pids
        if stop == "sigkill":
            first.process.kill()
            await first.process.wait()
            # the worker follows its parent (no orphan joining the next server)
            async with asyncio.timeout(15):
                while any(_alive(pid) for pid in workers):
                    await asyncio.sleep(0.05)
    async with server(tmp_path) as second, httpx.AsyncClient(base_url=second.url, headers=AUTH) as api:
        again = (await api.get(f"/v1/streams/{created['id']}")).json()
        assert again["stream_key"] == created["stream_key"]
        assert again["output_playback_id"] == created["output_playback_id"]
        assert again["params"]["prompt"] == "a pencil sketch"
        # the same playback URL plays as soon as input returns, through the same stream key
        playing = asyncio.create_task(first_mjpeg_frame(api, created["output_playback_id"]))
        await processed_frames(second.url, created["stream_key"], 3)
        assert (await playing).startswith(b"\xff\xd8")
        assert (await api.delete(f"/v1/streams/{created['id']}")).status_code == 200
    async with server(tmp_path) as third, httpx.AsyncClient(base_url=third.url, headers=AUTH) as api:
        assert (await api.get(f"/v1/streams/{created['id']}")).status_code == 404


@pytest.mark.slow
async def test_a_killed_worker_is_restarted_and_its_stream_resumes(tmp_path):
    async with server(tmp_path) as running, httpx.AsyncClient(base_url=running.url, headers=AUTH) as api:
        stream = (await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": {}})).json()
        assert len(await processed_frames(running.url, stream["stream_key"], 1)) == 1
        (worker,) = running.worker_pids
        os.kill(worker, signal.SIGKILL)
        async with asyncio.timeout(30):
            while running.worker_pids in ([], [worker]):
                await asyncio.sleep(0.05)
        assert len(await processed_frames(running.url, stream["stream_key"], 2)) == 2
        health = (await api.get("/health")).json()
        assert health["status"] == "ok" and len(health["workers"]) == 1


def test_the_store_migrates_and_refuses_a_newer_schema(tmp_path):
    store = StreamStore.in_directory(tmp_path)
    store.close()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600  # it holds stream keys
    store = StreamStore.in_directory(tmp_path)  # an up-to-date file opens again
    store._db.execute("PRAGMA user_version = 99")
    store.close()
    with pytest.raises(RuntimeError, match="newer version"):
        StreamStore.in_directory(tmp_path)
