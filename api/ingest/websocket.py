"""WebSocket ingest for a ``/v1/streams`` stream: the browser page's non-WebRTC path.

``ws(s)://host/live/video-to-video/{stream_key}/ws``: the stream key is the
credential, as for WHIP. The client sends images as binary messages, either
bare JPEG/PNG bytes or frames of the relay protocol (``docs/protocol.md``);
it receives each result as a relay-protocol frame (32-byte header with the
sequence number and params version, then the JPEG). Errors come back as
``{"type": "error", ...}`` and the connection goes on, except for a message
larger than any frame may be (the relay's ``max_frame_bytes``, plus a frame
header): ``frame_too_large`` naming the limit, then close 1009 (message too
big), as seed 000 does. Text messages are reserved for control messages, of
which none are defined yet: each gets a ``bad_message`` error. Like every relay peer
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
from wire.frames import HEADER_SIZE, MAGIC, decode_frame
from wire.messages import Receive, Role, encode_control
from wire.relay_messages import Error, Shutdown

router = APIRouter()

#: the close code when the stream ends: 1001 "going away"
CLOSE_STREAM_ENDED = 1001
#: the close code after a message over the frame limit: 1009 "message too big"
CLOSE_TOO_BIG = 1009
STREAM_ENDED = "stream ended (deleted, or stopped by the server)"
TEXT_REFUSED = "text messages are not accepted here: send images (or relay frames) as binary messages"


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
            if receiver.done() and not receiver.cancelled() and receiver.exception() is None:
                too_big = receiver.result()
                if too_big is not None:
                    session.close()
                    sender.cancel()  # the socket's only writer from now on is this task
                    await asyncio.gather(sender, return_exceptions=True)
                    await _close_too_big(websocket, too_big)
            elif ended.done():
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


async def _close_too_big(websocket: WebSocket, error: Error) -> None:
    """Say which limit, then close with 1009; a client already gone is no error."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_text(encode_control(error))
        await websocket.close(code=CLOSE_TOO_BIG, reason="frame too large")


def _oversize(data: bytes, limit: int) -> Error | None:
    """``frame_too_large`` for a message whose image is over ``limit`` bytes (a frame's header aside)."""
    size = len(data) - HEADER_SIZE if data[:2] == MAGIC else len(data)
    if size <= limit:
        return None
    return Error(
        code=ErrorCode.FRAME_TOO_LARGE,
        message=f"a frame of {size} bytes is over the limit of {limit} bytes (max_frame_bytes)",
    )


async def _receive(websocket: WebSocket, session: LocalSession) -> Error | None:
    """Publish what the client sends until it leaves (None) or sends a message over the frame limit
    (the error to close with)."""
    limit = session.hub.config.max_frame_bytes
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return None
            data = message.get("bytes")
            if data is None:  # text is reserved for control messages; none are defined yet
                session.post(Error(code=ErrorCode.BAD_MESSAGE, message=TEXT_REFUSED))
                continue
            if (too_big := _oversize(data, limit)) is not None:
                return too_big
            try:
                _publish(session, data)
            except ProtocolError as exc:
                session.post(Error.of(exc))  # after the messages already on their way
    return None  # the client went away


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
