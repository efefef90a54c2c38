"""The worker runtime against a real relay: results, hot params, reloads, errors."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from api.server.services import services
from media.codec import decode_image
from relay.client import connect
from relay.local import LocalProducer, LocalViewer
from tests.api_fixtures import api, create_stream, serving_worker  # noqa: F401  (fixtures)
from tests.helpers import input_frame, jpeg, picture, recv_frame, recv_json
from worker.engines import Engine, EngineError, create_engine
from worker.pipeline import ChannelPipeline, Events, PipelineOptions, load_retry_delay
from worker.runtime import Worker, WorkerOptions


@pytest.fixture
async def filter_worker(relay):
    worker = Worker(WorkerOptions(relay_url=relay.url, engine="filter"))
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 10)
    yield worker
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def params_text(**params: Any) -> str:
    return orjson.dumps({"type": "params", "params": params}).decode()


async def test_filter_worker_end_to_end(relay, filter_worker):
    viewer, _ = await connect(relay.url, "viewer", "cam")
    producer, _ = await connect(relay.url, "producer", "cam", receive="none")
    await producer.send(params_text(effect="edges"))
    await recv_json(producer, "params_ack")
    for seq in (3, 4, 10):
        image = jpeg(128, 96, seed=seq)
        await producer.send(input_frame(seq, image, "cam", 128, 96))
        frame = await recv_frame(viewer)
        while frame.params_version < 1:  # a frame sent before the params reached the engine
            frame = await recv_frame(viewer)
        assert frame.seq == seq and (frame.width, frame.height) == (128, 96)
        expected = create_engine("filter", {"effect": "edges"}).process([decode_image(image)])[0]
        got = decode_image(frame.payload)
        assert np.abs(got.astype(int) - expected).mean() < 12  # JPEG noise only
        assert np.abs(got.astype(int) - decode_image(image)).mean() > 20
    await viewer.close()
    await producer.close()


async def test_hot_params_change_the_output_without_reload(relay, filter_worker):
    producer, _ = await connect(relay.url, "producer", "cam")
    image = jpeg(64, 48, seed=1)
    looks = {}
    for version, effect in enumerate(["sepia", "invert"], start=1):
        await producer.send(params_text(effect=effect))
        await recv_json(producer, "params_ack", version=version)
        seq = version * 100
        while True:  # frames keep flowing; the change shows within a few frames
            await producer.send(input_frame(seq, image, "cam"))
            frame = await recv_frame(producer)
            if frame.params_version == version:
                break
            seq += 1
        looks[effect] = decode_image(frame.payload).astype(int)
    inverted = 255 - decode_image(image).astype(int)
    assert np.abs(looks["invert"] - inverted).mean() < 8
    assert np.abs(looks["sepia"] - looks["invert"]).mean() > 30
    pipeline = filter_worker.pipelines["cam"]
    assert pipeline.stats()["reloading"] is False
    await producer.close()


async def test_rejected_params_are_reported_and_the_stream_goes_on(relay, filter_worker):
    producer, _ = await connect(relay.url, "producer", "cam")
    await producer.send(params_text(effect="glitter"))
    report = await recv_json(producer, "report", event="error")
    assert "glitter" in report["message"]
    await producer.send(input_frame(1, jpeg(), "cam"))
    assert (await recv_frame(producer)).seq == 1
    await producer.close()


async def test_undecodable_image_is_reported_and_the_stream_goes_on(relay, filter_worker):
    producer, _ = await connect(relay.url, "producer", "cam")
    broken = jpeg()[:200]  # a JPEG header with no image data: the relay cannot tell
    await producer.send(input_frame(1, broken, "cam"))
    assert "decode" in (await recv_json(producer, "report", event="error"))["message"]
    await producer.send(input_frame(2, jpeg(), "cam"))
    assert (await recv_frame(producer)).seq == 2
    await producer.close()


class TintEngine(Engine):
    """Adds a colour; ``color`` needs a reload, ``gain`` is hot. Loading waits on ``gate``."""

    name = "tint"
    gate = threading.Event()
    loads = 0

    def load(self) -> None:
        if type(self).loads:  # the first load is free; reloads wait for the test
            assert self.gate.wait(20)
        type(self).loads += 1

    def update(self, params: Mapping[str, Any]) -> set[str]:
        if "color" in params and params["color"] != self.params.get("color"):
            return {"color"}
        self.params.update(params)
        return set()

    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        color = np.array(self.params.get("color", [0, 0, 0]), dtype=np.uint8)
        return [np.full_like(f, color) for f in frames]


async def test_reload_keeps_serving_with_the_old_engine_until_the_new_one_is_ready(relay):
    TintEngine.gate.clear()
    TintEngine.loads = 0
    options = WorkerOptions(relay_url=relay.url, engine="tint", params={"color": [200, 0, 0]})
    worker = Worker(options, factory=TintEngine)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 10)
    producer, _ = await connect(relay.url, "producer", "cam")
    await recv_json(producer, "report", event="ready")

    async def color_of(seq: int) -> tuple[list[int], int]:
        await producer.send(input_frame(seq, jpeg(), "cam"))
        frame = await recv_frame(producer)
        return decode_image(frame.payload)[10, 10].tolist(), frame.params_version

    await producer.send(params_text(color=[0, 0, 200]))
    await recv_json(producer, "report", event="reloading")
    for seq in range(5):  # the new engine is still loading: the old one serves
        (r, _, b), version = await color_of(seq)
        assert r > 180 and b < 20 and version == 0
    TintEngine.gate.set()
    assert (await recv_json(producer, "report", event="ready"))["message"] == "reloaded"
    (r, _, b), version = await color_of(99)
    assert b > 180 and r < 20 and version == 1
    await producer.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_worker_serves_several_channels_with_its_capacity(relay):
    worker = Worker(WorkerOptions(relay_url=relay.url, engine="filter", capacity=2))
    task = asyncio.create_task(worker.run())
    producers = []
    for name, effect in (("a", "invert"), ("b", "posterize")):
        ws, _ = await connect(relay.url, "producer", name)
        await ws.send(params_text(effect=effect))
        producers.append(ws)
    for ws, name in zip(producers, "ab", strict=False):
        await ws.send(input_frame(1, jpeg(), name))
        frame = await recv_frame(ws)
        while frame.params_version < 1:
            await ws.send(input_frame(1, jpeg(), name))
            frame = await recv_frame(ws)
        assert frame.channel == name
    assert sorted(worker.pipelines) == ["a", "b"]
    a = decode_image((await _next_output(producers[0], "a")).payload)
    b = decode_image((await _next_output(producers[1], "b")).payload)
    assert np.abs(a.astype(int) - b).mean() > 30
    for ws in producers:
        await ws.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _next_output(ws, channel):
    await ws.send(input_frame(2, jpeg(), channel))
    return await recv_frame(ws)


def test_picture_helper_is_not_flat():
    assert picture().std() > 20


def test_the_worker_ignores_unknown_and_malformed_relay_messages():
    worker = Worker(WorkerOptions(engine="filter"))
    for text in ('{"type": "from_the_future"}', "not json", '{"type": "assign"}'):
        worker._on_text(text)
    assert worker.pipelines == {}


# -- a failed load is not final -------------------------------------------------------


async def test_a_failed_load_is_retried_when_params_fix_it(relay):
    """The first load fails (an effect the filter engine does not know): the channel stays in
    error, the relay's status says which attempt failed and when the next comes, and params
    that fix it load the engine at once; frames then come back processed."""
    options = WorkerOptions(relay_url=relay.url, engine="filter", params={"effect": "glitter"})
    worker = Worker(options)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 10)
    producer, _ = await connect(relay.url, "producer", "cam")
    error = await recv_json(producer, "report", event="error")
    assert "glitter" in error["message"] and "attempt 1" in error["message"]
    assert "retrying in 2 s" in error["message"]
    assert error["data"]["attempt"] == 1 and error["data"]["retry_in_s"] == 2.0
    channel = relay.hub.stats().channels["cam"]
    assert channel["engine_state"] == "error" and "retrying in 2 s" in channel["last_error"]
    await producer.send(params_text(effect="invert"))
    ready = await recv_json(producer, "report", event="ready")
    assert ready["data"]["effect"] == "invert"
    assert relay.hub.stats().channels["cam"]["engine_state"] == "ready"
    image = jpeg(64, 48, seed=2)
    await producer.send(input_frame(1, image, "cam"))
    frame = await recv_frame(producer)
    assert frame.seq == 1 and frame.params_version == 1
    inverted = 255 - decode_image(image).astype(int)
    assert np.abs(decode_image(frame.payload).astype(int) - inverted).mean() < 8
    pipeline = worker.pipelines["cam"]
    await producer.close()  # released: the pipeline's threads end
    await asyncio.to_thread(pipeline.join, 10)
    assert not any(t.is_alive() for t in pipeline._threads)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class FlakyEngine(Engine):
    """Fails its first ``failures`` loads, then works (returns its input)."""

    name = "flaky"
    failures = 0
    loads = 0

    def load(self) -> None:
        type(self).loads += 1
        if type(self).loads <= self.failures:
            raise RuntimeError(f"out of memory (load {type(self).loads})")

    def update(self, params: Mapping[str, Any]) -> set[str]:
        return set()

    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(frames)


async def test_failed_loads_are_retried_on_their_own_with_backoff(relay):
    FlakyEngine.failures, FlakyEngine.loads = 3, 0
    options = WorkerOptions(relay_url=relay.url, engine="flaky", load_retry_first=0.05, load_retry_max=0.1)
    worker = Worker(options, factory=FlakyEngine)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 10)
    producer, _ = await connect(relay.url, "producer", "cam")
    errors = [await recv_json(producer, "report", event="error") for _ in range(3)]
    assert [e["data"]["attempt"] for e in errors] == [1, 2, 3]
    assert [e["data"]["retry_in_s"] for e in errors] == [0.05, 0.1, 0.1]  # doubling, capped
    assert "out of memory (load 3)" in errors[-1]["message"]
    await recv_json(producer, "report", event="ready")  # with no params change
    assert FlakyEngine.loads == 4
    await producer.send(input_frame(7, jpeg(), "cam"))
    assert (await recv_frame(producer)).seq == 7
    await producer.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_the_load_retry_schedule_doubles_up_to_a_minute():
    assert [load_retry_delay(n) for n in range(1, 9)] == [2, 4, 8, 16, 32, 60, 60, 60]


def test_a_waiting_pipeline_reports_its_next_try_and_stops_at_once():
    """Stats of a channel waiting to retry say so; stopping it ends its threads without the wait."""
    FlakyEngine.failures, FlakyEngine.loads = 100, 0
    reports: list[tuple[Any, str, dict[str, Any]]] = []
    failed = threading.Event()

    def report(event: Any, message: str, data: dict[str, Any]) -> None:
        reports.append((event, message, data))
        failed.set()

    pipeline = ChannelPipeline(
        "cam",
        FlakyEngine,
        {},
        0,
        Events(output=lambda f: None, report=report),
        PipelineOptions(load_retry_first=3600, load_retry_max=3600),
    )
    pipeline.start()
    assert failed.wait(10)
    stats = pipeline.stats()
    assert stats["load_failures"] == 1 and 3500 < stats["next_load_in_s"] <= 3600
    pipeline.stop()
    pipeline.join(5)
    assert not any(t.is_alive() for t in pipeline._threads)
    assert FlakyEngine.loads == 1


class PickyEngine(Engine):
    """Will not load for a prompt that says "broken" (any other prompt loads); returns its input."""

    name = "picky"

    def load(self) -> None:
        if "broken" in str(self.params.get("prompt", "")):
            raise EngineError("cannot load a broken prompt")

    def update(self, params: Mapping[str, Any]) -> set[str]:
        return {"prompt"} if params.get("prompt") != self.params.get("prompt") else set()

    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(frames)


async def engine_state(api, stream_id: str, state: str) -> None:
    """Wait until the relay says the stream's engine is in ``state`` (reports reach its viewers)."""
    hub = services(api.app).relay.hub
    viewer = LocalViewer(hub, stream_id, receive="none")
    try:
        while hub.channels[stream_id].engine_state != state:
            await viewer.peer.outbox.take()
    finally:
        viewer.close()


