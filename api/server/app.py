"""The ASGI application: REST API, media endpoints, and the relay it hosts.

``create_app`` mounts the routes; its lifespan runs :func:`start_services`,
the one place that builds the server's parts (relay, streams, outputs,
WebRTC, metrics, local workers) in order and stops them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI

from api import webrtc
from api.ingest import websocket as ws_ingest
from api.playback import mjpeg, outputs
from api.seeds.routes import router as seeds_router
from api.seeds.settings001 import seed001_options
from api.seeds.state import SeedState
from api.server import errors, metrics
from api.server.config import Config
from api.server.doors import DoorGuard, Doors
from api.server.farewell import Farewells
from api.server.health import VERSION
from api.server.limits import BodyLimit
from api.server.services import Services
from api.server.workers import LocalWorkers
from api.streams import ids
from api.streams.manager import StreamManager
from api.streams.routes import router, v1
from api.streams.store import StreamStore
from api.web import page

if TYPE_CHECKING:
    from api.streams.shared import SharedStreams
from relay import Relay

log = logging.getLogger("api")


def create_app(config: Config | None = None, relay_socket: socket.socket | None = None) -> FastAPI:
    """The app for ``config``; ``relay_socket``: the relay's listening socket, bound by the caller.

    ``app.state.ready`` is set once the lifespan has started every service.
    """
    config = config or Config()
    if not config.server.api_keys:
        config.server.api_keys = [ids.api_key()]
    farewells = Farewells()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with start_services(config, relay_socket, farewells) as running:
            app.state.services = running
            app.state.ready.set()
            try:
                yield
            finally:
                app.state.ready.clear()

    app = FastAPI(title="StreamDiffusion server", version=VERSION, lifespan=lifespan)
    app.state.config = config
    app.state.farewells = farewells
    app.state.ready = asyncio.Event()
    errors.install(app)
    app.add_middleware(
        BodyLimit, max_bytes=config.server.max_body_bytes, timeout=config.server.body_timeout_s
    )
    # outermost: a request over the caps, or a WebSocket from a foreign origin, goes no further
    app.state.doors = Doors(config.server.max_connections_per_client, config.server.max_websockets_per_client)
    app.add_middleware(
        DoorGuard, doors=app.state.doors, api_keys=config.server.api_keys, origins=config.server.origins
    )
    for routes in (
        metrics.router,
        router,
        v1,
        ws_ingest.router,
        outputs.router,
        webrtc.router,
        mjpeg.router,
        seeds_router,
    ):  # seeds: seed 000's /ws, seed 001's /api/*
        app.include_router(routes)
    page.install(app)
    return app


@contextlib.asynccontextmanager
async def start_services(
    config: Config, relay_socket: socket.socket | None, farewells: Farewells
) -> AsyncIterator[Services]:
    """Start order: relay, streams and what follows them (outputs, WebRTC), metrics, the streams
    kept in ``server.data_dir`` (none without one), local workers.

    Stopped in reverse: streams first (their outputs and sessions end with
    them; their records stay), then the workers, then the relay, which tells
    its clients.
    """
    relay_config = config.relay_config()
    if not relay_config.tokens:  # a token of this run's own, so that /v1 channels still need one (or the key)
        relay_config = dataclasses.replace(
            relay_config,
            tokens=frozenset({secrets.token_urlsafe(32)}),
            open_channels=relay_config.accepts_open_channels,
        )
    relay_token = next(iter(relay_config.tokens))  # to workers and outputs by environment, never argv
    relay = Relay(relay_config, sock=relay_socket)
    await relay.start()
    host = "127.0.0.1" if relay_config.host in ("0.0.0.0", "::", "") else relay_config.host
    relay_url = f"ws://{host}:{relay.port}"
    node, local_store, shared = "", None, None
    if relay.backplane is not None:  # a cluster: the streams are the cluster's, in NATS
        from api.streams.shared import SharedStreams  # nats-py: the cluster extra

        node = relay.backplane.node
        shared = await SharedStreams.open(
            relay.backplane.nc, config.server.cluster_streams_bucket, config.server.cluster_streams_replicas
        )
    elif config.server.data_dir:
        local_store = StreamStore.in_directory(config.server.data_dir)
    streams = StreamManager(relay.hub, shared or local_store, node)
    backplane = relay.backplane
    pushes_here = (
        (lambda stream: not stream.node or backplane.pusher(stream.channel, stream.node) == node)
        if backplane is not None
        else None
    )
    stream_outputs = outputs.outputs_for(config, relay_url, relay_token, pushes_here)
    streams.subscribe(stream_outputs)
    webrtc_state = webrtc.webrtc_state(config)
    streams.subscribe(webrtc_state.registry)
    workers = LocalWorkers(config.workers.count, config.workers.args)
    running = Services(
        config=config,
        relay=relay,
        relay_url=relay_url,
        relay_token=relay_token,
        streams=streams,
        outputs=stream_outputs,
        webrtc=webrtc_state,
        metrics=metrics.Metrics(relay.hub, webrtc_state),
        workers=workers,
        farewells=farewells,
        seeds=SeedState(seed001_options(config)),
    )
    following: asyncio.Task[None] | None = None
    try:
        restored = await streams.restore()
        if restored:
            where = local_store.path if local_store else f"bucket {config.server.cluster_streams_bucket}"
            log.info("restored %d streams from %s", restored, where)
        if shared is not None:
            following = asyncio.create_task(_follow_cluster(streams, shared, stream_outputs))
        for named in config.server.named_streams:
            params = {**config.stream_defaults(), **named.params}
            await streams.ensure_named(named.name, named.stream_key, params)
        for note in config.inert_options():
            log.warning("%s", note)
        await workers.start(config.launch_options(relay_url), relay_token)
        yield running
    finally:
        if following is not None:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
        await streams.stop_all()
        await workers.stop()
        await relay.close()
        if local_store is not None:
            local_store.close()


#: how often a cluster node checks which stream pushes (RTMP, republishing) are its to run
PUSHERS_CHECK_S = 1.0


async def _follow_cluster(
    streams: StreamManager, shared: SharedStreams, stream_outputs: outputs.Outputs
) -> None:
    """A cluster node's part: the streams other nodes change, and the pushes that move to or from
    this node as nodes come and go.
    """

    async def pushers() -> None:
        while True:
            await asyncio.sleep(PUSHERS_CHECK_S)  # a reconciliation period, not a wait for an event
            await stream_outputs.follow_pushers(streams.streams.values())

    async with asyncio.TaskGroup() as group:
        group.create_task(streams.follow(shared.changes()))
        group.create_task(pushers())
