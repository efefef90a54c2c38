"""The noise predictor the stream calls: the UNet, plus ControlNet residuals and IP-Adapter embeds.

Rows of a stream batch come in blocks of ``frame_buffer_size`` (one block
per denoising step, doubled for CFG), so row ``r`` belongs to frame
``r % frame_buffer_size`` and each frame's control image is tiled to match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker.engines.diffusion.images import frames_to_tensor
from worker.engines.diffusion.params import ControlNetParams
from worker.engines.diffusion.stream import Conditioning


@dataclass
class ControlNetUnit:
    """A loaded ControlNet with its (hot-updatable) settings and bound preprocessor."""

    model: torch.nn.Module
    params: ControlNetParams
    preprocess: Callable[[np.ndarray], np.ndarray]


class UNetPredictor:
    """Implements ``stream.NoisePredictor`` for a diffusers UNet."""

    def __init__(
        self, unet: Callable[..., Any], controlnets: Sequence[ControlNetUnit], frame_buffer_size: int
    ) -> None:
        self.unet = unet
        self.controlnets = list(controlnets)
        self.image_embeds: torch.Tensor | None = None  # IP-Adapter style image, one row
        self._fbs = frame_buffer_size
        self._control_images: list[torch.Tensor] = []

    def set_control_frames(
        self, frames: Sequence[np.ndarray], size: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> None:
        """Preprocess the current input frames into each ControlNet's image (in [0, 1])."""
        self._control_images = [
            (frames_to_tensor([unit.preprocess(f) for f in frames], size, device, dtype) + 1.0) / 2.0
            for unit in self.controlnets
        ]

    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        steps: torch.Tensor,
        num_steps: int,
        cond: Conditioning,
    ) -> torch.Tensor:
        added = cond.added_cond_kwargs()
        if self.image_embeds is not None:
            added = {**(added or {}), "image_embeds": [self.image_embeds.repeat(len(latents), 1, 1)]}
        residuals = self._control_residuals(latents, timesteps, steps, num_steps, cond)
        return self.unet(
            latents,
            timesteps,
            encoder_hidden_states=cond.embeds,
            added_cond_kwargs=added,
            return_dict=False,
            **residuals,
        )[0]

    def _control_residuals(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        steps: torch.Tensor,
        num_steps: int,
        cond: Conditioning,
    ) -> dict[str, Any]:
        """Summed ControlNet residuals, each scaled per row by its scale and guidance window."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for unit, image in zip(self.controlnets, self._control_images, strict=True):
            scale = self._row_scales(unit.params, steps, num_steps).to(latents.dtype)
            if not bool(scale.any()):
                continue
            unit_down, unit_mid = unit.model(
                latents,
                timesteps,
                encoder_hidden_states=cond.embeds,
                controlnet_cond=image.repeat(len(latents) // self._fbs, 1, 1, 1),
                added_cond_kwargs=cond.added_cond_kwargs(),
                return_dict=False,
            )
            unit_down = [r * scale.view(-1, 1, 1, 1) for r in unit_down]
            unit_mid = unit_mid * scale.view(-1, 1, 1, 1)
            down = unit_down if down is None else [a + b for a, b in zip(down, unit_down, strict=True)]
            mid = unit_mid if mid is None else mid + unit_mid
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    @staticmethod
    def _row_scales(params: ControlNetParams, steps: torch.Tensor, num_steps: int) -> torch.Tensor:
        """``conditioning_scale`` for rows whose step lies in the guidance window, else 0 (as diffusers)."""
        start = steps.float() / num_steps
        end = (steps.float() + 1) / num_steps
        inside = (start >= params.control_guidance_start) & (end <= params.control_guidance_end)
        return inside.float() * params.conditioning_scale
