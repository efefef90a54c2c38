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
from worker.engines.diffusion.loading import pretrained

DEPTH_PREPROCESSORS = frozenset({"depth", "depth_anything"})
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
        load = AutoModelForDepthEstimation.from_pretrained
        self.model = pretrained(load, model_id, "depth model", dtype=dtype).to(device).eval()
        backbone = getattr(self.model.config, "backbone_config", None)
        self.patch = int(getattr(backbone, "patch_size", 14) or 14)
        self._device, self._dtype = device, dtype
        self._mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray, detect_resolution: int = 518) -> np.ndarray:
        height, width = frame.shape[:2]
        pixels = torch.from_numpy(np.ascontiguousarray(frame)).to(self._device).permute(2, 0, 1)[None]
        pixels = pixels.to(self._dtype) / 255.0
        scale = detect_resolution / min(height, width)
        size = [max(self.patch, round(side * scale / self.patch) * self.patch) for side in (height, width)]
        pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False)
        depth = self.model(pixel_values=(pixels - self._mean) / self._std).predicted_depth[:, None].float()
        depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        low, high = depth.min(), depth.max()
        depth = (depth - low) / (high - low) if float(high - low) > 1e-12 else torch.zeros_like(depth)
        grey = (depth * 255).round().to(torch.uint8).cpu().numpy()
        return np.repeat(grey[:, :, None], 3, axis=2)
