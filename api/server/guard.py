"""Limits before a request exists: a deadline for its headers and a count of connections per address.

uvicorn waits forever for the first request on a new connection (its
keep-alive timeout starts after a response), so a client that connects and
sends nothing, or half a header, holds a descriptor for good; enough of them
lock everyone out. :func:`guarded_h11` gives uvicorn's h11 protocol a header
deadline and counts each address's HTTP connections in :class:`Doors`, where
:class:`~api.server.doors.DoorGuard` decides, once it sees the headers, whether
the request is over the cap (429 unless it carries the API key). Only a flood
far beyond the cap is closed unread. A connection upgraded to a WebSocket
leaves the HTTP count: WebSocket sessions have a cap of their own.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:  # uvicorn's own dependency, named here only in a type
    import h11

from api.server.doors import Doors


def guarded_h11(header_timeout: float, doors: Doors) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes a connection without a request after ``header_timeout``
    seconds, and counts its client address's HTTP connections in ``doors``."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _counted: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else None
            if host is not None:
                self._counted = host
                doors.http[host] += 1
                if doors.flooded(host):
                    transport.close()
                    return
            self._arm()

        def _uncount(self) -> None:
            if self._counted is not None:
                Doors.release(doors.http, self._counted)
                self._counted = None

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

        def handle_websocket_upgrade(self, event: h11.Request) -> None:
            self._uncount()  # from now on a WebSocket session, counted as one
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._uncount()
            super().connection_lost(exc)

    return GuardedH11Protocol
