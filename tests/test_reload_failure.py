"""A PATCH whose new pipeline fails to load: the stream shows the params that really serve, and its
status says which params version failed and why; the store keeps both.

A real diffusion worker (tiny random-weight models on the CPU) is asked to
switch to a model that does not exist; it keeps serving the old one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from api.streams.store import StreamStore
from relay.local import LocalProducer, LocalViewer
from tests.api_fixtures import AUTH, KEY, serving_worker
from tests.helpers import jpeg, server_config
from tests.test_api import wait_until_ready

pytestmark = pytest.mark.diffusion
SIZE = 384


async def failure_reported(client: httpx.AsyncClient, stream_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        data = (await client.get(f"/v1/streams/{stream_id}/status")).json()["data"]
        if data["inference_status"]["last_reload_error"]:
            return data
        assert time.monotonic() < deadline, f"no reload failure reported: {data['inference_status']}"
        await asyncio.sleep(0.1)  # polling the status, bounded by the deadline


async def test_a_failed_reload_keeps_the_serving_params_and_says_why(tiny, tmp_path: Path):
    settings = server_config(KEY, server={"data_dir": str(tmp_path / "data"), "degraded_input_fps": 0})
    app = create_app(settings)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
        client.app = app  # type: ignore[attr-defined]
        async with serving_worker(app, engine="diffusion"):
            params = tiny.fast_params(SIZE, prompt="a fox")
            created = await client.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": params})
            sid = created.json()["id"]
            await asyncio.wait_for(wait_until_ready(client, sid), 120)
            missing = str(tmp_path / "no-such-model")
            before = (await client.get(f"/v1/streams/{sid}/status")).json()["data"]["params_version"]
            patched = await client.patch(
                f"/v1/streams/{sid}", json={"params": {"model_id": missing, "prompt": "a cat"}}
            )
            assert patched.status_code == 200 and patched.json()["params"]["model_id"] == missing  # as asked
            version = before + 1  # the PATCH's (the failure may be back before a status is read)

            status = await failure_reported(client, sid)
            failure = status["inference_status"]["last_reload_error"]
            assert failure["params_version"] == version, failure
            assert failure["rejected_params"] == {"model_id": missing}
            assert "no-such-model" in failure["error"] and f"version {version}" in failure["error"], failure
            # what serves: the old model, with the change's hot field (the prompt) applied
            stream = (await client.get(f"/v1/streams/{sid}")).json()
            assert stream["params"]["model_id"] == str(tiny.sd) and stream["params"]["prompt"] == "a cat"
            assert status["inference_status"]["last_params"] == stream["params"]
            assert status["state"] != "ERROR" and status["params_version"] == version + 1
            assert services(app).hub.channels[sid].params["model_id"] == str(tiny.sd)  # a new worker loads it

            # it still serves, and a hot change on top does not try the missing model again
            hub = services(app).hub
            with LocalProducer(hub, sid) as producer, LocalViewer(hub, sid) as viewer:
                producer.publish(jpeg(SIZE, SIZE), SIZE, SIZE)
                frame = await viewer.next_frame(60)
            assert (frame.width, frame.height) == (SIZE, SIZE)
            restarts = status["inference_status"]["restart_count"]
            again = await client.patch(f"/v1/streams/{sid}", json={"params": {"prompt": "a dog"}})
            assert again.json()["params"]["model_id"] == str(tiny.sd)
            after = (await client.get(f"/v1/streams/{sid}/status")).json()["data"]
            assert after["inference_status"]["restart_count"] == restarts

            # the store has what serves and the failure
            store = StreamStore.in_directory(settings.server.data_dir)
            try:
                (stored,) = await store.load()
            finally:
                store.close()
            assert stored.params["model_id"] == str(tiny.sd) and stored.params["prompt"] == "a dog"
            assert stored.reload_failure is not None and stored.reload_failure.version == version
