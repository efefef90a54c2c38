"""Doors that need keys and inputs with limits: what an anonymous or careless client cannot do."""

from __future__ import annotations

import asyncio
import contextlib
import logging

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


@pytest.fixture
async def capped():
    """A server where one address may hold 3 HTTP connections and 3 WebSocket sessions; headers may take
    30 s, so silent connections stay for the whole test."""
    server = {"header_timeout_s": 30, "max_connections_per_client": 3, "max_websockets_per_client": 3}
    async with running(create_app(server_config(KEY, server=server))) as url:
        yield url


async def test_idle_websockets_do_not_lock_the_address_out_of_http(capped):
    ws_url = capped.replace("http://", "ws://")
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            idle = await stack.enter_async_context(websockets.connect(ws_url + "/ws"))
            assert orjson.loads(await idle.recv())["type"] == "status"
        with pytest.raises(websockets.InvalidStatus) as refused:  # a fourth session is over their own cap
            await websockets.connect(ws_url + "/ws")
        assert refused.value.response.status_code == 429
        assert orjson.loads(refused.value.response.body)["code"] == "REQUEST/TOO_MANY_CONNECTIONS"
        keyed = await stack.enter_async_context(websockets.connect(f"{ws_url}/ws?api_key={KEY}"))
        assert orjson.loads(await keyed.recv())["type"] == "status"  # the key is never refused
        async with httpx.AsyncClient(base_url=capped) as client:
            assert (await client.get("/health")).status_code == 200  # plain HTTP is not starved


async def test_over_the_cap_a_request_gets_429_unless_it_carries_the_api_key(capped):
    held = [await _connect(capped) for _ in range(3)]  # silent: they fill the address's HTTP cap
    async with httpx.AsyncClient(base_url=capped, timeout=10) as client:
        refused = await client.get("/health")
        assert refused.status_code == 429 and refused.json()["code"] == "REQUEST/TOO_MANY_CONNECTIONS"
        created = await client.post(
            "/v1/streams",
            json={"pipeline": "streamdiffusion", "params": {"prompt": "x"}},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert created.status_code == 201
    for _, writer in held:
        writer.close()


async def test_a_flood_far_beyond_the_cap_is_closed_unread(guarded):
    held = [await _connect(guarded) for _ in range(12)]  # four times the cap of 3
    reader, writer = await _connect(guarded)
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the thirteenth is refused
    writer.close()
    for _, other in held:
        other.close()
        await other.wait_closed()
    async with asyncio.timeout(10), httpx.AsyncClient(base_url=guarded) as client:
        while True:  # the server notices the closed ones, then serves again
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/health")).status_code == 200:
                    break


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # scripts and Node send none
        ("https://evil.example", False),
        ("null", False),
        ("http://localhost:5173", True),  # a local dev server
        ("http://127.0.0.1:3000", True),
        ("http://[::1]:8000", True),
        ("https://app.example", True),  # listed in server.origins
    ],
)
async def test_websockets_accept_only_their_own_loopback_and_listed_origins(origin, allowed):
    app = create_app(server_config(KEY, server={"origins": ["https://app.example"]}))
    async with (
        running(app) as url,
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as api,
    ):
        ws_url = url.replace("http://", "ws://")
        stream = await create_stream(api)
        for path in ("/ws", "/api/ws/someone", f"/live/video-to-video/{stream['stream_key']}/ws"):
            if allowed:
                async with websockets.connect(ws_url + path, origin=origin) as ws:
                    assert ws.state is websockets.State.OPEN
            else:
                with pytest.raises(websockets.InvalidStatus) as refused:
                    await websockets.connect(ws_url + path, origin=origin)
                assert refused.value.response.status_code == 403


async def _handshake_status(url: str, host: str, origin: str) -> bytes:
    """The status line a raw WebSocket handshake to ``/ws`` gets, as a browser reaching the server as
    ``host`` (behind a proxy, say) would send it."""
    reader, writer = await _connect(url)
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return status


async def test_the_servers_own_origin_may_open_its_websockets(api):
    url = str(api.base_url).rstrip("/")
    assert b" 101 " in await _handshake_status(url, "media.example:8443", "https://media.example:8443")
    assert b" 101 " in await _handshake_status(url, "media.example", "https://media.example")
    assert b" 403 " in await _handshake_status(url, "media.example", "https://other.example")


@pytest.fixture
async def slow_bodies():
    """A server that gives request bodies 0.5 s; yields its URL and a stream's playback id."""
    app = create_app(server_config(KEY, server={"body_timeout_s": 0.5}))
    async with (
        running(app) as url,
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as api,
    ):
        yield url, (await create_stream(api))["output_playback_id"]


async def _trickle(
    url: str, path: str, content_type: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request that declares 1000 bytes of body and sends one."""
    reader, writer = await _connect(url)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {content_type}\r\n"
        "Content-Length: 1000\r\n\r\nv".encode()
    )
    return reader, writer


@pytest.mark.parametrize("door", ["whep", "streams"])
async def test_a_body_that_does_not_arrive_in_time_gets_408(slow_bodies, door):
    url, playback_id = slow_bodies
    path, content_type = {
        "whep": (f"/live/video-to-video/{playback_id}/whep", "application/sdp"),
        "streams": ("/v1/streams", "application/json"),
    }[door]
    reader, writer = await _trickle(url, path, content_type)
    answer = await asyncio.wait_for(reader.read(), 10)  # all of it: the server closes the connection
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert orjson.loads(body)["code"] == "REQUEST/TIMEOUT"


async def test_a_client_leaving_mid_body_is_no_server_error(caplog):
    server_log = logging.getLogger("uvicorn.error")  # where uvicorn reports an app's exceptions
    server_log.addHandler(caplog.handler)
    try:
        app = create_app(server_config(KEY))
        async with running(app) as url:
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as api:
                playback_id = (await create_stream(api))["output_playback_id"]
            _, writer = await _trickle(url, f"/live/video-to-video/{playback_id}/whep", "application/sdp")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        # the server has stopped, so it has handled the disconnect
    finally:
        server_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
