"""Connecting to a relay as a producer, worker or viewer: the handshake in one call."""

from __future__ import annotations

from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from wire.messages import Role, decode_control, encode_control


class RelayRefused(ConnectionError):
    """The relay answered the hello with an error (bad token, limits, bad role...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


async def connect(url: str, role: Role | str, channel: str = "default", token: str | None = None,
                  *, max_size: int | None = 64 * 1024 * 1024, max_queue: int = 16,
                  **hello: Any,
                  ) -> tuple[ClientConnection, dict[str, Any]]:
    """Open a connection, send ``hello`` and wait for ``welcome``.

    Compression is off (deflate makes JPEG frames ~40x slower). Extra keyword
    arguments go into the hello (``receive``, ``capacity``, ``engine``...).
    ``max_queue`` is how many received messages wait unread before the
    socket stops reading (a slow reader's backpressure).
    Raises :class:`RelayRefused` when the relay says no.
    """
    ws = await websockets.connect(url, compression=None, max_size=max_size, max_queue=max_queue)
    role = role.value if isinstance(role, Role) else role
    message = {"type": "hello", "role": role, "channel": channel, **hello}
    if token:
        message["token"] = token
    decode_control(encode_control(message))  # fail here, not at the relay, on a bad hello
    await ws.send(encode_control(message))
    reply = orjson.loads(await ws.recv())
    if reply.get("type") != "welcome":
        await ws.close()
        raise RelayRefused(reply.get("code", "bad_message"), reply.get("message", str(reply)))
    return ws, reply
