"""The seed routers in one, plus seed 001's HTTP endpoints.

``create_app`` includes :data:`router`; it carries seed 000's ``/ws``, seed
001's ``/api/ws/{userId}`` and the HTTP side of seed 001, all open, keyed or
off as ``server.seed_endpoints`` says (:mod:`api.seeds.access`):

* ``GET /api/settings``: ``info``, ``input_params``, ``max_queue_size``,
  ``page_content`` (see :mod:`api.seeds.settings001`);
* ``GET /api/queue``: ``{"queue_size": <connected users>}``;
* ``GET /api/stream/{userId}?quality=85&max_fps=30``: the user's results as
  MJPEG at ``quality`` (default: ``performance.jpeg_quality``; ``api.playback.mjpeg``:
  boundary ``frame``, newest frame wins), from the request on until the
  client leaves or the user's session ends. Unknown
  users get 404 ``{"detail": "User not found"}``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.playback.mjpeg import MjpegResponse, mjpeg_stream
from api.seeds import ws000, ws001
from api.seeds.access import require_seed_access
from api.seeds.params import initial_params
from api.seeds.settings001 import settings_body
from api.server.services import services

router = APIRouter()
router.include_router(ws000.router)
router.include_router(ws001.router)


@router.get("/api/settings", dependencies=[Depends(require_seed_access)])
async def seed001_settings(request: Request) -> JSONResponse:
    running = services(request)
    return JSONResponse(settings_body(running, initial_params(running.config.default_stream_params())))


@router.get("/api/queue", dependencies=[Depends(require_seed_access)])
async def seed001_queue(request: Request) -> JSONResponse:
    return JSONResponse({"queue_size": len(services(request).seeds.sessions)})


@router.get("/api/stream/{user_id}", response_model=None, dependencies=[Depends(require_seed_access)])
async def seed001_stream(
    request: Request,
    user_id: str,
    quality: int | None = Query(
        None, ge=1, le=100, description="JPEG quality; default: the server's performance.jpeg_quality"
    ),
    max_fps: float = Query(30.0, gt=0, le=120),
) -> MjpegResponse | JSONResponse:
    running = services(request)
    session = running.seeds.sessions.get(user_id)
    if session is None:
        return JSONResponse({"detail": "User not found"}, status_code=404)
    reencode = _reencode_quality(quality, running.config.performance.jpeg_quality)
    stream = mjpeg_stream(running.hub, session.channel.name, reencode, max_fps)
    session.streams.add(stream)
    return MjpegResponse(stream)


def _reencode_quality(asked: int | None, configured: int) -> int | None:
    """The quality to re-encode at, or None: the workers' own JPEGs (made at ``configured``, seed
    001's ``performance.jpeg_quality``) pass through untouched when no other quality is asked."""
    return None if asked is None or asked == configured else asked
