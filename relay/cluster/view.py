"""Which relay nodes are alive, from their heartbeats; no I/O, the clock is passed in.

A node is alive while its heartbeats keep coming: unheard for ``dead_after``
seconds (a crash, a lost NATS connection), or saying ``bye``, it is gone,
and the channels its workers served are given to other workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.cluster.messages import Claim, Heartbeat, WorkerInfo, owner


@dataclass(frozen=True)
class NodeSeen:
    """Another node as this one sees it: no channel names (``/health`` shows it to anyone)."""

    name: str
    #: seconds since its last heartbeat (a node is gone after ``dead_after``)
    heartbeat_age_s: float
    workers: int
    #: its workers' slots, and those serving a channel (for any node), as its heartbeat says
    capacity: int
    used: int


@dataclass(frozen=True)
class ClusterStatus:
    """What a node sees of its cluster, for ``/health`` and ``/metrics``."""

    node: str
    #: its NATS connection is up (while it is down, the other nodes age, then are gone)
    connected: bool
    nodes: list[NodeSeen]
    #: the other nodes' workers in this node's hub (proxy workers), by id: their node
    worker_nodes: dict[str, str]
    #: frames replaced unsent on their way to NATS (newest-frame-wins), over its max_payload,
    #: and not published as no other node wanted them
    dropped: int = 0
    too_large: int = 0
    unwanted: int = 0


@dataclass
class ClusterView:
    node: str
    dead_after: float
    #: the other nodes: their last heartbeat and when it came (monotonic seconds)
    nodes: dict[str, tuple[Heartbeat, float]] = field(default_factory=dict)
    #: the frame subjects some other node subscribes to; None: a node that does not say (all)
    _wanted: set[str] | None = field(default_factory=set, repr=False)

    def heard(self, heartbeat: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True when its node is news (new, or back after it was dropped)."""
        new = heartbeat.node not in self.nodes
        if heartbeat.bye:
            self.nodes.pop(heartbeat.node, None)
        else:
            self.nodes[heartbeat.node] = (heartbeat, now)
        self._count_wanted()
        return new and not heartbeat.bye

    def expire(self, now: float) -> list[str]:
        """Drop and return the nodes unheard for ``dead_after`` seconds."""
        dead = [node for node, (_, seen) in self.nodes.items() if now - seen >= self.dead_after]
        for node in dead:
            del self.nodes[node]
        if dead:
            self._count_wanted()
        return dead

    def wanted(self, subject: str) -> bool:
        """Some other node subscribes to ``subject`` (as its last heartbeat said), or may."""
        return self._wanted is None or subject in self._wanted

    def _count_wanted(self) -> None:
        wanted: set[str] = set()
        for heartbeat, _ in self.nodes.values():
            if heartbeat.wants is None:
                self._wanted = None
                return
            wanted.update(heartbeat.wants)
        self._wanted = wanted

    def owner(self, channel: str, mine: Claim | None, home: str | None = None) -> tuple[str, Claim | None]:
        """The node that gives ``channel`` its worker, and its claim; ``mine``: this node's, if any;
        ``home``: the node that created it, a claimant while alive even before its heartbeat says so.

        With no claim anywhere (a node that only serves it) the answer is this node.
        """
        claims = {node: hb.homes[channel] for node, (hb, _) in self.nodes.items() if channel in hb.homes}
        if mine is not None:
            claims[self.node] = mine
            if home in self.nodes and home not in claims:
                claims[home] = Claim(producers=False)
        if not claims:
            return self.node, None
        node = owner(channel, claims, home)
        return node, claims[node]

    def pusher(self, channel: str, home: str) -> str:
        """The node that runs a stream's pushes (RTMP, republishing): ``home``, the node that created
        it, while it is alive; else one of the nodes holding ``channel`` (this one among them), the
        same on every node.
        """
        if self.alive(home):
            return home
        holders = {node for node, (hb, _) in self.nodes.items() if channel in hb.homes} | {self.node}
        return owner(channel, dict.fromkeys(holders, Claim(producers=False)))

    def alive(self, node: str) -> bool:
        return node == self.node or node in self.nodes

    def workers(self, node: str) -> list[WorkerInfo]:
        entry = self.nodes.get(node)
        return entry[0].workers if entry else []

    def seen(self, now: float) -> list[NodeSeen]:
        """The other nodes alive, by name, with what their last heartbeat said of their workers."""
        return [
            NodeSeen(
                name=node,
                heartbeat_age_s=max(0.0, now - heard),
                workers=len(heartbeat.workers),
                capacity=sum(w.capacity for w in heartbeat.workers),
                used=sum(len(w.channels) for w in heartbeat.workers),
            )
            for node, (heartbeat, heard) in sorted(self.nodes.items())
        ]
