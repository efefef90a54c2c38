"""A relay node's NATS link: its frames and reports out, the other nodes' in, workers lent and borrowed.

How a stream spans nodes (subjects in :mod:`relay.cluster.messages`):

- every node publishes its producers' input and its workers' output, and
  subscribes to a channel's subjects only where it has interest there: a
  local worker serving the channel wants its input, local viewers and
  producers its output and reports. Frames from NATS go to local receivers
  only (never published again) through their newest-frame-wins outboxes;
  frames on their way to NATS wait in such slots too, so a slow link drops
  old frames, never queues them;
- each node's heartbeat lists its workers and the channels they serve; the
  other nodes' workers appear in the hub as proxy workers, with the slots
  their node reported free. The node whose producers (or API) opened a
  channel, its home, gives it a worker as it always did, local or proxy:
  the ``assign`` to a proxy becomes a request to the worker's node, which
  alone decides whether its worker still has room (two homes racing for a
  last slot: one is refused and looks further);
- producers (or the API) may hold a channel on several nodes: each lists it
  as a claim in its heartbeat, and one rule on every node
  (:func:`relay.cluster.messages.owner`: nodes with producers first, then
  the node that created the stream, then rendezvous hashing) picks the one
  that gives it a worker; the others send their producers' frames and params
  there and show the owner's engine state and rates.
  So each channel has one worker cluster-wide, decided by one node, without
  a shared store (two nodes that assigned one before hearing each other:
  the one that is not the owner releases its worker);
- a worker leaving shows in its node's next heartbeat (sent at once); a node
  unheard for ``cluster_dead_after_s`` is gone. Either way the homes drop the
  proxies, and the hub reassigns their channels as when a local worker
  leaves; a node that hears nobody (its own NATS link is down) likewise
  gives back the channels it served for others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from pydantic import ValidationError

from relay.cluster.messages import (
    HEARTBEAT_SUBJECT,
    AssignWorker,
    Claim,
    Heartbeat,
    ReleaseWorker,
    Reply,
    UpdateParams,
    WorkerInfo,
    channel_subject,
    decode,
    encode,
    frame_subject,
    node_subject,
)
from relay.cluster.view import ClusterStatus, ClusterView
from relay.config import RelayConfig
from relay.hub import Channel, Delivery, Hub, Peer
from relay.outbox import Outbox
from wire.errors import ProtocolError
from wire.frames import FrameKind, decode_frame
from wire.messages import DEFAULT_CHANNEL, Message, Report, Role, encode_control
from wire.relay_messages import Assign, ChannelParams, Release

try:
    import nats
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.errors import Error as NatsError
except ImportError:  # the cluster extra is missing: connect() says how to install it
    nats = None  # type: ignore[assignment]

log = logging.getLogger("relay.cluster")

INSTALL = "pip install nats-py (or: pip install -e .[cluster]) to run relay nodes with --nats"
#: messages from NATS a frame subscription may hold unprocessed before nats-py drops them
FRAME_PENDING_BYTES = 64 * 1024 * 1024


def _discard(_: Delivery) -> bool:
    """A proxy worker's frames: its own node takes them from the channel's subject."""
    return True


class NatsBackplane:
    """One relay node's part in the cluster; :meth:`connect` starts it, :meth:`close` leaves."""

    def __init__(self, hub: Hub, client: Client, node: str, config: RelayConfig) -> None:
        self.hub, self.nc, self.node, self.config = hub, client, node, config
        self.view = ClusterView(node, config.cluster_dead_after_s)
        #: frames (newest per channel and kind) and reports on their way to NATS
        self._out: Outbox[Delivery] = Outbox(config.control_queue)
        #: the other nodes' workers, as hub peers, and the node of each
        self._proxies: dict[str, Peer] = {}
        self._proxy_node: dict[str, str] = {}
        #: (proxy worker, channel) -> when its node confirmed serving it (monotonic)
        self._confirmed: dict[tuple[str, str], float] = {}
        #: channels our workers serve for other nodes -> the node that asked
        self._served: dict[str, str] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._fixed: list[Subscription] = []
        self._dirty = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_size = False
        #: frames replaced unsent on their way to NATS (newest-frame-wins), frames over max_payload,
        #: and frames not published because no other node wanted them
        self.dropped = 0
        self.too_large = 0
        self.unwanted = 0

    @classmethod
    async def connect(cls, hub: Hub, config: RelayConfig) -> NatsBackplane:
        """Connect to ``config.nats`` (comma-separated URLs), join the cluster and attach to ``hub``."""
        if nats is None:
            raise RuntimeError(f"nats-py is not installed: {INSTALL}")
        node = config.node_name or secrets.token_hex(4)
        backplanes: list[NatsBackplane] = []

        async def reconnected() -> None:
            log.info("node %s: NATS connection back", node)
            for backplane in backplanes:
                backplane.changed()

        async def disconnected() -> None:
            log.warning("node %s: NATS connection lost; reconnecting", node)

        async def error(exc: Exception) -> None:
            log.warning("node %s: NATS: %s", node, exc)

        client = await nats.connect(
            [url.strip() for url in config.nats.split(",") if url.strip()],
            name=f"sd-relay {node}",
            no_echo=True,  # never our own frames back
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=5,
            reconnected_cb=reconnected,
            disconnected_cb=disconnected,
            error_cb=error,
        )
        backplane = cls(hub, client, node, config)
        backplanes.append(backplane)
        await backplane.start()
        return backplane

    async def start(self) -> None:
        if self.nc.max_payload < self.config.max_frame_bytes + 4096:
            log.warning(
                "NATS max_payload is %d bytes, under max_frame_bytes %d: larger frames stay on their node "
                "(set max_payload in the NATS server's config)",
                self.nc.max_payload,
                self.config.max_frame_bytes,
            )
        self._fixed = [
            await self.nc.subscribe(HEARTBEAT_SUBJECT, cb=self._on_heartbeat),
            await self.nc.subscribe(node_subject(self.node), cb=self._on_request),
        ]
        self.hub.backplane = self
        self._spawn(self._send_loop())
        self._spawn(self._tick_loop())
        await self._heartbeat()
        await self.nc.flush()
        log.info("node %s joined the cluster", self.node)

    async def close(self) -> None:
        """Say bye, give back what we served and borrowed, and disconnect."""
        self.hub.backplane = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in list(self._proxies):
            self._drop_proxy(worker)
        for name in list(self._served):
            del self._served[name]
            self.hub.unserve_remote(name)
        if self.nc.is_connected:
            with contextlib.suppress(NatsError, TimeoutError):
                await self.nc.publish(HEARTBEAT_SUBJECT, encode(Heartbeat(node=self.node, bye=True)))
                await self.nc.flush(timeout=1)
        await self.nc.close()

    # -- what the hub calls (synchronous: queue, never wait) ---------------

    def share(self, delivery: Delivery) -> None:
        frame = delivery.frame
        if not self.view.wanted(frame_subject(frame.channel, frame.kind)):
            self.unwanted += 1  # no other node subscribes to it, as their heartbeats say
            return
        if self._out.put_frame((frame.channel, frame.kind), delivery) is not None:
            self.dropped += 1
        self.hub.backlog = True  # our sender task needs a turn of the loop before the next frame

    def report(self, report: Report) -> None:
        self._out.put_control(report)

    def owner(self, channel: Channel) -> str | None:
        node, _ = self.view.owner(channel.name, self._claim(channel), channel.home)
        return None if node == self.node else node

    def pusher(self, channel: str, home: str) -> str:
        """The node that runs the pushes of the stream on ``channel`` created by ``home``."""
        return self.view.pusher(channel, home)

    def forward_params(self, channel: Channel) -> None:
        if channel.owner is not None:
            update = UpdateParams(
                home=self.node, channel=channel.name, params=channel.params, version=channel.params_version
            )
            self._spawn(self._publish(node_subject(channel.owner), encode(update)))

    def changed(self) -> None:
        self._dirty.set()

    def status(self) -> ClusterStatus:
        return ClusterStatus(
            node=self.node,
            connected=self.nc.is_connected,
            nodes=self.view.seen(time.monotonic()),
            worker_nodes=dict(self._proxy_node),
            dropped=self.dropped,
            too_large=self.too_large,
            unwanted=self.unwanted,
        )

    # -- outgoing ------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A task of ours ended: none should, but by :meth:`close` or its proxy leaving; say why."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("node %s: cluster task failed: the node may fall out of step", self.node, exc_info=exc)

    async def _publish(self, subject: str, data: bytes) -> None:
        if not self.nc.is_connected:
            return  # while reconnecting: dropped, not buffered (stale frames are worse than none)
        if len(data) > self.nc.max_payload:
            self.too_large += 1
            if not self._warned_size:
                self._warned_size = True
                log.warning("a %d-byte message exceeds NATS max_payload: not shared", len(data))
            return
        with contextlib.suppress(NatsError):
            await self.nc.publish(subject, data)

    async def _send_loop(self) -> None:
        """Frames and reports to NATS; awaiting each publish lets newer frames replace waiting ones."""
        while True:
            reports, deliveries = await self._out.take()
            for report in reports:
                if isinstance(report, Report):
                    await self._publish(
                        channel_subject(report.channel, "ctl"), encode_control(report).encode()
                    )
            for delivery in deliveries:
                await self._publish(frame_subject(delivery.frame.channel, delivery.frame.kind), delivery.raw)

    async def _tick_loop(self) -> None:
        """Each heartbeat period, or at once after a change: forget silent nodes, resubscribe, heartbeat."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.cluster_heartbeat_s):
                    await self._dirty.wait()
            self._dirty.clear()
            for node in self.view.expire(time.monotonic()):
                log.warning("node %s unheard for %.1f s: gone", node, self.config.cluster_dead_after_s)
                self._node_gone(node)
            self._settle_owners()
            self._drop_orphans()
            await self._sync_subscriptions()
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        workers = [
            WorkerInfo(
                id=w.id,
                capacity=w.capacity,
                pinned=sorted(w.pinned),
                name=w.name,
                engine=w.engine,
                channels={name: self._served.get(name, self.node) for name in w.assigned},
            )
            for w in self.hub.workers
            if w.id not in self._proxies
        ]
        wants = sorted(s for s in self._subscriptions if not s.endswith(".ctl"))
        homes = {name: claim for name, c in self.hub.channels.items() if (claim := self._claim(c))}
        heartbeat = Heartbeat(node=self.node, workers=workers, wants=wants, homes=homes)
        await self._publish(HEARTBEAT_SUBJECT, encode(heartbeat))

    async def _sync_subscriptions(self) -> None:
        """Subscribe to the subjects of the channels this node has receivers for, and only those."""
        if not self.nc.is_connected:
            return  # nats-py restores the subscriptions it has on reconnecting; then this runs again
        local = {w for w in self.hub.workers if w.id not in self._proxies}
        wanted: set[str] = set()
        for name, channel in self.hub.channels.items():
            if channel.producers or channel.viewers or channel.held:
                wanted.add(channel_subject(name, "out"))
                wanted.add(channel_subject(name, "ctl"))
            if channel.worker in local or any(v.wants(FrameKind.INPUT) for v in channel.viewers):
                wanted.add(channel_subject(name, "in"))
        for subject in set(self._subscriptions) - wanted:
            with contextlib.suppress(NatsError):
                await self._subscriptions.pop(subject).unsubscribe()
        for subject in wanted - set(self._subscriptions):
            with contextlib.suppress(NatsError):  # the link just dropped: next time
                if subject.endswith(".ctl"):
                    sub = await self.nc.subscribe(subject, cb=self._on_report)
                else:
                    sub = await self.nc.subscribe(
                        subject, cb=self._on_frame, pending_bytes_limit=FRAME_PENDING_BYTES
                    )
                self._subscriptions[subject] = sub

    # -- incoming ------------------------------------------------------------

    async def _on_frame(self, msg: Msg) -> None:
        try:
            frame = decode_frame(msg.data)
        except ProtocolError:
            return
        self.hub.route_remote(Delivery(frame, msg.data))
        if self.hub.backlog:  # a receiver's sender task waits for a turn (see relay.server)
            self.hub.backlog = False
            await asyncio.sleep(0)

    async def _on_report(self, msg: Msg) -> None:
        try:
            report = Report.model_validate_json(msg.data)
        except ValidationError:
            return
        self.hub.remote_report(report)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            heartbeat = decode(msg.data)
        except ValidationError:
            return
        if not isinstance(heartbeat, Heartbeat) or heartbeat.node == self.node:
            return
        if heartbeat.bye:
            self.view.heard(heartbeat, time.monotonic())
            log.info("node %s left the cluster", heartbeat.node)
            self._node_gone(heartbeat.node)
            self._settle_owners()
            return
        if self.view.heard(heartbeat, time.monotonic()):
            log.info("node %s joined the cluster", heartbeat.node)
        self._sync_proxies(heartbeat)
        self._settle_owners()

    async def _on_request(self, msg: Msg) -> None:
        """Another node's request about one of our workers."""
        try:
            request = decode(msg.data)
        except ValidationError:
            return
        match request:
            case AssignWorker():
                ok, reason = self._serve(request)
                if msg.reply:
                    with contextlib.suppress(NatsError):
                        await msg.respond(encode(Reply(ok=ok, reason=reason)))
            case ReleaseWorker() if self._served.get(request.channel) == request.home:
                del self._served[request.channel]
                self.hub.unserve_remote(request.channel)
            case UpdateParams() if self._served.get(request.channel) == request.home:
                self.hub.remote_params(request.channel, request.params, request.version)
            case UpdateParams():  # a node whose producers changed the params of a channel we own
                channel = self.hub.channels.get(request.channel)
                if channel is not None and channel.owner is None and not channel.remote:
                    self.hub.set_params(channel, request.params, replace=True)

    def _serve(self, request: AssignWorker) -> tuple[bool, str]:
        worker = next((w for w in self.hub.workers if w.id == request.worker), None)
        if worker is None or worker.id in self._proxies:
            return False, "no such worker here"
        if not self.view.alive(request.home):
            return False, f"node {request.home} is unknown here"
        if not self.hub.serve_remote(request.channel, worker, request.params, request.version):
            return False, "the worker has no room for it"
        self._served[request.channel] = request.home
        return True, ""

    # -- channel owners: one node gives each channel its worker -----------------

    def _claim(self, channel: Channel) -> Claim | None:
        """This node's claim to give ``channel`` a worker: while it wants one, and not for another node."""
        if channel.remote or not channel.wants_worker:
            return None
        return Claim(
            producers=bool(channel.producers),
            state=channel.engine_state,
            worker=channel.worker.id if channel.worker else None,
            fps_in=round(channel.frames_in.rate(), 2),
            fps_out=round(channel.frames_out.rate(), 2),
        )

    def _settle_owners(self) -> None:
        """Follow the owner of each channel this node would serve, as the claims now heard decide.

        Two nodes may both have given a channel a worker before they heard
        each other (producers joining both at once): the one that is not the
        owner releases its worker here.
        """
        for channel in list(self.hub.channels.values()):
            claim = self._claim(channel)
            if claim is None:
                continue
            node, theirs = self.view.owner(channel.name, claim, channel.home)
            self.hub.set_owner(channel, None if node == self.node else node)
            if channel.owner is not None and theirs is not None:
                channel.engine_state = theirs.state  # what the owner's worker said last
                channel.owner_stats = {
                    "fps_in": theirs.fps_in,
                    "fps_out": theirs.fps_out,
                    "worker": theirs.worker,
                }
            else:
                channel.owner_stats = None

    # -- proxies: the other nodes' workers, in our hub -------------------------

    def _sync_proxies(self, heartbeat: Heartbeat) -> None:
        """Make the hub's proxies of ``heartbeat.node``'s workers match what it says."""
        now, grew = time.monotonic(), False
        listed = set()
        for info in heartbeat.workers:
            listed.add(info.id)
            proxy = self._proxies.get(info.id)
            free = max(0, info.free_for(self.node))
            if proxy is None:
                self._add_proxy(heartbeat.node, info, free)
                continue
            grew |= free > proxy.capacity
            proxy.capacity, proxy.pinned = free, frozenset(info.pinned)
            for name in list(proxy.assigned):
                confirmed = self._confirmed.get((proxy.id, name))
                lost = info.channels.get(name) != self.node
                if lost and confirmed is not None and now - confirmed > self.config.cluster_dead_after_s:
                    log.info("worker %s no longer serves %s (its node says): reassigning", proxy.id, name)
                    del self._confirmed[(proxy.id, name)]
                    self.hub.unassign(proxy, name)
        for worker, node in list(self._proxy_node.items()):
            if node == heartbeat.node and worker not in listed:
                self._drop_proxy(worker)
        if grew:
            self.hub.refresh()

    def _add_proxy(self, node: str, info: WorkerInfo, free: int) -> None:
        proxy = Peer(
            id=info.id,
            role=Role.WORKER,
            channel=DEFAULT_CHANNEL,
            capacity=free,
            pinned=frozenset(info.pinned),
            name=info.name or f"{node}/{info.id}",
            engine=info.engine,
            outbox=Outbox(self.config.control_queue),
        )
        proxy.outbox.fast_send = _discard
        self._proxies[info.id], self._proxy_node[info.id] = proxy, node
        self._spawn(self._forward(proxy, node))
        self.hub.join(proxy)

    def _drop_proxy(self, worker: str) -> None:
        proxy = self._proxies.pop(worker)
        del self._proxy_node[worker]
        for key in [k for k in self._confirmed if k[0] == worker]:
            del self._confirmed[key]
        self.hub.leave(proxy)  # its channels go to other workers, as when a local one leaves
        proxy.outbox.close()

    async def _forward(self, proxy: Peer, node: str) -> None:
        """What the hub tells a proxy worker, as requests to its node, in order."""
        subject = node_subject(node)
        while True:
            messages, _ = await proxy.outbox.take()
            for message in messages:
                if isinstance(message, Message):
                    await self._forward_one(proxy, subject, message)
            if proxy.outbox.closed:
                return

    async def _forward_one(self, proxy: Peer, subject: str, message: Message) -> None:
        match message:
            case Assign():
                request = AssignWorker(**message.model_dump(), home=self.node, worker=proxy.id)
                # our claim first (one connection keeps order): the worker's node sees why we ask
                await self._heartbeat()
                reply = await self._request(subject, encode(request))
                if reply is not None and reply.ok:
                    self._confirmed[(proxy.id, message.channel)] = time.monotonic()
                    return
                log.info(
                    "worker %s refused channel %s: %s",
                    proxy.id,
                    message.channel,
                    reply.reason if reply else "no answer",
                )
                # full until its node's next heartbeat says otherwise
                proxy.capacity = sum(1 for name in proxy.assigned if name != message.channel)
                self.hub.unassign(proxy, message.channel)
            case Release():
                self._confirmed.pop((proxy.id, message.channel), None)
                await self._publish(subject, encode(ReleaseWorker(**message.model_dump(), home=self.node)))
            case ChannelParams():
                update = UpdateParams(**message.model_dump(), home=self.node)
                await self._publish(subject, encode(update))

    async def _request(self, subject: str, data: bytes) -> Reply | None:
        if not self.nc.is_connected:
            return None
        try:
            msg = await self.nc.request(subject, data, timeout=self.config.cluster_dead_after_s)
            reply = decode(msg.data)
        except (NatsError, ValidationError):
            return None
        return reply if isinstance(reply, Reply) else None

    # -- nodes gone ------------------------------------------------------------

    def _node_gone(self, node: str) -> None:
        """``node`` left or went silent: drop its workers, give back what we served for it."""
        for worker, owner in list(self._proxy_node.items()):
            if owner == node:
                self._drop_proxy(worker)
        for name, home in list(self._served.items()):
            if home == node:
                del self._served[name]
                self.hub.unserve_remote(name)

    def _drop_orphans(self) -> None:
        """Channels we served for another node whose worker left here: that node finds another."""
        for name in list(self._served):
            channel = self.hub.channels.get(name)
            if channel is None or not channel.remote or channel.worker is None:
                del self._served[name]
                self.hub.unserve_remote(name)
