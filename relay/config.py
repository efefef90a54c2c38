"""Relay limits and access settings, all explicit and overridable from the CLI."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

DEFAULT_PORT = 8765
#: relay tokens (comma-separated) for every command: relay, worker, producers, viewer
TOKEN_ENV = "RELAY_TOKEN"


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
    #: when non-empty, the only channel names clients may join.
    allowed_channels: frozenset[str] = field(default_factory=frozenset)
    #: pending control messages kept per peer before the oldest is dropped.
    control_queue: int = 64
    #: bind beyond loopback without tokens (refused unless set).
    insecure: bool = False

    @property
    def websocket_max_size(self) -> int:
        """Hard limit for the socket layer: above ``max_frame_bytes`` so that an
        oversize frame gets our ``frame_too_large`` error, not a closed socket."""
        return self.max_frame_bytes + max(self.max_frame_bytes, 1024 * 1024)

    def limits(self) -> dict[str, int]:
        return {"max_frame_bytes": self.max_frame_bytes, "max_width": self.max_width,
                "max_height": self.max_height, "max_channels": self.max_channels}

    def check(self) -> None:
        """Refuse to listen beyond loopback with no tokens unless told to."""
        if self.tokens or self.insecure or is_loopback(self.host):
            return
        raise ValueError(
            f"refusing to listen on {self.host} without tokens: pass --token "
            "(or set RELAY_TOKEN), or --insecure to accept anyone")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
