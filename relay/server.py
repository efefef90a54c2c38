"""The relay's WebSocket server: handshakes, one receive loop and one sender task per peer.

Handshake, in order of preference:

1. a ``hello`` JSON message (answered by ``welcome``);
2. the connection URL: ``ws://host:port/<channel>?role=viewer&token=...``
   registers at once, for clients that cannot send a hello;
3. seed 002, what the example's scripts do: a ``register`` message
   (answered ``registered``) or an ``image`` as the first message. A
   producer goes to the URL's channel; on the default URL (``/``) to
   ``default``, or to a channel of its own when another producer is there
   already. It gets one reply per message it sends (``ack`` per image,
   ``error`` for a refused one, ``pong``, ``prompt_updated``), and base64
   results only when its URL asks (``?receive=output``). A consumer gets the
   channel's input images as base64 ``image`` messages (``receive`` in the
   URL changes that);
4. nothing within ``hello_timeout``: a seed-002 consumer (the seed's own
   consumer just listens) if open channels are allowed, else the connection
   is closed (``hello_timeout``).

Seed-002 peers never get unasked ``status`` or ``report`` messages: the
scripts read exactly one reply per message they send.

Doors, all decided before a peer joins (never per frame): browser
``Origin`` headers outside ``origins`` are refused (403) by websockets'
handshake; an address holding ``max_connections_per_ip`` connections gets
a 503 (connections that showed the relay token, in the hello, an
``Authorization: Bearer`` header or the URL, are not counted); tokens and
channel keys are the hub's :meth:`~relay.hub.Hub.check_access`; control
messages (text, frames never) go through a token bucket per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import websockets
from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Origin

from common.listen import listen
from relay.config import RelayConfig
from relay.hub import Delivery, Hub, Peer, registered
from relay.limits import OncePerInterval, TokenBucket, limit_accept_error_logs
from relay.outbox import Control, Outbox
from wire.errors import ErrorCode, ProtocolError
from wire.frames import decode_frame
from wire.messages import (
    DEFAULT_CHANNEL,
    ClientMessage,
    ClientType,
    Hello,
    LegacyImage,
    Register,
    Role,
    decode_control,
    encode_control,
)
from wire.relay_messages import Error, Shutdown, Welcome

if TYPE_CHECKING:
    from relay.cluster.backplane import NatsBackplane

log = logging.getLogger("relay")
_crowded = OncePerInterval("connections from", 10.0)  # one line per 10 s while an address is refused
log.addFilter(_crowded)

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
        #: connections counted against their address's cap, and the counts
        self._counted: dict[ServerConnection, str] = {}
        self.connections_per_ip: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        #: the link to the other relay nodes (``config.nats``); None: a relay on its own
        self.backplane: NatsBackplane | None = None

    async def start(self) -> None:
        self.config.check()
        limit_accept_error_logs()
        if self.config.nats:  # imported only here: nats-py is an optional dependency
            from relay.cluster.backplane import NatsBackplane

            self.backplane = await NatsBackplane.connect(self.hub, self.config)
        sock = self._sock or listen(self.config.host, self.config.port)
        self._server = await websockets.serve(
            self._handle,
            sock=sock,
            compression=None,  # deflate makes JPEG round trips ~40x slower
            max_size=self.config.websocket_max_size,
            # browsers always send an Origin, scripts and workers none: a web page may
            # connect only from an allowed origin (403 otherwise)
            origins=[None, *(Origin(origin) for origin in sorted(self.config.origins))],
            process_request=self._admit,
        )
        if self.config.idle_release_s > 0:
            self._sweeper = asyncio.create_task(self._release_idle_channels())

    @property
    def port(self) -> int:
        assert self._server is not None, "relay not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}"

    async def close(self) -> None:
        """Tell every peer, then close their sockets and the listener."""
        if self._server is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.backplane is not None:  # first: the other nodes reassign what we served for them
            await self.backplane.close()
            self.backplane = None
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

    async def _release_idle_channels(self) -> None:
        """Ask the hub, a few times per ``idle_release_s``, to free the slots of idle channels."""
        period = min(5.0, max(0.05, self.config.idle_release_s / 4))
        while True:
            await asyncio.sleep(period)  # a timer: the hub decides from the channels' clocks
            self.hub.release_idle()

    # -- one connection -----------------------------------------------------

    def _admit(self, ws: ServerConnection, request: Request) -> Response | None:
        """Before the handshake: count the connection against its address's cap, or refuse it (503).

        A request showing a relay token (``Authorization: Bearer``, or
        ``token`` in the URL) is not counted: an address full of anonymous
        sockets cannot lock out the relay's own workers and outputs.
        """
        if self._request_token_ok(request):
            return None
        ip = _client_ip(ws)
        held = self.connections_per_ip.get(ip, 0)
        if held >= self.config.max_connections_per_ip:
            log.warning("refusing connections from %s: it holds %d (max_connections_per_ip)", ip, held)
            return ws.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"too many connections from {ip} (at most {self.config.max_connections_per_ip})\n",
            )
        self.connections_per_ip[ip] = held + 1
        self._counted[ws] = ip
        ws.connection_lost_waiter.add_done_callback(lambda _: self._uncount(ws))  # however it ends
        return None

    def _uncount(self, ws: ServerConnection) -> None:
        ip = self._counted.pop(ws, None)
        if ip is not None:
            left = self.connections_per_ip[ip] - 1
            if left:
                self.connections_per_ip[ip] = left
            else:
                del self.connections_per_ip[ip]

    def _request_token_ok(self, request: Request) -> bool:
        if not self.config.tokens:
            return False
        try:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        except MultipleValuesError:
            return False
        if scheme.lower() == "bearer" and self.hub.is_relay_token(token.strip()):
            return True
        return self.hub.is_relay_token(_parse_path(request.path)[1].get("token"))

    async def _handle(self, ws: ServerConnection) -> None:
        self._connections.add(ws)
        peer: Peer | None = None
        sender: asyncio.Task[None] | None = None
        channel, query, default_url = _parse_path(ws.request.path if ws.request else "/")
        try:
            pending: ClientMessage | None = None  # the first message, when it was also a frame
            if "role" in query:
                peer = await self._register(ws, lambda: _hello_from_query(channel, query), welcome=False)
            else:
                try:
                    async with asyncio.timeout(self.config.hello_timeout):
                        first = await ws.recv()  # cancel-safe: a late message is not lost
                except TimeoutError:
                    peer = await self._silent(ws, channel, query)
                else:
                    peer, pending = await self._first_message(ws, first, channel, query, default_url)
            if peer is None:
                return
            sender = asyncio.create_task(self._send_loop(ws, peer))
            peer.outbox.fast_send = _direct_sender(ws, peer)
            scale = peer.capacity if peer.role is Role.WORKER else 1  # a worker reports per channel
            bucket = TokenBucket(self.config.control_rate * scale, self.config.control_burst * scale)
            warned = False
            if pending is not None:
                self._on_control(peer, pending)  # a seed-002 image: handshake and frame at once
            async for message in ws:
                if isinstance(message, bytes):
                    try:
                        self._on_frame(peer, message)
                    except ProtocolError as exc:
                        peer.send(Error.of(exc))
                    if self.hub.backlog:
                        # Let the receivers' sender tasks run before the next frame. Frames
                        # already read from the socket would otherwise be routed in one go,
                        # each receiver's slot keeping only the last: a producer faster than
                        # the relay starves every sender (bench/relay.py: 5-15% of frames read
                        # were delivered, the CPU going to frames dropped unsent). Not when
                        # every receiver took its frame at once: a loop turn costs ~5 us.
                        self.hub.backlog = False
                        await asyncio.sleep(0)
                    continue
                control: ClientMessage | ProtocolError
                try:
                    control = decode_control(message)
                except ProtocolError as exc:
                    control = exc
                if isinstance(control, LegacyImage):  # a seed-002 frame, not a control message
                    self._on_control(peer, control)
                elif bucket.take():
                    warned = False
                    self._on_control(peer, control)
                elif not warned:  # one error per flood; the rest is dropped unanswered
                    warned = True
                    peer.send(
                        Error(
                            code=ErrorCode.RATE_LIMITED,
                            message=(
                                f"more than {self.config.control_rate * scale:g} control messages a second: "
                                "dropping them"
                            ),
                        )
                    )
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(ws)
            if peer is not None:
                self.hub.leave(peer)
                peer.outbox.close()
            if sender is not None:
                await sender

    async def _silent(self, ws: ServerConnection, channel: str, query: dict[str, str]) -> Peer | None:
        """No hello in time: a seed-002 consumer (it only listens) where open channels are allowed."""
        if not self.config.accepts_open_channels:
            error = ProtocolError(f"no hello within {self.config.hello_timeout:g} s", ErrorCode.HELLO_TIMEOUT)
            await _refuse(ws, error)
            return None
        hello = _seed_hello(channel, query, ClientType.CONSUMER)
        return await self._register(ws, lambda: hello, welcome=False, quiet=True)

    async def _first_message(
        self,
        ws: ServerConnection,
        message: str | bytes,
        channel: str,
        query: dict[str, str],
        default_url: bool,
    ) -> tuple[Peer | None, ClientMessage | None]:
        """Register the peer the first message describes.

        Returns the peer (None when refused) and the message itself when it
        must still be dispatched (a seed-002 image is both handshake and frame).
        """
        try:
            if isinstance(message, bytes):
                raise ProtocolError("send a hello message before frames")
            first = decode_control(message)
        except ProtocolError as exc:
            await _refuse(ws, exc)
            return None, None
        if isinstance(first, Hello):
            return await self._register(ws, lambda: first, welcome=True), None
        if not isinstance(first, Register | LegacyImage):
            await _refuse(ws, ProtocolError(f"send a hello message before {first.type!r}"))
            return None, None
        kind = first.client_type if isinstance(first, Register) else ClientType.PRODUCER

        def hello() -> Hello:
            seed_default = kind is ClientType.PRODUCER and default_url
            return _seed_hello(self.hub.seed_channel(channel) if seed_default else channel, query, kind)

        peer = await self._register(ws, hello, welcome=False, quiet=True)
        if peer is None or isinstance(first, LegacyImage):
            return peer, first
        peer.send(registered(peer))
        return peer, None

    async def _register(
        self,
        ws: ServerConnection,
        hello: Callable[[], Hello],
        welcome: bool,
        quiet: bool = False,
    ) -> Peer | None:
        """Check the hello, the credential and the limits; join the hub. Refusals close the socket."""
        try:
            greeting = hello()
            trusted = self.hub.is_relay_token(greeting.token)
            peer = Peer.from_hello(
                secrets.token_hex(4),
                greeting,
                Outbox(self.config.control_queue),
                anonymous=bool(self.config.tokens) and not trusted,
                quiet=quiet,
            )
            self.hub.check_join(peer)
        except ProtocolError as exc:
            await _refuse(ws, exc)
            return None
        if welcome and not peer.legacy:
            peer.send(
                Welcome(role=peer.role, channel=peer.channel, session=peer.id, limits=self.config.limits())
            )
        self.hub.join(peer)
        if trusted:
            self._uncount(ws)  # the relay's own clients never crowd an address out
        return peer

    def _on_frame(self, peer: Peer, message: bytes) -> None:
        """A binary frame: to the hub as bytes plus its parsed header."""
        if len(message) > self.config.max_frame_bytes + 4096:
            raise ProtocolError(
                f"message of {len(message)} bytes exceeds the frame limit of {self.config.max_frame_bytes}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        self.hub.route(peer, decode_frame(message), message)

    def _on_control(self, peer: Peer, control: Any) -> None:
        """A decoded control message (or the ProtocolError decoding it raised) from a joined peer."""
        try:
            if isinstance(control, ProtocolError):
                raise control
            self.hub.on_message(peer, control)
        except ProtocolError as exc:
            peer.send(Error.of(exc))

    async def _send_loop(self, ws: ServerConnection, peer: Peer) -> None:
        async def send_control(message: Control) -> None:
            await ws.send(message if isinstance(message, str) else encode_control(message))

        async def send_frame(delivery: Delivery) -> None:
            await ws.send(delivery.as_json() if peer.legacy else delivery.raw)

        with contextlib.suppress(ConnectionClosed):
            await peer.outbox.drain(send_control, send_frame)
            # closed: the connection ended, or the hub sent the peer away (its error went first)
            await ws.close(CLOSE_POLICY, "sent away by the relay")


async def serve(config: RelayConfig) -> None:
    """Run a relay until cancelled."""
    async with Relay(config) as relay:
        log.info("relay listening on %s", relay.url)
        await relay.serve_forever()


async def _refuse(ws: ServerConnection, exc: ProtocolError) -> None:
    """A handshake refusal: the error, then a close with 1008."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(encode_control(Error.of(exc)))
        await ws.close(CLOSE_POLICY, str(exc)[:120])


