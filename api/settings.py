"""Server settings: HTTP, relay, local workers, API keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.config import RelayConfig


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    #: URL clients use to reach this server (for whip_url etc.); default: from each request
    public_url: str | None = None
    #: accepted ``Authorization: Bearer`` keys for ``/v1/*``; empty: one is generated and printed
    api_keys: frozenset[str] = field(default_factory=frozenset)
    relay: RelayConfig = field(default_factory=RelayConfig)
    workers: int = 1
    engine: str = "auto"
    worker_args: list[str] = field(default_factory=list)
