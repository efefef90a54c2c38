"""Limits before a request exists: a deadline for its headers and a cap on connections per address.

uvicorn waits forever for the first request on a new connection (its
keep-alive timeout starts after a response), so a client that connects and
sends nothing, or half a header, holds a descriptor for good; enough of them
lock everyone out. :func:`guarded_h11` gives uvicorn's h11 protocol both
limits; WebSocket connections count toward the cap too, once upgraded.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_h11(header_timeout: float, max_per_client: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes a connection without a request after ``header_timeout``
    seconds, and refuses a client address's connection beyond ``max_per_client`` at once."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else None
            same = sum(1 for c in self.connections if (getattr(c, "client", None) or (None,))[0] == host)
            if host is not None and same > max_per_client:
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # closed, or upgraded to a WebSocket
            if self.cycle is not None and not self.cycle.response_complete:
                return  # its headers came: a request is being served
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's headers get the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol
