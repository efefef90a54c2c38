"""The seed endpoints are open on loopback, as the seeds expect, and keyed or off where configured."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import websockets

from api.server.app import create_app
from api.server.http import running
from tests.helpers import server_config

KEY = "seed-key"


@asynccontextmanager
async def server(**settings: Any) -> AsyncIterator[str]:
    app = create_app(server_config(KEY, server=settings))
    async with running(app) as url:
        yield url


async def _ws_status(url: str) -> str:
    """The first message's type on seed 000's socket, or why the handshake was refused."""
    try:
        async with websockets.connect(url) as ws:
            return orjson.loads(await ws.recv())["type"]
    except websockets.InvalidStatus as exc:
        return f"refused {exc.response.status_code}"


@pytest.mark.parametrize(
    ("settings", "open_"), [({}, True), ({"seed_endpoints": "open"}, True), ({"host": "0.0.0.0"}, False)]
)
async def test_auto_is_open_on_loopback_only(settings, open_):
    async with server(**settings) as url, httpx.AsyncClient(base_url=url) as client:
        settings_answer = await client.get("/api/settings")
        ws = await _ws_status(url.replace("http://", "ws://") + "/ws")
    if open_:
        assert settings_answer.status_code == 200 and ws == "status"
    else:
        assert settings_answer.status_code == 404 and "off" in settings_answer.json()["error"]
        assert ws == "refused 403"


async def test_keyed_needs_the_api_key():
    async with server(seed_endpoints="keyed") as url, httpx.AsyncClient(base_url=url) as client:
        refused = await client.get("/api/queue")
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        assert (await client.get("/api/queue", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
        assert (await client.get("/api/stream/u7", params={"api_key": "wrong"})).status_code == 401
        base = url.replace("http://", "ws://")
        assert await _ws_status(base + "/ws") == "refused 403"
        assert await _ws_status(base + f"/ws?api_key={KEY}") == "status"
        assert await _ws_status(base + "/api/ws/alice") == "refused 403"
