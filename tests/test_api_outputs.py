"""RTMP push and HLS through the API: stream params in, nginx-rtmp and PyAV reading back."""

from __future__ import annotations

import asyncio
import contextlib
import time

from relay.local import LocalProducer
from tests.helpers import jpeg
from tests.test_api import api, create, wait_until_ready, worker  # noqa: F401  (fixtures)
from tests.test_rtmp_hls import decode, rtmp_server  # noqa: F401  (fixture)

SIZE = 384


@contextlib.asynccontextmanager
async def feeding(api, stream_id: str):
    """Publish changing frames at about 30 fps until the block ends."""
    producer = LocalProducer(api.app.state.relay.hub, stream_id)
    frames = [jpeg(SIZE, SIZE, seed=i) for i in range(30)]

    async def run() -> None:
        i = 0
        while True:
            producer.publish(frames[i % len(frames)], SIZE, SIZE)
            i += 1
            await asyncio.sleep(1 / 30)  # the camera's frame rate, not a synchronisation

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        producer.close()


async def poll(check, timeout: float = 20.0):
    """Re-check ``check()`` (an async predicate) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


async def test_output_rtmp_url_pushes_to_nginx(api, worker, rtmp_server):
    url = rtmp_server.url("live", "apitest")
    response = await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "output_rtmp_url": url,
                                                   "params": {"prompt": "photo negative", "width": SIZE,
                                                              "height": SIZE}})
    assert response.status_code == 201
    stream = response.json()
    assert stream["output_rtmp_url"] == url
    await asyncio.wait_for(wait_until_ready(api, stream["id"]), 15)
    async with feeding(api, stream["id"]):
        async def publishing():
            status = (await api.get(f"/v1/streams/{stream['id']}/status")).json()["data"]
            return status["gateway_status"]["outputs"].get("rtmp", {}).get("publishing")
        await poll(publishing)
        live = {"analyzeduration": "1000000", "fflags": "nobuffer"}
        frames = await asyncio.to_thread(decode, url, 10, live)
    assert {f.shape for f in frames} == {(SIZE, SIZE, 3)}
    assert max(f.std() for f in frames) > 10
    assert (await api.delete(f"/v1/streams/{stream['id']}")).status_code == 200
    assert stream["id"] not in api.app.state.outputs.rtmp


async def test_hls_playlist_plays_back_with_pyav(api, worker):
    stream = await create(api, prompt="photo negative", width=SIZE, height=SIZE)
    await asyncio.wait_for(wait_until_ready(api, stream["id"]), 15)
    playlist = stream["hls_url"]
    async with feeding(api, stream["id"]):
        first = await api.get(playlist)
        assert first.status_code in (200, 503)
        if first.status_code == 503:
            assert first.headers["retry-after"] and first.json()["code"] == "STREAMS/HLS_STARTING"

        async def two_segments():
            response = await api.get(playlist)
            return response.status_code == 200 and response.text.count("#EXTINF") >= 2
        await poll(two_segments, 30)
        frames = await asyncio.to_thread(decode, playlist, 5)
    assert {f.shape for f in frames} == {(SIZE, SIZE, 3)}
    assert (await api.get(stream["hls_url"].replace("index.m3u8", "../../etc/passwd"))).status_code == 404
    await api.delete(f"/v1/streams/{stream['id']}")
    assert stream["id"] not in api.app.state.outputs.hls


async def test_mediamtx_republishing_pushes_every_stream_and_returns_its_whep_url(rtmp_server):
    """nginx-rtmp stands in for MediaMTX's RTMP listener (MediaMTX itself cannot be fetched here)."""
    import httpx

    from api.app import create_app
    from api.server import running
    from api.settings import ServerSettings
    from relay import RelayConfig
    from tests.test_api import AUTH, KEY
    from worker.runtime import Worker, WorkerOptions

    settings = ServerSettings(port=0, relay=RelayConfig(port=0), workers=0, api_keys=frozenset({KEY}),
                              mediamtx_publish_url=rtmp_server.url("live", "").rstrip("/"),
                              mediamtx_whep_url="http://mediamtx.example:8889")
    app = create_app(settings)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        client.app = app
        worker = Worker(WorkerOptions(relay_url=app.state.relay_url, engine="filter"))
        task = asyncio.create_task(worker.run())
        stream = await create(client, width=SIZE, height=SIZE)
        playback = stream["output_playback_id"]
        assert stream["output_stream_url"] == f"http://mediamtx.example:8889/{playback}/whep"
        await asyncio.wait_for(wait_until_ready(client, stream["id"]), 15)
        async with feeding(client, stream["id"]):
            async def publishing():
                status = (await client.get(f"/v1/streams/{stream['id']}/status")).json()["data"]
                assert status["gateway_status"]["whep_url"] == stream["output_stream_url"]
                return status["gateway_status"]["outputs"]["republish"]["publishing"]
            await poll(publishing)
            live = {"analyzeduration": "1000000", "fflags": "nobuffer"}
            frames = await asyncio.to_thread(decode, rtmp_server.url("live", playback), 5, live)
        assert {f.shape for f in frames} == {(SIZE, SIZE, 3)}
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
