"""Relay limits and access settings, all explicit and overridable from the CLI."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

DEFAULT_PORT = 8765
#: relay tokens (comma-separated) for every command: relay, worker, producers, viewer
TOKEN_ENV = "RELAY_TOKEN"
#: the largest message the project's clients (worker, producers, viewer, outputs) accept
#: (``relay.client.connect``'s ``max_size``): whatever the relay sends a peer must fit in it
PEER_MAX_SIZE = 64 * 1024 * 1024
#: room for a frame's header or a control message's envelope around its payload
_ENVELOPE = 64 * 1024


def token_from_environment() -> str | None:
    """The token a client sends: the first of ``$RELAY_TOKEN``'s comma-separated values."""
    return os.environ.get(TOKEN_ENV, "").split(",")[0].strip() or None


@dataclass(frozen=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: accepted tokens; empty means no token is needed (allowed on loopback only).
    tokens: frozenset[str] = field(default_factory=frozenset)
    #: largest encoded image a frame may carry.
    max_frame_bytes: int = 8 * 1024 * 1024
    max_width: int = 4096
    max_height: int = 4096
    max_channels: int = 256
    #: largest params message, and largest params a channel may hold once merged (JSON bytes);
    #: a worker's reports too.
    max_params_bytes: int = 256 * 1024
    #: when non-empty, the only channel names clients may join.
    allowed_channels: frozenset[str] = field(default_factory=frozenset)
    #: pending control messages kept per peer before the oldest is dropped.
    control_queue: int = 64
    #: bind beyond loopback without tokens (refused unless set).
    insecure: bool = False
    #: producers and viewers may join channels that have no key (every channel of a
    #: standalone relay; the API's seed channels) without a token. None: yes when no
    #: tokens are configured, else no.
    open_channels: bool | None = None
    #: browser origins allowed to open a WebSocket (``Origin`` header, e.g.
    #: ``https://app.example``); a handshake with any other Origin is refused (403).
    #: Clients that send no Origin (scripts, workers) are not concerned.
    origins: frozenset[str] = field(default_factory=frozenset)
    #: seconds a connection has to send its hello; a silent one then becomes a seed-002
    #: consumer if open channels are allowed, else it is closed.
    hello_timeout: float = 10.0
    #: connections one client address may hold, not counting those with the relay token.
    max_connections_per_ip: int = 64
    #: control (text) messages a connection may send per second, and in one burst; the
    #: excess is dropped (one ``rate_limited`` error). Frames are never counted.
    control_rate: float = 20.0
    control_burst: int = 40
    #: share of the workers' total capacity that anonymous channels (no key: the API's
    #: seed sessions, tokenless clients of a relay that has tokens) may hold: the rest is
    #: kept for keyed channels (the API's /v1 streams). At least one slot while no keyed
    #: channel exists; 1 turns the reserve off.
    anonymous_share: float = 0.5
    #: share of ``max_channels`` that anonymous network clients (no relay token, on a relay
    #: that has tokens) may open, rounded down: the rest is kept for the API's streams and
    #: sessions and for token holders. 1 turns the reserve off.
    anonymous_channel_share: float = 0.5
    #: seconds without input after which a channel gives its worker slot back (its params
    #: and its viewers stay; the next input frame asks for a worker again); 0: never.
    idle_release_s: float = 60.0
    #: NATS server URLs (comma-separated): join the relay nodes there, sharing channels,
    #: workers and viewers (:mod:`relay.cluster`; needs nats-py). Empty: a relay on its own.
    nats: str = ""
    #: this node's name in the cluster (letters, digits, - and _); empty: a random one
    node_name: str = ""
    #: seconds between a cluster node's heartbeats, and without one before it counts as gone
    #: (its workers' channels then go to other workers)
    cluster_heartbeat_s: float = 0.25
    cluster_dead_after_s: float = 1.0

    @property
    def websocket_max_size(self) -> int:
        """Hard limit for the socket layer: above ``max_frame_bytes`` so that an
        oversize frame gets our ``frame_too_large`` error, not a closed socket."""
        return self.max_frame_bytes + max(self.max_frame_bytes, 1024 * 1024)

    @property
    def accepts_open_channels(self) -> bool:
        """Whether a client without a token may join a channel that has no key."""
        return not self.tokens if self.open_channels is None else self.open_channels

    def limits(self) -> dict[str, int]:
        return {
            "max_frame_bytes": self.max_frame_bytes,
            "max_width": self.max_width,
            "max_height": self.max_height,
            "max_channels": self.max_channels,
        }

    def check(self) -> None:
        """Refuse settings the relay cannot honour.

        Beyond loopback, a relay that anyone could use (no tokens, or open
        channels) needs ``insecure``. Whatever the relay forwards (a frame,
        base64 for JSON peers; a channel's params) must fit in what its
        clients accept (:data:`PEER_MAX_SIZE`), so no client can get a worker
        dropped.
        """
        if (
            not (self.tokens and not self.accepts_open_channels)
            and not self.insecure
            and not is_loopback(self.host)
        ):
            what = "with open channels" if self.tokens else "without tokens"
            raise ValueError(
                f"refusing to listen on {self.host} {what}: pass --token "
                "(or set RELAY_TOKEN) and no --open-channels, or --insecure to accept anyone"
            )
        if (self.max_frame_bytes + 2) // 3 * 4 + _ENVELOPE > PEER_MAX_SIZE:
            raise ValueError(
                f"max_frame_bytes {self.max_frame_bytes} is too large: frames (base64 for "
                f"seed-002 peers) must fit in the {PEER_MAX_SIZE} bytes clients accept"
            )
        if self.max_params_bytes + _ENVELOPE > PEER_MAX_SIZE // 4:
            raise ValueError(
                f"max_params_bytes {self.max_params_bytes} is too large "
                f"(at most {PEER_MAX_SIZE // 4 - _ENVELOPE})"
            )
        if self.node_name and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.node_name):
            raise ValueError("node_name: 1-64 letters, digits, - or _")
        if not 0 < self.cluster_heartbeat_s * 2 <= self.cluster_dead_after_s:
            raise ValueError("cluster_dead_after_s must be at least twice cluster_heartbeat_s (> 0)")
        if self.idle_release_s < 0:
            raise ValueError("idle_release_s must be >= 0 (0: never)")
        if not 0 <= self.anonymous_share <= 1:
            raise ValueError("anonymous_share must be between 0 and 1")
        if not 0 <= self.anonymous_channel_share <= 1:
            raise ValueError("anonymous_channel_share must be between 0 and 1")
        if (
            self.hello_timeout <= 0
            or self.control_rate <= 0
            or self.control_burst < 1
            or self.max_connections_per_ip < 1
            or self.max_params_bytes < 1
        ):
            raise ValueError(
                "hello_timeout and control_rate must be > 0; control_burst, "
                "max_connections_per_ip and max_params_bytes >= 1"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
