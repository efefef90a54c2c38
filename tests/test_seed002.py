"""Seed 002's example scripts, as they behave, against the relay.

The clients here do exactly what the seed's scripts do: the producer sends
``register`` first and waits for one reply, then reads exactly one reply per
image it sends; the consumer registers (or just connects and listens) and
receives base64 ``image`` messages; ``prompt_update`` and ``ping`` are
answered. Nothing here sends a hello.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from media.codec import decode_image, encode_image
from relay.config import RelayConfig
from relay.server import Relay
from tests.helpers import EchoWorker, input_frame, jpeg, recv_json
from wire.frames import ImageFormat
from worker.runtime import Worker, WorkerOptions

pytestmark = pytest.mark.asyncio

#: the seed producer's wait for the reply to its ``register``
REGISTER_WAIT = 5.0


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    # a short hello timeout: the silent consumer is recognised sooner, nothing else changes
    async with Relay(RelayConfig(port=0, hello_timeout=0.5)) as running:
        yield running


def image_message(payload: bytes, fmt: str = "jpeg") -> str:
    return orjson.dumps(
        {"type": "image", "format": fmt, "data": base64.b64encode(payload).decode(), "timestamp": time.time()}
    ).decode()


async def one_reply(ws: ClientConnection, timeout: float = REGISTER_WAIT) -> dict[str, Any]:
    """What the seed's scripts do after each message: read exactly one reply."""
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str)
    reply: dict[str, Any] = orjson.loads(message)
    return reply


