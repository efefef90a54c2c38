"""What the neural preprocessors share: frames in and grey maps out, ImageNet normalization, model loading."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from worker.engines.diffusion.loading import pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_network(
    load: Callable[..., Any], model_id: str, what: str, device: torch.device, dtype: torch.dtype
) -> Any:
    """``load(model_id)`` through ``pretrained`` (hub or local, clear error), on ``device``, in eval mode."""
    return pretrained(load, model_id, what, dtype=dtype).to(device).eval()


def frame_tensor(
    frame: np.ndarray, device: torch.device, dtype: torch.dtype, scale: float = 1 / 255
) -> torch.Tensor:
    """An ``HxWx3`` uint8 frame as a ``1x3xHxW`` tensor on ``device``, times ``scale`` (default: to [0,
    1]).
    """
    pixels = torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1)[None]
    return pixels.to(dtype) * scale


def grey_frame(values: torch.Tensor) -> np.ndarray:
    """An ``HxW`` tensor in [0, 1] as an ``HxWx3`` uint8 grey frame on the CPU."""
    grey = (values.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.repeat(grey[:, :, None], 3, axis=2)


class ImageNetNormalize:
    """``(x - mean) / std`` with ImageNet's statistics, kept on the model's device."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self._mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._mean) / self._std
