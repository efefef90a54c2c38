"""Each node's /health and /metrics say which relay nodes and workers it sees (issue 15).

Two API servers in process, each with its relay joined to its own nats-server of a two-server
NATS cluster (real processes, routed), and a worker speaking the protocol over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from relay.client import connect
from relay.cluster.messages import Heartbeat, WorkerInfo
from relay.cluster.view import ClusterView, NodeSeen
from tests.api_fixtures import AUTH, KEY, api  # noqa: F401  (a fixture)
from tests.helpers import EchoWorker, server_config
from tests.test_cluster import NatsServer, Viewer, check_results, nats_cluster, stream, until

CHANNEL = "secret-cam"  # /health is for anyone: it must never show up there


@pytest.fixture
def nats_servers(tmp_path: Path) -> Iterator[list[NatsServer]]:
    pytest.importorskip("nats", reason="nats-py is not installed: pip install -e .[cluster]")
    with nats_cluster(tmp_path / "nats", 2, jetstream=True) as servers:  # the API nodes' streams
        yield servers


@contextlib.asynccontextmanager
async def api_node(server: NatsServer, name: str) -> AsyncIterator[httpx.AsyncClient]:
    """An API server whose relay is node ``name`` on ``server``; ``client.app`` is the app."""
    app = create_app(server_config(KEY, relay={"nats": server.url, "node_name": name}))
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def seen(client: httpx.AsyncClient) -> list[NodeSeen]:
    """The other nodes ``client``'s relay hears, read from the hub (to wait on, without HTTP)."""
    backplane = services(client.app).hub.backplane  # type: ignore[attr-defined]
    assert backplane is not None
    return backplane.status().nodes


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed by prometheus_client: (sample name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def echo_worker(client: httpx.AsyncClient) -> contextlib.AbstractAsyncContextManager[EchoWorker]:
    running_services = services(client.app)  # type: ignore[attr-defined]
    return EchoWorker(running_services.relay_url, token=running_services.relay_token).serving()


@pytest.mark.network_service
async def test_health_and_metrics_list_the_other_nodes_and_their_workers_slots(nats_servers):
    async with api_node(nats_servers[0], "a") as a:
        async with api_node(nats_servers[1], "b") as b, echo_worker(b) as worker:
            await until(lambda: [n.workers for n in seen(a)] == [1], "a never heard b's worker")
            health: dict[str, Any] = (await a.get("/health")).json()
            assert health["cluster"]["node"] == "a" and health["cluster"]["connected"] is True
            (node_b,) = health["cluster"]["nodes"]
            assert node_b["name"] == "b" and node_b["workers"] == 1
            assert node_b["capacity"] == {"total": 1, "used": 0}
            assert isinstance(node_b["heartbeat_age_s"], float) and node_b["heartbeat_age_s"] >= 0
            # b's worker is in a's hub (as a proxy), and /health says whose it is
            assert [(w["node"], w["capacity"]) for w in health["workers"]] == [("b", 1)]
            assert health["status"] == "ok"

            # a producer on a: a gives the channel to b's worker; b's heartbeat says the slot is used
            token = services(a.app).relay_token  # type: ignore[attr-defined]
            url = services(a.app).relay_url  # type: ignore[attr-defined]
            producer, _ = await connect(url, "producer", CHANNEL, token=token, receive="none")
            assert await asyncio.wait_for(worker.assigned.get(), 10) == CHANNEL
            await until(lambda: [n.used for n in seen(a)] == [1], "b's heartbeat never showed the slot used")
            response = await a.get("/health", headers={})  # no key needed
            assert response.status_code == 200
            assert response.json()["cluster"]["nodes"][0]["capacity"] == {"total": 1, "used": 1}
            assert CHANNEL not in response.text  # nor in b's, whose heartbeat lists it
            b_health = await b.get("/health", headers={})
            assert CHANNEL not in b_health.text
            assert b_health.json()["cluster"]["node"] == "b"
            assert [n["name"] for n in b_health.json()["cluster"]["nodes"]] == ["a"]
            assert b_health.json()["cluster"]["nodes"][0]["workers"] == 0
            assert [w["node"] for w in b_health.json()["workers"]] == ["b"]

            values = metric_values((await a.get("/metrics")).text)
            assert values[("sd_cluster_nodes", ())] == 2
            assert values[("sd_cluster_connected", ())] == 1
            assert values[("sd_cluster_node_workers", (("node", "b"),))] == 1
            capacity = "sd_cluster_node_worker_capacity"
            assert values[(capacity, (("node", "b"), ("state", "total")))] == 1
            assert values[(capacity, (("node", "b"), ("state", "used")))] == 1
            assert values[("sd_cluster_node_heartbeat_age_seconds", (("node", "b"),))] >= 0
            await producer.close()

        # b stopped (it says bye): a sees no other node, and its series go
        await until(lambda: seen(a) == [], "a still lists b, which left")
        health = (await a.get("/health")).json()
        assert health["cluster"]["nodes"] == [] and health["workers"] == []
        values = metric_values((await a.get("/metrics")).text)
        assert values[("sd_cluster_nodes", ())] == 1
        assert not [key for key in values if ("node", "b") in key[1]]


@pytest.mark.network_service
async def test_a_node_cut_off_from_nats_says_so_and_the_other_stops_listing_it(nats_servers):
    async with api_node(nats_servers[0], "a") as a, api_node(nats_servers[1], "b") as b:
        await until(lambda: [n.name for n in seen(a)] == ["b"] and seen(b) != [], "a and b never met")
        nats_servers[1].kill()
        await until(lambda: seen(a) == [], "a still lists b, unheard since its NATS server died")
        health = (await b.get("/health")).json()
        assert health["cluster"]["connected"] is False
        assert (await a.get("/health")).json()["cluster"]["connected"] is True
        values = metric_values((await b.get("/metrics")).text)
        assert values[("sd_cluster_connected", ())] == 0


@pytest.mark.network_service
async def test_frames_no_other_node_wants_are_not_published_and_metrics_count_them(nats_servers):
    """Producer, worker and a viewer on a: its frames stay there until a viewer on b wants the output."""
    async with api_node(nats_servers[0], "a") as a, api_node(nats_servers[1], "b") as b:
        await until(lambda: seen(a) != [] and seen(b) != [], "a and b never met")
        node_a, node_b = services(a.app), services(b.app)  # type: ignore[attr-defined]
        backplane = node_a.hub.backplane
        assert backplane is not None
        async with echo_worker(a):
            producer, _ = await connect(node_a.relay_url, "producer", CHANNEL, token=node_a.relay_token)
            viewer_a = Viewer(
                (await connect(node_a.relay_url, "viewer", CHANNEL, token=node_a.relay_token))[0]
            )
            sent = await stream(producer, CHANNEL, [viewer_a], 3, start=0)
            counters = node_a.hub.channels[CHANNEL]
            routed = counters.frames_in.total + counters.frames_out.total
            assert routed >= 6 and backplane.status().unwanted == routed  # every input and output
            values = metric_values((await a.get("/metrics")).text)
            assert values[("sd_cluster_frames_not_shared_total", (("why", "unwanted"),))] == routed

            # a viewer on b: b's heartbeat says it wants the channel's output, and a publishes it
            viewer_b = Viewer(
                (await connect(node_b.relay_url, "viewer", CHANNEL, token=node_b.relay_token))[0]
            )
            wanted = "sd.ch." + CHANNEL + ".out"
            await until(lambda: backplane.view.wanted(wanted), "a never heard that b wants the output")
            inputs, before = counters.frames_in.total, backplane.status().unwanted
            sent |= await stream(producer, CHANNEL, [viewer_b], 3, start=max(sent) + 1)
            check_results(viewer_b, sent, CHANNEL)
            # its input still stays on a (b has no worker for it): only those count as unwanted
            assert backplane.status().unwanted - before == counters.frames_in.total - inputs
            for viewer in (viewer_a, viewer_b):
                await viewer.close()
            await producer.close()


async def test_without_nats_health_has_no_cluster_and_metrics_no_cluster_series(api):
    health = (await api.get("/health")).json()
    assert "cluster" in health and health["cluster"] is None
    assert all(w["node"] is None for w in health["workers"])
    text = (await api.get("/metrics")).text
    assert "sd_cluster_" not in text and "sd_channels" in text


def test_a_node_seen_is_summed_from_its_last_heartbeat():
    view = ClusterView("a", dead_after=1.0)
    heartbeat = Heartbeat(
        node="c",
        workers=[
            WorkerInfo(id="w1", capacity=2, channels={"x": "a"}),
            WorkerInfo(id="w2", capacity=1, channels={"y": "b"}),
        ],
    )
    view.heard(heartbeat, now=10.0)
    view.heard(Heartbeat(node="b"), now=10.3)
    assert view.seen(now=10.5) == [
        NodeSeen(name="b", heartbeat_age_s=pytest.approx(0.2), workers=0, capacity=0, used=0),
        NodeSeen(name="c", heartbeat_age_s=pytest.approx(0.5), workers=2, capacity=3, used=2),
    ]
    view.heard(Heartbeat(node="c", bye=True), now=10.6)
    assert [n.name for n in view.seen(now=10.7)] == ["b"]


def test_a_subject_is_wanted_while_another_node_says_so_or_does_not_say():
    view = ClusterView("a", dead_after=1.0)
    assert not view.wanted("sd.ch.cam.out")  # alone: nobody wants anything
    view.heard(Heartbeat(node="b", wants=["sd.ch.cam.out"]), now=1.0)
    assert view.wanted("sd.ch.cam.out") and not view.wanted("sd.ch.cam.in")
    view.heard(Heartbeat(node="c"), now=1.0)  # a node that does not say what it wants: everything
    assert view.wanted("sd.ch.cam.in")
    assert view.expire(now=2.5) == ["b", "c"] and not view.wanted("sd.ch.cam.out")
    view.heard(Heartbeat(node="b", wants=["sd.ch.cam.in"]), now=3.0)
    view.heard(Heartbeat(node="b", wants=[]), now=3.1)  # its last heartbeat counts
    assert not view.wanted("sd.ch.cam.in")
