"""Seed 001's ``GET /api/settings``: the description a frontend builds its page from.

The seed's frontend reads ``info.properties.input_mode.default`` (send
images or not), renders ``page_content`` as HTML, shows the queue when
``max_queue_size`` > 0, and builds its form from ``input_params.properties``:
one control per property chosen by ``field`` (``textarea``, ``range``,
``seed``, ``checkbox``, ``select``), bounded by ``min``/``max``/``step``,
folded away when ``hide``, keyed by ``id``, starting at ``default``. It then
sends every property back on every frame, so only fields that
``DiffusionParams`` accepts (and that need no reload) appear here, with the
server's effective defaults. Types, titles and bounds come from the
``DiffusionParams`` JSON schema, so the form and the validation agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from worker.engines.diffusion.params import DiffusionParams

if TYPE_CHECKING:
    from api.server.config import Config
    from api.server.services import Services

InputMode = Literal["image", "video"]

DEFAULT_PAGE = (
    '<h1 class="text-3xl font-bold">StreamDiffusion</h1>'
    '<p class="text-sm">Real-time image-to-image with '
    '<a href="https://github.com/cumulo-autumn/StreamDiffusion" target="_blank" '
    'class="text-blue-500 underline hover:no-underline">StreamDiffusion</a>: '
    "change the prompt while your camera streams.</p>"
)

#: UI hints per exposed field, in form order (featured first, then the hidden ones)
HINTS: dict[str, dict[str, Any]] = {
    "prompt": {"field": "textarea"},
    "negative_prompt": {"field": "textarea", "hide": True},
    "guidance_scale": {"field": "range", "step": 0.01},
    "delta": {"field": "range", "step": 0.01, "hide": True},
    "num_inference_steps": {"field": "range", "step": 1, "hide": True},
    "seed": {"field": "seed", "max": 2**32 - 1, "hide": True},
    "width": {"field": "range", "step": 64, "hide": True, "disabled": True},
    "height": {"field": "range", "step": 64, "hide": True, "disabled": True},
    "do_add_noise": {"field": "checkbox", "hide": True},
}


@dataclass
class Seed001Options:
    """What seed 001 configured beside the engine (``Services.seeds.options``)."""

    title: str = "StreamDiffusion Backend"
    name: str = "img2img"
    input_mode: InputMode = "image"
    page_content: str = DEFAULT_PAGE
    #: a session's length in seconds before ``{"status": "timeout"}`` (0: unlimited)
    timeout_s: float = 0.0
    #: with the engine ready, ask for a new frame when a result is this late
    stall_s: float = 10.0
    #: after the params, the image must follow within this many seconds, or the bundle is dropped
    image_wait_s: float = 5.0


def seed001_options(config: Config) -> Seed001Options:
    """Defaults plus what the server's configuration says (pipeline name and mode, session timeout)."""
    return Seed001Options(
        name=config.pipeline.name,
        input_mode=config.pipeline.mode,
        timeout_s=float(config.server.session_timeout_s),
    )


def info_schema(opts: Seed001Options) -> dict[str, Any]:
    """``info``: a pydantic-style schema; ``properties.title`` is a plain string as in the seed."""
    return {
        "title": "Info",
        "type": "object",
        "properties": {
            "title": opts.title,
            "name": {"default": opts.name, "title": "Name", "type": "string"},
            "input_mode": {
                "default": opts.input_mode,
                "title": "Input Mode",
                "type": "string",
                "enum": ["image", "video"],
            },
            "page_content": {"default": opts.page_content, "title": "Page Content", "type": "string"},
        },
    }


def input_params_schema(defaults: dict[str, Any]) -> dict[str, Any]:
    """``input_params``: the ``HINTS`` fields of ``DiffusionParams`` with UI hints and ``defaults``."""
    source = DiffusionParams.model_json_schema()["properties"]
    properties = {
        name: _property(name, source[name], defaults.get(name), hints) for name, hints in HINTS.items()
    }
    return {"title": "InputParams", "type": "object", "properties": properties}


def settings_body(running: Services, defaults: dict[str, Any]) -> dict[str, Any]:
    opts = running.seeds.options
    return {
        "info": info_schema(opts),
        "input_params": input_params_schema(defaults),
        "max_queue_size": int(running.config.server.max_queue_size),
        "page_content": opts.page_content,
    }


def _property(name: str, schema: dict[str, Any], default: Any, hints: dict[str, Any]) -> dict[str, Any]:
    schema = _scalar(schema)
    prop: dict[str, Any] = {
        "default": _form_value(default),
        "title": schema.get("title", name),
        "type": schema.get("type", "string"),
        "id": name,
    }
    for key, hint in (("minimum", "min"), ("maximum", "max")):
        if key in schema:
            prop[key] = prop[hint] = schema[key]
    prop.update(hints)
    return prop


def _scalar(schema: dict[str, Any]) -> dict[str, Any]:
    """A union like ``str | list[...]`` as its scalar branch: forms edit scalars."""
    branches = schema.get("anyOf")
    if not branches:
        return schema
    scalar = next((b for b in branches if b.get("type") not in ("array", "object", "null")), {})
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**scalar, **rest}


def _form_value(value: Any) -> Any:
    """Weighted prompts/seeds (lists of pairs) shown as their first entry."""
    if isinstance(value, list) and value and isinstance(value[0], (list, tuple)):
        return value[0][0]
    return value
