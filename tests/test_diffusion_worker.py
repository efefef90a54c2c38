"""The diffusion engine end to end: relay, ``python -m worker --engine diffusion --model <tiny>``,
producer.
"""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np
import orjson
import pytest

from api.server.services import services
from media.codec import decode_image
from relay.client import connect
from tests.helpers import input_frame, jpeg, recv_frame, recv_json
from tests.test_commands import ROOT

pytestmark = pytest.mark.diffusion
SIZE = 384


@pytest.mark.slow
async def test_worker_process_runs_the_tiny_diffusion_model(relay, tiny):
    defaults = tiny.fast_params(SIZE, prompt="a red fox")
    del defaults["model_id"]  # --model sets it
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--relay",
        relay.url,
        "--engine",
        "diffusion",
        "--model",
        str(tiny.sd),
        "--params",
        orjson.dumps(defaults).decode(),
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        producer, _ = await connect(relay.url, "producer", "cam")
        ready = await recv_json(producer, "report", event="ready")
        assert ready["data"]["engine"] == "diffusion"
        sent = [jpeg(SIZE, SIZE, seed=i) for i in range(4)]
        outputs = []
        for seq, image in enumerate(sent):
            await producer.send(input_frame(seq, image, "cam", SIZE, SIZE))
            frame = await recv_frame(producer)
            assert frame.seq == seq and (frame.width, frame.height) == (SIZE, SIZE)
            outputs.append(decode_image(frame.payload).astype(int))
        assert np.abs(outputs[-1] - decode_image(sent[-1]).astype(int)).mean() > 5  # not an identity
        # a hot params change reaches the engine and is stamped on the next results
        await producer.send(orjson.dumps({"type": "params", "params": {"seed": 7}}).decode())
        version = (await recv_json(producer, "params_ack"))["version"]
        for seq in range(10, 40):
            await producer.send(input_frame(seq, sent[0], "cam", SIZE, SIZE))
            if (await recv_frame(producer)).params_version == version:
                break
        else:
            raise AssertionError("the params change never reached the output")
        await producer.close()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def test_reload_patch_keeps_the_stream_serving_until_the_new_pipeline_is_ready(tiny):
    """PATCH /v1/streams/{id} with a new size: the old pipeline serves while the new one loads."""
    import httpx

    from api.server.app import create_app
    from api.server.http import running
    from relay.local import LocalProducer, LocalViewer
    from tests.api_fixtures import AUTH, KEY, serving_worker
    from tests.helpers import server_config
    from tests.test_api import wait_until_ready

    app = create_app(server_config(KEY, server={"degraded_input_fps": 0}))
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as api:
        api.app = app
        async with serving_worker(app, engine="diffusion"):
            params = tiny.fast_params(SIZE)
            response = await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": params})
            sid = response.json()["id"]
            await asyncio.wait_for(wait_until_ready(api, sid), 60)
            hub = services(app).relay.hub
            producer, viewer = LocalProducer(hub, sid), LocalViewer(hub, sid)
            image = jpeg(SIZE, SIZE, seed=3)

            async def one() -> tuple[int, int]:
                producer.publish(image, SIZE, SIZE)
                frame = await viewer.next_frame(30)  # every frame gets an answer: the stream never stops
                return frame.width, frame.params_version

            assert (await one())[0] == SIZE
            response = await api.patch(f"/v1/streams/{sid}", json={"params": {"width": 448}})
            assert response.status_code == 200 and response.json()["params"]["width"] == 448
            assert response.json()["params"]["model_id"] == str(tiny.sd)  # merged, not replaced
            sizes = []
            while not sizes or sizes[-1] != 448:
                width, _version = await one()
                sizes.append(width)
                assert len(sizes) < 500, "the reload never finished"
            assert sizes[0] == SIZE, "the old pipeline should serve while the new one loads"
            status = (await api.get(f"/v1/streams/{sid}/status")).json()["data"]
            assert status["inference_status"]["restart_count"] == 1 and status["state"] == "ONLINE"
            producer.close()
            viewer.close()
