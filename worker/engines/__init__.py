"""Engine registry: names to classes, imported lazily so ``filter`` needs no torch.

``create_engine`` builds an engine that owns its model (tests, benchmarks);
``create_channel_engine`` builds what a worker's channel runs, which for
``diffusion`` is a lane on a model shared with the worker's other channels.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

from worker.engines.base import Engine, EngineError, SubmittingEngine

ENGINES = {
    "filter": "worker.engines.filter:FilterEngine",
    "diffusion": "worker.engines.diffusion:DiffusionEngine",
}
#: the worker's per-channel engines where they differ from ``ENGINES``
CHANNEL_ENGINES = {
    "diffusion": "worker.engines.diffusion.channel:DiffusionChannel",
}


def engine_class(name: str, channel: bool = False) -> type[Engine]:
    """The class of engine ``name``; with ``channel``, the one a worker's channel runs."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}")
    target = CHANNEL_ENGINES.get(name, ENGINES[name]) if channel else ENGINES[name]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"engine {name!r} is not installed here: {exc}") from exc
    return getattr(module, attr)


def create_engine(name: str, params: Mapping[str, Any] | None = None) -> Engine:
    """Instantiate (not load) engine ``name`` with ``params``."""
    return engine_class(name)(params)


def create_channel_engine(name: str, params: Mapping[str, Any] | None = None) -> Engine:
    """Instantiate (not load) what a worker's channel runs for engine ``name``."""
    return engine_class(name, channel=True)(params)


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device; never raises."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def default_engine_name() -> str:
    """``diffusion`` on a CUDA machine with diffusers installed, ``filter`` otherwise."""
    if cuda_available() and importlib.util.find_spec("diffusers") is not None:
        return "diffusion"
    return "filter"


__all__ = [
    "Engine",
    "EngineError",
    "SubmittingEngine",
    "create_channel_engine",
    "create_engine",
    "default_engine_name",
    "engine_class",
]
