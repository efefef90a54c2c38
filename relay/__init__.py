"""The relay: a WebSocket hub routing frames between producers, workers and viewers."""

from relay.config import RelayConfig
from relay.server import Relay, serve

__all__ = ["Relay", "RelayConfig", "serve"]
