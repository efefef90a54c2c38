"""What ``GET /health`` reports: version, GPU, workers and their capacity, streams, cluster nodes."""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from api.server.services import Services
from common.version import __version__ as VERSION

if TYPE_CHECKING:
    from relay.cluster.view import ClusterStatus


@functools.cache
def gpu_info() -> dict[str, Any] | None:
    """This machine's CUDA device, or None; imports torch only if it is installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_mb": props.total_memory // 2**20,
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


def cluster_report(status: ClusterStatus | None) -> dict[str, Any] | None:
    """The relay nodes this one sees over NATS, and their workers' slots; None without NATS.

    Node names and slot counts only: never the channels their heartbeats list.
    """
    if status is None:
        return None
    return {
        "node": status.node,
        "connected": status.connected,
        "nodes": [
            {
                "name": node.name,
                "heartbeat_age_s": round(node.heartbeat_age_s, 3),
                "workers": node.workers,
                "capacity": {"total": node.capacity, "used": node.used},
            }
            for node in status.nodes
        ],
    }


def health_report(running: Services) -> dict[str, Any]:
    """For anyone, without a key: so it names no stream, channel or key (stream ids would let
    an anonymous client find a channel to read or publish on).

    With NATS, ``workers`` holds the other nodes' workers too (``node`` says whose; their
    capacity is the slots free for this node) and ``cluster`` lists the nodes this one hears.
    """
    hub = running.hub
    cluster = hub.backplane.status() if hub.backplane is not None else None
    workers = [
        {
            "name": w.name,
            "engine": w.engine,
            "node": cluster and cluster.worker_nodes.get(w.id, cluster.node),
            "capacity": w.capacity,
            "used": len(w.assigned),
        }
        for w in hub.workers
    ]
    return {
        "status": "ok" if workers else "degraded",
        "detail": None if workers else "no worker connected: streams wait in LOADING",
        "version": VERSION,
        "python": sys.version.split()[0],
        "gpu": gpu_info(),
        "workers": workers,
        "capacity": {"total": sum(w["capacity"] for w in workers), "used": sum(w["used"] for w in workers)},
        "streams": len(running.streams.streams),
        "relay_url": running.relay_url,
        "cluster": cluster_report(cluster),
    }
