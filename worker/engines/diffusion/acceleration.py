"""UNet acceleration: SDPA, xformers, ``torch.compile`` or TensorRT, each with a logged fallback.

``accelerate`` returns what the predictor should call. Compiled variants
(``compile``, ``tensorrt``) only fail when first run, so the engine warms
up inside ``load`` and calls ``accelerate(..., "sdpa")`` again if that fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

log = logging.getLogger(__name__)

COMPILED = frozenset({"compile", "tensorrt"})


@dataclass(frozen=True)
class Accelerated:
    """The callable to run in place of the UNet, and the mode actually in effect."""

    unet: Callable[..., Any]
    mode: str


def accelerate(
    unet: UNet2DConditionModel,
    controlnets: Sequence[ControlNetModel],
    mode: str,
    device: torch.device,
    cache_key: str,
) -> Accelerated:
    """Apply ``mode`` to the UNet (and attention modes to the ControlNets too)."""
    if mode == "none":
        log.info("acceleration none: diffusers' default attention")
        return Accelerated(unet, "none")
    if mode == "xformers":
        if _xformers_usable(device):
            for model in (unet, *controlnets):
                model.enable_xformers_memory_efficient_attention()
            log.info("acceleration xformers: memory-efficient attention")
            return Accelerated(unet, "xformers")
        # expected without xformers installed: SDPA is the same kind of memory-efficient attention
        log.info("acceleration xformers unavailable (%s); using sdpa", _why_not("xformers", device))
    if mode == "tensorrt":
        if device.type == "cuda" and importlib.util.find_spec("torch_tensorrt") is not None:
            return Accelerated(_tensorrt(_sdpa(unet, controlnets, device), unet.dtype, cache_key), "tensorrt")
        log.warning(
            "acceleration tensorrt unavailable (%s); falling back to sdpa", _why_not("torch_tensorrt", device)
        )
    if mode == "compile":
        return Accelerated(_compile(_sdpa(unet, controlnets, device), device), "compile")
    log.info(
        "acceleration sdpa: scaled-dot-product attention%s",
        ", channels-last" if device.type == "cuda" else "",
    )
    return Accelerated(_sdpa(unet, controlnets, device), "sdpa")


def engine_cache_dir(cache_key: str) -> Path:
    """Where TensorRT engines for ``cache_key`` (model, size, batch...) are kept between runs."""
    root = Path(os.environ.get("TENSORRT_CACHE_DIR", Path.home() / ".cache" / "daydream" / "tensorrt"))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cache_key)[:80]
    return root / f"{slug}-{hashlib.sha256(cache_key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def heartbeat(what: str, every_s: float = 10.0) -> Iterator[None]:
    """Log "still <what>" every ``every_s`` seconds while the block runs (engine builds take minutes)."""
    done = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            log.info("still %s (%.0f s so far)", what, time.monotonic() - started)

    thread = threading.Thread(target=beat, name="build-heartbeat", daemon=True)
    log.info("%s...", what)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        log.info("%s took %.1f s", what, time.monotonic() - started)


def _sdpa(
    unet: UNet2DConditionModel, controlnets: Sequence[ControlNetModel], device: torch.device
) -> UNet2DConditionModel:
    """Fused SDPA attention everywhere; channels-last convolutions on CUDA."""
    for model in (unet, *controlnets):
        processors = model.attn_processors
        # IP-Adapter installs its own processors; keep those.
        model.set_attn_processor(
            {
                name: proc if "IPAdapter" in type(proc).__name__ else AttnProcessor2_0()
                for name, proc in processors.items()
            }
        )
        if device.type == "cuda":
            # torch's Module.to overloads omit memory_format (Module.to takes it), and diffusers' own
            # `to`, wrapped in functools.wraps, is not bound as a method to mypy (see loading.module_to)
            model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    return unet


def _compile(unet: UNet2DConditionModel, device: torch.device) -> Callable[..., Any]:
    """``torch.compile``; on CUDA with CUDA graphs ("reduce-overhead") to cut launch overhead."""
    if device.type != "cuda":
        log.info("acceleration compile: torch.compile (default mode; CUDA graphs need CUDA)")
        return torch.compile(unet)
    log.info("acceleration compile: torch.compile with CUDA graphs (reduce-overhead)")
    compiled = torch.compile(unet, mode="reduce-overhead")

    def run(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are consumed
        return compiled(*args, **kwargs)

    return run


def _tensorrt(unet: UNet2DConditionModel, dtype: torch.dtype, cache_key: str) -> Callable[..., Any]:
    """Torch-TensorRT as a ``torch.compile`` backend, engines cached on disk per model/size/batch."""
    import torch_tensorrt  # noqa: F401 - registers the "tensorrt" backend

    cache = engine_cache_dir(cache_key)
    cache.mkdir(parents=True, exist_ok=True)
    log.info("acceleration tensorrt: engines cached in %s (the first build takes minutes)", cache)
    # a backend's own options, passed through as they are: torch's annotation covers inductor's only
    options: dict[str, Any] = {
        "enabled_precisions": {dtype},
        "immutable_weights": False,
        "cache_built_engines": True,
        "reuse_cached_engines": True,
        "engine_cache_dir": str(cache),
    }
    return torch.compile(unet, backend="tensorrt", options=options, dynamic=False)


def _xformers_usable(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("xformers") is not None


def _why_not(package: str, device: torch.device) -> str:
    if device.type != "cuda":
        return f"needs CUDA, running on {device.type}"
    return f"{package} is not installed"
