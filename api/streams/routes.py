"""``/health`` and the Daydream-compatible ``/v1/streams`` endpoints."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request

from api.server.errors import ApiError
from api.server.health import health_report
from api.server.services import services
from api.streams import style_image
from api.streams.auth import require_api_key
from api.streams.manager import Stream, StreamManager, validate_params
from api.streams.schemas import CreateStream, UpdateStream

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def manager(request: Request) -> StreamManager:
    return services(request).streams


def base_url(request: Request) -> str:
    return services(request).config.server.public_url or str(request.base_url).rstrip("/")


async def with_style_image(request: Request, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with its style image checked (format, bytes, pixel size) or fetched: 422 otherwise."""
    config = services(request).config
    limit = (config.relay.max_width, config.relay.max_height)  # a style image is no larger than a frame
    return await style_image.resolve(params, config.server.style_image_allow_private, limit)


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return health_report(services(request))


@v1.post("/streams", status_code=201)
async def create_stream(body: CreateStream, request: Request) -> dict[str, Any]:
    streams = manager(request)
    config = services(request).config
    given = await with_style_image(request, body.given_params())
    params = validate_params({**config.stream_defaults(), **given})
    stream = await streams.create(
        body.pipeline or body.pipeline_id or "streamdiffusion", params, body.name or "", body.output_rtmp_url
    )
    return stream.to_json(base_url(request))


@v1.get("/streams")
async def list_streams(request: Request) -> dict[str, Any]:
    url = base_url(request)
    return {"success": True, "data": [s.to_json(url) for s in manager(request).streams.values()]}


@v1.get("/streams/{stream_id}")
async def get_stream(stream_id: str, request: Request) -> dict[str, Any]:
    return manager(request).get(stream_id).to_json(base_url(request))


@v1.patch("/streams/{stream_id}")
async def update_stream(stream_id: str, body: UpdateStream, request: Request) -> dict[str, Any]:
    """Merge params; hot fields apply on the next frame, others reload while the old pipeline serves."""
    streams = manager(request)
    stream = streams.get(stream_id)
    patch = await with_style_image(request, body.params)
    await streams.update(stream, patch, name=body.name, output_rtmp_url=body.rtmp_change())
    return stream.to_json(base_url(request))


@v1.patch("/streams/{stream_id}/params")
async def update_params(
    stream_id: str, request: Request, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    """Hot params only (never reloads): a body of params, or ``{"params": {...}}``."""
    streams = manager(request)
    stream = streams.get(stream_id)
    patch = body["params"] if set(body) == {"params"} and isinstance(body["params"], dict) else body
    patch = await with_style_image(request, patch)
    await streams.update(stream, patch, hot_only=True)
    return {"success": True, "data": stream.to_json(base_url(request))}


@v1.get("/streams/{stream_id}/status")
async def stream_status(stream_id: str, request: Request) -> dict[str, Any]:
    streams = manager(request)
    stream = streams.get(stream_id)
    running = services(request)
    outputs = running.outputs.state(stream)
    outputs["whep"] = running.webrtc.playback_state(stream)
    data = streams.status(stream, base_url(request), outputs, running.config.server.degraded_input_fps)
    return {"success": True, "error": None, "data": data}


@v1.delete("/streams/{stream_id}")
async def delete_stream(stream_id: str, request: Request) -> dict[str, Any]:
    streams = manager(request)
    await streams.delete(streams.get(stream_id))
    return {"success": True, "data": {}}


@v1.delete("/streams")
async def delete_stream_by_query(request: Request, id: str | None = Query(default=None)) -> dict[str, Any]:
    if not id:
        raise ApiError(400, "missing 'id' query parameter", "REQUEST/BAD_REQUEST")
    return await delete_stream(id, request)


__all__ = ["Stream", "router", "v1"]
