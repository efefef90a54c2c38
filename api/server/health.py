"""What ``GET /health`` reports: version, GPU, workers and their capacity, streams."""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Any

from api.server.services import Services
from common.version import __version__ as VERSION


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


def health_report(running: Services) -> dict[str, Any]:
    """For anyone, without a key: so it names no stream, channel or key (stream ids would let
    an anonymous client find a channel to read or publish on)."""
    workers = [
        {"name": w.name, "engine": w.engine, "capacity": w.capacity, "used": len(w.assigned)}
        for w in running.hub.workers
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
    }
