"""The ``depth`` ControlNet preprocessor: a transformers depth-estimation model on the engine's device.

Depth Anything V2 Small by default (``preprocessor_params.model_id`` picks any
``AutoModelForDepthEstimation`` checkpoint, hub id or local directory). The
frame is resized so both sides are multiples of the backbone's patch size
(short side ``detect_resolution``), normalized with ImageNet's mean and std
as Depth Anything and DPT expect, and the predicted depth is scaled to
0-255 per frame (near = bright) and resized back to the frame's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForDepthEstimation

from worker.engines.base import EngineError
from worker.engines.diffusion.vision import ImageNetNormalize, frame_tensor, grey_frame, load_network

DEPTH_PREPROCESSORS = frozenset({"depth", "depth_anything"})
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
PARAMS = {"model_id", "detect_resolution"}


def check_depth_params(params: Mapping[str, Any]) -> None:
    """Refuse unknown or unusable ``preprocessor_params`` before any weights load."""
    unknown = set(params) - PARAMS
    if unknown:
        raise EngineError(f"preprocessor 'depth' takes parameters {sorted(PARAMS)}, got {sorted(params)}")
    resolution = params.get("detect_resolution", 518)
    if not isinstance(resolution, int) or not 64 <= resolution <= 2048:
        raise EngineError("preprocessor 'depth': detect_resolution must be an integer in 64..2048")


def depth_model_id(params: Mapping[str, Any]) -> str:
    return str(params.get("model_id", DEFAULT_DEPTH_MODEL))


class DepthEstimator:
    """One depth model: RGB uint8 frame in, grey depth frame of the same size out."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model = load_network(
            AutoModelForDepthEstimation.from_pretrained, model_id, "depth model", device, dtype
        )
        backbone = getattr(self.model.config, "backbone_config", None)
        self.patch = int(getattr(backbone, "patch_size", 14) or 14)
        self._device, self._dtype = device, dtype
        self._normalize = ImageNetNormalize(device, dtype)

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray, detect_resolution: int = 518) -> np.ndarray:
        height, width = frame.shape[:2]
        scale = detect_resolution / min(height, width)
        size = [max(self.patch, round(side * scale / self.patch) * self.patch) for side in (height, width)]
        pixels = F.interpolate(
            frame_tensor(frame, self._device, self._dtype), size=size, mode="bicubic", align_corners=False
        )
        depth = self.model(pixel_values=self._normalize(pixels)).predicted_depth[:, None].float()
        depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        low, high = depth.min(), depth.max()
        return grey_frame(
            (depth - low) / (high - low) if float(high - low) > 1e-12 else torch.zeros_like(depth)
        )
