"""What channels on one diffusion model share: weights on the device, the accelerated UNet and the caches.

A :class:`DiffusionModel` holds no per-channel state; each channel's prompt,
seed, schedule and latent buffers live in its :class:`~.lane.Lane`. So one
model can serve one channel (:class:`~.engine.DiffusionEngine`) or several
batched together (:class:`~.shared.SharedDiffusion`), and :func:`share_key`
says which params must match for that.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from worker.engines.base import EngineError, ProgressCallback
from worker.engines.diffusion import download, ip_adapter
from worker.engines.diffusion.acceleration import COMPILED, Accelerated, accelerate
from worker.engines.diffusion.loading import LoadedModels, load_models
from worker.engines.diffusion.neural import NeuralPreprocessors
from worker.engines.diffusion.params import DiffusionParams
from worker.engines.diffusion.predictor import UNetPredictor
from worker.engines.diffusion.prompts import PromptEncoder
from worker.engines.diffusion.vae import LatentCodec

#: steps of a load, each said as it starts: models, IP-Adapter, acceleration, warm-up
LOAD_STEPS = 4

log = logging.getLogger(__name__)


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when present, else the CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def share_key(config: DiffusionParams, device: torch.device, dtype: torch.dtype) -> Hashable | None:
    """What channels must have in common to share one model and its batched steps; None: not shareable.

    The weights (model, LoRAs, VAE, ControlNet models), the acceleration and the frame size and buffer
    (one latent shape per batch) must match. Prompts, seeds, schedules (step counts included), guidance,
    ControlNet scales and preprocessors, processing blocks, filters and modes may differ. Not shared:
    an IP-Adapter (its scale is a setting of the model's attention layers, one for every row of a
    batch) and compiled UNets (specialised to one batch size, which changes as channels come and go).
    """
    if config.ip_adapter is not None or config.acceleration in COMPILED:
        return None
    return (
        config.model_id,
        tuple(sorted((config.lora_dict or {}).items())),
        config.use_lcm_lora,
        config.lcm_lora_id,
        config.acceleration,
        config.width,
        config.height,
        config.frame_buffer_size,
        config.use_safety_checker,
        config.use_tiny_vae,
        config.vae_id,
        tuple(c.model_id for c in config.enabled_controlnets()),
        str(device),
        str(dtype),
    )


@dataclass
class Loaded:
    """What :meth:`DiffusionModel.load` sets up: the models, the accelerated UNet and what runs them."""

    models: LoadedModels
    accelerated: Accelerated
    predictor: UNetPredictor
    codec: LatentCodec
    prompts: PromptEncoder


class DiffusionModel:
    """Loaded weights and caches for ``config``'s shareable part (see :func:`share_key`)."""

    def __init__(self, config: DiffusionParams, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.device, self.dtype = device, dtype
        self._loaded: Loaded | None = None
        self.neural = NeuralPreprocessors(device, dtype)

    @property
    def loaded(self) -> Loaded:
        """The loaded models and what runs them; an error before :meth:`load` and after :meth:`close`."""
        if self._loaded is None:
            raise EngineError("the diffusion model is not loaded")
        return self._loaded

    @property
    def models(self) -> LoadedModels | None:
        """The loaded models, None when not loaded."""
        return self._loaded.models if self._loaded is not None else None

    @property
    def accelerated(self) -> Accelerated | None:
        """The UNet's acceleration in effect, None when not loaded."""
        return self._loaded.accelerated if self._loaded is not None else None

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.config.width, self.config.height)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        pipe = self.loaded.models.pipe
        scale = pipe.vae_scale_factor
        return (pipe.unet.config.in_channels, self.config.height // scale, self.config.width // scale)

    def load(self, progress: ProgressCallback | None = None) -> None:
        """Load every model, apply the acceleration (compiled modes compile on first use).

        ``progress`` hears each stage as it starts (steps of :data:`LOAD_STEPS`, warming up last), and
        the bytes of a hub model being downloaded (a ``downloading <id>`` stage, see :mod:`.download`).
        """
        config = self.config
        say = progress or (lambda stage, done, total, unit: None)
        if self.device.type != "cuda":  # said once per load: a user sees why frames take seconds
            where = "the CPU" if self.device.type == "cpu" else str(self.device)
            log.warning("no CUDA device: the diffusion engine runs on %s, expect seconds per frame", where)
        loading = (f"loading {config.model_id}", 0, LOAD_STEPS, "steps")
        say(*loading)

        def fetch(repo_id: str, passed: Collection[str]) -> None:
            """A hub model not cached yet downloads as a stage in bytes; then the load goes on."""
            if download.prefetch(repo_id, say, skip=passed):
                say(*loading)

        models = load_models(config, self.device, self.dtype, fetch if progress is not None else None)
        if config.ip_adapter is not None:
            say("loading the IP-Adapter", 1, LOAD_STEPS, "steps")
            ip_adapter.load_ip_adapter(models.pipe, models.is_xl, config.ip_adapter)
        say(acceleration_stage(config.acceleration), 2, LOAD_STEPS, "steps")
        accelerated = self._accelerate(models, config.acceleration)
        self._loaded = Loaded(
            models=models,
            accelerated=accelerated,
            predictor=UNetPredictor(accelerated.unet, models.controlnets),
            codec=LatentCodec(models.vae, self.dtype),
            prompts=PromptEncoder(models.pipe, self.output_size),
        )

    def accelerate(self, mode: str) -> Accelerated:
        """``mode`` applied to the loaded UNet; the predictor runs the result from now on."""
        loaded = self.loaded
        accelerated = self._accelerate(loaded.models, mode)
        loaded.accelerated = accelerated
        loaded.predictor.unet = accelerated.unet
        return accelerated

    def _accelerate(self, models: LoadedModels, mode: str) -> Accelerated:
        config = self.config
        cache_key = "|".join(
            [
                config.model_id,
                f"{config.width}x{config.height}",
                f"fbs{config.frame_buffer_size}",
                str(config.lora_dict),
            ]
        )
        return accelerate(models.pipe.unet, models.controlnets, mode, self.device, cache_key)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "acceleration": self._loaded.accelerated.mode if self._loaded is not None else None,
        }
        if self._loaded is not None:
            info |= {"model_kind": self._loaded.models.kind, "sdxl": self._loaded.models.is_xl}
        return info

    def close(self) -> None:
        self._loaded = None
        self.neural = NeuralPreprocessors(self.device, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def acceleration_stage(acceleration: str) -> str:
    """What a person reads while the UNet is accelerated (a TensorRT build takes minutes)."""
    if acceleration == "tensorrt":
        return "building the TensorRT engine (minutes the first time)"
    return f"accelerating the UNet ({acceleration})"
