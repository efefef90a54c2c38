"""What the hub tells a backplane: the few events other relay nodes must hear about.

A relay on its own has none (``Hub.backplane`` is None and nothing here is
called). With ``--nats`` the hub gets a :class:`relay.cluster.NatsBackplane`,
which does the I/O and calls the hub back (``route_remote``,
``serve_remote``...). Every method here is called from the hub's own code
paths, synchronously: it must only queue work, never wait; :meth:`status`
is read by the API (``/health``, ``/metrics``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from wire.messages import Report

if TYPE_CHECKING:
    from relay.cluster.view import ClusterStatus
    from relay.hub import Channel, Delivery


class Backplane(Protocol):
    def share(self, delivery: Delivery) -> None:
        """A local producer's input or a local worker's output, routed here: for the other nodes."""

    def report(self, report: Report) -> None:
        """A local worker's report (already applied here): for the channel's other nodes."""

    def owner(self, channel: Channel) -> str | None:
        """The other node that gives ``channel`` its worker, or None when this one does."""

    def forward_params(self, channel: Channel) -> None:
        """A channel another node owns got new params here (its producers'): for that node."""

    def changed(self) -> None:
        """Peers, channels or assignments changed: heartbeat and subscriptions are due."""

    def status(self) -> ClusterStatus:
        """What this node sees of the cluster (read by ``/health`` and ``/metrics``; changes nothing)."""
