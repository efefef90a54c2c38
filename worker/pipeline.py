"""One channel's processing: decode, engine, encode, each on its own thread.

Stages hand work over through :class:`~common.slots.ThreadSlot`, so while the engine
runs frame N the decoder prepares the newest frame after it and the encoder
finishes frame N-1: the engine never waits on I/O or codecs, and a slow
engine sees the newest frame rather than a queue. Threads, not processes:
simplejpeg, OpenCV and torch release the GIL in their C code, and
``bench/worker.py`` measures what the runtime costs against the engine alone.

Parameter changes are applied on the engine thread between batches. A
change that needs a reload builds a new engine on a helper thread while the
current one keeps serving, then swaps it in.

A failed first load is not final: the channel stays assigned in an error
state (its frames dropped) and the engine thread loads again as soon as new
params arrive, and on its own after a backoff (2, 4, 8... seconds, at most
60; new params start the schedule over). Each failure's ``error`` report
says the attempt and when the next one comes, so the relay's ``last_error``
(and the API's stream status) shows it; ``ready`` follows the load that works.

With a :class:`~worker.engines.base.SubmittingEngine` (the diffusion engine
in a worker: one model batched across channels) the engine thread hands
each batch over and goes back for the next frame at once; the engine's own
thread runs it together with other channels' frames and passes the outputs
to this channel's encode stage. Each result carries the params version that
was current when its frames were submitted, which the engine honours: hot
params drop a submission made before them. When the channel stops, its
engine is closed (a shared model is freed with its last channel).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.slots import Closed, ThreadSlot
from media.codec import decode_image, encode_image
from wire.frames import Frame, ImageFormat
from wire.messages import ReportEvent
from worker.engines import Engine, EngineError, SubmittingEngine, create_channel_engine
from worker.engines.base import Result

log = logging.getLogger("worker")

EngineFactory = Callable[[Mapping[str, Any]], Engine]

#: seconds before the first automatic retry of a failed engine load; doubled each failure
LOAD_RETRY_FIRST = 2.0
#: the longest wait between automatic load retries
LOAD_RETRY_MAX = 60.0


def load_retry_delay(failures: int, first: float = LOAD_RETRY_FIRST, cap: float = LOAD_RETRY_MAX) -> float:
    """Seconds to wait after the ``failures``-th failed load in a row: first, 2 x first, ... at most cap."""
    return min(cap, first * 2 ** max(0, failures - 1))


@dataclass
class StageTimes:
    """Running totals for stats: seconds spent per stage and frames through each."""

    decode: float = 0.0
    engine: float = 0.0
    encode: float = 0.0
    frames: int = 0
    errors: int = 0

    def per_frame_ms(self) -> dict[str, float]:
        n = max(self.frames, 1)
        return {
            "decode_ms": round(self.decode / n * 1000, 3),
            "engine_ms": round(self.engine / n * 1000, 3),
            "encode_ms": round(self.encode / n * 1000, 3),
        }


@dataclass
class Decoded:
    frame: Frame
    rgb: np.ndarray


@dataclass
class PendingUpdate:
    params: dict[str, Any]
    version: int


@dataclass
class Events:
    """Callbacks into the connection (called from pipeline threads)."""

    output: Callable[[Frame], None]
    report: Callable[[ReportEvent, str, dict[str, Any]], None] = lambda event, message, data: None


@dataclass
class PipelineOptions:
    output_format: ImageFormat = ImageFormat.JPEG
    quality: int = 85
    extra_params: dict[str, Any] = field(default_factory=dict)
    #: automatic retries of a failed load: ``load_retry_first`` seconds, doubling up to ``load_retry_max``
    load_retry_first: float = LOAD_RETRY_FIRST
    load_retry_max: float = LOAD_RETRY_MAX


class ChannelPipeline:
    """Runs one channel's frames through an engine on three threads."""

    def __init__(
        self,
        channel: str,
        engine_factory: EngineFactory,
        params: Mapping[str, Any],
        version: int,
        events: Events,
        options: PipelineOptions | None = None,
    ) -> None:
        self.channel = channel
        self.options = options or PipelineOptions()
        self.events = events
        self.times = StageTimes()
        self._factory = engine_factory
        self._params = {**self.options.extra_params, **params}
        self._version = version
        self._engine: Engine | None = None
        self._replacement: tuple[Engine, dict[str, Any], int] | None = None
        self._reloading = False
        self._updates: list[PendingUpdate] = []
        self._lock = threading.Lock()
        #: set by ``update`` and ``stop``: wakes an engine thread waiting to retry a failed load
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._finished = False  # the engine thread has ended: engines built after it are closed at once
        self._load_failures = 0
        self._next_load: float | None = None  # monotonic time of the next automatic load attempt
        self._incoming: ThreadSlot[Frame] = ThreadSlot(1)
        self._decoded: ThreadSlot[Decoded] = ThreadSlot(1)
        self._processed: ThreadSlot[tuple[Frame, np.ndarray, int]] = ThreadSlot(4)
        self._threads = [
            threading.Thread(target=self._guard(self._decode_loop), name=f"decode-{channel}", daemon=True),
            threading.Thread(target=self._guard(self._engine_loop), name=f"engine-{channel}", daemon=True),
            threading.Thread(target=self._guard(self._encode_loop), name=f"encode-{channel}", daemon=True),
        ]

    # -- control, from the connection ---------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, frame: Frame) -> None:
        self._incoming.put(frame)

    def update(self, params: Mapping[str, Any], version: int) -> None:
        """Queue new full params; the engine thread applies them before its next batch."""
        with self._lock:
            self._updates.append(PendingUpdate({**self.options.extra_params, **params}, version))
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        for buffer in (self._incoming, self._decoded, self._processed):
            buffer.close()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    @property
    def dropped(self) -> int:
        return self._incoming.dropped + self._decoded.dropped + self._processed.dropped

    def stats(self) -> dict[str, Any]:
        stats = {
            **self.times.per_frame_ms(),
            "frames": self.times.frames,
            "errors": self.times.errors,
            "dropped": self.dropped,
            "params_version": self._version,
            "reloading": self._reloading,
        }
        next_load = self._next_load
        if self._engine is None and next_load is not None:  # waiting to retry a failed load
            stats.update(
                load_failures=self._load_failures,
                next_load_in_s=round(max(0.0, next_load - time.monotonic()), 3),
            )
        return stats

    # -- stages ---------------------------------------------------------------

    def _guard(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except Closed:
                pass
            finally:
                self.stop()  # one stage ending stops the others

        return run

    def _decode_loop(self) -> None:
        while True:
            for frame in self._incoming.take():
                start = time.perf_counter()
                try:
                    rgb = decode_image(frame.payload, frame.format)
                except Exception as exc:  # a bad frame must not stop the channel
                    self._error(f"cannot decode frame {frame.seq}: {exc}")
                    continue
                self.times.decode += time.perf_counter() - start
                self._decoded.put(Decoded(frame, rgb))

    def _engine_loop(self) -> None:
        try:
            self._engine = self._load_until_ready()
            self._load_failures, self._next_load = 0, None
            self.events.report(ReportEvent.READY, "engine loaded", self._engine.info())
            while True:
                batch_size = self._engine.batch_size
                self._decoded.resize(batch_size)
                batch = self._decoded.take(batch_size, timeout=0.05)
                self._apply_updates()
                if batch:
                    self._run(self._engine, batch)
        finally:
            self._close_engines()

    def _run(self, engine: Engine, batch: list[Decoded]) -> None:
        """Process ``batch`` now, or hand it to a submitting engine; results go to the encode stage."""
        done = self._finisher(batch, self._version, time.perf_counter())
        frames = [item.rgb for item in batch]
        if isinstance(engine, SubmittingEngine):
            try:
                engine.submit(frames, done)
            except Exception as exc:
                done(exc)
            return
        try:
            result: Result = engine.process(frames)
        except Exception as exc:
            result = exc
        done(result)

    def _finisher(self, batch: list[Decoded], version: int, start: float) -> Callable[[Result], None]:
        """What to do with ``batch``'s result: outputs to the encode stage, an error to the report."""

        def done(result: Result) -> None:
            if isinstance(result, Exception):
                self._error(f"engine failed on frame {batch[-1].frame.seq}: {result}")
                return
            self.times.engine += time.perf_counter() - start  # with a shared model: waiting included
            for item, out in zip(batch, result, strict=False):
                self._processed.put((item.frame, out, version))

        return done

    def _close_engines(self) -> None:
        """Close the engine and any replacement built meanwhile; a reload finishing later closes its own."""
        with self._lock:
            self._finished = True
            replacement, self._replacement = self._replacement, None
        engines = [self._engine, replacement[0] if replacement else None]
        self._engine = None
        for engine in engines:
            if engine is not None:
                _close_quietly(engine)

    def _encode_loop(self) -> None:
        fmt, quality = self.options.output_format, self.options.quality
        while True:
            for frame, rgb, version in self._processed.take():
                start = time.perf_counter()
                try:
                    payload = encode_image(rgb, fmt, quality)
                except Exception as exc:
                    self._error(f"cannot encode the result of frame {frame.seq}: {exc}")
                    continue
                self.times.encode += time.perf_counter() - start
                self.times.frames += 1
                height, width = rgb.shape[:2]
                self.events.output(frame.as_output(payload, fmt, width, height, version))

    def _load_until_ready(self) -> Engine:
        """Build the engine, retrying after failures (new params at once, else after a backoff).

        Raises :class:`Closed` when the pipeline stops meanwhile.
        """
        failures = 0
        while True:
            with self._lock:
                updates, self._updates = self._updates, []
            if updates:  # newer params than the last attempt's: try them now, the schedule starts over
                self._params, self._version = updates[-1].params, updates[-1].version
                failures = 0
            try:
                return self._build(self._params)
            except Exception as exc:
                failures += 1
                delay = load_retry_delay(failures, self.options.load_retry_first, self.options.load_retry_max)
                self._load_failures = failures
                self._next_load = time.monotonic() + delay
                self._error(
                    f"engine failed to load (attempt {failures}, params version "
                    f"{self._version}): {exc}; retrying in {delay:g} s or when the params "
                    "change",
                    load_failed=True,
                    attempt=failures,
                    retry_in_s=delay,
                    version=self._version,
                )
            self._wait_for_retry(self._next_load)

    def _wait_for_retry(self, until: float) -> None:
        """Return at ``until`` or as soon as new params are queued; raise :class:`Closed` on stop."""
        while True:
            if self._stopped.is_set():
                raise Closed
            with self._lock:
                if self._updates:
                    return
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(remaining)
            self._wake.clear()  # whatever set it is checked above before the next wait

    # -- params -------------------------------------------------------------

    def _build(self, params: Mapping[str, Any]) -> Engine:
        engine = self._factory(params)
        engine.on_progress = LoadProgress(self.events.report)
        try:
            engine.load()
        except BaseException:
            _close_quietly(engine)  # what a half-done load holds (GPU memory) must not pile up over retries
            raise
        return engine

    def _apply_updates(self) -> None:
        with self._lock:
            updates, self._updates = self._updates, []
            replacement, self._replacement = self._replacement, None
        if replacement is not None:
            old = self._engine
            self._engine, self._params, self._version = replacement
            self._reloading = False
            if old is not None:
                old.close()
            self.events.report(ReportEvent.READY, "reloaded", self._engine.info())
        if not updates or self._engine is None:
            return
        latest = updates[-1]
        try:
            reload_keys = self._engine.update(latest.params)
        except Exception as exc:
            self._error(f"params version {latest.version} rejected: {exc}")
            return
        if reload_keys:
            self._start_reload(latest, reload_keys)
        else:
            self._params, self._version = latest.params, latest.version

    def _start_reload(self, update: PendingUpdate, keys: set[str]) -> None:
        self.events.report(
            ReportEvent.RELOADING, f"reloading for {sorted(keys)}", {"version": update.version}
        )

        def build() -> None:
            try:
                engine = self._build(update.params)
            except Exception as exc:
                self._error(
                    f"reload for params version {update.version} failed, "
                    f"keeping version {self._version}: {exc}",
                    reload_failed=True,
                    version=update.version,
                    kept_version=self._version,
                )
                return
            with self._lock:
                finished = self._finished
                if not finished:
                    self._replacement = (engine, update.params, update.version)
            if finished:  # the channel stopped while this loaded
                _close_quietly(engine)

        self._reloading = True
        threading.Thread(target=build, name=f"reload-{self.channel}", daemon=True).start()

    def _error(self, message: str, **data: Any) -> None:
        self.times.errors += 1
        log.warning("channel %s: %s", self.channel, message)
        self.events.report(ReportEvent.ERROR, message, data)


class LoadProgress:
    """An engine's load progress as ``progress`` reports: each new stage at once, updates within a
    stage at most every :attr:`interval` seconds, with the fraction done and an ETA when known."""

    interval = 0.25

    def __init__(
        self,
        report: Callable[[ReportEvent, str, dict[str, Any]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._report, self._clock = report, clock
        self._stage = ""
        self._stage_started = self._last_sent = 0.0

    def __call__(self, stage: str, done: float | None, total: float | None, unit: str) -> None:
        now = self._clock()
        if stage != self._stage:
            self._stage, self._stage_started = stage, now
        elif now - self._last_sent < self.interval and not (done is not None and done == total):
            return
        self._last_sent = now
        data: dict[str, Any] = {"stage": stage, "done": done, "total": total, "unit": unit}
        if done is not None and total:
            fraction = min(1.0, done / total)
            data["fraction"] = round(fraction, 4)
            elapsed = now - self._stage_started
            if 0 < fraction < 1 and elapsed > 0:
                data["eta_s"] = round(elapsed * (1 - fraction) / fraction, 1)
        self._report(ReportEvent.PROGRESS, stage, data)


def _close_quietly(engine: Engine) -> None:
    try:
        engine.close()
    except Exception:  # a close that fails must not hide the reason it was closed
        log.debug("closing an engine failed", exc_info=True)


def engine_factory(name: str) -> EngineFactory:
    """Builds what a worker's channel runs for ``name`` (a lane on a shared model for diffusion)."""

    def build(params: Mapping[str, Any]) -> Engine:
        return create_channel_engine(name, params)

    return build


__all__ = ["ChannelPipeline", "EngineError", "Events", "PipelineOptions", "engine_factory"]
