"""Doors that need keys and inputs with limits: what an anonymous or careless client cannot do."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import orjson
import pytest
import websockets

from api.server.app import create_app
from api.server.http import running
from tests.api_fixtures import KEY, api, create_stream, worker  # noqa: F401
from tests.helpers import server_config
from tests.test_webrtc import PatternTrack, publish


def anonymous(api: httpx.AsyncClient) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=str(api.base_url), timeout=15)


async def test_only_the_stream_key_publishes_on_the_short_whip_route(api, worker):
    stream = await create_stream(api)
    async with anonymous(api) as client:
        by_id = await client.post(
            f"/whip/{stream['id']}", content="v=0\r\n", headers={"Content-Type": "application/sdp"}
        )
        assert by_id.status_code == 404 and by_id.json()["success"] is False
        pc, answer = await publish(client, f"/whip/{stream['stream_key']}", PatternTrack())
        assert answer.status_code == 201
        await pc.close()


async def test_health_names_no_stream_and_metrics_need_the_key(api, worker):
    stream = await create_stream(api)
    async with anonymous(api) as client:
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["workers"][0]["used"] == 1
        for secret in (stream["id"], stream["stream_key"], stream["output_playback_id"]):
            assert secret not in health.text
        refused = await client.get("/metrics")
        assert refused.status_code == 401 and stream["id"] not in refused.text
    assert (await api.get("/metrics")).status_code == 200


async def test_health_is_degraded_without_a_worker(api):
    body = (await api.get("/health")).json()
    assert body["status"] == "degraded" and "no worker" in body["detail"]


async def test_oversized_bodies_are_refused_at_the_door(api):
    declared = await api.post(
        "/v1/streams", content=b"{" + b" " * (9 * 2**20) + b"}", headers={"Content-Type": "application/json"}
    )
    assert declared.status_code == 413
    assert declared.json()["code"] == "REQUEST/TOO_LARGE" and declared.json()["details"]["max_body_bytes"]

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 2**20

    chunked = await api.post("/v1/streams", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert not (await api.get("/v1/streams")).json()["data"]


async def test_prompts_are_bounded_and_errors_name_the_field_sent(api):
    long = await api.post(
        "/v1/streams", json={"pipeline": "streamdiffusion", "params": {"prompt": "x" * 4001}}
    )
    assert long.status_code == 422 and long.json()["error"].startswith("invalid field 'params.prompt'")
    seed = await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": {"seed": -1}})
    assert seed.status_code == 422 and seed.json()["error"].startswith("invalid field 'params.seed'")
    assert all("constrained" not in ".".join(d["loc"]) for d in seed.json()["details"])


@pytest.fixture
async def guarded():
    """A server with a 0.5 s header deadline and at most 3 connections per client address."""
    app = create_app(server_config(KEY, server={"header_timeout_s": 0.5, "max_connections_per_client": 3}))
    async with running(app) as url:
        yield url


async def _connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def test_connections_without_headers_are_closed(guarded):
    silent = await _connect(guarded)
    partial = await _connect(guarded)
    partial[1].write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    for reader, writer in (silent, partial):
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        writer.close()
    async with httpx.AsyncClient(base_url=guarded) as client:
        assert (await client.get("/health")).status_code == 200
    async with websockets.connect(guarded.replace("http://", "ws://") + "/ws") as ws:
        assert orjson.loads(await ws.recv())["type"] == "status"
        await asyncio.sleep(1)  # past the header deadline: an upgraded connection is not cut
        await ws.send(orjson.dumps({"type": "ping"}))
        assert ws.state is websockets.State.OPEN


async def test_one_address_cannot_take_every_connection(guarded):
    held = [await _connect(guarded) for _ in range(3)]
    reader, writer = await _connect(guarded)
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the fourth is refused
    writer.close()
    for _, other in held:
        other.close()
        await other.wait_closed()
    async with asyncio.timeout(10), httpx.AsyncClient(base_url=guarded) as client:
        while True:  # the server notices the closed ones, then serves again
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/health")).status_code == 200:
                    break
