"""RTMP push and HLS through the API: stream params in, nginx-rtmp and PyAV reading back."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from api.streams.store import FILE_NAME
from tests.api_fixtures import feeding, serving_worker
from tests.helpers import server_config
from tests.test_api import AUTH, KEY, api, create, wait_until_ready, worker  # noqa: F401  (fixtures)
from tests.test_rtmp_hls import decode, rtmp_server  # noqa: F401  (fixture)

SIZE = 384


async def poll(check, timeout: float = 20.0):
    """Re-check ``check()`` (an async predicate) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.mark.network_service
async def test_output_rtmp_url_pushes_to_nginx(api, worker, rtmp_server):
    url = rtmp_server.url("live", "apitest")
    response = await api.post(
        "/v1/streams",
        json={
            "pipeline": "streamdiffusion",
            "output_rtmp_url": url,
            "params": {"prompt": "photo negative", "width": SIZE, "height": SIZE},
        },
    )
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
    assert stream["id"] not in services(api.app).outputs.rtmp


async def test_hls_playlist_plays_back_with_pyav(api, worker):
    stream = await create(api, prompt="photo negative", width=SIZE, height=SIZE)
    await asyncio.wait_for(wait_until_ready(api, stream["id"]), 15)
    playlist = stream["hls_url"]
    async with feeding(api, stream["id"]):
        first = await api.get(playlist, headers={"Origin": "http://player.example"}, timeout=30)
        # the first request waits for the first segment: a player with default settings plays
        assert first.status_code == 200 and "#EXTINF" in first.text
        assert first.headers["access-control-allow-origin"] == "*"
        assert "Retry-After" in first.headers["access-control-expose-headers"]
        preflight = await api.options(
            playlist, headers={"Origin": "http://player.example", "Access-Control-Request-Method": "GET"}
        )
        assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == "*"

        async def two_segments():
            response = await api.get(playlist)
            return response.status_code == 200 and response.text.count("#EXTINF") >= 2

        await poll(two_segments, 30)
        frames = await asyncio.to_thread(decode, playlist, 5)
        segment = next(line for line in (await api.get(playlist)).text.splitlines() if line.endswith(".ts"))
        answer = await api.get(playlist.replace("index.m3u8", segment))
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
    assert {f.shape for f in frames} == {(SIZE, SIZE, 3)}
    assert (await api.get(stream["hls_url"].replace("index.m3u8", "../../etc/passwd"))).status_code == 404
    await api.delete(f"/v1/streams/{stream['id']}")
    assert stream["id"] not in services(api.app).outputs.hls


@pytest.mark.network_service
async def test_mediamtx_republishing_pushes_every_stream_and_returns_its_whep_url(rtmp_server):
    """nginx-rtmp stands in for MediaMTX's RTMP listener (MediaMTX itself cannot be fetched here)."""
    settings = server_config(
        KEY,
        mediamtx={
            "publish_url": rtmp_server.url("live", "").rstrip("/"),
            "whep_url": "http://mediamtx.example:8889",
        },
    )
    app = create_app(settings)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        client.app = app
        async with serving_worker(app):
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


def temp_hls_bases() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob("sd-hls-*"))


@pytest.mark.parametrize("configured", [False, True], ids=["temporary", "configured"])
async def test_hls_directories_go_with_their_streams_and_the_server(tmp_path: Path, configured: bool):
    """Each stream's HLS directory goes when it closes (here: one deleted, one at server shutdown).

    A temporary base exists only while some HLS output does; a configured
    ``hls_dir`` stays (it is the operator's), emptied of the stream directories.
    """
    configured_base = tmp_path / "hls" if configured else None
    settings = server_config(
        KEY,
        server={"hls_dir": str(configured_base) if configured_base else None, "hls_first_playlist_wait_s": 0},
    )  # no input here: the 503 at once
    app = create_app(settings)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        streams = [await create(client), await create(client)]
        assert temp_hls_bases() == []  # nothing made before anyone asks for HLS
        for stream in streams:
            starting = await client.get(stream["hls_url"])
            assert starting.status_code == 503 and starting.headers["retry-after"]
            assert starting.headers["access-control-allow-origin"] == "*"
        outputs = [services(app).outputs.hls[stream["id"]] for stream in streams]
        for output in outputs:
            assert await output.wait_for(lambda o: o.ready, 15)  # the child has made its directory
        directories = [output.hls_dir for output in outputs]
        base = directories[0].parent
        assert directories[1].parent == base and all(d.is_dir() for d in directories)
        assert base == configured_base if configured else temp_hls_bases() == [base]
        assert (await client.delete(f"/v1/streams/{streams[0]['id']}")).status_code == 200
        assert not directories[0].exists() and directories[1].is_dir()
    assert not any(output.running for output in outputs)
    assert not directories[1].exists()
    assert base.is_dir() == configured
    assert temp_hls_bases() == []


