"""Servers for ``bench/relay.py``, each run in its own process.

* ``relay``: this project's relay (:class:`relay.Relay`), compression off.
* ``bare``: the limit. A minimal websockets server that forwards every binary
  message of a producer to the viewers of the same channel, unparsed
  (``compression=None``). The channel is the URL path, the role ``?role=``.
* ``naive`` / ``naive-plain``: the baseline that seed 002 describes. Clients
  send ``{"type":"image","format":"jpeg","data":<base64>,"timestamp":t}``;
  the server parses it with the stdlib ``json``, sends
  ``{"type":"ack","status":"received"}`` to the sender, then relays the
  message to every other client of the same URL path, one ``await send``
  after another. ``naive`` keeps the websockets defaults (per-message deflate
  ON, as a naive implementation would); ``naive-plain`` is the same code with
  ``compression=None``, to show how much of the gap deflate alone explains.
  The relayed message is the received text as is (re-serialising it with
  ``json.dumps`` would only make the baseline slower).

:func:`server_process` is the ``multiprocessing`` target: it runs the server
on uvloop (when installed), reports the port through a pipe and stops when the
parent sends anything down that pipe, optionally under ``cProfile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import defaultdict
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import websockets
from websockets.exceptions import ConnectionClosed

SERVERS = ("relay", "bare", "naive", "naive-plain")
ACK = {"type": "ack", "status": "received"}


def _path(ws: Any) -> tuple[str, dict[str, str]]:
    parts = urlsplit(ws.request.path if ws.request else "/")
    return parts.path.strip("/") or "default", dict(parse_qsl(parts.query))


# -- the bare binary forwarder ----------------------------------------------


async def _start_bare() -> Any:
    viewers: dict[str, set[Any]] = defaultdict(set)

    async def handler(ws: Any) -> None:
        channel, query = _path(ws)
        if query.get("role") == "viewer":
            viewers[channel].add(ws)
            try:
                await ws.wait_closed()
            finally:
                viewers[channel].discard(ws)
            return
        subscribers = viewers[channel]
        async for message in ws:
            for viewer in list(subscribers):
                with contextlib.suppress(ConnectionClosed):
                    await viewer.send(message)

    return await websockets.serve(handler, "127.0.0.1", 0, compression=None, max_size=16 * 1024 * 1024)


# -- the naive base64 JSON relay of seed 002 --------------------------------


async def _start_naive(compression: str | None) -> Any:
    groups: dict[str, set[Any]] = defaultdict(set)

    async def handler(ws: Any) -> None:
        channel, _ = _path(ws)
        group = groups[channel]
        group.add(ws)
        try:
            async for message in ws:
                data = json.loads(message)
                if data.get("type") == "image":
                    await ws.send(json.dumps(ACK))
                    for other in list(group):
                        if other is not ws:
                            with contextlib.suppress(ConnectionClosed):
                                await other.send(message)
        except ConnectionClosed:
            pass
        finally:
            group.discard(ws)

    kwargs = {} if compression == "default" else {"compression": compression}
    return await websockets.serve(handler, "127.0.0.1", 0, **kwargs)  # max_size: default 1 MiB


# -- this project's relay ---------------------------------------------------


class _OurRelay:
    def __init__(self) -> None:
        from relay import Relay, RelayConfig

        self.relay = Relay(RelayConfig(host="127.0.0.1", port=0, max_channels=1024))

    async def start(self) -> _OurRelay:
        await self.relay.start()
        return self

    @property
    def sockets(self) -> Any:
        return self.relay._server.sockets  # only to read the port

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        await self.relay.close()


async def start_server(kind: str) -> Any:
    if kind == "relay":
        return await _OurRelay().start()
    if kind == "bare":
        return await _start_bare()
    if kind == "naive":
        return await _start_naive("default")
    if kind == "naive-plain":
        return await _start_naive(None)
    raise ValueError(f"unknown server {kind!r}: one of {', '.join(SERVERS)}")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def server_process(kind: str, conn: Any, profile_path: str | None = None) -> None:
    """Run server ``kind``; send ``(port, loop name)`` on ``conn``; stop on any message."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        server = await start_server(kind)
        port = server.sockets[0].getsockname()[1]
        conn.send((port, type(loop).__module__.split(".")[0]))

        def wait_for_parent() -> None:
            with contextlib.suppress(EOFError):
                conn.recv()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_parent, daemon=True).start()
        if profiler is not None:
            profiler.enable()
        await stop.wait()
        if profiler is not None:
            profiler.disable()
        server.close()
        with contextlib.suppress(Exception):  # a benchmark shutting down: nothing to save
            await asyncio.wait_for(server.wait_closed(), 3)

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(main())
    if profiler is not None:
        profiler.dump_stats(profile_path)
    with contextlib.suppress(OSError):
        conn.send("done")
