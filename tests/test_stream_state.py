"""A stream fed slower than ``server.degraded_input_fps`` is DEGRADED_INPUT, and ONLINE again once
its input recovers; a real filter worker serves it."""

from __future__ import annotations

import asyncio
import time

import httpx

from api.server.app import create_app
from api.server.config import load_config
from api.server.http import running
from api.streams.manager import stream_state
from tests.api_fixtures import AUTH, KEY, create_stream, feeding, serving_worker
from tests.helpers import server_config
from tests.test_api import wait_until_ready

SIZE = 384


async def state_becomes(client: httpx.AsyncClient, stream_id: str, wanted: str, timeout: float = 20) -> dict:
    """Poll the status until its state is ``wanted``; the last status seen in the failure."""
    deadline = time.monotonic() + timeout
    while True:
        data = (await client.get(f"/v1/streams/{stream_id}/status")).json()["data"]
        if data["state"] == wanted:
            return data
        assert time.monotonic() < deadline, f"never {wanted}: {data['state']}, {data['inference_status']}"
        await asyncio.sleep(0.1)  # polling a status, bounded by the deadline


async def test_slow_input_is_degraded_and_recovers():
    settings = server_config(KEY)
    assert settings.server.degraded_input_fps == 15  # Daydream's runner's threshold
    app = create_app(settings)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:
        client.app = app  # type: ignore[attr-defined]
        async with serving_worker(app):
            stream = await create_stream(client, width=SIZE, height=SIZE)
            await asyncio.wait_for(wait_until_ready(client, stream["id"]), 15)
            assert (await state_becomes(client, stream["id"], "OFFLINE"))["inference_status"][
                "input_fps"
            ] == 0
            rate = [5.0]
            async with feeding(client, stream["id"], SIZE, rate):
                slow = await state_becomes(client, stream["id"], "DEGRADED_INPUT")
                assert 0 < slow["inference_status"]["input_fps"] < 15
                rate[0] = 30.0
                fast = await state_becomes(client, stream["id"], "ONLINE")
                assert fast["inference_status"]["input_fps"] >= 15
                rate[0] = 5.0
                await state_becomes(client, stream["id"], "DEGRADED_INPUT")
            await state_becomes(client, stream["id"], "OFFLINE")


def test_the_threshold_is_configurable_and_zero_turns_it_off():
    assert stream_state("ready", 10.0, 10.0, 15.0) == "DEGRADED_INPUT"
    assert stream_state("ready", 10.0, 10.0, 5.0) == "ONLINE"
    assert stream_state("ready", 1.0, 1.0, 0.0) == "ONLINE"
    assert stream_state("ready", 0.0, 0.0, 0.0) == "OFFLINE"
    assert stream_state("ready", 30.0, 5.0, 15.0) == "DEGRADED_INFERENCE"
    assert stream_state("loading", 2.0, 0.0, 15.0) == "LOADING"


def test_the_config_file_sets_it():
    config = load_config(None, {"server": {"degraded_input_fps": 5}})
    assert config.server.degraded_input_fps == 5
    assert load_config(None, {}).server.degraded_input_fps == 15