@pytest.mark.network_service
async def test_rtmp_output_resumes_after_a_restart(rtmp_server, tmp_path: Path):
    """A stream's RTMP push comes back by itself when the server restarts with the same data dir."""
    url = rtmp_server.url("live", "restarted")
    kept = {"data_dir": str(tmp_path / "data")}
    body = {
        "pipeline": "streamdiffusion",
        "output_rtmp_url": url,
        "params": {"prompt": "photo negative", "width": SIZE, "height": SIZE},
    }
    first = create_app(server_config(KEY, server=kept))
    async with running(first) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as client:
        stream = (await client.post("/v1/streams", json=body)).json()
    second = create_app(server_config(KEY, server=kept))
    async with running(second) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as client:
        assert stream["id"] in services(second).outputs.rtmp  # started again from the stored record
        client.app = second  # type: ignore[attr-defined]  (what feeding() reads)
        async with serving_worker(second, capacity=2):
            await asyncio.wait_for(wait_until_ready(client, stream["id"]), 15)
            async with feeding(client, stream["id"]):

                async def publishing():
                    status = (await client.get(f"/v1/streams/{stream['id']}/status")).json()["data"]
                    return status["gateway_status"]["outputs"].get("rtmp", {}).get("publishing")

                await poll(publishing)
                frames = await asyncio.to_thread(
                    decode, url, 5, {"analyzeduration": "1000000", "fflags": "nobuffer"}
                )
    assert {f.shape for f in frames} == {(SIZE, SIZE, 3)}


BAD_RTMP = "rtmp://127.0.0.1:9/KEYONLY"  # no application: the output process refuses it


async def test_a_bad_rtmp_url_is_refused_before_anything_is_stored(tmp_path: Path):
    """422 naming the field, and no stream left behind (in memory or in the store)."""
    app = create_app(server_config(KEY, server={"data_dir": str(tmp_path)}))
    async with running(app) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as client:
        body = {"pipeline": "streamdiffusion", "params": {}, "output_rtmp_url": BAD_RTMP}
        response = await client.post("/v1/streams", json=body)
        assert response.status_code == 422, response.text
        assert "output_rtmp_url" in response.json()["error"]
        assert (await client.get("/v1/streams")).json()["data"] == []
    again = create_app(server_config(KEY, server={"data_dir": str(tmp_path)}))
    async with running(again), httpx.AsyncClient(base_url=base, headers=AUTH):
        assert services(again).streams.streams == {}


async def test_patch_refuses_a_bad_rtmp_url_and_clears_with_empty_or_null(api):
    stream = (
        await api.post(
            "/v1/streams",
            json={
                "pipeline": "streamdiffusion",
                "params": {},
                "output_rtmp_url": "rtmp://127.0.0.1:9/live/k",
            },
        )
    ).json()
    path = f"/v1/streams/{stream['id']}"
    response = await api.patch(path, json={"output_rtmp_url": BAD_RTMP})
    assert response.status_code == 422, response.text
    assert "output_rtmp_url" in response.json()["error"]
    assert (await api.get(path)).json()["output_rtmp_url"] == "rtmp://127.0.0.1:9/live/k"
    assert stream["id"] in services(api.app).outputs.rtmp
    for clear in ("", None):
        response = await api.patch(path, json={"output_rtmp_url": clear})
        assert response.status_code == 200, response.text
        assert response.json()["output_rtmp_url"] is None
        assert stream["id"] not in services(api.app).outputs.rtmp
        await api.patch(path, json={"output_rtmp_url": "rtmp://127.0.0.1:9/live/k"})
    response = await api.patch(path, json={"name": "kept"})  # left out: the output stays
    assert response.json()["output_rtmp_url"] == "rtmp://127.0.0.1:9/live/k"


async def test_a_stored_bad_rtmp_url_does_not_stop_the_server_starting(tmp_path: Path, caplog):
    """An older database may hold a URL the API refuses today: the stream serves, without that output."""
    kept = {"data_dir": str(tmp_path)}
    first = create_app(server_config(KEY, server=kept))
    async with running(first) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as client:
        stream = (await client.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": {}})).json()
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        db.execute("UPDATE streams SET output_rtmp_url = ?", (BAD_RTMP,))
    db.close()
    second = create_app(server_config(KEY, server=kept))
    with caplog.at_level(logging.WARNING, logger="api.outputs"):
        async with running(second) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as client:
            assert (await client.get(f"/v1/streams/{stream['id']}")).status_code == 200
            assert stream["id"] not in services(second).outputs.rtmp
    assert any(stream["id"] in r.getMessage() and "KEYONLY" not in r.getMessage() for r in caplog.records)
