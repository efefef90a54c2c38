"""Frames (``HxWx3`` uint8 RGB numpy) to model tensors (``Bx3xHxW`` in [-1, 1]) and back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from media.fit import DEFAULT_FIT, FitMode, fit_rgb


def resize(frame: np.ndarray, size: tuple[int, int], fit: FitMode = DEFAULT_FIT) -> np.ndarray:
    """``frame`` at ``size`` = ``(width, height)``: another aspect ratio is cropped or padded
    (``fit``, :mod:`media.fit`), never stretched; area filter when shrinking, linear when growing."""
    return fit_rgb(frame, size, fit)


def frames_to_tensor(
    frames: Sequence[np.ndarray], size: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Stack frames resized to ``size`` into a ``Bx3xHxW`` tensor in [-1, 1]."""
    batch = np.stack([np.ascontiguousarray(resize(f, size)) for f in frames])
    tensor = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
    return tensor.to(dtype) / 127.5 - 1.0


def tensor_to_frames(images: torch.Tensor) -> list[np.ndarray]:
    """Inverse of ``frames_to_tensor``: clamp, quantize and move to the CPU."""
    pixels = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())
