"""Prometheus ``/metrics`` (with the API key, as stream ids label its series): per-stream fps,
latency histogram, drops, GPU memory, workers, WebRTC sessions, and with NATS the relay nodes
this one hears and their workers' slots.

Gauges and counters are read from the hub at scrape time (a custom
collector, so nothing is updated on the frame path); the latency histogram
is fed by the hub's latency observer, one ``observe`` per result.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from api.server.services import services
from api.streams.auth import require_api_key
from api.webrtc.sessions import WebRTCState
from relay.cluster.view import ClusterStatus
from relay.hub import Hub

router = APIRouter()

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BUCKET_LABELS = (*(str(bound) for bound in LATENCY_BUCKETS), "+Inf")


class HubCollector:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        fps_in = GaugeMetricFamily("sd_stream_input_fps", "Input frames per second", labels=["stream"])
        fps_out = GaugeMetricFamily("sd_stream_output_fps", "Output frames per second", labels=["stream"])
        frames_in = CounterMetricFamily("sd_stream_input_frames", "Input frames received", labels=["stream"])
        frames_out = CounterMetricFamily(
            "sd_stream_output_frames", "Output frames produced", labels=["stream"]
        )
        drops = CounterMetricFamily(
            "sd_stream_dropped_frames",
            "Frames replaced by newer ones before sending, or with no worker",
            labels=["stream", "where"],
        )
        gpu = GaugeMetricFamily(
            "sd_stream_gpu_memory_bytes", "GPU memory the stream's worker reports", labels=["stream"]
        )
        for name, channel in list(self.hub.channels.items()):
            fps_in.add_metric([name], channel.frames_in.rate())
            fps_out.add_metric([name], channel.frames_out.rate())
            frames_in.add_metric([name], channel.frames_in.total)
            frames_out.add_metric([name], channel.frames_out.total)
            for where, count in channel.drops.items():
                drops.add_metric([name, where], count)
            memory = channel.worker_stats.get("gpu_memory_mb")
            if memory is not None:
                gpu.add_metric([name], memory * 2**20)
        workers = GaugeMetricFamily("sd_workers", "Workers connected to the relay")
        workers.add_metric([], len(self.hub.workers))
        capacity = GaugeMetricFamily(
            "sd_worker_capacity", "Channels workers can serve, and in use", labels=["state"]
        )
        capacity.add_metric(["total"], sum(w.capacity for w in self.hub.workers))
        capacity.add_metric(["used"], sum(len(w.assigned) for w in self.hub.workers))
        channels = GaugeMetricFamily("sd_channels", "Relay channels open")
        channels.add_metric([], len(self.hub.channels))
        yield from (fps_in, fps_out, frames_in, frames_out, drops, gpu, workers, capacity, channels)
        if self.hub.backplane is not None:
            yield from cluster_metrics(self.hub.backplane.status())


def cluster_metrics(status: ClusterStatus) -> Iterator[Metric]:
    """The nodes this one hears over NATS (it included), and each other node's workers as its
    heartbeat lists them."""
    connected = GaugeMetricFamily("sd_cluster_connected", "1 while this node's NATS connection is up")
    connected.add_metric([], 1 if status.connected else 0)
    nodes = GaugeMetricFamily(
        "sd_cluster_nodes", "Relay nodes this node sees alive over NATS, itself included"
    )
    nodes.add_metric([], 1 + len(status.nodes))
    age = GaugeMetricFamily(
        "sd_cluster_node_heartbeat_age_seconds", "Seconds since the node's last heartbeat", labels=["node"]
    )
    workers = GaugeMetricFamily(
        "sd_cluster_node_workers", "Workers of another node, as its heartbeat lists them", labels=["node"]
    )
    capacity = GaugeMetricFamily(
        "sd_cluster_node_worker_capacity",
        "Channels another node's workers can serve, and in use (for any node), as its heartbeat says",
        labels=["node", "state"],
    )
    for node in status.nodes:
        age.add_metric([node.name], node.heartbeat_age_s)
        workers.add_metric([node.name], node.workers)
        capacity.add_metric([node.name, "total"], node.capacity)
        capacity.add_metric([node.name, "used"], node.used)
    dropped = CounterMetricFamily(
        "sd_cluster_frames_not_shared",
        "Frames not published to NATS: no other node wanted them, replaced by newer ones, or over "
        "NATS max_payload",
        labels=["why"],
    )
    dropped.add_metric(["replaced"], status.dropped)
    dropped.add_metric(["too_large"], status.too_large)
    dropped.add_metric(["unwanted"], status.unwanted)
    yield from (connected, nodes, age, workers, capacity, dropped)


class WebRTCCollector:
    """WHIP publishers and WHEP viewers per stream, and the shared WHEP encoders running."""

    def __init__(self, webrtc: WebRTCState) -> None:
        self.webrtc = webrtc

    def collect(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily(
            "sd_stream_webrtc_sessions",
            "WebRTC sessions (whip: publishers, whep: viewers)",
            labels=["stream", "kind"],
        )
        counts = Counter((s.stream.id, s.kind) for s in list(self.webrtc.registry.sessions.values()))
        for (stream, kind), count in sorted(counts.items()):
            sessions.add_metric([stream, kind], count)
        encoders = GaugeMetricFamily("sd_whep_shared_encoders", "WHEP encoders shared by a stream's viewers")
        encoders.add_metric([], len(self.webrtc.encoders) if self.webrtc.encoders is not None else 0)
        yield from (sessions, encoders)


class LatencyHistograms:
    """Relay latency per channel, kept only while the channel is open.

    A ``prometheus_client.Histogram`` keeps every label it ever saw, so series
    of ended streams and sessions would pile up; these drop with the channel.
    """

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._counts: dict[str, list[int]] = {}  # per bucket of LATENCY_BUCKETS, then +Inf
        self._sums: dict[str, float] = {}

    def observe(self, channel: str, seconds: float) -> None:
        counts = self._counts.get(channel)
        if counts is None:
            counts = self._counts[channel] = [0] * (len(LATENCY_BUCKETS) + 1)
            self._sums[channel] = 0.0
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._sums[channel] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "sd_stream_latency_seconds", "Relay latency: input arrival to result arrival", labels=["stream"]
        )
        for channel in list(self._counts):
            if channel not in self.hub.channels:
                del self._counts[channel], self._sums[channel]
                continue
            cumulative = itertools.accumulate(self._counts[channel])
            family.add_metric(
                [channel], list(zip(BUCKET_LABELS, cumulative, strict=True)), self._sums[channel]
            )
        yield family


class Metrics:
    """The Prometheus registry of one server: hub, latency and WebRTC collectors."""

    def __init__(self, hub: Hub, webrtc: WebRTCState) -> None:
        self.registry = CollectorRegistry()
        latency = LatencyHistograms(hub)
        for collector in (HubCollector(hub), latency, WebRTCCollector(webrtc)):
            self.registry.register(collector)
        hub.latency_observers.append(latency.observe)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_api_key)])
async def metrics(request: Request) -> Response:
    return Response(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
