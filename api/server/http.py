"""Run the app under uvicorn on a socket we bind ourselves (so port 0 works and is known)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI

from api.server.guard import guarded_h11
from common.listen import listen


class GracefulServer(uvicorn.Server):
    """Says goodbye to WebSocket clients in their protocol before uvicorn closes
    them, and exits 0 after a requested shutdown (uvicorn re-raises SIGTERM,
    which makes the exit status -15)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        farewells = getattr(self.config.app.state, "farewells", None)
        if farewells is not None:
            await farewells.say_all()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # before the base class re-raises them


def uvicorn_server(app: FastAPI, log_level: str = "warning") -> uvicorn.Server:
    server = app.state.config.server
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        http=guarded_h11(server.header_timeout_s, app.state.doors),
        # above the frame limit, so an oversize frame reaches the app and gets an error
        # message naming the limit; beyond this the transport closes with 1009
        ws_max_size=app.state.config.relay_config().websocket_max_size,
        ws_per_message_deflate=False,  # deflate costs ~40x on JPEG frames
        access_log=False,
        # endless responses (MJPEG) would otherwise hold shutdown forever
        timeout_graceful_shutdown=2,
    )
    return GracefulServer(config)


@contextlib.asynccontextmanager
async def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop until the block ends; yields its base URL."""
    sock = listen(host, port)
    server = uvicorn_server(app)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    started = app.state.ready  # set by the lifespan once every service runs
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not started.is_set():
        waiter.cancel()
        task.result()  # raises the startup error
        raise RuntimeError("server stopped during startup")
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()
