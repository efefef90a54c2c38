"""Bearer API keys for ``/v1/*``."""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.requests import HTTPConnection

from api.server.errors import ApiError
from api.server.services import services


def bearer_token(connection: HTTPConnection) -> str | None:
    """The ``Authorization: Bearer`` token of a request or WebSocket handshake, if any."""
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def is_api_key(connection: HTTPConnection, token: str) -> bool:
    keys: list[str] = services(connection).config.server.api_keys
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in keys)


def require_api_key(request: Request) -> str:
    """FastAPI dependency: the request's valid key, or a 401 in Daydream's error envelope."""
    token = bearer_token(request)
    if not token:
        raise ApiError(
            401,
            "missing 'Authorization: Bearer <api key>' header",
            "AUTH/UNAUTHORIZED",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not is_api_key(request, token):
        raise ApiError(401, "invalid API key", "AUTH/UNAUTHORIZED", headers={"WWW-Authenticate": "Bearer"})
    return token
