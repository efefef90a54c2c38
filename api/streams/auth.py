"""Bearer API keys for ``/v1/*``."""

from __future__ import annotations

import hmac

from fastapi import Request

from api.server.errors import ApiError
from api.server.services import services


def require_api_key(request: Request) -> str:
    """FastAPI dependency: the request's valid key, or a 401 in Daydream's error envelope."""
    keys: frozenset[str] = services(request).settings.api_keys
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing 'Authorization: Bearer <api key>' header", "AUTH/UNAUTHORIZED",
                       headers={"WWW-Authenticate": "Bearer"})
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise ApiError(401, "invalid API key", "AUTH/UNAUTHORIZED",
                       headers={"WWW-Authenticate": "Bearer"})
    return token
