"""Counting and once-a-second printing shared by the producer and the viewer."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

from common.percentiles import percentiles_ms

__all__ = ["Rate", "every_second", "percentiles_ms"]  # percentiles_ms: the common one, for sender.py


class Rate:
    """A counter that also tells how much it grew since the last look."""

    def __init__(self) -> None:
        self.total = 0
        self._seen = 0

    def add(self, n: int = 1) -> None:
        self.total += n

    def delta(self) -> int:
        d, self._seen = self.total - self._seen, self.total
        return d


@asynccontextmanager
async def every_second(line: Callable[[float], str] | None) -> AsyncIterator[None]:
    """While the block runs, print ``line(seconds_since_last)`` to stderr once a second.

    ``None`` prints nothing (library use, tests)."""
    if line is None:
        yield
        return

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            print(line(now - last), file=sys.stderr, flush=True)
            last = now

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
