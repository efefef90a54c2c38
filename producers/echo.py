"""A minimal worker that returns every input frame unchanged.

For tests and for checking a relay (its routing, its overhead) without a
GPU or an engine: the image bytes are not even decoded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.exceptions import ConnectionClosed

from producers.net import open_relay
from wire.frames import FrameKind, decode_frame, encode_frame


async def run_echo_worker(
    url: str,
    *,
    token: str | None = None,
    capacity: int = 16,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    seen: list[dict[str, Any]] | None = None,
) -> int:
    """Echo frames until ``stop`` is set or the relay closes; return how many were echoed.

    ``ready`` is set once the relay has accepted the worker; ``seen`` collects
    the control messages it received (``assign``, ``params``...).
    """
    ws, _welcome = await open_relay(
        url, "worker", "default", token, capacity=capacity, name="echo", engine="echo"
    )
    if ready is not None:
        ready.set()
    versions: dict[str, int] = {}
    echoed = 0

    async def close_on_stop() -> None:
        if stop is not None:
            await stop.wait()
            await ws.close()

    closer = asyncio.create_task(close_on_stop())
    try:
        async for message in ws:
            if isinstance(message, str):
                msg = orjson.loads(message)
                if seen is not None:
                    seen.append(msg)
                if msg.get("type") in ("assign", "params"):
                    versions[msg["channel"]] = int(msg.get("version", 0))
                continue
            frame = decode_frame(message)
            if frame.kind is not FrameKind.INPUT:
                continue
            out = frame.as_output(
                frame.payload, frame.format, frame.width, frame.height, versions.get(frame.channel, 0)
            )
            await ws.send(encode_frame(out))
            echoed += 1
    except ConnectionClosed:
        pass
    finally:
        closer.cancel()
        await ws.close()
    return echoed
