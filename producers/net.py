"""Opening connections to the relay with errors a person can act on, and trying again.

:func:`retrying` keeps calling an opener while the relay cannot be reached
(connection refused, timeouts, a proxy answering 502 while the relay
restarts), waiting 0.25, 0.5, 1, 2, 2... seconds between tries (never more
than :data:`common.backoff.RETRY_MAX`) for at most a window of seconds; a refusal (wrong
token, bad settings) is final at once. The producer and the viewer use it at
start and after a lost connection (``--reconnect SECONDS``). :class:`Relays`
spreads those tries over the nodes of a cluster (``--relay URL,URL``), so a
client whose node dies continues on another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidHandshake, InvalidURI

from common.backoff import retry_delays
from relay.client import RelayRefused, connect
from wire.errors import ProtocolError
from wire.messages import DEFAULT_CHANNEL, Receive, Role

log = logging.getLogger("producers")

T = TypeVar("T")

DEFAULT_RELAY = "ws://127.0.0.1:8765"
MAX_MESSAGE = 64 * 1024 * 1024
OPEN_TIMEOUT = 10.0
#: seconds to keep trying to reach the relay (at start, and after losing it) unless told otherwise
DEFAULT_RECONNECT = 30.0


class ConnectError(ConnectionError):
    """The relay cannot be reached or refused us; the message says what to check.

    ``retryable``: the relay may answer a later try (it is down or restarting);
    False for a refusal or bad settings, which trying again will not fix.
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


async def open_relay(
    url: str, role: Role | str, channel: str, token: str | None, timeout: float = OPEN_TIMEOUT, **hello: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    """``relay.client.connect`` with failures turned into :class:`ConnectError`."""
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
        # lands just as the connection is refused, and the caller would not stop
        async with asyncio.timeout(timeout):
            return await connect(url, role, channel, token, **hello)
    except RelayRefused as exc:
        raise ConnectError(f"the relay at {url} refused the {role}: {exc}") from None
    except ProtocolError as exc:
        raise ConnectError(f"bad connection settings: {exc}") from None
    except InvalidURI as exc:
        raise ConnectError(_unreachable(url, exc)) from None
    except (TimeoutError, OSError, InvalidHandshake) as exc:
        raise ConnectError(_unreachable(url, exc), retryable=True) from None


async def open_legacy(
    url: str,
    channel: str,
    token: str | None,
    receive: Receive | str = Receive.OUTPUT,
    timeout: float = OPEN_TIMEOUT,
) -> ClientConnection:
    """A bare connection for the seed-002 protocol: no hello, the channel in the URL path."""
    parts = urlsplit(url)
    path = parts.path
    if path in ("", "/") and channel != DEFAULT_CHANNEL:
        path = "/" + channel
    # always said: a seed-002 producer gets no results unless it asks (it reads one reply per image)
    query = {k: v for k, v in (("token", token), ("receive", str(receive))) if v}
    target = urlunsplit((parts.scheme, parts.netloc, path or "/", urlencode(query), ""))
    try:
        async with asyncio.timeout(timeout):  # not wait_for: see open_relay
            return await websockets.connect(target, compression=None, max_size=MAX_MESSAGE)
    except InvalidURI as exc:
        raise ConnectError(_unreachable(url, exc)) from None
    except (TimeoutError, OSError, InvalidHandshake) as exc:
        raise ConnectError(_unreachable(url, exc), retryable=True) from None


class Relays:
    """The relay URLs a client may use (comma-separated: nodes of one cluster), and the one in use.

    Each try goes through them in turn from the one in use; after a lost
    connection the next one comes first (its node may be the one that died).
    """

    def __init__(self, spec: str) -> None:
        self.urls = [url.strip() for url in spec.split(",") if url.strip()] or [spec]
        self._current = 0

    @property
    def current(self) -> str:
        return self.urls[self._current]

    def lost(self) -> None:
        """The connection to :attr:`current` ended: start the next tries with the next URL."""
        self._current = (self._current + 1) % len(self.urls)

    async def open(self, open_url: Callable[[str, float], Awaitable[T]], timeout: float) -> T:
        """``open_url(url, timeout)`` on each URL in turn until one opens; raises the last retryable
        error when none does, and a final one at once.
        """
        error: ConnectError | None = None
        for step in range(len(self.urls)):
            index = (self._current + step) % len(self.urls)
            try:
                opened = await open_url(self.urls[index], timeout)
            except ConnectError as exc:
                if not exc.retryable:
                    raise
                error = exc
                continue
            self._current = index
            return opened
        assert error is not None
        raise error


async def retrying(
    open_once: Callable[[float], Awaitable[T]], window: float, stop: asyncio.Event | None = None
) -> T | None:
    """``open_once(timeout)`` until it succeeds; None when ``stop`` is set first.

    A retryable :class:`ConnectError` is tried again after the next of
    :func:`retry_delays` for up to ``window`` seconds (0: one try); then the
    last error is raised, saying how long it tried. Other errors propagate at once.
    """
    deadline = time.monotonic() + window
    delays = retry_delays()
    tries = 0
    while True:
        tries += 1
        timeout = max(1.0, min(OPEN_TIMEOUT, deadline - time.monotonic()))
        try:
            opened = await _unless_stopped(open_once(timeout), stop)
        except ConnectError as exc:
            if not exc.retryable:
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if tries == 1:
                    raise
                raise ConnectError(
                    f"{exc}; gave up after {tries} tries in {window:g} s", retryable=True
                ) from None
            delay = min(next(delays), remaining)
            log.info("%s; trying again in %.2g s", exc, delay)
            if await _unless_stopped(asyncio.sleep(delay, True), stop) is None:
                return None
            continue
        return opened  # None: stopped


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event | None) -> T | None:
    """``await work``, or None as soon as ``stop`` is set (``work`` is then cancelled, and a
    connection it opened meanwhile is closed)."""
    if stop is None:
        return await work
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    if stop.is_set():  # stopped: what the work did no longer matters
        if task.exception() is None:
            opened = task.result()
            ws = opened[0] if isinstance(opened, tuple) else opened
            if isinstance(ws, ClientConnection):
                await ws.close()
        return None
    return task.result()  # raises what the work raised


def _unreachable(url: str, exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    hint = ""
    if isinstance(exc, (ConnectionRefusedError, asyncio.TimeoutError)):
        hint = " (is the relay running? start one with: python -m relay)"
    return f"cannot connect to {url}: {reason}{hint}"
