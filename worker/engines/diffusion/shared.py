"""One diffusion model serving several channels: a thread that runs one batched step at a time.

Channels submit their newest frames (a newer submission replaces one not
started yet); each step takes the pending submission of every channel that
has one, at the moment the step starts, and runs them together
(:func:`~.step.run_step`). A channel that stops sending simply has nothing
pending and is not waited for; a channel sending at 60 fps gets one frame per
step like one at 15 fps that has a frame waiting, so neither starves the
other. Results go back through each submission's ``done`` callback.

Everything that touches a channel's lane (adding it, applying its hot params,
removing it) runs on the step thread between steps (:meth:`SharedDiffusion.call`),
so a lane never changes in the middle of a step.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from worker.engines.base import Done, EngineError, ProgressCallback
from worker.engines.diffusion.lane import Lane
from worker.engines.diffusion.model import LOAD_STEPS, DiffusionModel
from worker.engines.diffusion.params import DiffusionParams
from worker.engines.diffusion.step import run_step, warm_up

log = logging.getLogger(__name__)

T = TypeVar("T")
_numbers = itertools.count(1)


@dataclass
class _Submission:
    lane: Lane
    frames: list[np.ndarray]
    done: Done


class _Task(Generic[T]):
    """A function to run on the step thread, and its outcome for the caller waiting on it."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._finished = threading.Event()
        self._result: tuple[T] | None = None  # (what fn returned,): T itself may be None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._result = (self._fn(),)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, whatever it is
            self._error = exc
        finally:
            self._finished.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._finished.set()

    def wait(self) -> T:
        self._finished.wait()
        if self._error is not None:
            raise self._error
        if self._result is None:  # finished, so run() returned or something failed it
            raise RuntimeError("task finished without a result")
        return self._result[0]


class SharedDiffusion:
    """A loaded :class:`~.model.DiffusionModel` and the thread that runs its batched steps."""

    def __init__(self, config: DiffusionParams, device: torch.device, dtype: torch.dtype) -> None:
        self.model = DiffusionModel(config, device, dtype)
        self.name = f"diffusion-{next(_numbers)}"
        self._cond = threading.Condition()
        self._tasks: list[_Task[Any]] = []
        self._pending: dict[Lane, _Submission] = {}
        self._lanes: list[Lane] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched steps run
        self.frames = 0  # submissions processed by them (the mean batch is frames / steps)
        self.replaced = 0  # submissions replaced by a newer one before a step took them

    @property
    def lanes(self) -> int:
        """Channels on this model now."""
        return len(self._lanes)

    def load(self, progress: ProgressCallback | None = None) -> None:
        """Load the model, warm it up with the first channel's params, start the step thread."""
        self.model.load(progress)
        if progress is not None:
            progress("warming up", LOAD_STEPS - 1, LOAD_STEPS, "steps")
        warm_up(self.model, Lane(self.model, self.model.config))
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def add_lane(self, config: DiffusionParams) -> Lane:
        """A new channel's lane (its prompt encoded, its noise drawn) between steps."""

        def add() -> Lane:
            lane = Lane(self.model, config)
            self._lanes.append(lane)
            return lane

        return self.call(add)

    def apply(self, lane: Lane, config: DiffusionParams) -> None:
        """Hot params for ``lane``, between steps; its pending submission (made before them) is dropped."""

        def apply() -> None:
            lane.apply(config, previous=lane.config)
            with self._cond:
                self._pending.pop(lane, None)

        self.call(apply)

    def remove_lane(self, lane: Lane) -> None:
        """The channel leaves: nothing of it runs after this returns."""

        def remove() -> None:
            with self._cond:
                self._pending.pop(lane, None)
            if lane in self._lanes:
                self._lanes.remove(lane)

        self.call(remove)

    def submit(self, lane: Lane, frames: Sequence[np.ndarray], done: Done) -> None:
        """Queue ``lane``'s frames for the next step, replacing its submission not started yet."""
        with self._cond:
            if self._closed:
                raise EngineError("the diffusion model was closed")
            if self._pending.pop(lane, None) is not None:
                self.replaced += 1
            self._pending[lane] = _Submission(lane, list(frames), done)
            self._cond.notify()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the step thread between two steps; return its result or raise its error."""
        if threading.current_thread() is self._thread:
            return fn()
        task = _Task(fn)
        with self._cond:
            if self._closed:
                raise EngineError("the diffusion model was closed")
            self._tasks.append(task)
            self._cond.notify()
        return task.wait()

    def info(self) -> dict[str, Any]:
        return {
            "shared_by": self.lanes,
            "steps": self.steps,
            "mean_batch": round(self.frames / self.steps, 2) if self.steps else 0.0,
        }

    def close(self) -> None:
        """Stop the step thread (after the step it is in) and free the model."""
        with self._cond:
            self._closed = True
            tasks, self._tasks = self._tasks, []
            self._pending.clear()
            self._cond.notify_all()
        for task in tasks:
            task.fail(EngineError("the diffusion model was closed"))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._lanes.clear()
        self.model.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or bool(self._tasks) or bool(self._pending))
                if self._closed:
                    return
                tasks, self._tasks = self._tasks, []
            for task in tasks:
                task.run()
            with self._cond:
                batch = list(self._pending.values())
                self._pending.clear()
            if batch:
                self._step(batch)

    def _step(self, batch: list[_Submission]) -> None:
        results: list[list[np.ndarray] | Exception]
        try:
            with torch.inference_mode():
                results = list(run_step(self.model, [(s.lane, s.frames) for s in batch]))
        except Exception as exc:  # noqa: BLE001 - every channel of the step hears of it, the thread goes on
            log.warning("%s: a batched step of %d channels failed: %s", self.name, len(batch), exc)
            results = [exc] * len(batch)
        self.steps += 1
        self.frames += len(batch)
        for submission, result in zip(batch, results, strict=True):
            try:
                submission.done(result)
            except Exception:
                log.exception("%s: a channel's result callback failed", self.name)
