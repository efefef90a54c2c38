"""Cheap per-channel counters: rates over a sliding window and latency percentiles."""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from common.percentiles import RELAY_QUANTILES, percentiles_ms


class RateMeter:
    """Events per second over roughly the last ``window`` seconds.

    ``tick`` costs one clock read; snapshots are taken at most every
    ``window / 8`` seconds, so memory stays constant at any rate.
    """

    def __init__(self, window: float = 2.0) -> None:
        self.total = 0
        self._window = window
        self._step = window / 8
        self._snaps: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])

    def tick(self, count: int = 1) -> None:
        self.total += count
        now = time.monotonic()
        if now - self._snaps[-1][0] >= self._step:
            self._snaps.append((now, self.total))
            while now - self._snaps[0][0] > self._window and len(self._snaps) > 2:
                self._snaps.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        start_time, start_total = self._snaps[0]
        elapsed = now - start_time
        if elapsed <= 0:
            return 0.0
        if now - self._snaps[-1][0] > self._window:  # idle for a whole window
            return 0.0
        return (self.total - start_total) / elapsed


class LatencyTracker:
    """Time from an input frame's arrival to its result's arrival, by sequence number."""

    def __init__(self, pending: int = 512, samples: int = 1024) -> None:
        self._pending: OrderedDict[int, float] = OrderedDict()
        self._max_pending = pending
        self.samples: deque[float] = deque(maxlen=samples)

    def started(self, seq: int) -> None:
        self._pending[seq] = time.monotonic()
        if len(self._pending) > self._max_pending:
            self._pending.popitem(last=False)

    def finished(self, seq: int) -> float | None:
        start = self._pending.pop(seq, None)
        if start is None:
            return None
        elapsed = time.monotonic() - start
        self.samples.append(elapsed)
        return elapsed

    def percentiles_ms(self) -> dict[str, float | None]:
        """``{"p50": ms, "p99": ms}``, ``None`` values before the first sample."""
        return percentiles_ms(self.samples, RELAY_QUANTILES)
