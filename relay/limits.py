"""Small guards of the relay's doors: a token bucket for control messages, rate-limited logging.

Neither is on the frame path: frames are never counted, and the log filter
only sees records of the loggers it is attached to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; :meth:`take` spends one if there is one."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class OncePerInterval(logging.Filter):
    """Let through one record per ``interval`` seconds of those whose message contains ``marker``.

    The next one let through says how many were held back. Other records pass.
    Made for errors that repeat as fast as the loop spins, such as asyncio's
    ``socket.accept() out of system resource`` (EMFILE) with its traceback,
    which it would otherwise log hundreds of times a second.
    """

    def __init__(
        self, marker: str, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.marker, self.interval, self._clock = marker, interval, clock
        self._next = 0.0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.marker not in str(record.msg):
            return True
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        if self.suppressed:
            record.msg = (
                f"{record.msg} ({self.suppressed} more like it in the last {self.interval:g} s not logged)"
            )
            self.suppressed = 0
        return True


#: asyncio's message when accept() fails for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS)
ACCEPT_ERROR_MARKER = "out of system resource"
_accept_filters = (
    OncePerInterval(ACCEPT_ERROR_MARKER),
    # each failed accept schedules up to 100 retries of the listener (asyncio's backlog loop):
    # once the server has closed, every one of them fails with its own traceback
    OncePerInterval("BaseSelectorEventLoop._start_serving"),
)


def limit_accept_error_logs() -> None:
    """Log asyncio's accept errors (EMFILE...) once per 10 s, not once per spin of the loop. Idempotent."""
    logger = logging.getLogger("asyncio")
    for accept_filter in _accept_filters:
        if accept_filter not in logger.filters:
            logger.addFilter(accept_filter)
