"""Shared pieces for API tests over real HTTP: a served app, an in-process worker on its relay, stream
creation, MJPEG parsing.

Import the fixtures into a test module (``from tests.api_fixtures import api, worker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from relay.local import LocalProducer
from tests.helpers import jpeg, server_config
from worker.pipeline import EngineFactory
from worker.runtime import Worker, WorkerOptions

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on a served app with no worker processes; ``client.app`` is the app.

    Tests feed frames one round trip at a time, slower than a camera: no DEGRADED_INPUT for that
    (tests/test_stream_state.py tests it).
    """
    settings = server_config(KEY, server={"degraded_input_fps": 0})
    app = create_app(settings)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


@contextlib.asynccontextmanager
async def serving_worker(
    app: Any,
    engine: str = "filter",
    capacity: int = 1,
    timeout: float = 10,
    factory: EngineFactory | None = None,
) -> AsyncIterator[Worker]:
    """An in-process worker on ``app``'s relay with the app's relay token while the block runs.

    It is connected (within ``timeout`` seconds) before the block runs, and cancelled and awaited
    after it, even when the block fails. ``factory`` makes its engines instead of ``engine``'s.
    Its JPEG quality is the app's ``performance.jpeg_quality``, as the server's local workers get.
    """
    options = WorkerOptions(
        relay_url=services(app).relay_url,
        token=services(app).relay_token,
        engine=engine,
        capacity=capacity,
        quality=services(app).config.performance.jpeg_quality,
    )
    worker = Worker(options, factory=factory)
    task = asyncio.create_task(worker.run())
    connected = asyncio.create_task(worker.connected.wait())
    try:
        await asyncio.wait({task, connected}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not worker.connected.is_set():
            if task.done():
                task.result()  # the worker's own error, if it failed to connect
            raise AssertionError(f"the worker did not connect to the relay in {timeout} s")
        yield worker
    finally:
        connected.cancel()
        task.cancel()
        await asyncio.gather(task, connected, return_exceptions=True)


@pytest.fixture
async def worker(api: httpx.AsyncClient) -> AsyncIterator[Worker]:
    """An in-process filter worker on the app's relay (invert for prompt "negative")."""
    async with serving_worker(api.app, capacity=4) as worker:  # type: ignore[attr-defined]
        yield worker


async def create_stream(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    body = {"pipeline": "streamdiffusion", "params": {"prompt": "negative", **params}}
    response = await api.post("/v1/streams", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` holds (checked every 10 ms), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def multipart_parts(response: httpx.Response, boundary: str = "frame") -> AsyncIterator[bytes]:
    """Bodies of a ``multipart/x-mixed-replace`` response's parts, as they arrive."""
    buffer = bytearray()
    marker = f"--{boundary}\r\n".encode()
    chunks = response.aiter_bytes()
    while True:
        while (head_end := buffer.find(b"\r\n\r\n")) < 0:
            buffer += await anext(chunks)
        head = bytes(buffer[:head_end])
        assert head.startswith(marker), head[:40]
        headers = dict(line.split(": ", 1) for line in head[len(marker) :].decode().split("\r\n"))
        assert headers["Content-Type"] == "image/jpeg"
        size = int(headers["Content-Length"])
        start = head_end + 4
        while len(buffer) < start + size + 2:
            buffer += await anext(chunks)
        yield bytes(buffer[start : start + size])
        assert buffer[start + size : start + size + 2] == b"\r\n"
        del buffer[: start + size + 2]


@contextlib.asynccontextmanager
async def feeding(
    api: httpx.AsyncClient, stream_id: str, size: int = 384, fps: list[float] | None = None
) -> AsyncIterator[None]:
    """Publish changing ``size`` x ``size`` frames into the stream until the block ends, at ``fps[0]``
    per second (30 without ``fps``; change ``fps[0]`` while it runs to change the rate)."""
    producer = LocalProducer(services(api.app).hub, stream_id)  # type: ignore[attr-defined]
    frames = [jpeg(size, size, seed=i) for i in range(30)]
    rate = fps if fps is not None else [30.0]

    async def run() -> None:
        i = 0
        while True:
            producer.publish(frames[i % len(frames)], size, size)
            i += 1
            await asyncio.sleep(1 / rate[0])  # the camera's frame rate, not a synchronisation

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        producer.close()
