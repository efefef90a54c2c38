"""Validated StreamDiffusion parameters (Daydream's ``params`` object plus our extras).

Kept free of torch so the API can validate requests with it. Field names,
defaults and ranges follow Daydream's published schema; extra fields are
rejected like Daydream does. ``RELOAD_FIELDS`` lists what needs a new engine;
everything else applies on the next frame.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.engines.base import EngineError
from worker.engines.diffusion.families import (
    IP_ADAPTER_FAMILIES,
    MAX_SDXL_CONTROLNETS,
    NAMES,
    controlnet_family,
    model_family,
)

Interpolation = Literal["linear", "slerp"]
#: the longest prompt accepted, in characters: CLIP reads 77 tokens, so this only bounds what travels
MAX_PROMPT_CHARS = 4000
#: the most entries of a weighted prompt or seed list
MAX_BLEND_ENTRIES = 16
#: the largest seed: torch's ``manual_seed`` overflows above 2**64 - 1; 2**63 - 1 also fits a signed int64
MAX_SEED = 2**63 - 1
#: the largest blend weight (either sign): 16 of them still sum to a finite, usable number
MAX_BLEND_WEIGHT = 1000.0
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Weight = Annotated[float, Field(ge=-MAX_BLEND_WEIGHT, le=MAX_BLEND_WEIGHT)]
WeightedPrompt = tuple[PromptText, Weight]
WeightedSeed = tuple[Seed, Weight]


def finite(value: Any) -> Any:
    """``value`` (free-form JSON) unless a number in it is NaN or infinite, which no engine can use."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and infinite numbers are not allowed")
    if isinstance(value, dict):
        for item in value.values():
            finite(item)
    elif isinstance(value, list | tuple):
        for item in value:
            finite(item)
    return value


#: processor and preprocessor options: free-form, yet finite
Options = Annotated[dict[str, Any], AfterValidator(finite)]
Size = Annotated[int, Field(ge=384, le=1024, multiple_of=64)]


class _Strict(BaseModel):
    # NaN and Infinity parse from JSON in Python, are stored as NaN and come back as null: refuse them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ControlNetParams(_Strict):
    """One ControlNet; only ``conditioning_scale`` and the guidance window change without a reload."""

    model_id: str
    conditioning_scale: float = Field(1.0, ge=0.0, le=5.0)
    preprocessor: str = "passthrough"
    preprocessor_params: Options = Field(default_factory=dict)
    enabled: bool = True
    control_guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    control_guidance_end: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _window(self) -> ControlNetParams:
        if self.control_guidance_start > self.control_guidance_end:
            raise ValueError("control_guidance_start must not exceed control_guidance_end")
        return self

    def structure(self) -> tuple[str, str, bool, Any]:
        """What a change of needs a reload: the weights loaded (a depth preprocessor's too)."""
        return (self.model_id, self.preprocessor, self.enabled, self.preprocessor_params.get("model_id"))


class IPAdapterParams(_Strict):
    """IP-Adapter (style image) settings; ``type`` and ``model_id`` need a reload, the rest is hot."""

    type: Literal["regular", "faceid"] = "regular"
    scale: float = Field(1.0, ge=0.0, le=2.0)
    weight_type: Literal["linear"] = "linear"
    enabled: bool = True
    # Ours: a hub id or a local directory laid out like it (``models/``, ``sdxl_models/``).
    model_id: str = "h94/IP-Adapter"


class ProcessorParams(_Strict):
    """One step of a processing block (``blur``, ``feedback``, ``latent_feedback``...)."""

    type: str
    enabled: bool = True
    params: Options = Field(default_factory=dict)


class ProcessingParams(_Strict):
    """Daydream's ``image_*processing`` / ``latent_*processing`` blocks; all hot."""

    enabled: bool = True
    processors: list[ProcessorParams] = Field(default_factory=list)

    def active(self) -> list[ProcessorParams]:
        return [p for p in self.processors if p.enabled] if self.enabled else []


