"""Which relay nodes are alive, from their heartbeats; no I/O, the clock is passed in.

A node is alive while its heartbeats keep coming: unheard for ``dead_after``
seconds (a crash, a lost NATS connection), or saying ``bye``, it is gone,
and the channels its workers served are given to other workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.cluster.messages import Heartbeat, WorkerInfo


@dataclass
class ClusterView:
    node: str
    dead_after: float
    #: the other nodes: their last heartbeat and when it came (monotonic seconds)
    nodes: dict[str, tuple[Heartbeat, float]] = field(default_factory=dict)

    def heard(self, heartbeat: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True when its node is news (new, or back after it was dropped)."""
        new = heartbeat.node not in self.nodes
        if heartbeat.bye:
            self.nodes.pop(heartbeat.node, None)
            return False
        self.nodes[heartbeat.node] = (heartbeat, now)
        return new

    def expire(self, now: float) -> list[str]:
        """Drop and return the nodes unheard for ``dead_after`` seconds."""
        dead = [node for node, (_, seen) in self.nodes.items() if now - seen >= self.dead_after]
        for node in dead:
            del self.nodes[node]
        return dead

    def alive(self, node: str) -> bool:
        return node == self.node or node in self.nodes

    def workers(self, node: str) -> list[WorkerInfo]:
        entry = self.nodes.get(node)
        return entry[0].workers if entry else []
