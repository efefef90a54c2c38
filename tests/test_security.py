"""Doors that need keys and inputs with limits: what an anonymous or careless client cannot do."""

from __future__ import annotations

import httpx

from tests.api_fixtures import api, create_stream, worker  # noqa: F401
from tests.test_webrtc import PatternTrack, publish


def anonymous(api: httpx.AsyncClient) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=str(api.base_url), timeout=15)


async def test_only_the_stream_key_publishes_on_the_short_whip_route(api, worker):
    stream = await create_stream(api)
    async with anonymous(api) as client:
        by_id = await client.post(f"/whip/{stream['id']}", content="v=0\r\n",
                                  headers={"Content-Type": "application/sdp"})
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
    declared = await api.post("/v1/streams", content=b"{" + b" " * (9 * 2**20) + b"}",
                              headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert declared.json()["code"] == "REQUEST/TOO_LARGE" and declared.json()["details"]["max_body_bytes"]

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 2**20

    chunked = await api.post("/v1/streams", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert not (await api.get("/v1/streams")).json()["data"]


async def test_prompts_are_bounded_and_errors_name_the_field_sent(api):
    long = await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": {"prompt": "x" * 4001}})
    assert long.status_code == 422 and long.json()["error"].startswith("invalid field 'params.prompt'")
    seed = await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": {"seed": -1}})
    assert seed.status_code == 422 and seed.json()["error"].startswith("invalid field 'params.seed'")
    assert all("constrained" not in ".".join(d["loc"]) for d in seed.json()["details"])


