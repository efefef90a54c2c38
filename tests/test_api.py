"""The Daydream-compatible REST API over real HTTP, with a real filter worker on the relay."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import numpy as np
import pytest

from api.server.services import services
from api.streams.ids import ALPHABET
from media.codec import decode_image
from relay.local import LocalProducer, LocalViewer
from tests.api_fixtures import AUTH, KEY, api, serving_worker, worker  # noqa: F401  (fixtures)
from tests.helpers import jpeg

ID_CHARS = f"[{ALPHABET}]"


async def create(api, **params):
    response = await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": params})
    assert response.status_code == 201, response.text
    return response.json()


async def test_create_returns_daydream_stream_object(api):
    stream = await create(api, prompt="cyberpunk city", width=768, height=448)
    assert re.fullmatch(f"str_{ID_CHARS}{{16}}", stream["id"])
    assert re.fullmatch(f"stk_{ID_CHARS}{{16}}", stream["stream_key"])
    assert re.fullmatch(f"{ID_CHARS}{{16}}", stream["output_playback_id"])
    assert stream["whip_url"].endswith(f"/live/video-to-video/{stream['stream_key']}/whip")
    assert stream["output_stream_url"].endswith(f"/live/video-to-video/{stream['output_playback_id']}/whep")
    assert stream["pipeline"] == "streamdiffusion"
    assert stream["from_playground"] is False and stream["is_smoke_test"] is False
    params = stream["params"]
    assert (params["prompt"], params["width"], params["height"]) == ("cyberpunk city", 768, 448)
    assert params["model_id"] == "stabilityai/sd-turbo" and params["seed"] == 789  # defaults filled
    assert params["negative_prompt"] == "blurry, low quality, flat, 2d"
    got = (await api.get(f"/v1/streams/{stream['id']}")).json()
    assert got == stream
    listing = (await api.get("/v1/streams")).json()
    assert listing["success"] is True and [s["id"] for s in listing["data"]] == [stream["id"]]


async def test_deprecated_pipeline_id_form(api):
    response = await api.post(
        "/v1/streams",
        json={
            "pipeline_id": "pip_SDXL-turbo",
            "pipeline_params": {"model_id": "stabilityai/sdxl-turbo", "prompt": "x"},
        },
    )
    assert response.status_code == 201
    assert response.json()["params"]["model_id"] == "stabilityai/sdxl-turbo"


@pytest.mark.parametrize(
    ("pipeline_id", "pipeline_params", "model"),
    [
        (
            "pip_SDXL-turbo",
            {"controlnets": [{"model_id": "xinsir/controlnet-depth-sdxl-1.0"}]},
            "stabilityai/sdxl-turbo",
        ),
        ("pip_SD15", {"ip_adapter": {"type": "regular"}}, "Lykon/dreamshaper-8"),
        ("pip_SDXL-turbo-faceid", {"ip_adapter": {"type": "faceid"}}, "stabilityai/sdxl-turbo"),
    ],
)
async def test_pipeline_params_are_checked_against_the_model_pipeline_id_implies(
    api, pipeline_id, pipeline_params, model
):
    body = {"pipeline_id": pipeline_id, "pipeline_params": pipeline_params}
    response = await api.post("/v1/streams", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["params"]["model_id"] == model


async def test_pipeline_params_still_refuse_a_controlnet_of_another_base_model(api):
    body = {
        "pipeline_id": "pip_SD15",
        "pipeline_params": {"controlnets": [{"model_id": "xinsir/controlnet-depth-sdxl-1.0"}]},
    }
    response = await api.post("/v1/streams", json=body)
    assert response.status_code == 422, response.text
    assert "pipeline_params.controlnets" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"pipeline": "streamdiffusion", "params": {"prompt": "x", "colour": 1}}, 422, "params.colour"),
        ({"pipeline": "streamdiffusion", "params": {"width": 500}}, 422, "params.width"),
        ({"pipeline": "streamdiffusion", "params": {"width": 2048}}, 422, "params.width"),
        ({"pipeline": "streamdiffusion", "params": {"guidance_scale": -1}}, 422, "params.guidance_scale"),
        ({"pipeline": "streamdiffusion", "params": {"t_index_list": [30, 10]}}, 422, "params.t_index_list"),
        ({"pipeline": "streamdiffusion", "params": {"num_inference_steps": 0}}, 422, "num_inference_steps"),
        ({"pipeline": "streamdiffusion", "params": {}, "surprise": True}, 422, "surprise"),
        ({"pipeline": "nope", "params": {}}, 422, "unknown pipeline"),
        ({"params": {}}, 422, "pipeline"),
        ({"pipeline": "streamdiffusion"}, 422, "params"),
    ],
)
async def test_bad_bodies_get_422_naming_the_field(api, body, status, needle):
    response = await api.post("/v1/streams", json=body)
    assert response.status_code == status
    error = response.json()
    assert error["success"] is False and error["status"] == status
    assert needle in error["error"] and error["code"] == "REQUEST/VALIDATION"


async def test_bad_json_is_a_clear_4xx(api):
    response = await api.post(
        "/v1/streams", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["success"] is False


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
async def test_auth_failures_are_401_with_json(api, headers):
    async with httpx.AsyncClient(base_url=str(api.base_url), headers=headers) as anonymous:
        for method, path in (
            ("GET", "/v1/streams"),
            ("POST", "/v1/streams"),
            ("GET", "/v1/streams/x"),
            ("DELETE", "/v1/streams/x"),
        ):
            response = await anonymous.request(method, path, json={})
            assert response.status_code == 401
            assert response.json()["code"] == "AUTH/UNAUTHORIZED"
    assert (await api.get("/health")).status_code == 200  # health needs no key


async def test_unknown_stream_is_404(api):
    for method in ("GET", "DELETE"):
        response = await api.request(method, "/v1/streams/str_doesnotexist")
        assert response.status_code == 404 and response.json()["code"] == "STREAMS/NOT_FOUND"
    assert (await api.get("/v1/streams/str_nope/status")).status_code == 404


async def test_stream_without_worker_reports_loading_and_never_hangs(api):
    stream = await create(api)
    status = (await api.get(f"/v1/streams/{stream['id']}/status")).json()
    assert status["success"] is True and status["error"] is None
    data = status["data"]
    assert (data["state"], data["detail"]) == ("LOADING", "waiting for a worker: none is connected")
    assert data["queue"] == {"position": 1, "in_use": 0, "slots": 0}
    assert data["stream_id"] == stream["id"] and data["worker"] is None


async def test_a_stream_waiting_for_a_slot_says_so_and_is_served_when_one_frees(api):
    async with serving_worker(api.app, capacity=2):
        first, _second, third = [await create(api) for _ in range(3)]
        data = (await api.get(f"/v1/streams/{third['id']}/status")).json()["data"]
        assert data["state"] == "LOADING"
        assert data["detail"] == "waiting for a slot: 2 of 2 in use (1st in the queue)"
        assert data["queue"] == {"position": 1, "in_use": 2, "slots": 2}
        assert (await api.get(f"/v1/streams/{first['id']}/status")).json()["data"]["queue"] is None
        assert (await api.delete(f"/v1/streams/{first['id']}")).status_code == 200
        data = (await api.get(f"/v1/streams/{third['id']}/status")).json()["data"]
        assert data["queue"] is None and data["worker"] is not None  # served as the slot freed


async def run_frames(api, stream_id: str, count: int, size=(512, 512)):
    """Publish ``count`` frames in-process and return the last output frame."""
    hub = services(api.app).relay.hub
    producer, viewer = LocalProducer(hub, stream_id), LocalViewer(hub, stream_id)
    try:
        out = None
        for seed in range(count):
            producer.publish(jpeg(*size, seed=seed), *size)
            out = await viewer.next_frame(10)
        return out
    finally:
        producer.close()
        viewer.close()


async def status_with_rates(api, stream_id: str) -> dict:
    """The stream's status once it shows input and output rates, one more frame before each look.

    Rates cover the last 2 s: a machine stalled between the frames and the look reads 0.
    """
    while True:
        data = (await api.get(f"/v1/streams/{stream_id}/status")).json()["data"]
        if data["inference_status"]["input_fps"] > 0 and data["inference_status"]["output_fps"] > 0:
            return data
        await run_frames(api, stream_id, 1)


async def wait_until_ready(api, stream_id: str) -> dict:
    hub = services(api.app).relay.hub
    viewer = LocalViewer(hub, stream_id, receive="none")
    try:
        while hub.channels[stream_id].engine_state != "ready":
            await viewer.peer.outbox.take()  # reports reach the channel's viewers
    finally:
        viewer.close()
    return (await api.get(f"/v1/streams/{stream_id}/status")).json()["data"]


async def test_stream_with_worker_goes_online_and_reports_metrics(api, worker):
    stream = await create(api, prompt="a pencil sketch")
    await asyncio.wait_for(wait_until_ready(api, stream["id"]), 15)
    await run_frames(api, stream["id"], 10)
    data = await asyncio.wait_for(status_with_rates(api, stream["id"]), 30)
    assert data["state"] == "ONLINE"
    info = data["inference_status"]
    assert info["input_fps"] > 0 and info["output_fps"] > 0
    assert info["last_input_time"] and info["last_output_time"] >= info["last_input_time"] - 1000
    assert data["latency_ms"]["p50"] is not None and data["worker"]
    assert data["engine"]["engine"] == "filter"
    health = (await api.get("/health")).json()
    assert health["status"] == "ok" and health["capacity"] == {"total": 4, "used": 1}
    assert health["workers"][0]["used"] == 1


async def test_hot_params_patch_changes_the_output_without_reload(api, worker):
    stream = await create(api, prompt="a pencil sketch")
    sid = stream["id"]
    await asyncio.wait_for(wait_until_ready(api, sid), 15)
    before = decode_image((await run_frames(api, sid, 2)).payload).astype(int)
    response = await api.patch(f"/v1/streams/{sid}/params", json={"prompt": "photo negative"})
    assert response.status_code == 200 and response.json()["data"]["params"]["prompt"] == "photo negative"
    hub = services(api.app).relay.hub
    version = hub.channels[sid].params_version
    producer, viewer = LocalProducer(hub, sid), LocalViewer(hub, sid)
    frames = 0
    while True:  # within a few frames the worker applies the new version
        producer.publish(jpeg(512, 512, seed=1), 512, 512)
        out = await viewer.next_frame(10)
        frames += 1
        if out.params_version == version:
            break
    producer.close()
    viewer.close()
    after = decode_image(out.payload).astype(int)
    assert frames < 10
    assert np.abs(after - before).mean() > 20
    inverted = 255 - decode_image(jpeg(512, 512, seed=1)).astype(int)
    assert np.abs(after - inverted).mean() < 10
    data = (await api.get(f"/v1/streams/{sid}/status")).json()["data"]
    assert data["inference_status"]["restart_count"] == 0


async def test_params_patch_refuses_reload_fields(api):
    stream = await create(api)
    response = await api.patch(f"/v1/streams/{stream['id']}/params", json={"params": {"width": 768}})
    assert response.status_code == 409
    assert response.json()["details"] == {"reload_fields": ["width"]}
    response = await api.patch(f"/v1/streams/{stream['id']}/params", json={"delta": 7})
    assert response.status_code == 422 and "params.delta" in response.json()["error"]


async def test_reload_patch_merges_params_and_keeps_the_stream_alive(api, worker):
    stream = await create(api, prompt="a pencil sketch", seed=5)
    sid = stream["id"]
    await asyncio.wait_for(wait_until_ready(api, sid), 15)
    response = await api.patch(
        f"/v1/streams/{sid}", json={"pipeline": "streamdiffusion", "params": {"width": 640, "height": 384}}
    )
    assert response.status_code == 200
    params = response.json()["params"]
    assert (params["width"], params["height"], params["seed"], params["prompt"]) == (
        640,
        384,
        5,
        "a pencil sketch",
    )
    out = await run_frames(api, sid, 3, size=(512, 512))
    assert (out.width, out.height) == (640, 384)  # the worker resizes to the stream's size
    assert (await api.get(f"/v1/streams/{sid}/status")).json()["data"]["state"] == "ONLINE"


async def test_delete_frees_worker_and_channel(api, worker):
    stream = await create(api)
    sid = stream["id"]
    await asyncio.wait_for(wait_until_ready(api, sid), 15)
    hub = services(api.app).relay.hub
    assert sid in hub.channels and sid in worker.pipelines
    response = await api.delete(f"/v1/streams/{sid}")
    assert response.status_code == 200 and response.json() == {"success": True, "data": {}}
    assert sid not in hub.channels
    assert all(sid not in w.assigned for w in hub.workers)
    assert (await api.get(f"/v1/streams/{sid}")).status_code == 404
    second = await create(api)
    response = await api.delete("/v1/streams", params={"id": second["id"]})
    assert response.status_code == 200
    assert (await api.delete("/v1/streams", params={"id": second["id"]})).status_code == 404


async def test_metrics_forget_the_streams_that_ended(api, worker):
    ended = []
    for _ in range(3):
        stream = await create(api, prompt="sketch")
        await asyncio.wait_for(wait_until_ready(api, stream["id"]), 15)
        await run_frames(api, stream["id"], 2)
        assert stream["id"] in (await api.get("/metrics")).text
        assert (await api.delete(f"/v1/streams/{stream['id']}")).status_code == 200
        ended.append(stream["id"])
    text = (await api.get("/metrics")).text
    assert not [sid for sid in ended if sid in text]


async def test_metrics_parse_with_prometheus_client(api, worker):
    from prometheus_client.parser import text_string_to_metric_families

    stream = await create(api, prompt="sketch")
    await asyncio.wait_for(wait_until_ready(api, stream["id"]), 15)
    await run_frames(api, stream["id"], 5)
    response = await api.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    label = (("stream", stream["id"]),)
    assert samples[("sd_stream_input_frames_total", label)] == 5
    assert samples[("sd_stream_output_frames_total", label)] == 5
    assert samples[("sd_stream_latency_seconds_count", label)] == 5
    assert samples[("sd_workers", ())] == 1

    async def output_fps() -> float:
        """The rate covers the last 2 s: a machine stalled since the frames reads 0, so one more frame."""
        while True:
            text = (await api.get("/metrics")).text
            fps = [
                s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "sd_stream_output_fps" and s.labels == {"stream": stream["id"]}
            ]
            if fps and fps[0] > 0:
                return fps[0]
            await run_frames(api, stream["id"], 1)

    assert await asyncio.wait_for(output_fps(), 30) > 0


@pytest.mark.parametrize(
    ("params", "field", "needle"),
    [
        (
            {"controlnets": [{"model_id": "lllyasviel/control_v11p_sd15_canny"}]},
            "params.controlnets",
            "SD 1.5 ControlNet",
        ),
        (
            {
                "model_id": "stabilityai/sdxl-turbo",
                "controlnets": [
                    {"model_id": f"xinsir/controlnet-{kind}-sdxl-1.0"}
                    for kind in ("depth", "canny", "tile", "openpose")
                ],
            },
            "params.controlnets",
            "at most 3",
        ),
        ({"ip_adapter": {"type": "regular"}}, "params.ip_adapter", "not SD 2.1"),
    ],
)
async def test_daydream_model_family_rules(api, params, field, needle):
    response = await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": params})
    assert response.status_code == 422
    assert (
        response.json()["error"].startswith(f"invalid field '{field}'") and needle in response.json()["error"]
    )


async def test_model_family_rules_pass_what_fits(api):
    for params in (
        {"controlnets": [{"model_id": "thibaud/controlnet-sd21-canny-diffusers"}]},
        {
            "model_id": "stabilityai/sdxl-turbo",
            "ip_adapter": {"type": "regular"},
            "controlnets": [
                {"model_id": "xinsir/controlnet-depth-sdxl-1.0"},
                {"model_id": "xinsir/controlnet-tile-sdxl-1.0", "enabled": False},
            ],
        },
        {"model_id": "/models/my-own", "controlnets": [{"model_id": "/models/my-controlnet"}]},
    ):
        response = await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": params})
        assert response.status_code == 201, response.text


async def test_patch_validates_like_create_and_bad_json_is_400(api):
    stream = await create(api)
    bogus = await api.patch(f"/v1/streams/{stream['id']}", json={"pipeline": "bogus"})
    assert bogus.status_code == 422 and bogus.json()["error"].startswith("invalid field 'pipeline'")
    for method, url in (("POST", "/v1/streams"), ("PATCH", f"/v1/streams/{stream['id']}")):
        broken = await api.request(
            method, url, content=b'{"pipeline": ', headers={"Content-Type": "application/json"}
        )
        assert broken.status_code == 400 and broken.json()["code"] == "REQUEST/BAD_REQUEST"
        assert "not valid JSON" in broken.json()["error"]


NAN, INF = float("nan"), float("inf")


async def send_json(api, method: str, url: str, body: dict) -> httpx.Response:
    """``body`` with NaN and Infinity written as Python's json writes them (and reads them back):
    httpx's own encoder refuses them, browsers' ``JSON.stringify`` makes them null."""
    content = json.dumps(body, allow_nan=True)
    return await api.request(method, url, content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"prompt": [["a", NAN]]}, "params.prompt.0.1': Input should be a finite number"),
        (
            {"prompt": [["a", 1e308], ["b", 1e308]]},
            "params.prompt.0.1': Input should be less than or equal to 1000",
        ),
        (
            {"seed": [[99999999999999999999999, 1.0]]},
            "params.seed.0.0': Input should be less than or equal to",
        ),
        ({"seed": 10**38}, "params.seed': Input should be less than or equal to 9223372036854775807"),
        ({"seed": [[1, INF]]}, "params.seed.0.1': Input should be a finite number"),
        ({"guidance_scale": NAN}, "params.guidance_scale': Input should be a finite number"),
        (
            {"image_preprocessing": {"processors": [{"type": "blur", "params": {"sigma": INF}}]}},
            "params.image_preprocessing.processors.0.params': Value error, NaN and infinite",
        ),
    ],
)
async def test_numbers_the_engine_cannot_use_are_422_naming_the_field(api, params, needle):
    stream = await create(api)
    response = await send_json(api, "PATCH", f"/v1/streams/{stream['id']}/params", params)
    assert response.status_code == 422, response.text
    assert needle in response.json()["error"]
    response = await send_json(api, "POST", "/v1/streams", {"pipeline": "streamdiffusion", "params": params})
    assert response.status_code == 422 and needle in response.json()["error"]
    assert (await api.get(f"/v1/streams/{stream['id']}")).json()["params"] == stream["params"]


async def test_the_largest_seed_and_weight_are_accepted(api):
    stream = await create(api, seed=[[2**63 - 1, 1000.0]], prompt=[["a", 1000.0], ["b", -1.5]])
    assert stream["params"]["seed"] == [[2**63 - 1, 1000.0]]
