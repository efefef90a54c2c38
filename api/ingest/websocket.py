"""WebSocket ingest for a ``/v1/streams`` stream: the browser page's non-WebRTC path.

``ws(s)://host/live/video-to-video/{stream_key}/ws``: the stream key is the
credential, as for WHIP. The client sends images as binary messages, either
bare JPEG/PNG bytes or frames of the relay protocol (``docs/protocol.md``);
it receives each result as a relay-protocol frame (32-byte header with the
sequence number and params version, then the JPEG). Errors come back as
``{"type": "error", ...}`` and the connection goes on. Like every relay peer
the client has a latest-frame-wins slot: a slow reader gets the newest
result, never a backlog.

The connection lives no longer than its stream: when the stream ends
(``DELETE``, or the server stopping it) the session leaves the channel at
once (so the worker is released), then the client gets
``{"type": "error", "code": "unknown_channel", "message": "stream ended ..."}``
and the socket closes with code 1001 (going away). A key whose stream ended
while the socket was opening is closed the same way.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from api.server.farewell import SHUTDOWN_TEXT
from api.server.services import services
from relay.hub import Delivery
from relay.local import Closed, LocalSession
from wire.errors import ErrorCode, ProtocolError
from wire.frames import MAGIC, decode_frame
from wire.messages import Receive, Role, encode_control
from wire.relay_messages import Error, Shutdown

router = APIRouter()

#: the close code when the stream ends: 1001 "going away"
CLOSE_STREAM_ENDED = 1001
STREAM_ENDED = "stream ended (deleted, or stopped by the server)"


@router.websocket("/live/video-to-video/{stream_key}/ws")
async def ingest(websocket: WebSocket, stream_key: str) -> None:
    running = services(websocket)
    stream = running.streams.by_stream_key(stream_key)
    if stream is None:
        await websocket.close(code=1008, reason="unknown stream key")
        return
    await websocket.accept()
    if stream.ended.is_set():  # deleted while the socket was opening: do not bring the channel back
        await _stream_ended(websocket)
        return
    session = LocalSession(running.hub, stream.channel, Role.PRODUCER, Receive.OUTPUT)
    sender = asyncio.create_task(_send(websocket, session))
    receiver = asyncio.create_task(_receive(websocket, session))
    ended = asyncio.create_task(stream.ended.wait())
    goodbye = encode_control(Shutdown(message=SHUTDOWN_TEXT))
    try:
        with running.farewells.registered(lambda: websocket.send_text(goodbye)):
            await asyncio.wait({receiver, ended}, return_when=asyncio.FIRST_COMPLETED)
            if ended.done():
                session.close()  # leave the channel first: no more results, the worker released
                sender.cancel()
                receiver.cancel()
                await asyncio.gather(sender, receiver, return_exceptions=True)
                await _stream_ended(websocket)
    finally:
        session.close()
        for task in (sender, receiver, ended):
            task.cancel()
        await asyncio.gather(sender, receiver, ended, return_exceptions=True)


async def _stream_ended(websocket: WebSocket) -> None:
    """Say why, then close with 1001; a client already gone is no error."""
    message = encode_control(Error(code=ErrorCode.UNKNOWN_CHANNEL, message=STREAM_ENDED))
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_text(message)
        await websocket.close(code=CLOSE_STREAM_ENDED, reason="stream ended")


async def _receive(websocket: WebSocket, session: LocalSession) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                continue  # text is reserved for control messages; none are needed yet
            try:
                _publish(session, data)
            except ProtocolError as exc:
                session.post(Error.of(exc))  # after the messages already on their way


def _publish(session: LocalSession, data: bytes) -> None:
    """A relay-protocol frame (its header's claims checked) or bare image bytes, passed through as they
    are.
    """
    if data[:2] == MAGIC:
        frame = decode_frame(data)
        session.publish(frame.payload, frame.width, frame.height, frame.format, frame.timestamp)
    else:
        session.publish(data)  # the hub reads format and size


async def _send(websocket: WebSocket, session: LocalSession) -> None:
    """The session's events, translated: results as relay frames (their bytes as routed), messages as JSON."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        async for event in session.events():
            match event:
                case Delivery():
                    await websocket.send_bytes(event.raw)
                case Closed():
                    return
                case _:
                    await websocket.send_text(encode_control(event))


__all__ = ["router"]
