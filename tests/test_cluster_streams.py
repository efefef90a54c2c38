"""The cluster's stream registry (issue 15): streams kept in NATS JetStream, answered for by every node.

Three nats-servers with JetStream (a real routed cluster; the bucket replicated on all three) and
two or three API servers in process, each with its relay joined to one of them. A stream created
on one node is read, changed and deleted on another; WHIP with its key on a node that did not
create it reaches a worker on the node that did, and MJPEG on a third shows the result; the
streams outlive every node; two nodes creating the same named stream at once end up with one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from api.streams.manager import Stream, StreamListener, StreamManager, validate_params
from api.streams.shared import Removed
from media.codec import decode_image
from relay import RelayConfig
from relay.hub import Hub
from tests.api_fixtures import AUTH, KEY, feeding, multipart_parts, serving_worker
from tests.helpers import server_config, start_server, stop_server
from tests.test_cluster import NatsServer, nats_cluster, until
from tests.test_rtmp_hls import decode, rtmp_server  # noqa: F401  (a fixture)
from tests.test_webrtc import BACKGROUND, PatternTrack, publish

#: reading a live RTMP stream from its start, as tests/test_api_outputs.py does
LIVE = {"analyzeduration": "1000000", "fflags": "nobuffer"}


@pytest.fixture
def nats_servers(tmp_path: Path) -> Iterator[list[NatsServer]]:
    pytest.importorskip("nats", reason="nats-py is not installed: pip install -e .[cluster]")
    with nats_cluster(tmp_path / "nats", 3, jetstream=True) as servers:
        yield servers


@contextlib.asynccontextmanager
async def api_node(server: NatsServer, name: str, **server_section: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An API server whose relay is node ``name`` on ``server``, its streams in the shared bucket."""
    config = server_config(
        KEY,
        relay={"nats": server.url, "node_name": name},
        server={"cluster_streams_replicas": 3, **server_section},
    )
    app = create_app(config)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def manager(client: httpx.AsyncClient) -> StreamManager:
    return services(client.app).streams  # type: ignore[attr-defined]


@pytest.mark.network_service
async def test_a_stream_created_on_one_node_is_read_changed_fed_and_deleted_on_the_others(nats_servers):
    async with (
        api_node(nats_servers[0], "a") as a,
        api_node(nats_servers[1], "b") as b,
        api_node(nats_servers[2], "c") as c,
        serving_worker(a.app, capacity=2),  # type: ignore[attr-defined]
    ):
        created = await a.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": {"prompt": "x"}})
        assert created.status_code == 201, created.text
        stream = created.json()
        sid = stream["id"]
        await until(lambda: sid in manager(b).streams and sid in manager(c).streams, "b or c never knew it")

        # read on b: the same stream, its URLs on b
        seen = (await b.get(f"/v1/streams/{sid}")).json()
        for field in ("stream_key", "output_playback_id", "params", "created_at"):
            assert seen[field] == stream[field], field
        assert seen["whip_url"].startswith(str(b.base_url))
        assert [s["id"] for s in (await b.get("/v1/streams")).json()["data"]] == [sid]

        # changed on b: a's copy (and its channel's params) follow
        patched = await b.patch(f"/v1/streams/{sid}", json={"params": {"prompt": "negative"}})
        assert patched.status_code == 200, patched.text
        await until(
            lambda: (
                manager(a).streams[sid].params["prompt"] == "negative"
                and services(a.app).hub.channels[sid].params["prompt"] == "negative"
            ),  # type: ignore[attr-defined]
            "a never took b's change",
        )

        # fed on b by WHIP with the key (b never created it), served by a's worker, watched on c
        whip_pc, whip = await publish(b, seen["whip_url"], PatternTrack(), "video/H264")
        try:
            async with c.stream("GET", f"/live/video-to-video/{stream['output_playback_id']}/mjpeg") as mjpeg:
                assert mjpeg.status_code == 200
                parts = multipart_parts(mjpeg)
                inverted = 255 - np.array(BACKGROUND)
                async with asyncio.timeout(30):
                    while True:  # "negative" inverts: the filter ran on b's WHIP frames
                        rgb = decode_image(await anext(parts))
                        mean = rgb.reshape(-1, 3).mean(axis=0)
                        if np.all(np.abs(mean - inverted) < 30):
                            break
            hub_b = services(b.app).hub  # type: ignore[attr-defined]
            assert hub_b.channels[sid].producers, "the WHIP session is b's producer"
            # c shows the state of the channel its owner (b, where the input is) has
            assert services(c.app).hub.channels[sid].owner == "b"  # type: ignore[attr-defined]
            async with asyncio.timeout(10):
                while (status := (await c.get(f"/v1/streams/{sid}/status")).json()["data"])["state"] not in (
                    "ONLINE",
                    "DEGRADED_INFERENCE",
                    "DEGRADED_INPUT",
                ):
                    await asyncio.sleep(0.05)  # polling the status, as a client does
            assert status["engine"] or status["state"], status
        finally:
            await whip_pc.close()

        # deleted on c: gone on every node, its key refused everywhere
        assert (await c.delete(f"/v1/streams/{sid}")).status_code == 200
        await until(lambda: sid not in manager(a).streams and sid not in manager(b).streams, "still known")
        assert (await a.get(f"/v1/streams/{sid}")).status_code == 404
        refused = await b.post(
            "/whip",
            content="v=0",
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {stream['stream_key']}"},
        )
        assert refused.status_code == 401
        assert whip.status_code == 201


