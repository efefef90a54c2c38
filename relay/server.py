"""The relay's WebSocket server: handshakes, one receive loop and one sender task per peer.

Handshake, in order of preference:

1. a ``hello`` JSON message (answered by ``welcome``);
2. the connection URL: ``ws://host:port/<channel>?role=viewer&token=...``
   registers at once, for clients that cannot send a hello;
3. a seed-002 ``image`` message as the first message: a producer on the
   URL's channel (``default`` for ``/``) that gets acks and base64 results.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any, Self, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import websockets
from websockets.asyncio.server import Server, ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from common.listen import listen
from relay.config import RelayConfig
from relay.hub import Delivery, Hub, Peer
from relay.outbox import Outbox
from wire.errors import ErrorCode, ProtocolError
from wire.frames import decode_frame
from wire.messages import DEFAULT_CHANNEL, Hello, LegacyImage, Message, decode_control, encode_control
from wire.relay_messages import Error, Shutdown, Welcome

log = logging.getLogger("relay")

CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001


class Relay:
    """A running relay. ``async with Relay(config) as relay:`` serves until the block ends."""

    def __init__(self, config: RelayConfig | None = None, sock: socket.socket | None = None) -> None:
        """``sock``: a socket already listening (see :func:`common.listen.listen`); else one is bound."""
        self.config = config or RelayConfig()
        self._sock = sock
        self.hub = Hub(self.config)
        self._server: Server | None = None
        self._connections: set[ServerConnection] = set()

    async def start(self) -> None:
        self.config.check()
        sock = self._sock or listen(self.config.host, self.config.port)
        self._server = await websockets.serve(
            self._handle, sock=sock,
            compression=None,  # deflate makes JPEG round trips ~40x slower
            max_size=self.config.websocket_max_size,
        )

    @property
    def port(self) -> int:
        assert self._server is not None, "relay not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}"

    async def close(self) -> None:
        """Tell every peer, then close their sockets and the listener."""
        if self._server is None:
            return
        self._server.close(close_connections=False)
        shutdown = encode_control(Shutdown(message="relay shutting down"))
        for ws in list(self._connections):
            with contextlib.suppress(ConnectionClosed):
                await ws.send(shutdown)
            await ws.close(CLOSE_GOING_AWAY, "relay shutting down")
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    # -- one connection -----------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        self._connections.add(ws)
        peer: Peer | None = None
        sender: asyncio.Task[None] | None = None
        channel, query = _parse_path(ws.request.path if ws.request else "/")
        try:
            if "role" in query:
                peer = await self._register(ws, lambda: _hello_from_query(channel, query), welcome=False)
                if peer is None:
                    return
                sender = asyncio.create_task(self._send_loop(ws, peer))
                peer.outbox.fast_send = _direct_sender(ws, peer)
            async for message in ws:
                if peer is None:
                    peer, replay = await self._first_message(ws, message, channel, query)
                    if peer is None:
                        return
                    sender = asyncio.create_task(self._send_loop(ws, peer))
                    peer.outbox.fast_send = _direct_sender(ws, peer)
                    if not replay:
                        continue
                try:
                    self._dispatch(peer, message)
                except ProtocolError as exc:
                    peer.send(Error.of(exc))
                if isinstance(message, bytes):
                    # Let the receivers' sender tasks run before the next frame. Frames
                    # already read from the socket would otherwise be routed in one go,
                    # each receiver's slot keeping only the last: a producer faster than
                    # the relay starves every sender (bench/relay.py: 5-15% of frames read
                    # were delivered, the CPU going to frames dropped unsent).
                    await asyncio.sleep(0)
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(ws)
            if peer is not None:
                self.hub.leave(peer)
                peer.outbox.close()
            if sender is not None:
                await sender

    async def _first_message(self, ws: ServerConnection, message: str | bytes, channel: str,
                             query: dict[str, str]) -> tuple[Peer | None, bool]:
        """Register the peer the first message describes.

        Returns the peer (None when refused) and whether the message itself
        must still be dispatched (a seed-002 image is both handshake and frame).
        """
        def hello() -> Hello:
            if isinstance(message, bytes):
                raise ProtocolError("send a hello message before frames")
            control = decode_control(message)
            if isinstance(control, Hello):
                return control
            if isinstance(control, LegacyImage):
                return _hello_from_query(channel, {**query, "role": "producer", "encoding": "json"})
            raise ProtocolError(f"send a hello message before {control.type!r}")

        peer = await self._register(ws, hello, welcome=True)
        return peer, peer is not None and peer.legacy and isinstance(message, str)

    async def _register(self, ws: ServerConnection, hello: Callable[[], Hello],
                        welcome: bool) -> Peer | None:
        """Check the hello, the token and the limits; join the hub. Refusals close the socket."""
        try:
            greeting = hello()
            if not self._token_ok(greeting.token):
                raise ProtocolError("missing or wrong token", ErrorCode.UNAUTHORIZED)
            peer = Peer.from_hello(secrets.token_hex(4), greeting, Outbox(self.config.control_queue))
            self.hub.check_join(peer)
        except ProtocolError as exc:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode_control(Error.of(exc)))
                await ws.close(CLOSE_POLICY, str(exc)[:120])
            return None
        if welcome and not peer.legacy:
            peer.send(Welcome(role=peer.role, channel=peer.channel, session=peer.id,
                              limits=self.config.limits()))
        self.hub.join(peer)
        return peer

    def _token_ok(self, token: str | None) -> bool:
        if not self.config.tokens:
            return True
        if not token:
            return False
        return any(hmac.compare_digest(token.encode(), t.encode()) for t in self.config.tokens)

    def _dispatch(self, peer: Peer, message: str | bytes) -> None:
        """Frames go to the hub as bytes plus their parsed header; text is decoded into a model."""
        if isinstance(message, bytes):
            if len(message) > self.config.max_frame_bytes + 4096:
                raise ProtocolError(f"message of {len(message)} bytes exceeds the frame limit of "
                                    f"{self.config.max_frame_bytes}", ErrorCode.FRAME_TOO_LARGE)
            self.hub.route(peer, decode_frame(message), message)
            return
        self.hub.on_message(peer, decode_control(message))

    async def _send_loop(self, ws: ServerConnection, peer: Peer) -> None:
        async def send_control(message: Message) -> None:
            await ws.send(encode_control(message))

        async def send_frame(delivery: Delivery) -> None:
            await ws.send(delivery.as_json() if peer.legacy else delivery.raw)

        with contextlib.suppress(ConnectionClosed):
            await peer.outbox.drain(send_control, send_frame)  # type: ignore[arg-type]


async def serve(config: RelayConfig) -> None:
    """Run a relay until cancelled."""
    async with Relay(config) as relay:
        log.info("relay listening on %s", relay.url)
        await relay.serve_forever()


def _parse_path(path: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(path)
    channel = unquote(parts.path.strip("/")) or DEFAULT_CHANNEL
    return channel, dict(parse_qsl(parts.query))


def _hello_from_query(channel: str, query: dict[str, str]) -> Hello:
    fields: dict[str, Any] = {"type": "hello", "channel": query.get("channel", channel)}
    for key in ("role", "token", "receive", "encoding", "name", "engine"):
        if key in query:
            fields[key] = query[key]
    if "capacity" in query:
        fields["capacity"] = query["capacity"]
    return cast(Hello, decode_control(fields))  # same validation (and errors) as a hello message


def _direct_sender(ws: ServerConnection, peer: Peer) -> Callable[[Delivery], bool]:
    """Write a frame at once when the peer's socket is idle, skipping its sender task.

    The task costs an Event wake-up, a task switch and an async context manager per
    frame (~20 us, a quarter of the relay's CPU at full load). This does what
    ``ws.send`` does inside its ``send_context``, only when that cannot wait: the
    connection open, not paused by flow control, nothing buffered. It relies on
    websockets' connection internals (``protocol``, ``paused``, ``send_data``),
    checked against websockets 17.x; anything unexpected falls back to the task.
    """
    protocol, transport = ws.protocol, ws.transport
    legacy = peer.legacy

    def send(delivery: Delivery) -> bool:
        if ws.paused or protocol.state is not State.OPEN or transport.get_write_buffer_size():
            return False
        try:
            if legacy:
                protocol.send_text(delivery.as_json().encode())
            else:
                protocol.send_binary(delivery.raw)
            ws.send_data()
        except Exception:  # noqa: BLE001 - the sender task meets the error on its next send
            return False
        return True

    return send
