"""A slow engine load says how far it is: progress reports to the relay, ``progress`` in the status."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from api.server.services import services
from tests.api_fixtures import api, create_stream, eventually, serving_worker  # noqa: F401  (fixture)
from wire.messages import ReportEvent
from worker.engines import Engine
from worker.pipeline import LoadProgress

GATE = threading.Event()


class SlowLoader(Engine):
    """Loads in stages (a download measured in bytes, then a warm-up) and waits at the end for the test."""

    name = "slow"

    def load(self) -> None:
        for done in (100, 200, 300):
            self.progress("downloading weights", done, 300, "bytes")
        self.progress("warming up")
        GATE.wait(30)

    def update(self, params: Mapping[str, Any]) -> set[str]:
        return set()

    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(frames)


async def test_a_slow_load_shows_its_stage_in_the_status_then_clears_when_ready(api):
    GATE.clear()
    try:
        async with serving_worker(api.app, engine="slow", factory=SlowLoader):
            sid = (await create_stream(api))["id"]
            hub = services(api.app).relay.hub
            await eventually(lambda: (hub.channels[sid].progress or {}).get("stage") == "warming up")
            data = (await api.get(f"/v1/streams/{sid}/status")).json()["data"]
            assert data["state"] == "LOADING" and data["progress"]["stage"] == "warming up"
            GATE.set()
            await eventually(lambda: hub.channels[sid].engine_state == "ready")
            assert (await api.get(f"/v1/streams/{sid}/status")).json()["data"]["progress"] is None
    finally:
        GATE.set()


def test_progress_reports_each_stage_at_once_and_its_steps_at_most_every_quarter_second():
    sent: list[dict[str, Any]] = []
    now = [100.0]
    progress = LoadProgress(
        lambda event, message, data: sent.append({"event": event, **data}), lambda: now[0]
    )
    for done in range(0, 1001, 10):  # a download: a call every 10 ms of the (test's) clock
        progress("downloading weights", done, 1000, "bytes")
        now[0] += 0.01
    progress("warming up", None, None, "steps")
    assert {r["event"] for r in sent} == {ReportEvent.PROGRESS}
    first, *middle, complete, warming = sent
    assert (first["stage"], first["done"], first["total"]) == ("downloading weights", 0, 1000)
    assert first["unit"] == "bytes" and first["fraction"] == 0.0
    assert [r["done"] for r in middle] == [250, 500, 750]  # at most one every 0.25 s
    assert middle[0]["fraction"] == 0.25 and abs(middle[0]["eta_s"] - 0.75) < 0.1  # a quarter in 0.25 s
    assert (complete["done"], complete["fraction"]) == (1000, 1.0)  # a stage's end is always said
    assert (warming["stage"], warming["done"], warming["total"]) == ("warming up", None, None)


@pytest.mark.diffusion
def test_the_diffusion_engine_says_its_load_stages(tiny):
    from worker.engines.diffusion import DiffusionEngine

    stages: list[tuple[str, float | None, float | None]] = []
    engine = DiffusionEngine(tiny.fast_params())
    engine.on_progress = lambda stage, done, total, unit: stages.append((stage, done, total))
    engine.load()
    engine.close()
    names = [stage for stage, _, _ in stages]
    assert names[0].startswith("loading ") and names[-1] == "warming up"
    assert any(name.startswith(("accelerating the UNet", "building the TensorRT")) for name in names)
    assert [done for _, done, _ in stages] == sorted(done for _, done, _ in stages)  # forward only
    assert {total for _, _, total in stages} == {4}


def test_a_tensorrt_build_is_named_as_one():
    from worker.engines.diffusion.model import acceleration_stage

    assert acceleration_stage("tensorrt").startswith("building the TensorRT engine")
    assert acceleration_stage("sdpa") == "accelerating the UNet (sdpa)"
