"""One channel's state on a (possibly shared) diffusion model.

A lane holds everything a channel's params decide: its prompt embeddings,
seed noise, schedule and RCFG state (its own :class:`~.stream.StreamDenoiser`
and scheduler), ControlNet settings, style image, processing blocks, similar
image filter and feedback frames. Nothing in it is read by another lane, so a
hot change in one channel never changes another channel's output; the model's
caches it uses (prompt embeddings by text, preprocessor networks by id) are
pure functions of their keys.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from worker.engines.diffusion import ip_adapter
from worker.engines.diffusion.blending import seed_noise
from worker.engines.diffusion.filter import SimilarImageFilter
from worker.engines.diffusion.images import frames_to_tensor, resize
from worker.engines.diffusion.model import DiffusionModel
from worker.engines.diffusion.neural import NEURAL_PREPROCESSORS
from worker.engines.diffusion.params import ControlNetParams, DiffusionParams
from worker.engines.diffusion.predictor import LaneControlNet, LaneInputs
from worker.engines.diffusion.preprocessors import check_preprocessor, preprocessor
from worker.engines.diffusion.processing import ImageChain, LatentChain
from worker.engines.diffusion.stream import StreamConfig, StreamDenoiser

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


class Lane:
    """A channel's denoising state on ``model``; built and changed only between steps."""

    def __init__(self, model: DiffusionModel, config: DiffusionParams) -> None:
        self.model = model
        self.config = config
        models = model.loaded.models
        stream_config = StreamConfig(
            latent_shape=model.latent_shape,
            frame_buffer_size=config.frame_buffer_size,
            use_denoising_batch=config.use_denoising_batch,
            consistency_boundary=models.kind != "turbo",
        )
        scheduler = copy.deepcopy(models.scheduler)  # its own: set_schedule changes it
        self.stream = StreamDenoiser(None, scheduler, stream_config, model.device, model.dtype)
        self.filter: SimilarImageFilter | None = None
        if config.enable_similar_image_filter:
            self.filter = SimilarImageFilter(
                config.similar_image_filter_threshold, config.similar_image_filter_max_skip_frame
            )
        self.chains = chains(config)
        self.controlnets = [LaneControlNet(c, self._preprocessor(c)) for c in config.enabled_controlnets()]
        self.image_embeds: torch.Tensor | None = None
        self.control_images: list[torch.Tensor] = []
        self.previous: list[np.ndarray] | None = None
        self.previous_latents: torch.Tensor | None = None
        self.skipped = 0
        self.apply(config, previous=None)

    def apply(self, config: DiffusionParams, previous: DiffusionParams | None) -> None:
        """Recompute only the state fed by hot fields that differ from ``previous`` (all of it when None)."""

        def changed(*names: str) -> bool:
            return previous is None or any(getattr(config, n) != getattr(previous, n) for n in names)

        stream, model = self.stream, self.model
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
            cond = model.loaded.prompts.blend(
                config.weighted_prompts(), config.prompt_interpolation_method, config.normalize_prompt_weights
            )
            needs_uncond = config.guidance_scale > 1.0 and config.cfg_type in ("initialize", "full")
            uncond = model.loaded.prompts.encode(config.negative_prompt) if needs_uncond else None
            stream.set_guidance(cond, uncond, config.cfg_type, config.guidance_scale, config.delta)
        if changed(*PROCESSING_FIELDS):
            self.chains = chains(config)
        if changed("controlnets"):
            for unit, params in zip(self.controlnets, config.enabled_controlnets(), strict=True):
                unit.params = params
                unit.preprocess = self._preprocessor(params)
        if config.ip_adapter is not None and changed(*STYLE_FIELDS):
            pipe = model.loaded.models.pipe
            # the model's own setting, not the lane's: why an IP-Adapter model serves one channel only
            pipe.set_ip_adapter_scale(config.ip_adapter.scale if config.ip_adapter.enabled else 0.0)
            self.image_embeds = ip_adapter.style_embeds(
                pipe, config.ip_adapter_style_image_url, model.output_size
            )
        self.config = config

    def begin(self, frames: Sequence[np.ndarray]) -> list[np.ndarray] | torch.Tensor:
        """Prepare input frames: the finished outputs when no denoising is needed, else the image tensor."""
        model, config = self.model, self.config
        image_pre, image_post, _, _ = self.chains
        size = model.output_size
        frames = image_pre([resize(f, size, config.fit) for f in frames], self.previous)
        if config.skip_diffusion:
            self.previous = image_post(frames, self.previous)
            return list(self.previous)
        images = frames_to_tensor(frames, size, model.device, model.dtype)
        skip = self.filter is not None and self.filter.should_skip(images)  # the filter sees every frame
        if skip and self.previous is not None:
            self.skipped += 1
            return list(self.previous)
        self.control_images = [
            (frames_to_tensor([unit.preprocess(f) for f in frames], size, model.device, model.dtype) + 1.0)
            / 2.0
            for unit in self.controlnets
        ]
        return images

    def start_latents(self, latents: torch.Tensor | None) -> torch.Tensor:
        """The first step's noisy latents: the input's, noised (img2img), or the seed's noise (txt2img)."""
        if latents is None:
            return self.stream.first_step_noise()
        return self.stream.add_noise(self.chains[2](latents, self.previous_latents))

    def inputs(self) -> LaneInputs:
        """What this lane adds to its UNet calls (ControlNet images and settings, style embeds)."""
        return LaneInputs(
            frame_buffer_size=self.config.frame_buffer_size,
            controlnets=[unit.params for unit in self.controlnets],
            control_images=self.control_images,
            image_embeds=self.image_embeds,
        )

    def finish_latents(self, x0: torch.Tensor) -> torch.Tensor:
        """Latent post-processing; the result is what the next frame's feedback blends in."""
        x0 = self.chains[3](x0, self.previous_latents)
        self.previous_latents = x0
        return x0

    def finish(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Image post-processing of the decoded frames; they become the previous output."""
        self.previous = self.chains[1](frames, self.previous)
        return list(self.previous)

    def reset(self) -> None:
        """Forget earlier frames (after a warm-up): latent buffer, feedback, filter."""
        self.stream.reset()
        self.previous = self.previous_latents = None
        self.skipped = 0
        if self.filter is not None:
            self.filter.reset()

    def _preprocessor(self, params: ControlNetParams) -> Callable[[np.ndarray], np.ndarray]:
        """A ControlNet's preprocessor; networks (depth, hed) load once per model and stay for hot updates."""
        if params.preprocessor in NEURAL_PREPROCESSORS:
            return self.model.neural.preprocessor(params.preprocessor, params.preprocessor_params)
        return preprocessor(params.preprocessor, params.preprocessor_params)


def check(config: DiffusionParams) -> None:
    """Fail fast on settings no load could satisfy (unknown preprocessors, faceid...)."""
    for controlnet in config.enabled_controlnets():
        check_preprocessor(controlnet.preprocessor, controlnet.preprocessor_params)
    if config.ip_adapter is not None:
        ip_adapter.check_supported(config.ip_adapter)
    chains(config)


def chains(config: DiffusionParams) -> tuple[ImageChain, ImageChain, LatentChain, LatentChain]:
    """The processing blocks: image pre/post, latent pre/post."""
    return (
        ImageChain(config.image_preprocessing, "image_preprocessing"),
        ImageChain(config.image_postprocessing, "image_postprocessing"),
        LatentChain(config.latent_preprocessing, "latent_preprocessing"),
        LatentChain(config.latent_postprocessing, "latent_postprocessing"),
    )


def describe(engine: str, config: DiffusionParams, lane: Lane | None) -> dict[str, Any]:
    """What a channel's diffusion engine runs, for its ``ready`` report and stats."""
    return {
        "engine": engine,
        "model_id": config.model_id,
        "mode": config.mode,
        "size": [config.width, config.height],
        "batch_size": config.frame_buffer_size,
        "vae": "tiny" if config.use_tiny_vae else "full",
        "controlnets": [c.model_id for c in config.enabled_controlnets()],
        "frames_skipped": lane.skipped if lane else 0,
    }
