"""Opening connections to the relay with errors a person can act on."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidHandshake, InvalidURI

from relay.client import RelayRefused, connect
from wire.errors import ProtocolError
from wire.messages import DEFAULT_CHANNEL, Receive, Role

DEFAULT_RELAY = "ws://127.0.0.1:8765"
MAX_MESSAGE = 64 * 1024 * 1024
OPEN_TIMEOUT = 10.0


class ConnectError(ConnectionError):
    """The relay cannot be reached or refused us; the message says what to check."""


async def open_relay(url: str, role: Role | str, channel: str, token: str | None,
                     **hello: Any) -> tuple[ClientConnection, dict[str, Any]]:
    """``relay.client.connect`` with failures turned into :class:`ConnectError`."""
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
        # lands just as the connection is refused, and the caller would not stop
        async with asyncio.timeout(OPEN_TIMEOUT):
            return await connect(url, role, channel, token, **hello)
    except RelayRefused as exc:
        raise ConnectError(f"the relay at {url} refused the {role}: {exc}") from None
    except ProtocolError as exc:
        raise ConnectError(f"bad connection settings: {exc}") from None
    except (TimeoutError, OSError, InvalidHandshake, InvalidURI) as exc:
        raise ConnectError(_unreachable(url, exc)) from None


async def open_legacy(url: str, channel: str, token: str | None,
                      receive: Receive | str = Receive.OUTPUT) -> ClientConnection:
    """A bare connection for the seed-002 protocol: no hello, the channel in the URL path."""
    parts = urlsplit(url)
    path = parts.path
    if path in ("", "/") and channel != DEFAULT_CHANNEL:
        path = "/" + channel
    query = {k: v for k, v in (("token", token),
                               ("receive", None if receive == Receive.OUTPUT else str(receive))) if v}
    target = urlunsplit((parts.scheme, parts.netloc, path or "/", urlencode(query), ""))
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):  # not wait_for: see open_relay
            return await websockets.connect(target, compression=None, max_size=MAX_MESSAGE)
    except (TimeoutError, OSError, InvalidHandshake, InvalidURI) as exc:
        raise ConnectError(_unreachable(url, exc)) from None


def _unreachable(url: str, exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    hint = ""
    if isinstance(exc, (ConnectionRefusedError, asyncio.TimeoutError)):
        hint = " (is the relay running? start one with: python -m relay)"
    return f"cannot connect to {url}: {reason}{hint}"