@pytest.mark.network_service
async def test_the_streams_outlive_every_node_and_two_nodes_naming_one_stream_end_with_one(nats_servers):
    named = {"named_streams": [{"name": "studio", "stream_key": "studio-key-0123456789abcdef"}]}
    async with api_node(nats_servers[0], "a", **named) as a, api_node(nats_servers[1], "b", **named) as b:
        # both started with the same named stream: each made one if the bucket had none yet
        await until(
            lambda: (
                len(manager(a).streams) == len(manager(b).streams) == 1
                and set(manager(a).streams) == set(manager(b).streams)
            ),
            "the nodes never agreed on one named stream",
        )
        (studio,) = manager(a).streams.values()
        created = await a.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": {"prompt": "y"}})
        other = created.json()
        await until(lambda: other["id"] in manager(b).streams, "b never knew the new stream")

    async with api_node(nats_servers[2], "c", **named) as c:  # every node was stopped: a new one
        listed = {s["id"]: s for s in (await c.get("/v1/streams")).json()["data"]}
        assert set(listed) == {studio.id, other["id"]}
        assert listed[studio.id]["stream_key"] == studio.stream_key
        assert listed[other["id"]]["stream_key"] == other["stream_key"]


@pytest.mark.network_service
async def test_without_jetstream_a_node_says_what_to_enable(tmp_path):
    pytest.importorskip("nats", reason="nats-py is not installed: pip install -e .[cluster]")
    import nats

    from api.streams.shared import SharedStreams

    with nats_cluster(tmp_path / "nats", 1) as (server,):
        client = await nats.connect(server.url)
        try:
            with pytest.raises(RuntimeError, match=r"no JetStream .* enable it \(a 'jetstream \{"):
                await SharedStreams.open(client, "sd_streams", wait_s=0.5)
        finally:
            await client.close()


@pytest.mark.network_service
async def test_while_the_registry_is_unreachable_changes_get_a_503_and_the_streams_come_back(tmp_path):
    pytest.importorskip("nats", reason="nats-py is not installed: pip install -e .[cluster]")
    with nats_cluster(tmp_path / "nats", 1, jetstream=True) as (server,):
        async with api_node(server, "a", cluster_streams_replicas=1) as a:
            body = {"pipeline": "streamdiffusion", "params": {}}
            sid = (await a.post("/v1/streams", json=body)).json()["id"]
            server.kill()
            refused = await a.post("/v1/streams", json=body)
            assert refused.status_code == 503, refused.text
            error = refused.json()
            assert error["code"] == "STREAMS/REGISTRY_UNAVAILABLE" and "unreachable" in error["error"]
            assert refused.headers["retry-after"] == "5"
            unchanged = await a.patch(f"/v1/streams/{sid}", json={"params": {"prompt": "not stored"}})
            assert unchanged.status_code == 503
            assert manager(a).streams[sid].params["prompt"] != "not stored", "a refused change is not applied"
            assert [s["id"] for s in (await a.get("/v1/streams")).json()["data"]] == [sid]  # reads still work

            server.restart()  # JetStream reads its store back: the registry is reachable again
            async with asyncio.timeout(60):
                while (again := await a.post("/v1/streams", json=body)).status_code == 503:
                    pass  # each refused try waited for NATS: no sleep needed
            assert again.status_code == 201, again.text
            listed = {s["id"] for s in (await a.get("/v1/streams")).json()["data"]}
            assert listed == {sid, again.json()["id"]}


