"""Load a pipeline, VAE, LoRAs and ControlNets with diffusers' ``from_pretrained``.

Hub ids download once into the Hugging Face cache (huggingface_hub prints
progress bars); without network, or with ``HF_HUB_OFFLINE`` set, only local
directories and the cache are used, and anything missing becomes an
``EngineError`` that names it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, DiffusionPipeline, LCMScheduler

from worker.engines.base import EngineError
from worker.engines.diffusion.params import DiffusionParams

log = logging.getLogger(__name__)

T = TypeVar("T")
ModelKind = Literal["turbo", "lcm", "base"]

PRESETS: dict[str, ModelKind] = {
    "stabilityai/sd-turbo": "turbo",
    "stabilityai/sdxl-turbo": "turbo",
    "SimianLuo/LCM_Dreamshaper_v7": "lcm",
    "KBlueLeaf/kohaku-v2.1": "base",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "base",
    "Lykon/dreamshaper-8": "base",
    "prompthero/openjourney-v4": "base",
}
"""Known models and how they are distilled; ``base`` models need LCM-LoRA for few steps."""

TINY_VAES = {False: "madebyollin/taesd", True: "madebyollin/taesdxl"}  # keyed by "is SDXL"
SDXL_LCM_LORA = "latent-consistency/lcm-lora-sdxl"
SD15_LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"


@dataclass
class LoadedModels:
    """Everything the engine runs, on its device."""

    pipe: Any  # a StableDiffusionPipeline or StableDiffusionXLPipeline
    vae: torch.nn.Module
    scheduler: LCMScheduler
    kind: ModelKind
    is_xl: bool
    controlnets: list[ControlNetModel] = field(default_factory=list)


def model_kind(model_id: str) -> ModelKind:
    """Preset kind, else guessed from the name (``turbo`` / ``lcm``), else ``base``."""
    if model_id in PRESETS:
        return PRESETS[model_id]
    name = model_id.lower()
    if "turbo" in name:
        return "turbo"
    return "lcm" if "lcm" in name else "base"


def load_models(params: DiffusionParams, device: torch.device, dtype: torch.dtype) -> LoadedModels:
    """Load every model ``params`` asks for, apply LoRAs, move all to ``device``."""
    pipe = _load_pipeline(params.model_id, dtype)
    is_xl = getattr(pipe, "text_encoder_2", None) is not None
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise EngineError(f"model {params.model_id!r} predicts {prediction!r}; only epsilon models are supported")
    kind = model_kind(params.model_id)
    _apply_loras(pipe, params, kind, is_xl)
    pipe.to(device)
    vae = _load_vae(params, pipe, is_xl, dtype).to(device)
    controlnets = [
        pretrained(ControlNetModel.from_pretrained, c.model_id, "ControlNet", dtype=dtype).to(device)
        for c in params.enabled_controlnets()
    ]
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return LoadedModels(pipe, vae, scheduler, kind, is_xl, controlnets)


def pretrained(load: Callable[..., T], source: str, what: str, **kwargs: Any) -> T:
    """``load(source, ...)`` online, then from the local cache only; ``EngineError`` if both fail."""
    started = time.monotonic()
    local_only = os.path.isdir(source) or _offline()
    log.info("loading %s %s%s", what, source, " (local files only)" if local_only else "")
    try:
        result = load(source, local_files_only=local_only, **kwargs)
    except Exception as exc:  # any failure: retry from the cache, then explain
        if local_only:
            raise EngineError(_missing(what, source, exc)) from exc
        log.warning("downloading %s %s failed (%s); trying the local cache", what, source, exc)
        try:
            result = load(source, local_files_only=True, **kwargs)
        except Exception as cache_exc:
            raise EngineError(_missing(what, source, exc)) from cache_exc
    log.info("loaded %s %s in %.1f s", what, source, time.monotonic() - started)
    return result


def _load_pipeline(model_id: str, dtype: torch.dtype) -> Any:
    config = pretrained(DiffusionPipeline.load_config, model_id, "model")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if "safety_checker" in config:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    pipe = pretrained(DiffusionPipeline.from_pretrained, model_id, "model", **kwargs)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
        raise EngineError(f"model {model_id!r} is a {type(pipe).__name__}, not a Stable Diffusion (XL) pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _apply_loras(pipe: Any, params: DiffusionParams, kind: ModelKind, is_xl: bool) -> None:
    """Load LCM-LoRA (base models only) and ``lora_dict``, then fuse them into the weights.

    Fused weights run at full speed; the LoRA layers are dropped afterwards.
    """
    loras: dict[str, tuple[str, float]] = {}
    if params.use_lcm_lora and kind == "base":
        lcm_id = SDXL_LCM_LORA if is_xl and params.lcm_lora_id == SD15_LCM_LORA else params.lcm_lora_id
        loras["lcm"] = (lcm_id, 1.0)
    for index, (source, weight) in enumerate((params.lora_dict or {}).items()):
        loras[f"lora_{index}"] = (source, weight)
    if not loras:
        return
    for name, (source, _) in loras.items():
        kwargs: dict[str, Any] = {"adapter_name": name}
        if os.path.isfile(source):
            source, kwargs["weight_name"] = os.path.split(source)
        pretrained(lambda src, **kw: pipe.load_lora_weights(src, **kw), source, "LoRA", **kwargs)
    names = list(loras)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras.values()])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()


def _load_vae(params: DiffusionParams, pipe: Any, is_xl: bool, dtype: torch.dtype) -> torch.nn.Module:
    if params.use_tiny_vae:
        vae_id = params.vae_id or TINY_VAES[is_xl]
        return pretrained(AutoencoderTiny.from_pretrained, vae_id, "tiny VAE", dtype=dtype)
    if params.vae_id:
        return pretrained(AutoencoderKL.from_pretrained, params.vae_id, "VAE", dtype=dtype)
    return pipe.vae


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _missing(what: str, source: str, exc: Exception) -> str:
    where = "its local directory" if os.path.isdir(source) else "the Hugging Face cache, nor downloaded"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{what} {source!r} is not available: it could not be loaded from {where}: {reason}"
