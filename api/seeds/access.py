"""Who may use the seed endpoints (``/ws``, ``/api/ws/{id}``, ``/api/settings``, ``/api/queue``,
``/api/stream/{id}``): ``server.seed_endpoints``.

The seeds describe them without keys, and their clients send none, so they
are ``open`` where only this machine can reach them: ``auto`` (the default)
means open when the server listens on loopback, off otherwise. ``keyed``
asks for the API key (``Authorization: Bearer`` or ``?api_key=``, since a
browser's WebSocket cannot set headers); ``off`` answers 404 (a WebSocket
handshake is refused with 403).
"""

from __future__ import annotations

from typing import Literal

from fastapi import Request, WebSocket
from starlette.requests import HTTPConnection

from api.server.errors import ApiError, not_found
from api.server.services import services
from api.streams.auth import bearer_token, is_api_key
from relay.config import is_loopback

SeedEndpoints = Literal["auto", "off", "open", "keyed"]


def effective_mode(configured: str, host: str) -> Literal["off", "open", "keyed"]:
    if configured == "auto":
        return "open" if is_loopback(host) else "off"
    return configured  # type: ignore[return-value]


def _allowed(connection: HTTPConnection) -> tuple[bool, str]:
    """Whether ``connection`` may use a seed endpoint, and what to tell it if not."""
    server = services(connection).config.server
    mode = effective_mode(server.seed_endpoints, server.host)
    if mode == "open":
        return True, ""
    if mode == "off":
        return False, "the seed endpoints are off on this server (server.seed_endpoints)"
    token = bearer_token(connection) or connection.query_params.get("api_key")
    if token and is_api_key(connection, token):
        return True, ""
    return False, "the seed endpoints need the API key: Authorization: Bearer <key> or ?api_key=<key>"


def require_seed_access(request: Request) -> None:
    """FastAPI dependency of the seed HTTP endpoints: 404 when off, 401 without the key when keyed."""
    allowed, why = _allowed(request)
    if not allowed:
        if "off" in why:
            error = not_found("endpoint")
            error.message = why
            raise error
        raise ApiError(401, why, "AUTH/UNAUTHORIZED", headers={"WWW-Authenticate": "Bearer"})


async def admit(websocket: WebSocket) -> bool:
    """For the seed WebSockets, before ``accept()``: refuses the handshake (403) when not allowed."""
    allowed, why = _allowed(websocket)
    if not allowed:
        await websocket.close(code=1008, reason=why[:120])
    return allowed