class DiffusionParams(_Strict):
    """All parameters of the diffusion engine, with Daydream's defaults."""

    model_id: str = "stabilityai/sd-turbo"
    prompt: (
        PromptText | Annotated[list[WeightedPrompt], Field(min_length=1, max_length=MAX_BLEND_ENTRIES)]
    ) = "flowers"
    prompt_interpolation_method: Interpolation = "slerp"
    normalize_prompt_weights: bool = True
    negative_prompt: PromptText = "blurry, low quality, flat, 2d"
    seed: Seed | Annotated[list[WeightedSeed], Field(min_length=1, max_length=MAX_BLEND_ENTRIES)] = 789
    seed_interpolation_method: Interpolation = "linear"
    normalize_seed_weights: bool = True
    guidance_scale: float = Field(1.0, ge=0.0, le=20.0)
    delta: float = Field(0.7, ge=0.0, le=1.0)
    num_inference_steps: int = Field(50, ge=1, le=100)
    t_index_list: list[Annotated[int, Field(ge=0, le=100)]] = Field(
        default_factory=lambda: [12, 20, 32], min_length=1, max_length=4
    )
    width: Size = 512
    height: Size = 512
    lora_dict: dict[str, float] | None = None
    use_lcm_lora: bool = True
    lcm_lora_id: str = "latent-consistency/lcm-lora-sdv1-5"
    # Daydream's values are none, xformers and tensorrt; sdpa and compile are ours. The default is
    # Daydream's (xformers), which runs PyTorch's SDPA where xformers is not installed.
    acceleration: Literal["none", "sdpa", "xformers", "compile", "tensorrt"] = "xformers"
    use_safety_checker: bool = True
    use_denoising_batch: bool = True
    do_add_noise: bool = True
    skip_diffusion: bool = False
    enable_similar_image_filter: bool = False
    similar_image_filter_threshold: float = Field(0.98, ge=0.0, le=1.0)
    similar_image_filter_max_skip_frame: int = Field(10, ge=0)
    controlnets: list[ControlNetParams] = Field(default_factory=list)
    ip_adapter: IPAdapterParams | None = None
    ip_adapter_style_image_url: str | None = None
    image_preprocessing: ProcessingParams | None = None
    image_postprocessing: ProcessingParams | None = None
    latent_preprocessing: ProcessingParams | None = None
    latent_postprocessing: ProcessingParams | None = None
    # Ours, beyond Daydream's schema:
    cfg_type: Literal["none", "self", "initialize", "full"] = "self"
    frame_buffer_size: int = Field(1, ge=1, le=4)
    mode: Literal["img2img", "txt2img"] = "img2img"
    use_tiny_vae: bool = True
    vae_id: str | None = None
    #: input of another aspect ratio than width x height: crop its centre or pad it (media.fit); hot
    fit: Literal["crop", "pad"] = "crop"

    @field_validator("t_index_list")
    @classmethod
    def _non_decreasing(cls, value: list[int]) -> list[int]:
        if any(b < a for a, b in itertools.pairwise(value)):
            raise ValueError("t_index_list must be non-decreasing")
        return value

    @field_validator("controlnets")
    @classmethod
    def _unique_controlnets(cls, value: list[ControlNetParams]) -> list[ControlNetParams]:
        ids = [c.model_id for c in value]
        if len(ids) != len(set(ids)):
            raise ValueError("controlnet model_id values must be unique")
        return value

    @model_validator(mode="after")
    def _indices_in_range(self) -> DiffusionParams:
        if max(self.t_index_list) > self.num_inference_steps:
            raise ValueError("t_index_list values must be in 0..num_inference_steps")
        return self

    @field_validator("controlnets")
    @classmethod
    def _controlnets_fit_the_model(
        cls,
        value: list[ControlNetParams],
        info: ValidationInfo,
    ) -> list[ControlNetParams]:
        """Daydream's rules for known models: ControlNets of the model's family, at most 3 on SDXL."""
        family = model_family(info.data.get("model_id", ""))
        if family is None:
            return value
        for index, controlnet in enumerate(value):
            other = controlnet_family(controlnet.model_id)
            if other is not None and other != family:
                raise ValueError(
                    f"controlnets[{index}].model_id {controlnet.model_id} is an {NAMES[other]} "
                    f"ControlNet; {info.data['model_id']} is {NAMES[family]}"
                )
        if family == "sdxl" and sum(c.enabled for c in value) > MAX_SDXL_CONTROLNETS:
            raise ValueError(f"SDXL models take at most {MAX_SDXL_CONTROLNETS} enabled ControlNets")
        return value

    @field_validator("ip_adapter")
    @classmethod
    def _ip_adapter_fits_the_model(
        cls,
        value: IPAdapterParams | None,
        info: ValidationInfo,
    ) -> IPAdapterParams | None:
        family = model_family(info.data.get("model_id", ""))
        if value is not None and value.enabled and family is not None and family not in IP_ADAPTER_FAMILIES:
            raise ValueError(
                f"IP-Adapter works with SD 1.5 and SDXL models, not {NAMES[family]} ({info.data['model_id']})"
            )
        return value

    def weighted_prompts(self) -> list[WeightedPrompt]:
        """``prompt`` as ``[(text, weight), ...]`` whether given as a string or a list."""
        return [(self.prompt, 1.0)] if isinstance(self.prompt, str) else list(self.prompt)

    def weighted_seeds(self) -> list[WeightedSeed]:
        """``seed`` as ``[(seed, weight), ...]`` whether given as an int or a list."""
        return [(self.seed, 1.0)] if isinstance(self.seed, int) else list(self.seed)

    def enabled_controlnets(self) -> list[ControlNetParams]:
        return [c for c in self.controlnets if c.enabled]


RELOAD_FIELDS = frozenset(
    {
        "model_id",
        "width",
        "height",
        "lora_dict",
        "use_lcm_lora",
        "lcm_lora_id",
        "acceleration",
        "use_safety_checker",
        "use_denoising_batch",
        "enable_similar_image_filter",
        "similar_image_filter_threshold",
        "similar_image_filter_max_skip_frame",
        "frame_buffer_size",
        "mode",
        "use_tiny_vae",
        "vae_id",
    }
)
"""Fields whose change needs a new engine (weights, shapes or compiled graphs change)."""


def parse_params(params: Mapping[str, Any]) -> DiffusionParams:
    """Validate ``params``; raise ``EngineError`` naming the first bad field."""
    try:
        return DiffusionParams.model_validate(dict(params))
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "params"
        if error["type"] == "extra_forbidden":
            raise EngineError(f"unknown parameter {field!r}") from None
        raise EngineError(f"invalid parameter {field!r}: {error['msg']}") from None


def reload_fields(current: DiffusionParams, new: DiffusionParams) -> set[str]:
    """Names of the changed fields that ``new`` can only get through a reload."""
    changed = {name for name in DiffusionParams.model_fields if getattr(current, name) != getattr(new, name)}
    reload = changed & RELOAD_FIELDS
    if [c.structure() for c in current.controlnets] != [c.structure() for c in new.controlnets]:
        reload.add("controlnets")
    if _ip_adapter_key(current) != _ip_adapter_key(new):
        reload.add("ip_adapter")
    return reload


def _ip_adapter_key(params: DiffusionParams) -> tuple[str, str] | None:
    """The loaded IP-Adapter: changing it swaps weights; scale and enabled stay hot."""
    return (params.ip_adapter.type, params.ip_adapter.model_id) if params.ip_adapter else None
