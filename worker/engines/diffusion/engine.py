"""The diffusion engine: StreamDiffusion img2img/txt2img on diffusers models.

``load`` builds everything (models, acceleration, warm-up); ``update``
applies hot parameters by recomputing only what they touch (cached prompt
embeddings, schedule constants, seed noise, ControlNet scales);
``process`` runs one stream-batch step per call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from worker.engines.base import Engine, EngineError
from worker.engines.diffusion import ip_adapter
from worker.engines.diffusion.acceleration import COMPILED, Accelerated, accelerate, heartbeat
from worker.engines.diffusion.blending import seed_noise
from worker.engines.diffusion.filter import SimilarImageFilter
from worker.engines.diffusion.images import frames_to_tensor, resize, tensor_to_frames
from worker.engines.diffusion.loading import LoadedModels, load_models
from worker.engines.diffusion.neural import NEURAL_PREPROCESSORS, NeuralPreprocessors
from worker.engines.diffusion.params import ControlNetParams, DiffusionParams, parse_params, reload_fields
from worker.engines.diffusion.predictor import ControlNetUnit, UNetPredictor
from worker.engines.diffusion.preprocessors import check_preprocessor, preprocessor
from worker.engines.diffusion.processing import ImageChain, LatentChain
from worker.engines.diffusion.prompts import PromptEncoder
from worker.engines.diffusion.stream import StreamConfig, StreamDenoiser, unet_batch_sizes
from worker.engines.diffusion.vae import LatentCodec

log = logging.getLogger(__name__)

GUIDANCE_FIELDS = (
    "prompt",
    "prompt_interpolation_method",
    "normalize_prompt_weights",
    "negative_prompt",
    "guidance_scale",
    "delta",
    "cfg_type",
)
SCHEDULE_FIELDS = ("num_inference_steps", "t_index_list")
SEED_FIELDS = ("seed", "seed_interpolation_method", "normalize_seed_weights")
STYLE_FIELDS = ("ip_adapter", "ip_adapter_style_image_url")
PROCESSING_FIELDS = (
    "image_preprocessing",
    "image_postprocessing",
    "latent_preprocessing",
    "latent_postprocessing",
)
BATCH_SHAPE_FIELDS = ("t_index_list", "cfg_type", "guidance_scale")  # hot, yet they set the UNet's batch size
WARM_UP_CALLS = {"compile": 3, "tensorrt": 2}  # CUDA graphs record on the 2nd call, replay from the 3rd


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when present, else the CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


class DiffusionEngine(Engine):
    """StreamDiffusion on a Stable Diffusion (XL) model; see ``params.DiffusionParams``."""

    name = "diffusion"

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``device`` and ``dtype`` default to ``pick_device()``; tests set float16 to run the CUDA dtype on a
        CPU.
        """
        super().__init__(params)
        self._config = parse_params(self.params)
        _check(self._config)
        picked_device, picked_dtype = pick_device()
        self._device, self._dtype = device or picked_device, dtype or picked_dtype
        self._lock = threading.Lock()
        self._models: LoadedModels | None = None
        self._accelerated: Accelerated | None = None
        self._predictor: UNetPredictor | None = None
        self._stream: StreamDenoiser | None = None
        self._codec: LatentCodec | None = None
        self._prompts: PromptEncoder | None = None
        self._filter: SimilarImageFilter | None = None
        self._chains = _chains(self._config)
        self._previous: list[np.ndarray] | None = None
        self._previous_latents: torch.Tensor | None = None
        self._skipped = 0
        self._neural = NeuralPreprocessors(self._device, self._dtype)

    @property
    def batch_size(self) -> int:
        return self._config.frame_buffer_size

    @property
    def output_size(self) -> tuple[int, int]:
        return (self._config.width, self._config.height)

    def load(self) -> None:
        config = self._config
        if self._device.type != "cuda":  # said once per load: a user sees why frames take seconds
            where = "the CPU" if self._device.type == "cpu" else str(self._device)
            log.warning("no CUDA device: the diffusion engine runs on %s, expect seconds per frame", where)
        models = load_models(config, self._device, self._dtype)
        if config.ip_adapter is not None:
            ip_adapter.load_ip_adapter(models.pipe, models.is_xl, config.ip_adapter)
        units = [
            ControlNetUnit(model, c, self._preprocessor(c))
            for model, c in zip(models.controlnets, config.enabled_controlnets(), strict=True)
        ]
        self._models = models
        self._accelerated = self._accelerate(config.acceleration)
        self._predictor = UNetPredictor(self._accelerated.unet, units, config.frame_buffer_size)
        scale = models.pipe.vae_scale_factor
        latent_shape = (models.pipe.unet.config.in_channels, config.height // scale, config.width // scale)
        stream_config = StreamConfig(
            latent_shape=latent_shape,
            frame_buffer_size=config.frame_buffer_size,
            use_denoising_batch=config.use_denoising_batch,
            consistency_boundary=models.kind != "turbo",
        )
        self._stream = StreamDenoiser(
            self._predictor, models.scheduler, stream_config, self._device, self._dtype
        )
        self._codec = LatentCodec(models.vae, self._dtype)
        self._prompts = PromptEncoder(models.pipe, self.output_size)
        if config.enable_similar_image_filter:
            self._filter = SimilarImageFilter(
                config.similar_image_filter_threshold, config.similar_image_filter_max_skip_frame
            )
        self._apply(config, previous=None)
        self._warm_up()

    def update(self, params: Mapping[str, Any]) -> set[str]:
        new = parse_params({**self.params, **params})
        _check(new)
        reload = reload_fields(self._config, new) | self._recompiling_fields(new)
        applied = new.model_copy(update={name: getattr(self._config, name) for name in reload})
        with self._lock:
            if self._stream is not None:
                self._apply(applied, previous=self._config)
            self._config = applied
            self.params.update({k: v for k, v in params.items() if k not in reload})
        return reload

    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._stream is None:
            raise EngineError("the diffusion engine is not loaded")
        if len(frames) != self.batch_size:
            raise EngineError(f"process needs {self.batch_size} frames, got {len(frames)}")
        with self._lock, torch.inference_mode():
            return self._process(frames)

    def info(self) -> dict[str, Any]:
        config = self._config
        info: dict[str, Any] = {
            "engine": self.name,
            "model_id": config.model_id,
            "mode": config.mode,
            "device": str(self._device),
            "dtype": str(self._dtype).removeprefix("torch."),
            "size": list(self.output_size),
            "batch_size": self.batch_size,
            "acceleration": self._accelerated.mode if self._accelerated else None,
            "vae": "tiny" if config.use_tiny_vae else "full",
            "controlnets": [c.model_id for c in config.enabled_controlnets()],
            "frames_skipped": self._skipped,
        }
        if self._models is not None:
            info |= {"model_kind": self._models.kind, "sdxl": self._models.is_xl}
        return info

    def close(self) -> None:
        with self._lock:
            self._models = self._accelerated = self._predictor = self._stream = None
            self._codec = self._prompts = self._filter = self._previous = self._previous_latents = None
            self._neural = NeuralPreprocessors(self._device, self._dtype)
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        config = self._config
        image_pre, image_post, latent_pre, latent_post = self._chains
        frames = image_pre([resize(f, self.output_size) for f in frames], self._previous)
        if config.skip_diffusion:
            self._previous = image_post(frames, self._previous)
            return list(self._previous)
        images = frames_to_tensor(frames, self.output_size, self._device, self._dtype)
        skip = self._filter is not None and self._filter.should_skip(images)  # the filter sees every frame
        if skip and self._previous is not None:
            self._skipped += 1
            return list(self._previous)
        if self._predictor.controlnets:
            self._predictor.set_control_frames(frames, self.output_size, self._device, self._dtype)
        if config.mode == "txt2img":
            x_t = self._stream.first_step_noise()
        else:
            x_t = self._stream.add_noise(latent_pre(self._codec.encode(images), self._previous_latents))
        x0 = latent_post(self._stream(x_t), self._previous_latents)
        self._previous_latents = x0
        outputs = image_post(tensor_to_frames(self._codec.decode(x0)), self._previous)
        self._previous = outputs
        return list(outputs)

    def _apply(self, config: DiffusionParams, previous: DiffusionParams | None) -> None:
        """Recompute only the state fed by hot fields that differ from ``previous`` (all of it when None)."""

        def changed(*names: str) -> bool:
            return previous is None or any(getattr(config, n) != getattr(previous, n) for n in names)

        stream = self._stream
        stream.do_add_noise = config.do_add_noise
        if changed(*SCHEDULE_FIELDS):
            stream.set_schedule(config.t_index_list, config.num_inference_steps)
        if changed(*SCHEDULE_FIELDS, *SEED_FIELDS):
            noise = seed_noise(
                config.weighted_seeds(),
                stream.noise_shape,
                config.seed_interpolation_method,
                config.normalize_seed_weights,
            )
            stream.set_noise(noise)
        if changed(*GUIDANCE_FIELDS):
            cond = self._prompts.blend(
                config.weighted_prompts(), config.prompt_interpolation_method, config.normalize_prompt_weights
            )
            needs_uncond = config.guidance_scale > 1.0 and config.cfg_type in ("initialize", "full")
            uncond = self._prompts.encode(config.negative_prompt) if needs_uncond else None
            stream.set_guidance(cond, uncond, config.cfg_type, config.guidance_scale, config.delta)
        if changed(*PROCESSING_FIELDS):
            self._chains = _chains(config)
        if changed("controlnets"):
            for unit, params in zip(self._predictor.controlnets, config.enabled_controlnets(), strict=True):
                unit.params = params
                unit.preprocess = self._preprocessor(params)
        if config.ip_adapter is not None and changed(*STYLE_FIELDS):
            pipe = self._models.pipe
            pipe.set_ip_adapter_scale(config.ip_adapter.scale if config.ip_adapter.enabled else 0.0)
            self._predictor.image_embeds = ip_adapter.style_embeds(
                pipe, config.ip_adapter_style_image_url, self.output_size
            )

    def _preprocessor(self, params: ControlNetParams) -> Callable[[np.ndarray], np.ndarray]:
        """A ControlNet's preprocessor; networks (depth, hed) load once (at ``load``) and stay for hot
        updates.
        """
        if params.preprocessor in NEURAL_PREPROCESSORS:
            return self._neural.preprocessor(params.preprocessor, params.preprocessor_params)
        return preprocessor(params.preprocessor, params.preprocessor_params)

    def _recompiling_fields(self, new: DiffusionParams) -> set[str]:
        """Hot fields whose change here would give a compiled UNet a new batch size.

        The next frame would then recompile (or build a TensorRT engine) on the
        hot path and stall the stream for a minute or more, so with a compiled
        UNet these fields reload instead: the old engine serves until the new
        one, compiled for the new shape, is warm.
        """
        if self._accelerated is None or self._accelerated.mode not in COMPILED:
            return set()
        if _unet_batch_sizes(new) == _unet_batch_sizes(self._config):
            return set()
        return {name for name in BATCH_SHAPE_FIELDS if getattr(new, name) != getattr(self._config, name)}

    def _accelerate(self, mode: str) -> Accelerated:
        config, models = self._config, self._models
        cache_key = "|".join(
            [
                config.model_id,
                f"{config.width}x{config.height}",
                f"fbs{config.frame_buffer_size}",
                str(config.lora_dict),
            ]
        )
        return accelerate(models.pipe.unet, models.controlnets, mode, self._device, cache_key)

    def _warm_up(self) -> None:
        """Run a few frames so compilation and autotuning happen before the engine goes live.

        A compiled mode that fails here falls back to SDPA with a logged reason.
        """
        grey = [np.full((self._config.height, self._config.width, 3), 127, np.uint8)] * self.batch_size
        mode = self._accelerated.mode
        try:
            with heartbeat(f"warming up ({mode})"):
                for _ in range(WARM_UP_CALLS.get(mode, 1)):
                    self.process(grey)
        except Exception as exc:
            if mode not in COMPILED:
                raise
            log.warning("acceleration %s failed while warming up (%s); falling back to sdpa", mode, exc)
            self._accelerated = self._accelerate("sdpa")
            self._predictor.unet = self._accelerated.unet
            self.process(grey)
        self._stream.reset()
        self._previous = self._previous_latents = None
        self._skipped = 0
        if self._filter is not None:
            self._filter.reset()


def _unet_batch_sizes(config: DiffusionParams) -> frozenset[int]:
    return unet_batch_sizes(
        len(config.t_index_list),
        config.frame_buffer_size,
        config.cfg_type,
        config.guidance_scale,
        config.use_denoising_batch,
    )


def _check(config: DiffusionParams) -> None:
    """Fail fast on settings no load could satisfy (unknown preprocessors, faceid...)."""
    for controlnet in config.enabled_controlnets():
        check_preprocessor(controlnet.preprocessor, controlnet.preprocessor_params)
    if config.ip_adapter is not None:
        ip_adapter.check_supported(config.ip_adapter)
    _chains(config)


def _chains(config: DiffusionParams) -> tuple[ImageChain, ImageChain, LatentChain, LatentChain]:
    """The processing blocks: image pre/post, latent pre/post."""
    return (
        ImageChain(config.image_preprocessing, "image_preprocessing"),
        ImageChain(config.image_postprocessing, "image_postprocessing"),
        LatentChain(config.latent_preprocessing, "latent_preprocessing"),
        LatentChain(config.latent_postprocessing, "latent_postprocessing"),
    )
