"""The web page at ``/``, the viewer at ``/view/{playback_id}``: static files, no build step.

``GET /web/params-schema`` tells the page what a stream accepts: the JSON
schema of a create request's ``params`` (so the page's controls are the
API's own fields, bounds and defaults), which fields need a reload, the
server's effective defaults, and suggestions for the free-text ids (known
models, ControlNets, preprocessors). It names no stream and needs no key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from api.server.services import services
from api.streams.manager import validate_params
from api.streams.schemas import CreateStream
from worker.engines.diffusion.families import MODELS, NAMES, Family
from worker.engines.diffusion.params import RELOAD_FIELDS

STATIC = Path(__file__).parent / "static"
router = APIRouter()
NO_CACHE = {"Cache-Control": "no-cache"}

#: ControlNets Daydream names for each model family (suggestions: any hub id or local path is accepted)
CONTROLNETS: dict[Family, list[str]] = {
    "sd21": [
        f"thibaud/controlnet-sd21-{kind}-diffusers" for kind in ("openpose", "hed", "canny", "depth", "color")
    ],
    "sd15": [
        "lllyasviel/control_v11f1p_sd15_depth",
        "lllyasviel/control_v11f1e_sd15_tile",
        "lllyasviel/control_v11p_sd15_canny",
    ],
    "sdxl": [f"xinsir/controlnet-{kind}-sdxl-1.0" for kind in ("depth", "canny", "tile")],
}
#: preprocessor and processing-block names Daydream documents (suggestions; the worker checks)
PROCESSORS = [
    "passthrough",
    "canny",
    "depth",
    "hed",
    "lineart",
    "openpose",
    "soft_edge",
    "standard_lineart",
    "blur",
    "sharpen",
    "color",
    "upscale",
    "feedback",
    "latent_feedback",
]
#: what a change of these structured fields reloads (the rest of them is hot)
RELOAD_PARTS = {
    "controlnets": "adding or removing a ControlNet, or changing its model or preprocessor, reloads; "
    "its scale and guidance window are hot",
    "ip_adapter": "turning IP-Adapter on or off, or changing its type, reloads; its scale is hot",
}


def params_schema(defaults: dict[str, Any]) -> dict[str, Any]:
    """The body of ``GET /web/params-schema`` for a server whose default params are ``defaults``."""
    body = CreateStream.model_json_schema()
    params = body["properties"]["params"]["anyOf"][0]["$ref"].rsplit("/", 1)[1]
    return {
        "schema": {**body["$defs"][params], "$defs": body["$defs"]},
        "reload_fields": sorted(RELOAD_FIELDS),
        "reload_parts": RELOAD_PARTS,
        "defaults": validate_params(dict(defaults)),
        "models": [{"id": model, "family": NAMES[family]} for model, family in MODELS.items()],
        "controlnets": {NAMES[family]: ids for family, ids in CONTROLNETS.items()},
        "model_families": {model: NAMES[family] for model, family in MODELS.items()},
        "processors": PROCESSORS,
    }


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=NO_CACHE)


@router.get("/view/{playback_id}", include_in_schema=False)
async def view(playback_id: str) -> FileResponse:
    """The output alone, full window (OBS Browser Source); the page retries until the stream exists."""
    return FileResponse(STATIC / "view.html", headers=NO_CACHE)


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


@router.get("/web/params-schema", include_in_schema=False)
async def schema(request: Request) -> dict[str, Any]:
    return params_schema(services(request).config.default_stream_params())


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
