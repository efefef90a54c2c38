"""Seed 000's ``/ws``: JSON control messages and binary frames on one socket.

The seed (``000_*.txt``) fixes the envelope ``{"type": ..., "data": {...}}``
and the flow; the field names inside ``data`` are ours, chosen to be
self-describing:

* on connect: ``{"type": "status", "data": {"status": "connected", "message",
  "session_id", "engine_state", "settings"}}``;
* ``{"type": "settings", "data": {...params}}`` is answered by
  ``{"type": "settings_updated", "data": {"success": true, "settings",
  "params_version", "ignored"}}``;
* a binary JPEG/PNG is answered by ``{"type": "processed_frame", "data":
  {"frame_id", "width", "height", "format", "size", "params_version",
  "processing_time_ms", "timestamp"}}`` immediately followed by the result's
  bytes; ``params_version`` >= the confirmed one means the new settings
  were used;
* problems are ``{"type": "error", "data": {"code", "message"}}`` and the
  connection goes on.

Only client messages are answered (plus engine errors), so a client that
reads strictly "send X, read the reply" never meets an unexpected message,
with one exception for a session that has to wait for a worker (every slot
busy): its frames are answered by ``waiting_for_worker`` errors that say
its place in the queue, and it hears ``{"type": "status", "data":
{"status": "waiting", "message", "queue_position", "slots_in_use",
"slots"}}`` whenever that place changes, then ``{"type": "status", "data":
{"status": "ready", ...}}`` when a worker takes it. A session idle for
``relay.idle_release_s`` gives its worker back; its next frame is published
all the same, which asks for a worker again (served at once if one is free).
Latest frame wins: frames are published as they arrive and the hub and
worker keep only the newest, so a client sending faster than the engine
gets fewer, fresher results instead of a growing delay.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket

from api.seeds.access import admit
from api.seeds.channel import Result, SessionChannel
from api.seeds.params import ParamsError, initial_params, merge_params
from api.seeds.socket import Outgoing, first_done, receive
from api.server.farewell import SHUTDOWN_TEXT
from api.server.services import services
from relay.local import Closed
from wire.errors import ErrorCode, ProtocolError
from wire.messages import Report, ReportEvent
from wire.relay_messages import ChannelState, Status

log = logging.getLogger("api.seeds")

router = APIRouter()


def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "data": {"code": code, "message": message, **extra}}


@router.websocket("/ws")
async def seed000_socket(websocket: WebSocket) -> None:
    if not await admit(websocket):
        return
    await websocket.accept()
    out = Outgoing(websocket)
    running = services(websocket)
    try:
        session = SessionChannel(running.hub, "ws000", initial_params(running.config.default_stream_params()))
    except (ParamsError, ProtocolError) as exc:
        await out.json(error("unavailable", f"cannot open a session: {exc}"))
        await out.close(1013, "try again later")
        return
    try:
        queue = session.queue_status  # said in the connect status: the session's events leave it out
        await out.json(
            {
                "type": "status",
                "data": {
                    "status": "connected",
                    "message": "Connected",
                    "session_id": session.name,
                    "engine_state": session.engine_state,
                    "settings": session.params,
                    **_queue_fields(queue),
                },
            }
        )
        goodbye = {"type": "status", "data": {"status": "shutdown", "message": SHUTDOWN_TEXT}}
        with running.farewells.registered(lambda: out.json(goodbye)):
            await first_done(_read(websocket, out, session), _pump(out, session, queue))
    finally:
        session.close()
        await out.close()


async def _read(websocket: WebSocket, out: Outgoing, session: SessionChannel) -> None:
    limit = session.hub.config.max_frame_bytes
    while (message := await receive(websocket)) is not None:
        if isinstance(message, bytes) and len(message) > limit:
            # larger than any frame may be: say so, then close (1009: message too big)
            await out.json(
                error(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"a frame of {len(message)} bytes is over the limit of {limit} bytes",
                    max_frame_bytes=limit,
                )
            )
            await out.close(1009, f"frames are limited to {limit} bytes")
            return
        reply = _frame(session, message) if isinstance(message, bytes) else _control(session, message)
        if reply is not None and not await out.json(reply):
            return


def _frame(session: SessionChannel, data: bytes) -> dict[str, Any] | None:
    """Publish one image; an error reply if it cannot be processed.

    An idle-released channel's frame is published all the same: input is what asks the hub
    for a worker again, and a free one gets this very frame.
    """
    if not session.has_worker and not session.idle:
        return _waiting(session)
    try:
        session.publish(data)
    except ProtocolError as exc:
        return error(exc.code or "bad_image", str(exc))
    return None if session.has_worker else _waiting(session)


def _waiting(session: SessionChannel) -> dict[str, Any]:
    """The error for a frame dropped because no worker serves the session (its queue place, if any)."""
    queue = session.queue_status
    detail = queue.detail if queue is not None else "no worker is free for this session yet"
    return error("waiting_for_worker", f"{detail}; frame dropped", **_queue_fields(queue))


def _control(session: SessionChannel, text: str) -> dict[str, Any]:
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return error("bad_json", f"not valid JSON: {exc}")
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return error("bad_message", 'expected {"type": ..., "data": {...}}')
    if message["type"] != "settings":
        return error(
            "unknown_type",
            f"unknown message type {message['type']!r}; send settings as JSON and frames as binary messages",
        )
    try:
        merged = merge_params(session.params, message.get("data") or {})
    except ParamsError as exc:
        return error("invalid_settings", str(exc), field=exc.field)
    version = session.set_params(merged.params) if merged.changed else session.params_version
    return {
        "type": "settings_updated",
        "data": {
            "success": True,
            "settings": merged.params,
            "params_version": version,
            "ignored": merged.ignored,
        },
    }


def _queue_fields(status: Status | None) -> dict[str, Any]:
    if status is None:
        return {}
    return {"queue_position": status.position, "slots_in_use": status.in_use, "slots": status.slots}


async def _pump(out: Outgoing, session: SessionChannel, told: Status | None) -> None:
    """Forward results (metadata, then bytes), engine errors and a waiting session's queue news
    (``told``: what the connect status said of the queue)."""
    waited = told is not None
    async for event in session.events(told):
        match event:
            case Result():
                await out.json_then_bytes(_processed(event), event.frame.payload)
            case Report(event=ReportEvent.ERROR):
                await out.json(error("engine_error", event.message))
            case Status(state=ChannelState.WAITING_FOR_WORKER):
                waited = True
                data = {"status": "waiting", "message": event.detail, **_queue_fields(event)}
                await out.json({"type": "status", "data": data})
            case Status(state=ChannelState.ASSIGNED) if waited:
                waited = False
                data = {"status": "ready", "message": "a worker is serving this session: send frames"}
                await out.json({"type": "status", "data": data})
            case Closed():
                return
        if out.closed:
            return


def _processed(result: Result) -> dict[str, Any]:
    frame = result.frame
    return {
        "type": "processed_frame",
        "data": {
            "frame_id": frame.seq,
            "width": frame.width,
            "height": frame.height,
            "format": frame.format.label,
            "size": len(frame.payload),
            "params_version": frame.params_version,
            "processing_time_ms": None if result.latency_s is None else round(result.latency_s * 1000, 2),
            "timestamp": frame.timestamp,
        },
    }
