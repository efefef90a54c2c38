"""Who may come through the HTTP and WebSocket doors at all: connection caps per address and browser origins.

The protocol (:mod:`api.server.guard`) counts each address's HTTP connections;
:class:`Doors` counts its WebSocket sessions, which are long-lived and so
have a cap of their own: idle sockets must not starve plain requests. Both
caps are decided here, once the request's headers are known, so that a
request carrying the API key is never refused by them and a refused one gets
a JSON answer (429) rather than a silent close.

Every WebSocket route is accepted through here, so the ``Origin`` check is
made once for all of them: a browser page may open a WebSocket only from the
server's own origin, a loopback origin, or one listed in ``server.origins``
(403 otherwise); clients that send no Origin (scripts, workers) are not
concerned.
"""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from api.server.errors import error_response
from relay.config import is_loopback

#: how many times the HTTP cap an address may hold before new connections are closed unread:
#: a ceiling on descriptors that connections sending nothing can take (each lives at most
#: the header timeout)
FLOOD_FACTOR = 4


class Doors:
    """Per-address counts shared by the connection protocol (HTTP) and :class:`DoorGuard` (WebSocket)."""

    def __init__(self, max_http: int, max_websockets: int) -> None:
        self.max_http, self.max_websockets = max_http, max_websockets
        self.http: Counter[str] = Counter()
        self.websockets: Counter[str] = Counter()

    def flooded(self, host: str) -> bool:
        """Too many connections from ``host`` to even read their headers."""
        return self.http[host] > self.max_http * FLOOD_FACTOR

    @staticmethod
    def release(counter: Counter[str], host: str) -> None:
        counter[host] -= 1
        if counter[host] <= 0:
            del counter[host]


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", [])}


def presented_key(scope: Scope) -> str | None:
    """The API key a request shows: ``Authorization: Bearer`` or, for a browser's WebSocket, ``?api_key=``."""
    scheme, _, token = _headers(scope).get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if scope["type"] == "websocket":
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key")
        return values[0] if values else None
    return None


def _netloc(url_host: str, scheme: str) -> str:
    """``host[:port]`` lowercased, without the scheme's default port (browsers leave it out of Origin)."""
    default = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}.get(scheme, "")
    host = url_host.lower()
    return host.removesuffix(default) if default else host


def origin_allowed(origin: str, host_header: str, scheme: str, listed: Iterable[str]) -> bool:
    """Whether a browser page at ``origin`` may open a WebSocket to a server reached as ``host_header``."""
    if origin in listed:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (file: pages, sandboxed frames) and other schemes: only when listed
    if _netloc(parts.netloc, parts.scheme) == _netloc(host_header, scheme):
        return True  # the server's own pages
    return parts.hostname is not None and is_loopback(parts.hostname)


class DoorGuard:
    """ASGI middleware: the per-address caps (429 beyond them, unless the API key is shown) and the
    WebSocket ``Origin`` check (403)."""

    def __init__(self, app: ASGIApp, doors: Doors, api_keys: list[str], origins: list[str]) -> None:
        self.app, self.doors, self.api_keys, self.origins = app, doors, api_keys, frozenset(origins)

    def _has_key(self, scope: Scope) -> bool:
        token = presented_key(scope)
        return token is not None and any(
            hmac.compare_digest(token.encode(), key.encode()) for key in self.api_keys
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = (scope.get("client") or ("",))[0]
        if scope["type"] == "http":
            if self.doors.http[host] > self.doors.max_http and not self._has_key(scope):
                await self._too_many(scope, receive, send, "HTTP connections", self.doors.max_http)
                return
            await self.app(scope, receive, send)
            return
        if not self._origin_ok(scope):
            await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})  # 403
            return
        if self.doors.websockets[host] >= self.doors.max_websockets and not self._has_key(scope):
            await self._too_many(scope, receive, send, "WebSocket sessions", self.doors.max_websockets)
            return
        self.doors.websockets[host] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            Doors.release(self.doors.websockets, host)

    def _origin_ok(self, scope: Scope) -> bool:
        headers = _headers(scope)
        origin = headers.get(b"origin")
        if origin is None:
            return True
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        host = headers.get(b"host", b"").decode("latin-1")
        return origin_allowed(origin.decode("latin-1"), host, scheme, self.origins)

    async def _too_many(self, scope: Scope, receive: Receive, send: Send, what: str, cap: int) -> None:
        """429 in the API's error envelope, and the connection closed; a WebSocket handshake gets it as
        its HTTP answer where the server can send one, else 403."""
        response = error_response(
            429,
            f"too many {what} from this address (at most {cap} at once; requests with the API key "
            "are not counted)",
            "REQUEST/TOO_MANY_CONNECTIONS",
            {"limit": cap},
            headers={"Connection": "close"} if scope["type"] == "http" else None,
        )
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": f"too many {what}"})
            return
        await response(scope, receive, send)