# -- following the bucket, without NATS: the manager given the changes a bucket would yield ------


class Seen(StreamListener):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def stream_created(self, stream: Stream) -> None:
        self.events.append(("created", stream.id))

    async def stream_changed(self, stream: Stream) -> None:
        self.events.append(("changed", stream.id))

    async def stream_closed(self, stream: Stream) -> None:
        self.events.append(("closed", stream.id))


def record(stream_id: str, key: str, created: float = 1.0, **fields: Any) -> Stream:
    params = validate_params({"prompt": "x"})
    return Stream(
        id=stream_id,
        stream_key=key,
        playback_id=f"play-{stream_id}",
        pipeline="streamdiffusion",
        params=params,
        created=created,
        node="a",
        **fields,
    )


async def changes(*items: Stream | Removed | None) -> AsyncIterator[Stream | Removed | None]:
    for item in items:
        yield item


async def test_a_node_applies_the_buckets_changes_and_ignores_what_it_already_has():
    hub = Hub(RelayConfig())
    streams = StreamManager(hub, node="b")
    seen = Seen()
    streams.subscribe(seen)
    first = record("str_1", "key-1")
    changed = dataclasses.replace(first, params={**first.params, "prompt": "y"})
    pushed = dataclasses.replace(changed, output_rtmp_url="rtmp://example/live")
    await streams.follow(changes(first, None, first, changed, pushed, Removed("str_1"), Removed("str_9")))
    assert seen.events == [("created", "str_1"), ("changed", "str_1"), ("closed", "str_1")]
    assert "str_1" not in streams.streams and "str_1" not in hub.channels

    await streams.follow(changes(first, changed))
    channel = hub.channels["str_1"]
    assert channel.params["prompt"] == "y" and channel.key == "key-1" and channel.home == "a"
    assert streams.by_playback_id("play-str_1") is streams.streams["str_1"]


async def test_of_two_streams_with_one_key_every_node_keeps_the_older():
    for order in ((0, 1), (1, 0)):  # whichever a node hears first
        streams = StreamManager(Hub(RelayConfig()), node="b")
        rivals = [record("str_old", "same-key", created=1.0), record("str_new", "same-key", created=2.0)]
        await streams.follow(changes(*(rivals[i] for i in order)))
        assert list(streams.streams) == ["str_old"]
        assert streams.by_stream_key("same-key").id == "str_old"  # type: ignore[union-attr]


@pytest.mark.network_service
async def test_a_streams_rtmp_push_runs_on_its_node_and_moves_when_that_node_stops(nats_servers, rtmp_server):
    """Created on a with output_rtmp_url: a pushes to nginx-rtmp, b does not; a stops: b pushes."""
    url = rtmp_server.url("live", "moving")
    body = {
        "pipeline": "streamdiffusion",
        "output_rtmp_url": url,
        "params": {"prompt": "negative", "width": 384, "height": 384},
    }
    async with api_node(nats_servers[1], "b") as b, serving_worker(b.app):  # type: ignore[attr-defined]
        pushes_b = services(b.app).outputs.rtmp  # type: ignore[attr-defined]
        async with api_node(nats_servers[0], "a") as a:
            created = await a.post("/v1/streams", json=body)
            assert created.status_code == 201, created.text
            sid = created.json()["id"]
            pushes_a = services(a.app).outputs.rtmp  # type: ignore[attr-defined]
            await until(lambda: sid in manager(b).streams and sid in pushes_a, "a never pushed")
            async with feeding(b, sid):
                frames = await asyncio.to_thread(decode, url, 3, LIVE)
            assert {f.shape for f in frames} == {(384, 384, 3)}
            assert sid not in pushes_b, "one node pushes a stream"
        # a stopped (it said bye): b runs the push from the next check on
        await until(lambda: sid in pushes_b, "b never took the push over")
        async with feeding(b, sid):
            frames = await asyncio.to_thread(decode, url, 3, LIVE)
        assert {f.shape for f in frames} == {(384, 384, 3)}


