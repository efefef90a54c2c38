"""Engine registry: names to classes, imported lazily so ``filter`` needs no torch."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

from worker.engines.base import Engine, EngineError

ENGINES = {
    "filter": "worker.engines.filter:FilterEngine",
    "diffusion": "worker.engines.diffusion:DiffusionEngine",
}


def engine_class(name: str) -> type[Engine]:
    try:
        target = ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"engine {name!r} is not installed here: {exc}") from exc
    return getattr(module, attr)


def create_engine(name: str, params: Mapping[str, Any] | None = None) -> Engine:
    """Instantiate (not load) engine ``name`` with ``params``."""
    return engine_class(name)(params)


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


__all__ = ["Engine", "EngineError", "create_engine", "default_engine_name", "engine_class"]
