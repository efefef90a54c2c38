"""Routing state of the relay: channels, peers, worker assignment. No sockets.

The server (and in-process sessions, :mod:`relay.local`) feed it frames and
decoded control messages; the hub decides who gets what and drops it into
the receivers' outboxes: frames as :class:`Delivery` (bytes, never parsed
again), control messages as typed models that each transport encodes (or,
in process, hands over as they are). Keeping it free of I/O makes the
routing rules readable in one place and testable without a network.

Access is decided here too, once per join (never per frame): a channel the
API opened with a key (a /v1 stream's stream key) takes network peers that
present the relay token or that key; other channels are open to tokenless
peers only when the config allows open channels; network workers need the
relay token whenever the relay has tokens. In-process peers
(:mod:`relay.local`) are the API itself and pass. On a relay that has
tokens, a tokenless network peer is anonymous: it may join only channels
that anonymous peers opened (never the API's or a token holder's), those
channels hold at most ``anonymous_channel_share`` of ``max_channels``, and
its ``stats`` name no other channel. Workers go to keyed
channels first, and anonymous channels (no key, opened without a
credential) hold at most ``anonymous_share`` of the workers' capacity.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from relay.config import RelayConfig
from relay.outbox import Outbox
from relay.stats import LatencyTracker, RateMeter
from wire.errors import ErrorCode, ProtocolError
from wire.frames import Frame, FrameKind, ImageFormat, encode_frame
from wire.images import probe_image
from wire.messages import (
    ClientMessage,
    ClientType,
    Encoding,
    Hello,
    LegacyImage,
    Message,
    Params,
    Ping,
    PromptUpdate,
    Receive,
    Register,
    Report,
    ReportEvent,
    Role,
    StatsRequest,
    encode_control,
    legacy_image_message,
)
from wire.relay_messages import (
    Ack,
    Assign,
    ChannelParams,
    ChannelState,
    EngineState,
    Error,
    ParamsAck,
    Pong,
    PromptUpdated,
    Registered,
    Release,
    StatsReply,
    Status,
)

if TYPE_CHECKING:
    from relay.backplane import Backplane

log = logging.getLogger("relay")

# what each ``receive`` setting delivers, looked up once per peer, not per frame
_WANTED = {
    Receive.INPUT: frozenset({FrameKind.INPUT}),
    Receive.OUTPUT: frozenset({FrameKind.OUTPUT}),
    Receive.BOTH: frozenset(FrameKind),
    Receive.NONE: frozenset(),
}


class Delivery:
    """A frame on its way out: the original bytes plus a lazily built seed-002 form."""

    __slots__ = ("_json", "frame", "raw")

    def __init__(self, frame: Frame, raw: bytes) -> None:
        self.frame = frame
        self.raw = raw
        self._json: str | None = None

    def as_json(self) -> str:
        if self._json is None:
            f = self.frame
            self._json = encode_control(
                legacy_image_message(
                    f.format, f.payload, f.timestamp, seq=f.seq, channel=f.channel, kind=f.kind.name.lower()
                )
            )
        return self._json


@dataclass(eq=False)
class Peer:
    """One connection (or in-process session) after its handshake.

    Its outbox holds frames as :class:`Delivery` and control messages as
    models (:mod:`wire.relay_messages`): a network transport encodes them
    with ``encode_control`` when it sends them, an in-process one reads them.
    """

    id: str
    role: Role
    channel: str
    receive: Receive = Receive.OUTPUT
    encoding: Encoding = Encoding.BINARY
    capacity: int = 1
    pinned: frozenset[str] = frozenset()
    name: str = ""
    engine: str = ""
    outbox: Outbox[Delivery] = field(default_factory=Outbox)
    #: joined over the network: the hub checks its credential (in-process peers are the API)
    network: bool = False
    #: the token it presented (a relay token or a channel's key), checked at join
    token: str | None = field(default=None, repr=False)
    #: a channel it creates is anonymous (no credential: a seed session, a tokenless client)
    anonymous: bool = False
    #: a seed-002 client: it reads one reply per message it sends, so it gets those replies
    #: and its frames, never unasked ``status`` or ``report`` messages
    quiet: bool = False
    assigned: list[str] = field(default_factory=list)  # workers only
    #: channels just released from this worker: its frames and reports for them, already on
    #: their way when the release went out, are dropped quietly (not answered with an error)
    released: deque[str] = field(default_factory=lambda: deque(maxlen=16))
    legacy_seq: itertools.count[int] = field(default_factory=itertools.count)
    last_input_seq: dict[str, int] = field(default_factory=dict)
    _wanted: frozenset[FrameKind] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.receive, self.encoding = Receive(self.receive), Encoding(self.encoding)
        self._wanted = _WANTED[self.receive]

    @classmethod
    def from_hello(
        cls,
        peer_id: str,
        hello: Hello,
        outbox: Outbox[Delivery],
        *,
        network: bool = True,
        anonymous: bool = False,
        quiet: bool = False,
    ) -> Peer:
        return cls(
            id=peer_id,
            role=hello.role,
            channel=hello.channel,
            receive=hello.receive,
            encoding=hello.encoding,
            capacity=hello.capacity,
            pinned=frozenset(hello.channels),
            name=hello.name,
            engine=hello.engine,
            outbox=outbox,
            network=network,
            token=hello.token,
            anonymous=anonymous,
            quiet=quiet,
        )

    @property
    def legacy(self) -> bool:
        return self.encoding is Encoding.JSON

    def send(self, message: Message) -> None:
        """Queue a control message (a model: the transport encodes it, if it must)."""
        self.outbox.put_control(message)

    def wants(self, kind: FrameKind) -> bool:
        return kind in self._wanted

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"id": self.id, "role": self.role.value, "name": self.name}
        if self.role is Role.WORKER:
            info.update(capacity=self.capacity, engine=self.engine, channels=list(self.assigned))
        else:
            info["channel"] = self.channel
        return info


@dataclass(eq=False)
class Channel:
    name: str
    producers: set[Peer] = field(default_factory=set)
    viewers: set[Peer] = field(default_factory=set)
    worker: Peer | None = None
    params: dict[str, Any] = field(default_factory=dict)
    params_version: int = 0
    held: bool = False  # kept open by the API even with no producer connected
    #: the API's access key (a /v1 stream's stream key): network peers need it or the relay token
    key: str | None = field(default=None, repr=False)
    #: opened without a credential (seed sessions, tokenless clients): at most
    #: ``anonymous_share`` of the workers' capacity, after keyed channels
    anonymous: bool = False
    #: opened by an anonymous network peer (:meth:`Hub.is_anonymous`): other anonymous peers may
    #: join it, and such channels hold at most ``anonymous_channel_share`` of the table. Channels
    #: the API or a token holder opened are not: anonymous peers cannot read or feed them
    public: bool = False
    #: JSON bytes a producer's params merges may grow the params to (max_params_bytes, plus
    #: what the API itself set: its own doors bound that, style images included)
    params_budget: int = 0
    frames_in: RateMeter = field(default_factory=RateMeter)
    frames_out: RateMeter = field(default_factory=RateMeter)
    latency: LatencyTracker = field(default_factory=LatencyTracker)
    drops: dict[str, int] = field(default_factory=lambda: {"worker": 0, "viewers": 0, "no_worker": 0})
    #: what the worker last said: loading, ready, reloading or error
    engine_state: EngineState = EngineState.WAITING_FOR_WORKER
    engine_info: dict[str, Any] = field(default_factory=dict)
    worker_stats: dict[str, Any] = field(default_factory=dict)
    last_error: str | None = None
    last_error_time: float | None = None
    restart_count: int = 0
    last_restart_time: float | None = None
    last_input_time: float | None = None
    last_output_time: float | None = None
    last_params_time: float | None = None
    #: params version of the newest result: tells when a change reached the output
    output_params_version: int = 0
    #: the last waiting ``status`` its peers were told (None while served)
    announced: Status | None = None
    #: the worker's latest ``progress`` report while it loads (None once ready or failed)
    progress: dict[str, Any] | None = None
    #: gave its worker back after ``idle_release_s`` without input; the next input ends it
    idle: bool = False
    #: when it last got a worker (time.time()): a fresh channel is not idle yet
    assigned_time: float | None = None
    #: a cluster node's worker serves it here for another node, which decides its worker:
    #: this hub neither queues, assigns nor releases it on its own (:mod:`relay.cluster`)
    remote: bool = False
    #: the cluster node that gives it its worker when another node does (its producers or API
    #: hold it too, and the cluster's rule picked that node): this hub neither queues nor assigns
    #: it, and sends its producers' params there (:mod:`relay.cluster`)
    owner: str | None = None
    #: while ``owner`` serves it: its rates and worker there, shown instead of this node's
    owner_stats: dict[str, Any] | None = None
    #: the node whose API created it (a cluster's /v1 stream): its owner while only held open
    home: str | None = None

    @property
    def wants_worker(self) -> bool:
        return (bool(self.producers) or self.held or self.remote) and not self.idle

    @property
    def empty(self) -> bool:
        return not (self.producers or self.viewers or self.held or self.remote)

    @property
    def priority(self) -> int:
        """Order in which waiting channels get a worker: keyed, then others, then anonymous."""
        return 0 if self.key is not None else 2 if self.anonymous else 1

    def stats(self) -> dict[str, Any]:
        return {
            "fps_in": round(self.frames_in.rate(), 2),
            "fps_out": round(self.frames_out.rate(), 2),
            "frames_in": self.frames_in.total,
            "frames_out": self.frames_out.total,
            "drops": dict(self.drops),
            "latency_ms": self.latency.percentiles_ms(),
            "producers": len(self.producers),
            "viewers": len(self.viewers),
            "worker": self.worker.id if self.worker else None,
            "params_version": self.params_version,
            "output_params_version": self.output_params_version,
            "engine_state": self.engine_state,
            "engine": self.engine_info,
            "worker_stats": self.worker_stats,
            "last_error": self.last_error,
            "restart_count": self.restart_count,
            "progress": self.progress,
            **(self.owner_stats or {}),
        }


class Hub:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.channels: dict[str, Channel] = {}
        self.workers: list[Peer] = []
        #: called with (channel, seconds) for each result matched to its input (metrics)
        self.latency_observers: list[Callable[[str, float], None]] = []
        #: shares frames and news with other relay nodes (``--nats``); None: a node on its own
        self.backplane: Backplane | None = None
        #: a frame routed since the transport last looked waits in an outbox (its socket was busy):
        #: the transport should let the senders run before it reads the next frame
        self.backlog = False

    # -- membership ---------------------------------------------------------

    def is_relay_token(self, token: str | None) -> bool:
        """Whether ``token`` is one of the relay's tokens (constant-time comparisons)."""
        if not token:
            return False
        given = token.encode()
        return any(hmac.compare_digest(given, t.encode()) for t in self.config.tokens)

    def is_anonymous(self, peer: Peer) -> bool:
        """A network peer without the relay token, on a relay that has tokens (a stream key is no
        relay token: it opens its own channel only).

        On a relay without tokens nobody on the network holds a credential: every channel is open
        to everyone, as before.
        """
        return peer.network and bool(self.config.tokens) and not self.is_relay_token(peer.token)

    def check_access(self, peer: Peer) -> None:
        """Raise ``ProtocolError`` (unauthorized) if a network ``peer``'s token does not open its door."""
        if not peer.network or self.is_relay_token(peer.token):
            return
        if peer.role is Role.WORKER:
            if self.config.tokens:
                raise ProtocolError("workers need the relay token", ErrorCode.UNAUTHORIZED)
            return
        channel = self.channels.get(peer.channel)
        if channel is not None and channel.key is not None:
            if peer.token and hmac.compare_digest(peer.token.encode(), channel.key.encode()):
                return
            raise ProtocolError(
                f"channel {peer.channel!r} needs the relay token or its key", ErrorCode.UNAUTHORIZED
            )
        if not self.config.accepts_open_channels:
            raise ProtocolError(
                "missing or wrong token" if self.config.tokens else "this relay has no open channels",
                ErrorCode.UNAUTHORIZED,
            )
        if channel is not None and not channel.public and self.is_anonymous(peer):
            raise ProtocolError(
                f"channel {peer.channel!r} was opened by the relay's own clients: it needs the relay token",
                ErrorCode.UNAUTHORIZED,
            )

    def check_join(self, peer: Peer) -> None:
        """Raise ``ProtocolError`` if ``peer`` may not join; changes nothing."""
        self.check_access(peer)
        if peer.role is Role.WORKER:
            return
        allowed = self.config.allowed_channels
        if allowed and peer.channel not in allowed:
            raise ProtocolError(f"unknown channel {peer.channel!r}", ErrorCode.UNKNOWN_CHANNEL)
        if peer.channel not in self.channels:
            self._check_room(public=self.is_anonymous(peer))

    def join(self, peer: Peer) -> None:
        self.check_join(peer)
        if peer.role is Role.WORKER:
            self.workers.append(peer)
            log.info("worker %s joined (capacity %d, engine %s)", peer.id, peer.capacity, peer.engine)
            self._assign_waiting()
            self._announce_queue()
            self._changed()
            return
        channel = self._channel(peer.channel, anonymous=peer.anonymous, public=self.is_anonymous(peer))
        if peer.role is Role.PRODUCER:
            channel.producers.add(peer)
            if channel.worker is None:
                self._assign(channel)
            told = channel.announced
            self._announce_queue()
            if channel.announced is told and told is not None and not peer.quiet:
                peer.send(told)  # the channel heard it before this peer came
        else:
            channel.viewers.add(peer)
        self._changed()

    def leave(self, peer: Peer) -> None:
        if peer.role is Role.WORKER:
            if peer in self.workers:
                self.workers.remove(peer)
            orphans = []
            for name in list(peer.assigned):
                channel = self.channels.get(name)
                if channel is not None and channel.worker is peer:
                    channel.worker = None
                    channel.engine_state = EngineState.WAITING_FOR_WORKER
                    log.info("worker %s left; reassigning channel %s", peer.id, name)
                    orphans.append(channel)
            peer.assigned.clear()
            self._assign_waiting()  # keyed channels first, wherever they were
            self._announce_queue()  # the orphans that found no other worker are told
            self._changed()
            return
        channel = self.channels.get(peer.channel)
        if channel is None:
            return
        channel.producers.discard(peer)
        channel.viewers.discard(peer)
        self._tidy(channel)
        self._announce_queue()
        self._changed()

    def open_channel(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        *,
        key: str | None = None,
        anonymous: bool | None = None,
        home: str | None = None,
    ) -> Channel:
        """Hold a channel open (the API's streams) so it keeps a worker with no producer.

        ``key``: network peers then need it (or the relay token) to join; peers
        already there without either are sent away. ``anonymous`` (default:
        when there is no key) marks a channel opened for a client with no
        credential (seed sessions): it gets a worker only within
        ``anonymous_share``. A full channel table raises ``ProtocolError``
        (``too_many_channels``). ``home``: in a cluster, the node that created the stream, which
        gives it its worker while no node has producers for it.
        """
        channel = self._channel(name, anonymous=key is None if anonymous is None else anonymous)
        channel.held, channel.home = True, home
        if key is not None and channel.key != key:
            channel.key, channel.anonymous, channel.public = key, False, False
            self._evict_unauthorized(channel)
        elif channel.public:  # the API's now: anonymous peers that opened the name first leave
            channel.public = False
            self._evict_unauthorized(channel)
        if params is not None:
            self.set_params(channel, params, replace=True)
        if channel.worker is None:
            self._assign(channel)
        self._announce_queue()
        self._changed()
        return channel

    def seed_channel(self, name: str) -> str:
        """Where a seed-002 producer on the relay's default URL goes: ``name`` unless a producer is
        already there, else a channel of its own (two seed scripts never mix their frames).
        """
        channel = self.channels.get(name)
        if channel is None or not channel.producers:
            return name
        while (own := f"{name}-{secrets.token_hex(3)}") in self.channels:
            pass
        return own

    def release_idle(self, now: float | None = None) -> list[str]:
        """Give back the worker slots of channels without input for ``idle_release_s``.

        Called periodically by the transport (never per frame). The channel
        stays, with its params and peers, and is told ``idle``; its next
        input frame asks for a worker again. Returns the channels released.
        """
        limit = self.config.idle_release_s
        if limit <= 0:
            return []
        now = time.time() if now is None else now
        released = []
        for channel in list(self.channels.values()):
            if channel.worker is None or channel.idle or channel.remote:  # remote: its node decides
                continue
            since = max(channel.last_input_time or 0.0, channel.assigned_time or 0.0)
            if now - since >= limit:
                channel.idle = True
                released.append(channel.name)
                log.info("channel %s idle for %.0f s: releasing its worker", channel.name, now - since)
                self._release(channel)
                channel.engine_state = EngineState.IDLE
                self._tell_channel(channel, Status(channel=channel.name, state=ChannelState.IDLE))
        if released:
            self._announce_queue()
        return released

    def close_channel(self, name: str) -> None:
        channel = self.channels.get(name)
        if channel is not None:
            channel.held = False
            self._tidy(channel)
            self._announce_queue()
            self._changed()

    # -- frames -------------------------------------------------------------

    def route(self, peer: Peer, frame: Frame, raw: bytes | None, *, probed: bool = False) -> None:
        """Check and forward one frame; ``raw`` is its encoded form when already at hand.

        The image's own header must agree with the frame header (format, size),
        unless ``probed``: the frame was made from the image's header (``route_image``).
        """
        if not probed:
            self._check_image(frame.payload, frame)
        if peer.role is Role.PRODUCER:
            if frame.kind is not FrameKind.INPUT:
                raise ProtocolError("producers send input frames", ErrorCode.NOT_ALLOWED)
            if frame.channel != peer.channel:
                raise ProtocolError(f"not joined to channel {frame.channel!r}", ErrorCode.UNKNOWN_CHANNEL)
            delivery = Delivery(frame, raw or encode_frame(frame))
            self._route_input(self.channels[peer.channel], delivery)
            if self.backplane is not None:
                self.backplane.share(delivery)
        elif peer.role is Role.WORKER:
            if frame.channel not in peer.assigned:
                if frame.channel in peer.released:
                    return  # sent before the worker heard its release
                raise ProtocolError(
                    f"channel {frame.channel!r} is not assigned to this worker", ErrorCode.UNKNOWN_CHANNEL
                )
            if frame.kind is not FrameKind.OUTPUT:
                raise ProtocolError("workers send output frames", ErrorCode.NOT_ALLOWED)
            delivery = Delivery(frame, raw or encode_frame(frame))
            self._route_output(self.channels[frame.channel], delivery)
            if self.backplane is not None:
                self.backplane.share(delivery)
        else:
            raise ProtocolError("viewers cannot send frames", ErrorCode.NOT_ALLOWED)

    def route_image(
        self,
        peer: Peer,
        payload: bytes,
        timestamp: float | None = None,
        seq: int | None = None,
        declared: ImageFormat | None = None,
    ) -> Frame:
        """Forward an encoded image that has no frame header (seed 002, in-process sessions).

        The hub reads its format and size (the one probe it gets); a producer's
        image is input for its channel numbered by the peer when ``seq`` is
        None, a worker's is output for its first channel, matched to the last
        input. ``declared``: the format the sender named, checked against the
        image as a frame header's is. Returns the frame as routed.
        """
        if peer.role is Role.WORKER:
            if not peer.assigned:
                raise ProtocolError("no channel is assigned to this worker yet", ErrorCode.UNKNOWN_CHANNEL)
            channel, kind = peer.assigned[0], FrameKind.OUTPUT
            if seq is None:
                seq = peer.last_input_seq.get(channel, 0)
        else:
            channel, kind = peer.channel, FrameKind.INPUT
            if seq is None:
                seq = next(peer.legacy_seq)
        fmt, width, height = self._check_image(payload, declared)
        frame = Frame(
            channel=channel,
            seq=seq,
            timestamp=time.time() if timestamp is None else timestamp,
            width=width,
            height=height,
            format=fmt,
            payload=payload,
            kind=kind,
        )
        self.route(peer, frame, None, probed=True)
        return frame

    def route_legacy(self, peer: Peer, image: LegacyImage) -> None:
        """A seed-002 image message: from a producer it is input (acked), from a worker output."""
        self.route_image(peer, image.data, image.timestamp, image.seq, image.format)
        if peer.role is Role.PRODUCER:
            peer.send(Ack())

    def _check_image(
        self, payload: bytes, declared: Frame | ImageFormat | None
    ) -> tuple[ImageFormat, int, int]:
        """The image's format and size, within the limits and as its sender declared.

        ``declared``: a frame header (format and size) or the format a JSON
        image message names; both get the same checks and errors.
        """
        size = len(payload)
        if size > self.config.max_frame_bytes:
            raise ProtocolError(
                f"frame of {size} bytes exceeds the limit of {self.config.max_frame_bytes}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        fmt, width, height = probe_image(payload)
        declared_format = declared.format if isinstance(declared, Frame) else declared
        if declared_format is not None and fmt != declared_format:
            raise ProtocolError(
                f"declared {declared_format.label} but the image is {fmt.label}", ErrorCode.BAD_IMAGE
            )
        if isinstance(declared, Frame):
            header = declared
            if (width, height) != (header.width, header.height):
                raise ProtocolError(
                    f"header says {header.width}x{header.height} but the image is {width}x{height}",
                    ErrorCode.BAD_IMAGE,
                )
        if width > self.config.max_width or height > self.config.max_height:
            raise ProtocolError(
                f"{width}x{height} exceeds the limit of {self.config.max_width}x{self.config.max_height}",
                ErrorCode.RESOLUTION_TOO_LARGE,
            )
        return fmt, width, height

    def _route_input(self, channel: Channel, delivery: Delivery) -> None:
        channel.frames_in.tick()
        channel.last_input_time = time.time()
        if channel.idle:  # input is back: ask for a worker again (this frame goes to it if one is free)
            channel.idle = False
            self._assign(channel)
            self._announce_queue()
        worker = channel.worker
        if worker is None:
            if channel.owner is None:  # else the owner's worker gets it through the backplane
                channel.drops["no_worker"] += 1
        else:
            channel.latency.started(delivery.frame.seq)
            worker.last_input_seq[channel.name] = delivery.frame.seq
            if worker.outbox.put_frame((channel.name, FrameKind.INPUT), delivery) is not None:
                channel.drops["worker"] += 1
            self.backlog = self.backlog or worker.outbox.backlogged
        for viewer in channel.viewers:
            if viewer.wants(FrameKind.INPUT):
                self._offer(channel, viewer, delivery)

    def _route_output(self, channel: Channel, delivery: Delivery) -> None:
        channel.frames_out.tick()
        channel.last_output_time = time.time()
        channel.output_params_version = delivery.frame.params_version
        elapsed = channel.latency.finished(delivery.frame.seq)
        if elapsed is not None:
            for observe in self.latency_observers:
                observe(channel.name, elapsed)
        for peer in (*channel.viewers, *channel.producers):
            if peer.wants(FrameKind.OUTPUT):
                self._offer(channel, peer, delivery)

    def _offer(self, channel: Channel, peer: Peer, delivery: Delivery) -> None:
        slot = (channel.name, delivery.frame.kind)
        if peer.outbox.put_frame(slot, delivery) is not None:
            channel.drops["viewers"] += 1
        self.backlog = self.backlog or peer.outbox.backlogged

    # -- control ------------------------------------------------------------

    def on_message(self, peer: Peer, message: ClientMessage) -> None:
        """A decoded control message from a joined peer; refusals raise ``ProtocolError``."""
        match message:
            case LegacyImage():
                self.route_legacy(peer, message)
            case Params():
                version = self.on_params(peer, message)
                peer.send(ParamsAck(channel=peer.channel, version=version))
            case StatsRequest():
                peer.send(self.stats_for(peer))
            case Report():
                self.on_report(peer, message)
            case Ping():
                peer.send(Pong(timestamp=time.time()))
            case PromptUpdate():
                version = self.on_params(peer, Params(params={"prompt": message.prompt}))
                peer.send(PromptUpdated(prompt=message.prompt, timestamp=time.time(), version=version))
            case Register():
                self.on_register(peer, message)
            case _:
                raise ProtocolError(f"unexpected {message.type!r} message after the handshake")

    def on_register(self, peer: Peer, message: Register) -> None:
        """A seed-002 ``register`` after the handshake: confirmed when it says what the peer is."""
        client_type = ClientType.PRODUCER if peer.role is Role.PRODUCER else ClientType.CONSUMER
        if peer.role is Role.WORKER or message.client_type is not client_type:
            raise ProtocolError(
                f"already joined as a {peer.role.value}; register before anything else", ErrorCode.NOT_ALLOWED
            )
        peer.send(registered(peer))

    def set_params(self, channel: Channel, params: dict[str, Any], replace: bool = False) -> int:
        """The API's own change (its doors bound it): producers' merges may add ``max_params_bytes`` to it."""
        channel.params = dict(params) if replace else {**channel.params, **params}
        channel.params_budget = self.config.max_params_bytes + _json_size(channel.params)
        return self._params_changed(channel)

    def _params_changed(self, channel: Channel) -> int:
        channel.params_version += 1
        channel.last_params_time = time.time()
        if channel.worker is not None:
            channel.worker.send(
                ChannelParams(channel=channel.name, params=channel.params, version=channel.params_version)
            )
        elif channel.owner is not None and not channel.held and self.backplane is not None:
            # the worker is the owner node's to tell (a held channel's API shares its params itself)
            self.backplane.forward_params(channel)
        return channel.params_version

    def on_params(self, peer: Peer, message: Params) -> int:
        """A producer's params: each message, and the channel's params once merged, within the limit."""
        if peer.role is not Role.PRODUCER:
            raise ProtocolError("only producers set a channel's params", ErrorCode.NOT_ALLOWED)
        if message.channel not in (None, peer.channel):
            raise ProtocolError(f"not joined to channel {message.channel!r}", ErrorCode.UNKNOWN_CHANNEL)
        limit = self.config.max_params_bytes
        size = _json_size(message.params)
        if size > limit:
            raise ProtocolError(
                f"params of {size} bytes exceed the limit of {limit}", ErrorCode.PARAMS_TOO_LARGE
            )
        channel = self.channels[peer.channel]
        merged = dict(message.params) if message.replace else {**channel.params, **message.params}
        budget = max(limit, channel.params_budget)
        if not message.replace and (total := _json_size(merged)) > budget:
            raise ProtocolError(
                f"the channel's params would grow to {total} bytes, over the limit of {budget}",
                ErrorCode.PARAMS_TOO_LARGE,
            )
        channel.params = merged
        return self._params_changed(channel)

    def on_report(self, peer: Peer, report: Report) -> None:
        """A worker's report moves its channel's engine state; all but stats reach the channel's peers."""
        if (
            peer.role is Role.WORKER
            and report.channel in peer.released
            and report.channel not in peer.assigned
        ):
            return  # sent before the worker heard its release
        if peer.role is not Role.WORKER or report.channel not in peer.assigned:
            raise ProtocolError("reports come from the channel's worker", ErrorCode.NOT_ALLOWED)
        if (size := len(report.message) + _json_size(report.data)) > self.config.max_params_bytes:
            raise ProtocolError(
                f"a report of {size} bytes exceeds the limit of {self.config.max_params_bytes}",
                ErrorCode.PARAMS_TOO_LARGE,
            )
        channel = self.channels[report.channel]
        self._apply_report(channel, report)
        if self.backplane is not None:
            self.backplane.report(report)

    def _apply_report(self, channel: Channel, report: Report) -> None:
        match report.event:
            case ReportEvent.STATS:
                channel.worker_stats = report.data
                return
            case ReportEvent.PROGRESS:
                channel.progress = report.data
            case ReportEvent.ERROR:
                channel.progress = None
                channel.last_error, channel.last_error_time = report.message, time.time()
                if channel.engine_state is EngineState.LOADING:
                    channel.engine_state = EngineState.ERROR
                elif report.data.get("reload_failed"):
                    channel.engine_state = EngineState.READY  # the previous engine keeps serving
            case ReportEvent.RELOADING:
                channel.engine_state = EngineState.RELOADING
                channel.restart_count += 1
                channel.last_restart_time = time.time()
            case ReportEvent.READY:
                channel.engine_state, channel.engine_info = EngineState.READY, report.data
                channel.progress = None
        self._tell_channel(channel, report)
        self._changed()  # the other nodes of the channel show its state from our heartbeat

    def stats(self, channels: list[str] | None = None) -> StatsReply:
        names = self.channels if channels is None else [c for c in channels if c in self.channels]
        return StatsReply(
            channels={name: self.channels[name].stats() for name in names},
            workers=[w.describe() for w in self.workers],
        )

    def stats_for(self, peer: Peer) -> StatsReply:
        """A peer's ``stats``: everything for a worker, else its own channel.

        An anonymous peer also sees only its own channel among the workers'
        assignments: the names of the others (seed sessions, /v1 stream ids)
        are what it would need to find them.
        """
        if peer.role is Role.WORKER:
            return self.stats()
        reply = self.stats([peer.channel])
        if self.is_anonymous(peer):
            for worker in reply.workers:
                worker["channels"] = [name for name in worker.get("channels", ()) if name == peer.channel]
        return reply

    # -- internals ----------------------------------------------------------

    def anonymous_channel_limit(self) -> int:
        """Channels anonymous peers may open: their share of the table, so the others find room."""
        return math.floor(self.config.anonymous_channel_share * self.config.max_channels + 1e-9)

    def _check_room(self, public: bool) -> None:
        """Raise ``too_many_channels`` when a new channel (``public``: an anonymous peer's) has no room."""
        if len(self.channels) >= self.config.max_channels:
            raise ProtocolError(
                f"the relay already serves {self.config.max_channels} channels", ErrorCode.TOO_MANY_CHANNELS
            )
        limit = self.anonymous_channel_limit()
        if public and sum(c.public for c in self.channels.values()) >= limit:
            raise ProtocolError(
                f"clients without the relay token already hold {limit} channels "
                "(anonymous_channel_share of max_channels)",
                ErrorCode.TOO_MANY_CHANNELS,
            )

    def _channel(self, name: str, anonymous: bool = False, public: bool = False) -> Channel:
        """The channel ``name``, created (``anonymous``, ``public`` or not) if new; raises when the table
        (or the anonymous peers' share of it) is full.
        """
        channel = self.channels.get(name)
        if channel is None:
            self._check_room(public)
            channel = self.channels[name] = Channel(name, anonymous=anonymous, public=public)
        return channel

    def _evict_unauthorized(self, channel: Channel) -> None:
        """Send away the network peers of a channel that just got a key, unless they hold it (or the
        token).
        """
        for peer in [*channel.producers, *channel.viewers]:
            try:
                self.check_access(peer)
            except ProtocolError as exc:
                channel.producers.discard(peer)
                channel.viewers.discard(peer)
                peer.send(Error.of(exc))
                peer.outbox.close()  # its transport closes the connection

    def _anonymous_slots(self) -> tuple[int, int]:
        """Anonymous channels served, and how many may be: their share of the workers' capacity."""
        share = self.config.anonymous_share
        capacity = sum(w.capacity for w in self.workers)
        limit = math.floor(share * capacity + 1e-9)
        if share > 0 and capacity and not any(c.key is not None for c in self.channels.values()):
            limit = max(limit, 1)  # a lone seed client on a one-slot server is served
        used = sum(1 for c in self.channels.values() if c.anonymous and c.worker is not None)
        return used, limit

    def slots(self, channel: Channel) -> tuple[int, int]:
        """The slots ``channel`` may get a worker from: (in use, total); an anonymous channel's share."""
        if channel.anonymous:
            return self._anonymous_slots()
        return sum(len(w.assigned) for w in self.workers), sum(w.capacity for w in self.workers)

    def queue(self) -> list[Channel]:
        """The channels waiting for a worker, in the order they will get one."""
        waiting = [
            c
            for c in self.channels.values()
            if c.worker is None and c.wants_worker and not c.remote and c.owner is None
        ]
        return sorted(waiting, key=lambda c: c.priority)  # stable: oldest first within a rank

    def _announce_queue(self) -> None:
        """Tell each waiting channel its place and slots, when they changed (joins and leaves only)."""
        for position, channel in enumerate(self.queue(), 1):
            in_use, slots = self.slots(channel)
            status = Status(
                channel=channel.name,
                state=ChannelState.WAITING_FOR_WORKER,
                position=position,
                in_use=in_use,
                slots=slots,
            )
            if status != channel.announced:
                channel.announced = status
                self._tell_channel(channel, status)

    def _anonymous_may_take_a_slot(self) -> bool:
        """Room for one more anonymous channel: within its share, and none taken from a waiting keyed
        channel.
        """
        used, limit = self._anonymous_slots()
        if used >= limit:
            return False
        keyed = [c for c in self.channels.values() if c.key is not None]
        free = sum(max(0, w.capacity - len(w.assigned)) for w in self.workers)
        waiting = sum(1 for c in keyed if c.worker is None and c.wants_worker)
        return free > waiting

    def _assign(self, channel: Channel) -> None:
        if channel.remote:
            return  # another node gives it its worker
        if self.backplane is not None:
            channel.owner = self.backplane.owner(channel)
            if channel.owner is not None:
                return
        candidates = [
            w
            for w in self.workers
            if len(w.assigned) < w.capacity and (not w.pinned or channel.name in w.pinned)
        ]
        if not candidates:
            return
        if channel.anonymous and not self._anonymous_may_take_a_slot():
            return
        self._give(channel, min(candidates, key=lambda w: len(w.assigned) / w.capacity))

    def _give(self, channel: Channel, worker: Peer) -> None:
        channel.worker, channel.announced = worker, None
        channel.assigned_time = time.time()
        channel.engine_state = EngineState.LOADING
        worker.assigned.append(channel.name)
        if channel.name in worker.released:
            worker.released.remove(channel.name)
        worker.send(Assign(channel=channel.name, params=channel.params, version=channel.params_version))
        log.info("channel %s assigned to worker %s", channel.name, worker.id)
        self._tell_channel(
            channel, Status(channel=channel.name, state=ChannelState.ASSIGNED, worker=worker.id)
        )
        self._changed()

    def _assign_waiting(self) -> None:
        for channel in self.queue():
            self._assign(channel)

    def _release(self, channel: Channel) -> None:
        worker = channel.worker
        if worker is None:
            return
        channel.worker = None
        channel.engine_state = EngineState.WAITING_FOR_WORKER
        if channel.name in worker.assigned:
            worker.assigned.remove(channel.name)
        worker.released.append(channel.name)
        worker.send(Release(channel=channel.name))
        self._assign_waiting()
        self._changed()

    def _tidy(self, channel: Channel) -> None:
        if not channel.wants_worker:
            self._release(channel)
        if channel.empty:
            del self.channels[channel.name]

    def _tell_channel(self, channel: Channel, message: Message) -> None:
        for peer in (*channel.producers, *channel.viewers):
            if not peer.quiet:
                peer.send(message)

    def _changed(self) -> None:
        """Peers, channels or assignments changed: the backplane tells the other nodes (it coalesces)."""
        if self.backplane is not None:
            self.backplane.changed()

    # -- cluster: what relay.cluster calls (nothing does without a backplane) --

    def route_remote(self, delivery: Delivery) -> None:
        """A frame another node shared: to this node's receivers only, never shared again."""
        channel = self.channels.get(delivery.frame.channel)
        if channel is None:
            return
        if delivery.frame.kind is FrameKind.INPUT:
            self._route_input(channel, delivery)
        else:
            self._route_output(channel, delivery)

    def serve_remote(self, name: str, worker: Peer, params: dict[str, Any], version: int) -> bool:
        """Another node gives channel ``name`` to ``worker``, one of ours: whether it took it.

        Refused when the worker is full or pinned elsewhere, or the channel
        already has another worker here; the asking node then looks further.
        """
        if worker not in self.workers or (worker.pinned and name not in worker.pinned):
            return False
        channel = self.channels.get(name)
        if channel is not None and channel.worker is not None:
            return channel.worker is worker and channel.remote
        if len(worker.assigned) >= worker.capacity:
            return False
        try:
            channel = self._channel(name)
        except ProtocolError:
            return False
        channel.remote, channel.idle = True, False
        channel.params, channel.params_version = dict(params), version
        self._give(channel, worker)
        return True

    def unserve_remote(self, name: str) -> None:
        """The node that asked for channel ``name`` let it go (or is gone): release our worker."""
        channel = self.channels.get(name)
        if channel is not None and channel.remote:
            channel.remote = False
            self._tidy(channel)
            self._announce_queue()
            self._changed()

    def remote_params(self, name: str, params: dict[str, Any], version: int) -> None:
        """New params for a channel served here for another node: to its worker as they are."""
        channel = self.channels.get(name)
        if channel is None or not channel.remote:
            return
        channel.params, channel.params_version = dict(params), version
        channel.last_params_time = time.time()
        if channel.worker is not None:
            channel.worker.send(ChannelParams(channel=name, params=channel.params, version=version))

    def remote_report(self, report: Report) -> None:
        """A worker's report another node shared: this node's peers of the channel hear it."""
        channel = self.channels.get(report.channel)
        if channel is not None:
            self._apply_report(channel, report)

    def refresh(self) -> None:
        """Another node's worker has room again (its heartbeat said so): serve the waiting channels."""
        self._assign_waiting()
        self._announce_queue()

    def set_owner(self, channel: Channel, owner: str | None) -> None:
        """The cluster picked ``owner`` (None: this node) to give ``channel`` its worker."""
        if owner == channel.owner or channel.remote:
            return
        channel.owner = owner
        if owner is None:
            log.info("channel %s: this node gives it a worker now", channel.name)
            if channel.worker is None:
                self._assign(channel)
        else:
            log.info("channel %s: node %s gives it a worker", channel.name, owner)
            self._release(channel)
            channel.announced = None
            self._tell_channel(channel, Status(channel=channel.name, state=ChannelState.ASSIGNED))
        self._announce_queue()
        self._changed()

    def unassign(self, worker: Peer, name: str) -> None:
        """``worker`` (another node's) will not serve channel ``name`` after all: find another."""
        if name in worker.assigned:
            worker.assigned.remove(name)
        channel = self.channels.get(name)
        if channel is not None and channel.worker is worker:
            channel.worker = None
            channel.engine_state = EngineState.WAITING_FOR_WORKER
        self._assign_waiting()
        self._announce_queue()
        self._changed()


def registered(peer: Peer) -> Registered:
    """The answer to a seed-002 ``register``: what the peer is, and its channel."""
    client_type = ClientType.PRODUCER if peer.role is Role.PRODUCER else ClientType.CONSUMER
    return Registered(client_type=client_type, timestamp=time.time(), channel=peer.channel)


def _json_size(value: Any) -> int:
    """Bytes of ``value`` as JSON (what the relay would send on)."""
    try:
        return len(orjson.dumps(value))
    except TypeError:  # not JSON (an in-process caller's object): no size to hold against it
        return 0
