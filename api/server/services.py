"""The server's running parts, built once by :func:`api.server.app.create_app`'s lifespan.

Routes reach them with :func:`services` (typed) instead of reading loose
attributes off ``app.state``. The lifespan shows the start order (and the
reverse stop order) in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from api.playback.outputs import Outputs
    from api.seeds.state import SeedState
    from api.server.config import Config
    from api.server.farewell import Farewells
    from api.server.metrics import Metrics
    from api.server.workers import LocalWorkers
    from api.streams.manager import StreamManager
    from api.webrtc.sessions import WebRTCState
    from relay import Relay
    from relay.hub import Hub


@dataclass
class Services:
    config: Config
    relay: Relay
    #: where the relay listens, as clients on this machine reach it
    relay_url: str
    #: the relay token this server's own clients present (configured, or generated at start)
    relay_token: str
    streams: StreamManager
    outputs: Outputs
    webrtc: WebRTCState
    metrics: Metrics
    workers: LocalWorkers
    farewells: Farewells
    #: the seed protocols' sessions and options
    seeds: SeedState

    @property
    def hub(self) -> Hub:
        return self.relay.hub


def services(where: HTTPConnection | FastAPI) -> Services:
    """The running services of the app serving ``where`` (a request, a WebSocket or the app itself)."""
    app = where if isinstance(where, FastAPI) else where.app
    found: Services | None = getattr(app.state, "services", None)
    if found is None:
        raise RuntimeError("the server is not started: services exist from the lifespan's startup on")
    return found
