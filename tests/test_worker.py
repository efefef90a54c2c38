"""The worker runtime against a real relay: results, hot params, reloads, errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from media.codec import decode_image
from relay.client import connect
from tests.helpers import input_frame, jpeg, picture, recv_frame, recv_json
from worker.engines import Engine, create_engine
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
    for ws, name in zip(producers, "ab"):
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
