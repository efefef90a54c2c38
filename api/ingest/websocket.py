"""WebSocket ingest for a ``/v1/streams`` stream: the browser page's non-WebRTC path.

``ws(s)://host/live/video-to-video/{stream_key}/ws``: the stream key is the
credential, as for WHIP. The client sends images as binary messages, either
bare JPEG/PNG bytes or frames of the relay protocol (``docs/protocol.md``);
it receives each result as a relay-protocol frame (32-byte header with the
sequence number and params version, then the JPEG). Errors come back as
``{"type": "error", ...}`` and the connection goes on. Like every relay peer
the client has a latest-frame-wins slot: a slow reader gets the newest
result, never a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from api.server.farewell import SHUTDOWN_TEXT
from relay.hub import Delivery
from relay.local import LocalProducer
from wire.errors import ProtocolError
from wire.frames import decode_frame
from wire.images import probe_image
from wire.messages import encode_control, error_message

router = APIRouter()


@router.websocket("/live/video-to-video/{stream_key}/ws")
async def ingest(websocket: WebSocket, stream_key: str) -> None:
    stream = websocket.app.state.streams.by_stream_key(stream_key)
    if stream is None:
        await websocket.close(code=1008, reason="unknown stream key")
        return
    await websocket.accept()
    hub = websocket.app.state.relay.hub
    producer = LocalProducer(hub, stream.channel, receive="output")
    sender = asyncio.create_task(_send_results(websocket, producer))
    goodbye = encode_control({"type": "shutdown", "message": SHUTDOWN_TEXT})
    try:
        with websocket.app.state.farewells.registered(lambda: websocket.send_text(goodbye)):
            await _receive(websocket, producer)
    finally:
        producer.close()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender


async def _receive(websocket: WebSocket, producer: LocalProducer) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                continue  # text is reserved for control messages; none are needed yet
            try:
                _publish(producer, data)
            except ProtocolError as exc:
                producer.peer.send(error_message(exc.code, str(exc)))


def _publish(producer: LocalProducer, data: bytes) -> None:
    if data[:2] == b"SD":
        frame = decode_frame(data)
        producer.publish(frame.payload, frame.width, frame.height, frame.format, frame.timestamp)
        return
    fmt, width, height = probe_image(data)
    producer.publish(data, width, height, fmt)


async def _send_results(websocket: WebSocket, producer: LocalProducer) -> None:
    async def send_frame(delivery: Delivery) -> None:
        await websocket.send_bytes(delivery.raw)

    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await producer.peer.outbox.drain(websocket.send_text, send_frame)


__all__ = ["router"]
