"""Telling WebSocket clients that the server is stopping, in each protocol's own words.

uvicorn closes every WebSocket with 1012 (service restart) when it shuts
down, before the app's lifespan shutdown runs. Endpoints register a
coroutine that says goodbye in their protocol; the server awaits them all
first (see :class:`api.server.http.GracefulServer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

log = logging.getLogger("api")

Goodbye = Callable[[], Awaitable[object]]
SHUTDOWN_TEXT = "server shutting down"


class Farewells:
    def __init__(self, timeout: float = 1.0) -> None:
        self._goodbyes: dict[int, Goodbye] = {}
        self._next = 0
        self.timeout = timeout

    @contextlib.contextmanager
    def registered(self, goodbye: Goodbye) -> Iterator[None]:
        """Keep ``goodbye`` to call at shutdown while the block runs (one connection's life)."""
        key = self._next = self._next + 1
        self._goodbyes[key] = goodbye
        try:
            yield
        finally:
            self._goodbyes.pop(key, None)

    def __len__(self) -> int:
        return len(self._goodbyes)

    async def say_all(self) -> None:
        """Call every goodbye at once; a client that does not take it within ``timeout`` is skipped."""
        goodbyes = list(self._goodbyes.values())
        if not goodbyes:
            return
        log.info("telling %d WebSocket client(s) that the server is stopping", len(goodbyes))
        results = await asyncio.gather(
            *(asyncio.wait_for(g(), self.timeout) for g in goodbyes), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, (OSError, asyncio.TimeoutError)):
                log.debug("goodbye failed: %r", result)