@pytest.mark.network_service
async def test_after_the_registrys_nats_server_restarts_every_node_follows_it_again(tmp_path):
    pytest.importorskip("nats", reason="nats-py is not installed: pip install -e .[cluster]")
    body = {"pipeline": "streamdiffusion", "params": {}}
    with nats_cluster(tmp_path / "nats", 1, jetstream=True) as (server,):
        async with (
            api_node(server, "a", cluster_streams_replicas=1) as a,
            api_node(server, "b", cluster_streams_replicas=1) as b,
        ):
            first = (await a.post("/v1/streams", json=body)).json()["id"]
            await until(lambda: first in manager(b).streams, "b never knew the first stream")
            server.kill()
            server.restart()  # JetStream keeps the bucket; the nodes' watches are gone with the server
            async with asyncio.timeout(60):
                while (created := await a.post("/v1/streams", json=body)).status_code == 503:
                    pass  # each refused try waited for NATS: no sleep needed
            second = created.json()["id"]
            assert (await a.delete(f"/v1/streams/{first}")).status_code == 200
            await until(
                lambda: second in manager(b).streams and first not in manager(b).streams,
                "b never followed the bucket again",
            )


async def test_a_change_a_node_cannot_apply_is_logged_and_the_next_ones_still_apply(caplog):
    streams = StreamManager(Hub(RelayConfig(max_channels=1)), node="b")
    first, second = record("str_1", "key-1"), record("str_2", "key-2")
    await streams.follow(changes(first, second, Removed("str_1"), second))
    assert "could not apply a change of the stream registry to stream str_2" in caplog.text  # no room
    assert "key-2" not in caplog.text, "a stream's key never goes to the log"
    assert list(streams.streams) == ["str_2"], "the table had room again after str_1 went"


@pytest.mark.network_service
async def test_the_readmes_cluster_two_api_commands_configured_by_environment_share_a_stream(
    nats_servers, tmp_path
):
    """As the README runs them: ``python -m api`` with ``STREAMDIFFUSION_RELAY__NATS``, a node name and
    one API key from the environment; a stream created on one is fed through the other's relay with
    its key (the producer command) and its results come back."""
    key = "cluster-readme-key-0123456789"
    base = {**os.environ, "STREAMDIFFUSION_SERVER__API_KEYS": json.dumps([key])}
    base["STREAMDIFFUSION_SERVER__CLUSTER_STREAMS_REPLICAS"] = "3"
    nodes = []
    try:
        for name, server in zip("ab", nats_servers, strict=False):
            env = {
                **base,
                "STREAMDIFFUSION_RELAY__NATS": server.url,
                "STREAMDIFFUSION_RELAY__NODE_NAME": name,
            }
            process, text = await start_server(data_dir=tmp_path / name, env=env)
            api = re.search(r"api ready at (http://\S+)", text).group(1)  # type: ignore[union-attr]
            relay = re.search(r"relay ready at (ws://\S+)", text).group(1)  # type: ignore[union-attr]
            nodes.append((process, api, relay))
        (_, api_a, _), (_, api_b, relay_b) = nodes
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(headers=auth, timeout=30) as client:
            stream = (
                await client.post(f"{api_a}/v1/streams", json={"pipeline": "streamdiffusion", "params": {}})
            ).json()
            async with asyncio.timeout(30):
                while (seen := await client.get(f"{api_b}/v1/streams/{stream['id']}")).status_code == 404:
                    pass  # b follows the bucket: a round trip per try
            assert seen.json()["stream_key"] == stream["stream_key"]
        producer = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "producers", "pattern", "--relay", relay_b, "--channel", stream["id"]),
            *("--size", "64x64", "--fps", "20", "--max-frames", "40", "--json"),
            env={**os.environ, "RELAY_TOKEN": stream["stream_key"]},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(producer.communicate(), 60)
        report = json.loads(out.decode().splitlines()[-1])
        assert producer.returncode == 0 and report["sent"] == 40
        assert report["received"] >= 30, report  # processed by a worker of either node
    finally:
        for process, _, _ in nodes:
            assert await stop_server(process) == 0
