"""Small WebSocket plumbing shared by the seed adapters.

Two tasks write to each client socket (the reader answering client
messages, the pump forwarding results), and seed 000 sends a result as two
messages (metadata, then bytes) that must stay adjacent, so every write
goes through one lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import orjson
from fastapi import WebSocket, WebSocketDisconnect

from common.tasks import first_done as run_until_first

#: what a write to (or a read from) a socket whose client has gone raises:
#: uvicorn's ClientDisconnected is an OSError, Starlette raises RuntimeError after a close
GONE = (OSError, RuntimeError, WebSocketDisconnect)


class Outgoing:
    """Serialised writes to one socket; ``closed`` once a write failed."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.closed = False
        self._lock = asyncio.Lock()

    async def json(self, message: dict[str, Any]) -> bool:
        return await self._send(orjson.dumps(message).decode(), None)

    async def json_then_bytes(self, message: dict[str, Any], data: bytes) -> bool:
        return await self._send(orjson.dumps(message).decode(), data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        async with self._lock:
            if not self.closed:
                self.closed = True
                with contextlib.suppress(*GONE):  # the client may be gone already
                    await self.websocket.close(code, reason)

    async def _send(self, text: str, data: bytes | None) -> bool:
        async with self._lock:
            if self.closed:
                return False
            try:
                await self.websocket.send_text(text)
                if data is not None:
                    await self.websocket.send_bytes(data)
            except GONE:  # disconnected: the reader sees it and ends the session
                self.closed = True
                return False
            return True


async def receive(websocket: WebSocket) -> str | bytes | None:
    """The next client message, or None once the client has gone."""
    try:
        message = await websocket.receive()
    except GONE:
        return None
    if message["type"] == "websocket.disconnect":
        return None
    if message.get("bytes") is not None:
        return message["bytes"]
    return message.get("text") or ""


async def first_done(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutines`` until one returns (or fails); cancel the rest; re-raise a failure."""
    for result in await run_until_first(*coroutines):
        if isinstance(result, Exception):
            raise result
