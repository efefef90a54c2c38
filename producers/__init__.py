"""Frame producers (static, directory, video, screen, webcam, pattern) and a viewer.

Importable core for tests, benchmarks and the embedded server::

    from producers import PatternSource, ProducerOptions, run_producer
    report = await run_producer(PatternSource(), ProducerOptions(relay=url, max_frames=100))

Names are loaded lazily so ``python -m producers.viewer`` does not import
its own module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConnectError": "producers.net",
    "DEFAULT_RELAY": "producers.net",
    "ProducerOptions": "producers.sender",
    "ProducerReport": "producers.sender",
    "run_producer": "producers.sender",
    "ViewerOptions": "producers.viewer",
    "ViewerReport": "producers.viewer",
    "ViewerError": "producers.viewer",
    "run_viewer": "producers.viewer",
    "Source": "producers.sources",
    "SourceError": "producers.sources",
    "StaticSource": "producers.sources",
    "DirectorySource": "producers.sources",
    "VideoSource": "producers.sources",
    "ScreenSource": "producers.sources",
    "WebcamSource": "producers.sources",
    "PatternSource": "producers.sources",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'producers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
