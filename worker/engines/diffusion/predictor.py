"""The noise predictor: one UNet call (plus ControlNet residuals) for the calls of one or more streams.

Each stream (a channel's lane) brings its own rows: latents, timesteps and
prompt conditioning from its :class:`~.stream.UNetCall`, and from its
:class:`LaneInputs` its ControlNet images, ControlNet settings and IP-Adapter
image embeds. The rows are concatenated into one batch, so channels sharing a
model share each UNet call, and the prediction is split back per call.

Within a stream's call rows come in blocks of ``frame_buffer_size`` (one block
per denoising step, doubled for CFG), so row ``r`` belongs to frame
``r % frame_buffer_size`` and each frame's control image is tiled to match.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.models.controlnets.controlnet import ControlNetModel

from worker.engines.base import EngineError
from worker.engines.diffusion.params import ControlNetParams
from worker.engines.diffusion.stream import Conditioning, UNetCall


@dataclass
class LaneControlNet:
    """One ControlNet as a channel uses it: its (hot-updatable) settings and bound preprocessor."""

    params: ControlNetParams
    preprocess: Callable[[np.ndarray], np.ndarray]


@dataclass
class LaneInputs:
    """What a channel adds to its UNet calls besides latents and prompt."""

    frame_buffer_size: int
    controlnets: list[ControlNetParams] = field(default_factory=list)  # one per loaded ControlNet
    control_images: list[torch.Tensor] = field(default_factory=list)  # per ControlNet, fbs rows in [0, 1]
    image_embeds: torch.Tensor | None = None  # IP-Adapter style image, one row


class UNetPredictor:
    """Runs the UNet and the loaded ControlNets on the concatenated rows of several calls."""

    def __init__(self, unet: Callable[..., Any], controlnets: Sequence[ControlNetModel]) -> None:
        self.unet = unet
        self.controlnets = list(controlnets)

    def predict(self, calls: Sequence[tuple[UNetCall, LaneInputs]]) -> list[torch.Tensor]:
        """One noise prediction per call, computed in one batch."""
        latents = torch.cat([call.latents for call, _ in calls]) if len(calls) > 1 else calls[0][0].latents
        timesteps = torch.cat([call.timesteps for call, _ in calls])
        cond = Conditioning.concat([call.cond for call, _ in calls])
        added: Mapping[str, torch.Tensor | list[torch.Tensor]] | None = cond.added_cond_kwargs()
        embeds = [(e, len(call.latents)) for call, inputs in calls if (e := inputs.image_embeds) is not None]
        if embeds:
            if len(embeds) != len(calls):
                raise EngineError("calls with and without an IP-Adapter style image cannot be batched")
            rows = [e.repeat(n, 1, 1) for e, n in embeds]
            added = {**(added or {}), "image_embeds": [torch.cat(rows)]}
        residuals = self._control_residuals(calls, latents, timesteps, cond)
        eps = self.unet(
            latents,
            timesteps,
            encoder_hidden_states=cond.embeds,
            added_cond_kwargs=added,
            return_dict=False,
            **residuals,
        )[0]
        return list(eps.split([len(call.latents) for call, _ in calls]))

    def _control_residuals(
        self,
        calls: Sequence[tuple[UNetCall, LaneInputs]],
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
    ) -> dict[str, Any]:
        """Summed ControlNet residuals, each scaled per row by its channel's scale and guidance window."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for index, model in enumerate(self.controlnets):
            scale = torch.cat(
                [_row_scales(inputs.controlnets[index], call.steps, call.num_steps) for call, inputs in calls]
            ).to(latents.dtype)
            if not bool(scale.any()):
                continue
            image = torch.cat(
                [
                    inputs.control_images[index].repeat(
                        len(call.latents) // inputs.frame_buffer_size, 1, 1, 1
                    )
                    for call, inputs in calls
                ]
            )
            unit_down, unit_mid = model(
                latents,
                timesteps,
                encoder_hidden_states=cond.embeds,
                controlnet_cond=image,
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


def _row_scales(params: ControlNetParams, steps: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``conditioning_scale`` for rows whose step lies in the guidance window, else 0 (as diffusers)."""
    start = steps.float() / num_steps
    end = (steps.float() + 1) / num_steps
    inside = (start >= params.control_guidance_start) & (end <= params.control_guidance_end)
    return inside.float() * params.conditioning_scale
