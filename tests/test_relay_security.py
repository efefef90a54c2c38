"""The relay's doors (issue 11): size limits, keys, origins, hello deadline, per-address cap, rate limits.

Each test plays the attacker the issue describes, against the standalone
relay or the API's embedded one, and checks that the door holds while the
well-behaved client next to it goes on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from api.server.workers import LocalWorkers
from relay import Relay, RelayConfig
from relay.client import RelayRefused, connect
from relay.config import TOKEN_ENV
from tests.api_fixtures import AUTH, KEY, eventually, serving_worker
from tests.helpers import EchoWorker, input_frame, jpeg, recv_frame, recv_json, server_config
from worker.launch import LAUNCH_ENV, LaunchOptions

ROOT = Path(__file__).resolve().parent.parent


async def refused(ws: websockets.ClientConnection) -> tuple[str, int]:
    """The error code a refused handshake got, and the close code that followed."""
    error = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    return error["code"], closed.value.rcvd.code


def hello(role: str, channel: str = "cam", **fields: object) -> str:
    return orjson.dumps({"type": "hello", "role": role, "channel": channel, **fields}).decode()


# -- 1. params: a limit at the door, and what reaches a worker always fits ------------------


async def test_oversized_params_are_refused_at_the_door_and_the_worker_keeps_serving(relay):
    worker = await EchoWorker(relay.url).start()
    serving = asyncio.create_task(worker.serve())
    viewer, _ = await connect(relay.url, "viewer", "cam")
    producer, _ = await connect(relay.url, "producer", "cam", receive="none")
    await asyncio.wait_for(worker.assigned.get(), 5)
    await producer.send(orjson.dumps({"type": "params", "params": {"prompt": "x" * 300_000}}).decode())
    error = await recv_json(producer, "error")
    assert error["code"] == "params_too_large" and "262144" in error["message"]
    # merges of messages under the limit cannot grow the channel's params past it either
    codes = []
    for i in range(4):
        await producer.send(orjson.dumps({"type": "params", "params": {f"k{i}": "y" * 100_000}}).decode())
        codes.append((await recv_json(producer))["type"])
    assert codes == ["params_ack", "params_ack", "error", "error"]
    channel = relay.hub.channels["cam"]
    assert set(channel.params) == {"k0", "k1"} and channel.params_version == 2
    # the worker is still there and serving: nothing it was sent was over its limit
    for seq in range(3):
        await producer.send(input_frame(seq, jpeg(seed=seq), "cam"))
        assert (await recv_frame(viewer)).seq == seq
    assert relay.hub.workers and relay.hub.workers[0].assigned == ["cam"]
    serving.cancel()
    for ws in (viewer, producer):
        await ws.close()
    await worker.close()


def test_limits_that_would_overflow_a_client_are_refused_at_start():
    from relay.config import PEER_MAX_SIZE  # what relay.client.connect accepts by default

    RelayConfig().check()
    with pytest.raises(ValueError, match="max_frame_bytes"):
        RelayConfig(max_frame_bytes=PEER_MAX_SIZE // 4 * 3).check()  # base64 would not fit
    with pytest.raises(ValueError, match="max_params_bytes"):
        RelayConfig(max_params_bytes=PEER_MAX_SIZE).check()


# -- 2. keyed channels, open channels, origins -----------------------------------------------


@pytest.fixture
async def server():
    """(app, base URL) of an API with no relay token configured and no worker processes."""
    app = create_app(server_config(KEY))
    async with running(app) as url:
        yield app, url


async def create_stream(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:
        response = await client.post(
            "/v1/streams", json={"pipeline": "streamdiffusion", "params": {"prompt": "negative"}}
        )
        assert response.status_code == 201, response.text
        return response.json()


async def test_a_stream_channel_opens_only_to_its_key_or_the_relay_token(server):
    app, url = server
    stream = await create_stream(url)
    relay_url = services(app).relay_url
    for role in ("viewer", "producer"):  # the anonymous reader and injector
        async with websockets.connect(relay_url, compression=None) as ws:
            await ws.send(hello(role, stream["id"]))
            assert await refused(ws) == ("unauthorized", 1008)
        async with websockets.connect(f"{relay_url}/{stream['id']}?role={role}") as ws:
            assert await refused(ws) == ("unauthorized", 1008)
    async with websockets.connect(relay_url, compression=None) as ws:  # a wrong key is no better
        await ws.send(hello("viewer", stream["id"], token="stk_guess"))
        assert await refused(ws) == ("unauthorized", 1008)
    # the stream key opens it, in the hello or the URL; the relay token too
    viewer, welcome = await connect(relay_url, "viewer", stream["id"], token=stream["stream_key"])
    assert welcome["channel"] == stream["id"]
    async with websockets.connect(
        f"{relay_url}/{stream['id']}?role=producer&token={stream['stream_key']}", compression=None
    ) as producer:
        await producer.send(input_frame(1, jpeg(), stream["id"]))
        await recv_json(producer, "status")  # waiting for a worker: joined, not refused
    token = next(iter(services(app).relay.config.tokens))
    watcher, _ = await connect(relay_url, "viewer", stream["id"], token=token)
    await viewer.close()
    await watcher.close()


async def test_open_channels_stay_tokenless_on_loopback_but_workers_need_the_token(server):
    app, _ = server
    relay_url = services(app).relay_url
    async with websockets.connect(relay_url) as legacy:  # a seed-002 producer, as the seed has it
        await legacy.send(
            orjson.dumps(
                {"type": "image", "format": "jpeg", "data": base64.b64encode(jpeg()).decode()}
            ).decode()
        )
        assert await recv_json(legacy, "ack") == {"type": "ack", "status": "received"}
    async with websockets.connect(relay_url, compression=None) as ws:  # an anonymous "worker"
        await ws.send(hello("worker"))
        assert await refused(ws) == ("unauthorized", 1008)


async def test_the_generated_relay_token_reaches_workers_and_outputs_by_environment_only(monkeypatch):
    spawned: list[tuple[list[str], dict[str, str]]] = []

    class Idle:
        """A worker process that runs until terminated."""

        def __init__(self) -> None:
            self.done = asyncio.Event()

        async def wait(self) -> int:
            await self.done.wait()
            return 0

        def terminate(self) -> None:
            self.done.set()

        kill = terminate

    async def spawn(command: list[str], env: dict[str, str]) -> Idle:
        spawned.append((command, env))
        return Idle()

    monkeypatch.setattr(LocalWorkers, "_spawn", staticmethod(spawn))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    app = create_app(server_config(KEY, workers={"count": 1}))
    async with running(app):
        (token,) = services(app).relay.config.tokens
        assert len(token) >= 32
        ((command, env),) = spawned
        assert env[TOKEN_ENV] == token == services(app).relay_token and not any(
            token in arg for arg in command
        )
        assert services(app).outputs.token == token  # RTMP/HLS processes: Options.environment, not argv
        assert not app.state.config.relay.tokens  # nothing configured was changed
        # the worker's options are typed, in its environment too: the command line is just the module
        assert command[1:] == ["-m", "worker"]
        launched = LaunchOptions.model_validate_json(env[LAUNCH_ENV])
        assert (launched.relay, launched.engine) == (services(app).relay_url, "auto")


async def test_browser_origins_are_refused_unless_allowed():
    config = RelayConfig(port=0, origins=frozenset({"https://app.example"}))
    async with Relay(config) as relay:
        for origin in ("https://evil.example", "null", "http://127.0.0.1:8080"):
            with pytest.raises(InvalidStatus) as refused_:
                await websockets.connect(relay.url, origin=origin)
            assert refused_.value.response.status_code == 403
        async with websockets.connect(relay.url, origin="https://app.example") as ws:
            await ws.send(hello("viewer"))
            assert (await recv_json(ws))["type"] == "welcome"
        ws, _ = await connect(relay.url, "viewer")  # scripts send no Origin
        await ws.close()
    async with Relay(RelayConfig(port=0)) as relay:  # default: no origin at all
        with pytest.raises(InvalidStatus):
            await websockets.connect(relay.url, origin="https://app.example")


async def test_open_channels_can_be_switched_off_and_workers_need_the_token_when_there_is_one():
    config = RelayConfig(port=0, tokens=frozenset({"t"}), open_channels=True)
    async with Relay(config) as relay:
        producer, _ = await connect(relay.url, "producer", "cam")  # open channel, no token
        with pytest.raises(RelayRefused) as no:
            await connect(relay.url, "worker")
        assert no.value.code == "unauthorized"
        worker = await EchoWorker(relay.url, token="t").start()
        await producer.close()
        await worker.close()
    async with Relay(RelayConfig(port=0, open_channels=False)) as relay:
        with pytest.raises(RelayRefused) as no:
            await connect(relay.url, "viewer", "cam")
        assert no.value.code == "unauthorized"
    with pytest.raises(ValueError, match="open channels"):
        RelayConfig(host="0.0.0.0", tokens=frozenset({"t"}), open_channels=True).check()


# -- 3. hello deadline, per-address cap, control rate, accept errors -------------------------


async def test_a_silent_connection_is_closed_after_the_hello_timeout_without_open_channels():
    config = RelayConfig(port=0, tokens=frozenset({"t"}), hello_timeout=0.3)
    async with Relay(config) as relay, websockets.connect(relay.url) as ws:
        started = time.monotonic()
        assert await refused(ws) == ("hello_timeout", 1008)
        assert 0.25 < time.monotonic() - started < 5


async def test_a_silent_connection_becomes_a_seed_002_consumer_where_channels_are_open():
    async with (
        Relay(RelayConfig(port=0, hello_timeout=0.3)) as relay,
        websockets.connect(relay.url) as consumer,
    ):  # the seed's main.py: connects and waits
        await eventually(lambda: "default" in relay.hub.channels, 5, "the consumer to join")
        producer, _ = await connect(relay.url, "producer", "default", receive="none")
        await producer.send(input_frame(3, jpeg(seed=3), "default"))
        image = await recv_json(consumer, "image")
        assert image["seq"] == 3 and image["kind"] == "input"
        assert base64.b64decode(image["data"]) == jpeg(seed=3)
        await producer.close()


async def test_one_address_cannot_hold_every_connection_but_the_token_still_gets_in():
    config = RelayConfig(port=0, tokens=frozenset({"t"}), max_connections_per_ip=4, hello_timeout=30)
    async with Relay(config) as relay:
        silent = [await websockets.connect(relay.url) for _ in range(4)]
        with pytest.raises(InvalidStatus) as full:
            await websockets.connect(relay.url)
        assert full.value.response.status_code == 503
        ws, welcome = await connect(relay.url, "producer", "cam", token="t")  # the relay's own clients
        worker = await EchoWorker(relay.url, token="t").start()
        assert welcome["type"] == "welcome" and relay.connections_per_ip == {"127.0.0.1": 4}
        await silent.pop().close()
        await eventually(lambda: relay.connections_per_ip.get("127.0.0.1") == 3, 5, "the slot to free")
        async with websockets.connect(relay.url):
            pass
        for conn in (*silent, ws):
            await conn.close()
        await worker.close()
        await eventually(lambda: not relay.connections_per_ip, 5, "every slot to free")


async def test_a_control_flood_gets_one_error_and_never_slows_the_next_stream(relay):
    worker = await EchoWorker(relay.url).start()
    serving = asyncio.create_task(worker.serve())
    flooder, _ = await connect(relay.url, "viewer", "flood")
    producer, _ = await connect(relay.url, "producer", "cam")
    await recv_json(producer, "status", state="assigned")
    stats = orjson.dumps({"type": "stats"}).decode()
    for _ in range(400):
        await flooder.send(stats)
    for seq in range(10):  # the other stream goes on while the flood is read
        await producer.send(input_frame(seq, jpeg(seed=seq), "cam"))
        assert (await recv_frame(producer)).seq == seq
    replies: list[dict] = []
    with contextlib.suppress(TimeoutError):
        while True:
            replies.append(orjson.loads(await asyncio.wait_for(flooder.recv(), 0.5)))
    errors = [r for r in replies if r["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"]
    assert sum(r["type"] == "stats" for r in replies) <= 40 + 20 * 2
    await asyncio.sleep(0.2)  # the bucket refills: the same connection is answered again
    await flooder.send(orjson.dumps({"type": "ping"}).decode())
    assert (await recv_json(flooder, "pong"))["type"] == "pong"
    serving.cancel()
    for ws in (flooder, producer):
        await ws.close()
    await worker.close()


def test_running_out_of_descriptors_is_logged_once_not_in_a_busy_loop(tmp_path):
    """The issue's relay wrote 130 MB of ``Too many open files`` tracebacks in 90 s (asyncio retries
    the listener up to 100 times per failed accept, logging each); now one line per 10 s."""
    script = (
        "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)); "
        "from relay.__main__ import main; main(['--port', '0'])"
    )
    log = tmp_path / "relay.log"
    with log.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=ROOT,
            stderr=stderr,
            stdout=subprocess.PIPE,
            env={**os.environ, TOKEN_ENV: ""},
        )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline().decode().rsplit(":", 1)[1])
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]
        time.sleep(2.5)
        text = log.read_text()
        assert text.count("out of system resource") == 1, text[-2000:]
        assert len(text) < 10_000
        for s in sockets:
            s.close()
    finally:
        child.terminate()
        child.wait(10)
    assert log.read_text().count("Traceback") <= 3


# -- 4. protocol versions --------------------------------------------------------------------


async def test_an_unknown_protocol_version_is_refused(relay):
    async with websockets.connect(relay.url, compression=None) as ws:
        await ws.send(hello("producer", protocol=2))
        error = orjson.loads(await ws.recv())
        assert error["code"] == "unsupported_protocol" and "1" in error["message"]
    async with websockets.connect(relay.url + "/cam?role=viewer&protocol=99") as ws:
        assert await refused(ws) == ("unsupported_protocol", 1008)
    ws, welcome = await connect(relay.url, "producer", protocol=1)
    assert welcome["protocol"] == 1
    await ws.close()


# -- 5. a full channel table, anonymous channels and keyed streams ---------------------------


async def test_a_full_channel_table_is_a_503_not_a_500():
    app = create_app(server_config(KEY, relay={"max_channels": 1}))
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:
        body = {"pipeline": "streamdiffusion", "params": {"prompt": "a fox"}}
        assert (await client.post("/v1/streams", json=body)).status_code == 201
        full = await client.post("/v1/streams", json=body)
        assert full.status_code == 503, full.text
        assert full.json()["code"] == "STREAMS/CAPACITY" and full.json()["success"] is False
        assert full.json()["details"] == {"max_channels": 1} and full.headers["Retry-After"]
        assert len((await client.get("/v1/streams")).json()["data"]) == 1


async def test_idle_seed_sockets_cannot_keep_a_stream_from_its_worker(server):
    app, url = server
    async with serving_worker(app, capacity=2):
        seeds = []
        try:
            ws_url = url.replace("http://", "ws://") + "/ws"
            for _ in range(4):  # seed 000 clients that connect and then do nothing
                seeds.append(await websockets.connect(ws_url, compression=None))
            hub = services(app).relay.hub
            await eventually(
                lambda: sum(name.startswith("ws000-") for name in hub.channels) == 4, 10, "four seed channels"
            )
            stream = await create_stream(url)
            async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:

                async def state() -> str:
                    status = await client.get(f"/v1/streams/{stream['id']}/status")
                    return status.json()["data"]["state"]

                deadline = time.monotonic() + 15
                while (current := await state()) == "LOADING":
                    assert time.monotonic() < deadline, "the stream never got a worker"
                    await asyncio.sleep(0.05)
            assert current in ("OFFLINE", "ONLINE")
            assert hub.channels[stream["id"]].worker is not None
        finally:
            for ws in seeds:
                await ws.close()


# -- 6. anonymous relay clients: their own channels only, and a share of the table -----------


async def test_an_anonymous_client_can_neither_list_nor_join_the_apis_channels(server):
    app, url = server
    relay_url, token, hub = services(app).relay_url, services(app).relay_token, services(app).relay.hub
    worker, _ = await connect(relay_url, "worker", token=token, capacity=2)
    stream = await create_stream(url)
    async with websockets.connect(url.replace("http://", "ws://") + "/ws", compression=None):
        await eventually(lambda: any(n.startswith("ws000-") for n in hub.channels), 10, "the seed channel")
        victim = next(name for name in hub.channels if name.startswith("ws000-"))
        await eventually(
            lambda: hub.channels[victim].worker is not None and hub.channels[stream["id"]].worker is not None,
            10,
            "both channels to get the worker",
        )
        # the scout: a tokenless viewer on a channel of its own asks for stats
        scout, _ = await connect(relay_url, "viewer", "x")
        await scout.send(orjson.dumps({"type": "stats"}).decode())
        seen = await recv_json(scout, "stats")
        assert [w["channels"] for w in seen["workers"]] == [[]]
        assert victim not in str(seen) and stream["id"] not in str(seen)
        # the relay token still sees every assignment
        insider, _ = await connect(relay_url, "viewer", "y", token=token)
        await insider.send(orjson.dumps({"type": "stats"}).decode())
        assigned = (await recv_json(insider, "stats"))["workers"][0]["channels"]
        assert sorted(assigned) == sorted([victim, stream["id"]])
        # the name alone opens nothing: no camera frames to read, no params to change
        for role, fields in (("viewer", {"receive": "input"}), ("producer", {})):
            async with websockets.connect(relay_url, compression=None) as ws:
                await ws.send(hello(role, victim, **fields))
                assert await refused(ws) == ("unauthorized", 1008)
            async with websockets.connect(f"{relay_url}/{victim}?role={role}") as ws:
                assert await refused(ws) == ("unauthorized", 1008)
        assert not hub.channels[victim].viewers and len(hub.channels[victim].producers) == 1
        for ws in (scout, insider):
            await ws.close()
    # seed-002 clients keep their open channels: a tokenless producer and viewer meet on theirs
    producer, _ = await connect(relay_url, "producer", "cam", receive="none")
    viewer, _ = await connect(relay_url, "viewer", "cam", receive="input")
    await producer.send(input_frame(1, jpeg(), "cam"))
    assert (await recv_frame(viewer)).seq == 1
    for ws in (producer, viewer, worker):
        await ws.close()


async def test_a_token_holders_channel_is_closed_to_tokenless_clients_on_a_standalone_relay():
    config = RelayConfig(port=0, tokens=frozenset({"t"}), open_channels=True)
    async with Relay(config) as relay:
        owner, _ = await connect(relay.url, "producer", "private", token="t")
        async with websockets.connect(relay.url, compression=None) as ws:
            await ws.send(hello("viewer", "private", receive="input"))
            assert await refused(ws) == ("unauthorized", 1008)
        anonymous, _ = await connect(relay.url, "producer", "open")
        guest, _ = await connect(relay.url, "viewer", "open", token="t")  # token holders go anywhere
        for ws in (owner, anonymous, guest):
            await ws.close()


async def test_anonymous_clients_cannot_fill_the_channel_table():
    app = create_app(server_config(KEY, relay={"max_channels": 8}))  # anonymous_channel_share: 0.5
    async with running(app) as url:
        relay_url, token = services(app).relay_url, services(app).relay_token
        squatters = [(await connect(relay_url, "viewer", f"squat-{i}"))[0] for i in range(4)]
        async with websockets.connect(relay_url, compression=None) as ws:
            await ws.send(hello("viewer", "squat-4"))
            assert await refused(ws) == ("too_many_channels", 1008)
        joined, _ = await connect(relay_url, "viewer", "squat-0")  # their own channels stay open to them
        # the rest of the table is the API's and the token holders'
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:
            created = await client.post(
                "/v1/streams", json={"pipeline": "streamdiffusion", "params": {"prompt": "a fox"}}
            )
            assert created.status_code == 201, created.text
        hub = services(app).relay.hub
        async with websockets.connect(url.replace("http://", "ws://") + "/ws", compression=None):
            await eventually(lambda: any(n.startswith("ws000-") for n in hub.channels), 10, "a seed session")
            insider, _ = await connect(relay_url, "viewer", "mine", token=token)
            await insider.close()
        for ws in (*squatters, joined):
            await ws.close()
