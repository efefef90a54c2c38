"""The ASGI application: REST API, media endpoints, and the relay it hosts.

``create_app`` wires everything; the lifespan starts the relay (a websockets
server on its own port, in the same event loop) and the local workers, and
stops them in reverse order, telling clients first.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator

from fastapi import FastAPI

from api import webrtc
from api.ingest import websocket as ws_ingest
from api.playback import mjpeg, outputs
from api.seeds.routes import router as seeds_router
from api.server import errors, metrics
from api.server.farewell import Farewells
from api.server.health import VERSION
from api.server.settings import ServerSettings
from api.server.workers import LocalWorkers
from api.streams import ids
from api.streams.manager import StreamManager
from api.streams.routes import router, v1
from api.web import page
from relay import Relay

log = logging.getLogger("api")


def create_app(settings: ServerSettings | None = None, relay_socket: socket.socket | None = None) -> FastAPI:
    """The app for ``settings``; ``relay_socket``: the relay's listening socket, bound by the caller."""
    settings = settings or ServerSettings()
    if not settings.api_keys:
        settings.api_keys = frozenset({ids.api_key()})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        relay = Relay(settings.relay, sock=relay_socket)
        await relay.start()
        host = "127.0.0.1" if settings.relay.host in ("0.0.0.0", "::", "") else settings.relay.host
        app.state.relay = relay
        app.state.relay_url = f"ws://{host}:{relay.port}"
        app.state.streams = StreamManager(relay.hub)
        workers = LocalWorkers(settings.workers, settings.engine, settings.worker_args)
        app.state.workers = workers
        await workers.start(app.state.relay_url, next(iter(settings.relay.tokens), None))
        for hook in app.state.startup_hooks:
            await hook(app)
        try:
            yield
        finally:
            await app.state.streams.close_all()
            await workers.stop()
            await relay.close()

    app = FastAPI(title="StreamDiffusion server", version=VERSION, lifespan=lifespan)
    app.state.settings = settings
    app.state.farewells = Farewells()
    app.state.startup_hooks = []
    app.state.stream_created_hooks = []
    errors.install(app)
    metrics.install(app)
    app.include_router(router)
    app.include_router(v1)
    app.include_router(ws_ingest.router)
    outputs.install(app)
    page.install(app)
    webrtc.install(app)  # WHIP/WHEP; closes sessions with their streams
    app.include_router(mjpeg.router)
    app.include_router(seeds_router)  # seed 000's /ws, seed 001's /api/*
    return app
