"""Frames (``HxWx3`` uint8 RGB numpy) to model tensors (``Bx3xHxW`` in [-1, 1]) and back."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch


def resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``frame`` at ``size`` = ``(width, height)``; area filter when shrinking, linear when growing."""
    height, width = frame.shape[:2]
    if (width, height) == size:
        return frame
    shrinking = width * height > size[0] * size[1]
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


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