def _client_ip(ws: ServerConnection) -> str:
    address = ws.remote_address
    return str(address[0]) if isinstance(address, tuple) and address else "?"


def _parse_path(path: str) -> tuple[str, dict[str, str], bool]:
    """The URL's channel, its query, and whether it is the default URL (no channel named)."""
    parts = urlsplit(path)
    query = dict(parse_qsl(parts.query))
    named = unquote(parts.path.strip("/"))
    return named or DEFAULT_CHANNEL, query, not named and "channel" not in query


def _seed_hello(channel: str, query: dict[str, str], kind: ClientType) -> Hello:
    """A seed-002 client's hello: base64 JSON, a producer that gets no results unless its URL asks
    (it reads one reply per image), a consumer that gets the producers' images.
    """
    if kind is ClientType.PRODUCER:
        fields = {"receive": "none", **query, "role": "producer", "encoding": "json"}
    else:
        fields = {"receive": "input", **query, "role": "viewer", "encoding": "json"}
    return _hello_from_query(channel, fields)


def _hello_from_query(channel: str, query: dict[str, str]) -> Hello:
    fields: dict[str, Any] = {"type": "hello", "channel": query.get("channel", channel)}
    for key in ("role", "token", "receive", "encoding", "name", "engine", "protocol"):
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
