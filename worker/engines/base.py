"""The contract between the worker runtime and an engine.

The runtime owns threads, sockets and codecs; an engine only turns RGB
frames into RGB frames. Parameters are split in two: *hot* ones apply on
the next frame (``update`` returns nothing for them), *reload* ones need a
new engine (``update`` returns their names and leaves them unapplied). The
runtime then builds a fresh engine with the merged parameters in the
background and swaps it in when ``load`` returns, so the old one keeps
serving meanwhile.

A :class:`SubmittingEngine` runs its frames on a thread it does not own
(one model batched across channels): the runtime hands frames over with
``submit`` and gets the outputs back through a callback.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np


class EngineError(RuntimeError):
    """An engine cannot be built or run with the given parameters."""


#: what an engine calls while it loads: ``(stage, done, total, unit)``; done/total may be None
ProgressCallback = Callable[[str, float | None, float | None, str], None]


class Engine(abc.ABC):
    """Base class for engines. Frames are ``HxWx3`` uint8 RGB arrays."""

    name: ClassVar[str]

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = dict(params or {})
        #: set by the runtime before ``load``: where a slow load says how far it is
        self.on_progress: ProgressCallback | None = None

    def progress(
        self, stage: str, done: float | None = None, total: float | None = None, unit: str = "steps"
    ) -> None:
        """Say how far ``load`` is ("loading unet", 3 of 7 steps; or bytes of a download)."""
        if self.on_progress is not None:
            self.on_progress(stage, done, total, unit)

    @property
    def batch_size(self) -> int:
        """How many frames ``process`` wants per call (StreamDiffusion's frame buffer)."""
        return 1

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(width, height)`` of the frames it produces, or None for "same as input"."""
        return None

    def load(self) -> None:  # noqa: B027 - an optional hook, not abstract: engines override it if they need it
        """Do the slow work (weights, compilation). Called once, off the event loop."""

    @abc.abstractmethod
    def update(self, params: Mapping[str, Any]) -> set[str]:
        """Apply the hot parameters among ``params``; return the names that need a reload."""

    @abc.abstractmethod
    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Transform ``len(frames) == batch_size`` frames; return as many outputs."""

    def info(self) -> dict[str, Any]:
        """What the engine runs on, for logs, stats and ``/health``."""
        return {"engine": self.name}

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract: engines override it if they need it
        """Free resources (GPU memory) when the engine is replaced or the channel released."""


#: what a submission's ``done`` gets: the output frames, or the error that stopped them
Result = list[np.ndarray] | Exception
Done = Callable[[Result], None]


class SubmittingEngine(Engine):
    """An engine whose frames run on another thread, e.g. one batched step for several channels.

    ``submit`` returns at once. A submission not started yet is replaced by the
    next one (newest wins) and its ``done`` is never called; otherwise ``done``
    is called once, on the engine's thread, so it must only hand the result on.
    """

    @abc.abstractmethod
    def submit(self, frames: Sequence[np.ndarray], done: Done) -> None:
        """Queue ``len(frames) == batch_size`` frames for the engine's next step."""

    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Submit and wait, for callers with nothing else to do meanwhile (tests, benchmarks)."""
        finished = threading.Event()
        results: list[Result] = []

        def done(result: Result) -> None:
            results.append(result)
            finished.set()

        self.submit(frames, done)
        finished.wait()
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]


def changed_keys(current: Mapping[str, Any], new: Mapping[str, Any]) -> set[str]:
    """Names in ``new`` whose value differs from ``current``."""
    return {key for key, value in new.items() if current.get(key, _MISSING) != value}


_MISSING = object()