async def test_a_patch_brings_a_stream_out_of_error(api):
    """Through the API: the status shows ERROR with the failed attempt and the next try; a PATCH
    with params that load reaches the worker and the stream serves."""
    async with serving_worker(api.app, engine="picky", factory=PickyEngine):
        stream = await create_stream(api, prompt="a broken lamp")
        sid = stream["id"]
        await asyncio.wait_for(engine_state(api, sid, "error"), 10)
        data = (await api.get(f"/v1/streams/{sid}/status")).json()["data"]
        assert data["state"] == "ERROR"
        assert re.search(r"attempt 1.*broken prompt.*retrying in 2 s", data["inference_status"]["last_error"])
        response = await api.patch(f"/v1/streams/{sid}", json={"params": {"prompt": "a lamp"}})
        assert response.status_code == 200
        await asyncio.wait_for(engine_state(api, sid, "ready"), 10)
        hub = services(api.app).relay.hub
        with LocalProducer(hub, sid) as producer, LocalViewer(hub, sid) as viewer:
            producer.publish(jpeg(64, 48, seed=3))
            out = await viewer.next_frame(10)
        assert out.params_version == hub.channels[sid].params_version
        data = (await api.get(f"/v1/streams/{sid}/status")).json()["data"]
        assert data["state"] != "ERROR" and data["detail"] == "ready"