async def register(url: str, client_type: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await websockets.connect(url, compression=None)
    await ws.send(orjson.dumps({"type": "register", "client_type": client_type}).decode())
    return ws, await one_reply(ws)


async def nothing_else_pending(ws: ClientConnection) -> None:
    """A ping's pong is the next message: nothing unasked was queued before it."""
    await ws.send('{"type": "ping"}')
    reply = await one_reply(ws)
    assert reply["type"] == "pong" and isinstance(reply["timestamp"], float), reply


async def test_the_producer_script_registers_then_reads_one_ack_per_image(relay: Relay) -> None:
    worker = await EchoWorker(relay.url).start()
    serving = asyncio.create_task(worker.serve())
    producer, reply = await register(relay.url, "producer")
    assert reply["type"] == "registered" and reply["client_type"] == "producer"
    assert abs(reply["timestamp"] - time.time()) < 60 and reply["channel"] == "default"
    for i in range(8):
        await producer.send(image_message(jpeg(seed=i)))
        assert await one_reply(producer) == {"type": "ack", "status": "received"}
    await nothing_else_pending(producer)  # no results, no status: its replies stay one per message
    assert relay.hub.channels["default"].frames_in.total == 8  # each ack follows its image's routing
    await producer.close()
    serving.cancel()
    await worker.close()


async def test_a_producer_with_no_worker_still_gets_exactly_its_acks(relay: Relay) -> None:
    producer = await websockets.connect(relay.url)  # no register: the image is the handshake
    for i in range(3):
        await producer.send(image_message(jpeg(seed=i)))
        assert (await one_reply(producer))["type"] == "ack"
    await nothing_else_pending(producer)  # never told "waiting_for_worker" unasked
    await producer.close()


@pytest.mark.parametrize("registers", [True, False], ids=["registered", "silent"])
async def test_consumers_receive_the_producers_images_as_base64(relay: Relay, registers: bool) -> None:
    if registers:
        consumer, reply = await register(relay.url, "consumer")
        assert reply["type"] == "registered" and reply["client_type"] == "consumer"
    else:  # the seed's consumer connects and listens: taken for one after the hello timeout
        consumer = await websockets.connect(relay.url)
        await asyncio.wait_for(_until_viewers(relay, "default", 1), 5)
    producer, _ = await register(relay.url, "producer")
    sent = [jpeg(seed=i) for i in range(3)]
    for payload in sent:
        await producer.send(image_message(payload))
        assert (await one_reply(producer))["type"] == "ack"
        image = await recv_json(consumer, "image")
        assert base64.b64decode(image["data"]) == payload and image["format"] == "jpeg"
    await producer.close()
    await consumer.close()


async def _until_viewers(relay: Relay, channel: str, count: int) -> None:
    while (c := relay.hub.channels.get(channel)) is None or len(c.viewers) < count:
        await asyncio.sleep(0.01)


async def test_two_producers_on_the_default_url_each_get_their_own_results(relay: Relay) -> None:
    workers = [await EchoWorker(relay.url).start() for _ in range(2)]
    serving = [asyncio.create_task(w.serve()) for w in workers]
    producers = [await websockets.connect(relay.url + "/?receive=output") for _ in range(2)]
    channels = []
    for n, producer in enumerate(producers):
        await producer.send(orjson.dumps({"type": "register", "client_type": "producer"}).decode())
        channels.append((await one_reply(producer))["channel"])
        # results asked for: an ack, then this producer's own processed image
        payload = jpeg(seed=10 + n)
        await producer.send(image_message(payload))
        assert (await one_reply(producer))["type"] == "ack"
        result = await recv_json(producer, "image")
        assert base64.b64decode(result["data"]) == payload and result["channel"] == channels[n]
    assert channels[0] == "default" and channels[1].startswith("default-") and len(set(channels)) == 2
    # naming the same channel shares it
    a, b = [await websockets.connect(relay.url + "/studio") for _ in range(2)]
    for ws in (a, b):
        await ws.send(orjson.dumps({"type": "register", "client_type": "producer"}).decode())
        assert (await one_reply(ws))["channel"] == "studio"
    for ws in (*producers, a, b):
        await ws.close()
    for task in serving:
        task.cancel()
    for w in workers:
        await w.close()


async def test_a_declared_format_that_does_not_match_gets_the_binary_frames_error(relay: Relay) -> None:
    worker = await EchoWorker(relay.url).start()
    producer = await websockets.connect(relay.url)
    await producer.send(image_message(jpeg(), fmt="png"))  # JPEG bytes said to be PNG
    as_json = await one_reply(producer)
    binary = await websockets.connect(relay.url + "/cam?role=producer&receive=none")
    await binary.send(input_frame(0, jpeg(), "cam", fmt=ImageFormat.PNG))
    as_frame = await recv_json(binary, "error")
    assert (
        as_json
        == as_frame
        == {
            "type": "error",
            "code": "bad_image",
            "message": "declared png but the image is jpeg",
        }
    )
    await producer.send(image_message(jpeg()))  # the connection goes on
    assert (await one_reply(producer))["type"] == "ack"
    for ws in (producer, binary):
        await ws.close()
    await worker.close()


async def test_register_answers_and_refusals_are_one_reply_each(relay: Relay) -> None:
    consumer, _ = await register(relay.url, "consumer")
    await consumer.send('{"type": "prompt_update", "prompt": "a cat"}')  # consumers change nothing
    assert (await one_reply(consumer))["code"] == "not_allowed"
    await consumer.send('{"type": "register", "client_type": "consumer"}')  # again: confirmed
    assert (await one_reply(consumer))["type"] == "registered"
    await consumer.send('{"type": "register", "client_type": "producer"}')
    assert (await one_reply(consumer))["code"] == "not_allowed"
    await nothing_else_pending(consumer)
    bad = await websockets.connect(relay.url)
    await bad.send('{"type": "register", "client_type": "wizard"}')
    assert (await one_reply(bad))["code"] == "bad_message"
    await asyncio.wait_for(bad.wait_closed(), 5)
    assert bad.close_code == 1008
    await consumer.close()


def solid(value: int) -> bytes:
    return encode_image(np.full((48, 64, 3), value, np.uint8), ImageFormat.JPEG)


async def test_prompt_update_changes_the_output_from_the_next_frame(relay: Relay) -> None:
    """With a real filter worker: the prompt "negative" inverts its output."""
    worker = Worker(WorkerOptions(relay_url=relay.url, engine="filter"))
    running = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 10)
    producer, reply = await register(relay.url, "producer")
    viewer = await websockets.connect(f"{relay.url}/{reply['channel']}?role=viewer&encoding=json")

    async def round_trip() -> float:
        """One image, its one ack, and the mean value of its result (the viewer reads it)."""
        await producer.send(image_message(solid(40)))
        assert (await one_reply(producer))["type"] == "ack"
        image = await recv_json(viewer, "image")
        return float(decode_image(base64.b64decode(image["data"])).mean())

    assert await round_trip() < 80
    await producer.send(
        orjson.dumps({"type": "prompt_update", "prompt": "negative", "timestamp": 1.0}).decode()
    )
    updated = await one_reply(producer)
    assert updated["type"] == "prompt_updated" and updated["status"] == "success"
    assert updated["prompt"] == "negative" and updated["version"] >= 1
    assert relay.hub.channels[reply["channel"]].params["prompt"] == "negative"
    means = [await round_trip() for _ in range(10)]
    assert means[-1] > 170  # 255 - 40, inverted once the worker applied the new prompt
    assert all(m < 80 or m > 170 for m in means)
    await producer.close()
    await viewer.close()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


async def test_an_oversized_prompt_update_gets_an_error_and_the_prompt_stays(relay: Relay) -> None:
    producer, reply = await register(relay.url, "producer")
    await producer.send(orjson.dumps({"type": "prompt_update", "prompt": "x" * 300_000}).decode())
    error = await one_reply(producer)
    assert error["type"] == "error" and error["code"] == "params_too_large"
    assert "prompt" not in relay.hub.channels[reply["channel"]].params
    await nothing_else_pending(producer)
    await producer.close()
