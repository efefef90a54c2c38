"""The relay with real websockets peers on loopback."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import websockets

from relay import Relay, RelayConfig
from relay.client import RelayRefused, connect
from tests.helpers import EchoWorker, input_frame, jpeg, noise_png, recv_frame, recv_json
from wire.frames import FrameKind, ImageFormat


async def test_producer_worker_viewer_round_trip_keeps_sequence_numbers(relay):
    worker = await EchoWorker(relay.url).start()
    serving = asyncio.create_task(worker.serve())
    viewer, _ = await connect(relay.url, "viewer", "cam")
    producer, welcome = await connect(relay.url, "producer", "cam", receive="none")
    assert welcome["role"] == "producer" and welcome["limits"]["max_frame_bytes"] > 0
    assert await asyncio.wait_for(worker.assigned.get(), 5) == "cam"
    sent = [5, 6, 9, 1000, 2**40]
    for seq in sent:
        await producer.send(input_frame(seq, jpeg(seed=seq), channel="cam"))
        frame = await recv_frame(viewer)
        assert (frame.seq, frame.kind, frame.channel) == (seq, FrameKind.OUTPUT, "cam")
    assert worker.received == sent
    serving.cancel()
    for ws in (viewer, producer):
        await ws.close()
    await worker.close()


async def test_slow_worker_gets_the_newest_frame_not_a_queue(relay):
    """A worker that stops reading: the relay keeps one pending frame for it and counts drops,
    while a viewer of the raw input keeps full rate."""
    count = 120
    big = noise_png(600, 600)  # ~1 MB: socket buffers fill after a few frames
    worker = await EchoWorker(relay.url, max_queue=1).start()
    fast, _ = await connect(relay.url, "viewer", "ch", receive="input")
    producer, _ = await connect(relay.url, "producer", "ch", receive="none")
    for seq in range(count):  # lockstep with the fast viewer: it never falls behind
        await producer.send(input_frame(seq, big, "ch", 600, 600, ImageFormat.PNG))
        assert (await recv_frame(fast)).seq == seq
    # now the stalled worker reads what reached it
    stats = relay.hub.stats().channels["ch"]
    dropped = stats["drops"]["worker"]
    received: list[int] = []
    while not received or received[-1] != count - 1:
        received.append((await recv_frame(worker.ws)).seq)
    assert received == sorted(received)
    assert dropped > count // 2
    assert len(received) + relay.hub.stats().channels["ch"]["drops"]["worker"] == count
    for ws in (fast, producer):
        await ws.close()
    await worker.close()


async def test_slow_viewer_drops_while_fast_viewer_keeps_full_rate(relay):
    count = 120
    big = noise_png(600, 600)
    worker = await EchoWorker(relay.url).start()
    serving = asyncio.create_task(worker.serve())
    slow, _ = await connect(relay.url, "viewer", "ch", max_queue=1)
    fast, _ = await connect(relay.url, "viewer", "ch")
    producer, _ = await connect(relay.url, "producer", "ch", receive="none")
    await asyncio.wait_for(worker.assigned.get(), 5)
    for seq in range(count):
        await producer.send(input_frame(seq, big, "ch", 600, 600, ImageFormat.PNG))
        assert (await recv_frame(fast)).seq == seq
    assert worker.received == list(range(count))
    received: list[int] = []
    while not received or received[-1] != count - 1:
        received.append((await recv_frame(slow)).seq)
    drops = relay.hub.stats().channels["ch"]["drops"]["viewers"]
    assert len(received) < count // 2 and received == sorted(received)
    assert len(received) + drops == count
    serving.cancel()
    for ws in (slow, fast, producer):
        await ws.close()
    await worker.close()


async def test_second_worker_takes_over_when_the_first_leaves(relay):
    first = await EchoWorker(relay.url).start()
    first_serving = asyncio.create_task(first.serve())
    viewer, _ = await connect(relay.url, "viewer", "cam")
    producer, _ = await connect(relay.url, "producer", "cam", receive="none")
    await asyncio.wait_for(first.assigned.get(), 5)
    second = await EchoWorker(relay.url).start()  # idle: the channel stays with the first
    second_serving = asyncio.create_task(second.serve())
    for seq in range(3):
        await producer.send(input_frame(seq, jpeg(seed=seq), "cam"))
        assert (await recv_frame(viewer)).seq == seq
    first_serving.cancel()
    await first.close()
    status = await recv_json(viewer, "status", state="assigned")
    assert status["worker"] == second.session
    for seq in range(3, 6):
        await producer.send(input_frame(seq, jpeg(seed=seq), "cam"))
        assert (await recv_frame(viewer)).seq == seq
    assert first.received == [0, 1, 2] and second.received == [3, 4, 5]
    second_serving.cancel()
    await second.close()
    for ws in (viewer, producer):
        await ws.close()


async def test_producer_waits_for_a_worker_and_is_told(relay):
    producer, _ = await connect(relay.url, "producer", "lonely")
    status = await recv_json(producer, "status")
    assert status == {
        "type": "status",
        "channel": "lonely",
        "state": "waiting_for_worker",
        "position": 1,
        "in_use": 0,
        "slots": 0,
    }
    await producer.send(input_frame(0, jpeg(), "lonely"))
    await producer.send(orjson.dumps({"type": "stats"}).decode())
    stats = await recv_json(producer, "stats")
    assert stats["channels"]["lonely"]["drops"]["no_worker"] == 1
    worker = await EchoWorker(relay.url).start()
    assert (await recv_json(worker.ws, "assign"))["channel"] == "lonely"
    assert (await recv_json(producer, "status"))["state"] == "assigned"
    await producer.close()
    await worker.close()


async def test_params_reach_the_worker_with_a_version(relay):
    worker = await EchoWorker(relay.url).start()
    producer, _ = await connect(relay.url, "producer", "p")
    await producer.send(orjson.dumps({"type": "params", "params": {"prompt": "a cat"}}).decode())
    assert (await recv_json(producer, "params_ack"))["version"] == 1
    await producer.send(orjson.dumps({"type": "params", "params": {"seed": 3}}).decode())
    assert (await recv_json(producer, "params_ack"))["version"] == 2
    first = await recv_json(worker.ws, "params")
    second = await recv_json(worker.ws, "params")
    assert first["params"] == {"prompt": "a cat"}
    assert second == {
        "type": "params",
        "channel": "p",
        "params": {"prompt": "a cat", "seed": 3},
        "version": 2,
    }
    await producer.close()
    await worker.close()


async def test_seed_002_client_asking_for_results_gets_acks_and_results(relay):
    import base64

    worker = await EchoWorker(relay.url).start()
    serving = asyncio.create_task(worker.serve())
    async with websockets.connect(relay.url + "/?receive=output") as legacy:  # no hello
        for i in range(3):
            image = jpeg(seed=i)
            await legacy.send(
                orjson.dumps(
                    {
                        "type": "image",
                        "format": "jpeg",
                        "data": base64.b64encode(image).decode(),
                        "timestamp": 1234567890.123 + i,
                    }
                ).decode()
            )
            assert await recv_json(legacy, "ack") == {"type": "ack", "status": "received"}
            result = await recv_json(legacy, "image")
            assert result["format"] == "jpeg" and result["timestamp"] == 1234567890.123 + i
            assert base64.b64decode(result["data"]) == image  # the echo worker's output
    assert worker.received == [0, 1, 2]
    serving.cancel()
    await worker.close()


async def test_legacy_viewer_by_url_gets_base64_images(relay):
    import base64

    worker = await EchoWorker(relay.url).start()
    serving = asyncio.create_task(worker.serve())
    async with websockets.connect(relay.url + "/room?role=viewer&encoding=json") as viewer:
        producer, _ = await connect(relay.url, "producer", "room", receive="none")
        await producer.send(input_frame(7, jpeg(seed=7), "room"))
        result = await recv_json(viewer, "image")
        assert result["seq"] == 7 and base64.b64decode(result["data"]) == jpeg(seed=7)
        await producer.close()
    serving.cancel()
    await worker.close()


BAD_INPUTS = [
    ("not json at all", "bad_message"),
    ('{"no": "type"}', "bad_message"),
    ('{"type": "launch_missiles"}', "bad_message"),
    ('{"type": "image", "format": "jpeg", "data": "***"}', "bad_image"),
    ('{"type": "image", "format": "gif", "data": "R0lGODlh"}', "bad_image"),
    ('{"type": "hello", "role": "producer"}', "bad_message"),
    (b"\x00" * 10, "bad_message"),
    (b"SD" + b"\x09" * 40, "bad_message"),
]


@pytest.mark.parametrize(("message", "code"), BAD_INPUTS)
async def test_malformed_messages_get_an_error_and_the_stream_goes_on(relay, message, code):
    worker = await EchoWorker(relay.url).start()
    serving = asyncio.create_task(worker.serve())
    other_viewer, _ = await connect(relay.url, "viewer", "other")
    other, _ = await connect(relay.url, "producer", "other", receive="none")
    producer, _ = await connect(relay.url, "producer", "cam")
    worker2 = await EchoWorker(relay.url).start()
    serving2 = asyncio.create_task(worker2.serve())
    await recv_json(producer, "status", state="assigned")
    await producer.send(message)
    error = await recv_json(producer, "error")
    assert error["code"] == code and error["message"]
    # the same connection still works, and the other channel lost nothing
    await producer.send(input_frame(1, jpeg(), "cam"))
    assert (await recv_frame(producer)).seq == 1
    for seq in range(5):
        await other.send(input_frame(seq, jpeg(seed=seq), "other"))
        assert (await recv_frame(other_viewer)).seq == seq
    for task in (serving, serving2):
        task.cancel()
    for ws in (producer, other, other_viewer):
        await ws.close()
    await worker.close()
    await worker2.close()


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda: input_frame(1, b"this is not an image at all", "cam"), "bad_image"),
        (lambda: input_frame(1, jpeg(64, 48), "cam", width=100, height=48), "bad_image"),
        (lambda: input_frame(1, jpeg(64, 48), "cam", fmt=ImageFormat.PNG), "bad_image"),
        (lambda: input_frame(1, jpeg(64, 48), "elsewhere"), "unknown_channel"),
        (lambda: input_frame(1, jpeg(320, 240), "cam", 320, 240), "resolution_too_large"),
        (lambda: input_frame(1, noise_png(200, 200), "cam", 200, 200, ImageFormat.PNG), "frame_too_large"),
    ],
)
async def test_bad_frames_are_refused_with_a_clear_code(build, code):
    config = RelayConfig(port=0, max_frame_bytes=64 * 1024, max_width=256, max_height=256)
    async with Relay(config) as relay:
        worker = await EchoWorker(relay.url).start()
        producer, _ = await connect(relay.url, "producer", "cam", receive="none")
        await producer.send(build())
        assert (await recv_json(producer, "error"))["code"] == code
        assert worker.received == []
        await producer.send(input_frame(2, jpeg(), "cam"))
        assert (await recv_frame(worker.ws)).seq == 2
        await producer.close()
        await worker.close()


async def test_viewers_cannot_send_frames_and_workers_only_their_channels(relay):
    viewer, _ = await connect(relay.url, "viewer", "cam")
    await viewer.send(input_frame(1, jpeg(), "cam"))
    assert (await recv_json(viewer, "error"))["code"] == "not_allowed"
    worker = await EchoWorker(relay.url).start()
    out = input_frame(1, jpeg(), "nobody")
    await worker.ws.send(out)
    assert (await recv_json(worker.ws, "error"))["code"] == "unknown_channel"
    await viewer.close()
    await worker.close()


async def test_tokens_are_required_when_configured():
    async with Relay(RelayConfig(port=0, tokens=frozenset({"s3cret"}))) as relay:
        for token in (None, "wrong"):
            with pytest.raises(RelayRefused) as refused:
                await connect(relay.url, "producer", "cam", token=token)
            assert refused.value.code == "unauthorized"
        async with websockets.connect(relay.url + "/cam?role=viewer&token=nope") as ws:
            assert orjson.loads(await ws.recv())["code"] == "unauthorized"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1008
        ws, welcome = await connect(relay.url, "producer", "cam", token="s3cret")
        assert welcome["type"] == "welcome"
        await ws.close()


async def test_wrong_role_unknown_channel_and_channel_limit_are_refused():
    config = RelayConfig(port=0, allowed_channels=frozenset({"a", "b", "c"}), max_channels=2)
    async with Relay(config) as relay:
        async with websockets.connect(relay.url) as ws:
            await ws.send('{"type": "hello", "role": "admin", "channel": "a"}')
            assert orjson.loads(await ws.recv())["code"] == "bad_role"
        with pytest.raises(RelayRefused) as refused:
            await connect(relay.url, "producer", "zzz")
        assert refused.value.code == "unknown_channel"
        a, _ = await connect(relay.url, "viewer", "a")
        b, _ = await connect(relay.url, "viewer", "b")
        with pytest.raises(RelayRefused) as refused:
            await connect(relay.url, "viewer", "c")
        assert refused.value.code == "too_many_channels"
        await a.close()
        await b.close()


async def test_frames_before_hello_are_refused(relay):
    async with websockets.connect(relay.url) as ws:
        await ws.send(input_frame(0, jpeg()))
        assert orjson.loads(await ws.recv())["code"] == "bad_message"


async def test_shutdown_tells_every_client():
    relay = Relay(RelayConfig(port=0))
    await relay.start()
    viewer, _ = await connect(relay.url, "viewer", "cam")
    await relay.close()
    assert (await recv_json(viewer, "shutdown"))["message"]
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await viewer.recv()
    assert closed.value.rcvd.code == 1001


def test_refuses_to_listen_beyond_loopback_without_tokens():
    with pytest.raises(ValueError, match="without tokens"):
        RelayConfig(host="0.0.0.0").check()
    RelayConfig(host="0.0.0.0", tokens=frozenset({"t"})).check()
    RelayConfig(host="0.0.0.0", insecure=True).check()
    RelayConfig(host="::1").check()


async def test_a_burst_of_frames_is_delivered_not_overwritten(relay):
    """Frames read in one socket read are each forwarded, not collapsed into the last one."""
    count = 300
    viewer, _ = await connect(relay.url, "viewer", "burst", receive="input")
    producer, _ = await connect(relay.url, "producer", "burst", receive="none")
    image = jpeg()
    for seq in range(count):  # back to back: the relay reads several frames per socket read
        await producer.send(input_frame(seq, image, "burst"))
    seqs = []
    while not seqs or seqs[-1] != count - 1:
        seqs.append((await recv_frame(viewer)).seq)
    assert seqs == sorted(seqs)
    assert len(seqs) > count * 0.8, f"only {len(seqs)} of {count} frames delivered"
    await viewer.close()
    await producer.close()


def test_outbox_direct_send_never_overtakes_frames_the_sender_holds():
    from relay.outbox import Outbox

    async def scenario():
        sent = []
        outbox = Outbox()
        outbox.fast_send = lambda item: sent.append(item) or True
        outbox.put_frame("a", 1)  # idle: straight out
        assert sent == [1]
        outbox.fast_send = lambda item: False  # socket busy: queued
        outbox.put_frame("a", 2)
        outbox.fast_send = lambda item: sent.append(item) or True
        _control, frames = await outbox.take()  # the sender task now holds frame 2
        assert frames == [2]
        outbox.put_frame("a", 3)  # must wait behind 2
        assert sent == [1]
        assert (await outbox.take())[1] == [3]

    asyncio.run(scenario())


async def test_control_messages_on_the_wire_are_the_bytes_clients_always_got(relay):
    async with websockets.connect(relay.url, compression=None) as ws:
        await ws.send('{"type": "hello", "role": "producer", "channel": "lonely"}')
        welcome = await asyncio.wait_for(ws.recv(), 5)
        assert welcome.startswith('{"type":"welcome","role":"producer","channel":"lonely","session":"')
        assert welcome.endswith(
            '","protocol":1,"limits":{"max_frame_bytes":8388608,"max_width":4096,'
            '"max_height":4096,"max_channels":256}}'
        )
        assert await ws.recv() == (
            '{"type":"status","channel":"lonely","state":"waiting_for_worker","position":1,"in_use":0,"slots":0}'
        )
        await ws.send('{"type": "ping"}')
        assert (await ws.recv()).startswith('{"type":"pong","timestamp":')  # seed 002 logs the time
        await ws.send('{"type": "params", "params": {"a": 1}}')
        assert await ws.recv() == '{"type":"params_ack","channel":"lonely","version":1}'
        await ws.send('{"type": "hello", "role": "viewer"}')
        assert await ws.recv() == (
            '{"type":"error","code":"bad_message",'
            '"message":"unexpected \'hello\' message after the handshake"}'
        )


async def test_an_idle_channel_is_told_and_its_next_frame_brings_the_worker_back():
    async with Relay(RelayConfig(port=0, idle_release_s=0.2)) as relay:
        worker = await EchoWorker(relay.url).start()
        serving = asyncio.create_task(worker.serve())
        producer, _ = await connect(relay.url, "producer", "sleepy")
        await producer.send(input_frame(0, jpeg(), "sleepy"))
        assert (await recv_frame(producer)).seq == 0
        assert (await recv_json(producer, "status", state="idle"))["channel"] == "sleepy"
        await producer.send(input_frame(1, jpeg(), "sleepy"))
        assert (await recv_json(producer, "status", state="assigned"))["channel"] == "sleepy"
        assert (await recv_frame(producer)).seq == 1
        await producer.close()
        serving.cancel()
        await worker.close()
