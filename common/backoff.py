"""Waits between tries: the producers, the viewer and the worker reconnect on one schedule."""

from __future__ import annotations

from collections.abc import Iterator

#: the first wait between tries (seconds); each failed try doubles it, up to RETRY_MAX
RETRY_FIRST = 0.25
#: never more than this between tries while a user waits (0.25, 0.5, 1, 2, 2... s)
RETRY_MAX = 2.0


def retry_delays(first: float = RETRY_FIRST, cap: float = RETRY_MAX) -> Iterator[float]:
    """Seconds to wait before each new try: ``first``, doubling, never more than ``cap``."""
    delay = first
    while True:
        yield min(delay, cap)
        delay = min(delay * 2, cap)
