"""Connecting to a relay as a producer, worker or viewer: the handshake in one call."""

from __future__ import annotations

from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from relay.config import PEER_MAX_SIZE
from wire.errors import ProtocolError
from wire.messages import Role, decode_control, encode_control
from wire.relay_messages import Error, Welcome, decode_relay_message


class RelayRefused(ConnectionError):
    """The relay answered the hello with an error (bad token, limits, bad role...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


async def connect(
    url: str,
    role: Role | str,
    channel: str = "default",
    token: str | None = None,
    *,
    max_size: int | None = PEER_MAX_SIZE,
    max_queue: int = 16,
    **hello: Any,
) -> tuple[ClientConnection, dict[str, Any]]:
    """Open a connection, send ``hello`` and wait for ``welcome``.

    Compression is off (deflate makes JPEG frames ~40x slower). Extra keyword
    arguments go into the hello (``receive``, ``capacity``, ``engine``...).
    ``max_queue`` is how many received messages wait unread before the
    socket stops reading (a slow reader's backpressure). ``max_size``
    defaults to :data:`~relay.config.PEER_MAX_SIZE`, which a relay's limits
    are checked against: nothing it forwards can exceed it. The token goes
    in the hello and in an ``Authorization`` header (so that an address
    crowded with anonymous sockets does not lock out the relay's own clients).
    Returns the socket and the welcome's fields. Raises :class:`RelayRefused`
    when the relay says no (or answers something other than a welcome), and
    ``ProtocolError`` for a hello the relay would refuse, before connecting.
    """
    role = role.value if isinstance(role, Role) else role
    message = {"type": "hello", "role": role, "channel": channel, **hello}
    if token:
        message["token"] = token
    decode_control(message)  # fail here, not at the relay, on a bad hello
    headers = {"Authorization": f"Bearer {token}"} if token else None
    ws = await websockets.connect(
        url, compression=None, max_size=max_size, max_queue=max_queue, additional_headers=headers
    )
    await ws.send(encode_control(message))  # the fields given, not every default
    try:
        reply = decode_relay_message(await ws.recv())
    except ProtocolError as exc:
        reply = Error.of(exc)
    if not isinstance(reply, Welcome):
        await ws.close()
        if isinstance(reply, Error):
            raise RelayRefused(reply.code, reply.message)
        raise RelayRefused("bad_message", f"expected a welcome, got {reply.type!r}")
    return ws, reply.model_dump(mode="json")
