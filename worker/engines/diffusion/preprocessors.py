"""ControlNet preprocessors that need no model weights, done with OpenCV.

Each takes and returns an ``HxWx3`` uint8 RGB frame. ``depth``, ``hed``
and ``openpose`` run networks (``neural.py``); the other neural
preprocessors of Daydream (normal, mediapipe_face...) need weights and code
this server does not have, and asking for one raises ``EngineError``. ``lineart`` and
``soft_edge`` are classical approximations of the neural ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import cv2
import numpy as np

from worker.engines.base import EngineError
from worker.engines.diffusion.neural import NEURAL_PREPROCESSORS, check_neural_params

Preprocessor = Callable[..., np.ndarray]

NEURAL = frozenset({"depth_tensorrt", "normal", "mediapipe_face", "lineart_anime"})


def passthrough(frame: np.ndarray) -> np.ndarray:
    """The frame as is (for inputs that are already control images)."""
    return frame


def canny(frame: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    edges = cv2.Canny(frame, low_threshold, high_threshold)
    return np.repeat(edges[:, :, None], 3, axis=2)


def blur(frame: np.ndarray, kernel_size: int = 15) -> np.ndarray:
    size = int(kernel_size) | 1  # Gaussian kernels must be odd
    return cv2.GaussianBlur(frame, (size, size), 0)


def sharpen(frame: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Unsharp mask: add back ``strength`` times the detail a blur removes."""
    blurred = cv2.GaussianBlur(frame, (0, 0), 3)
    return cv2.addWeighted(frame, 1.0 + strength, blurred, -strength, 0)


def color(frame: np.ndarray, block_size: int = 64) -> np.ndarray:
    """A coarse colour grid, as the SD 2.1 colour ControlNet expects."""
    height, width = frame.shape[:2]
    grid = (max(1, int(width // block_size)), max(1, int(height // block_size)))
    small = cv2.resize(frame, grid, interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def standard_lineart(
    frame: np.ndarray, gaussian_sigma: float = 6.0, intensity_threshold: int = 8
) -> np.ndarray:
    """controlnet_aux's weight-free "standard lineart": dark detail against a blurred copy."""
    pixels = frame.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(pixels, (0, 0), gaussian_sigma) - pixels, axis=2).clip(0, 255)
    strong = intensity[intensity > intensity_threshold]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
    lines = (intensity * 127).clip(0, 255).astype(np.uint8)
    return np.repeat(lines[:, :, None], 3, axis=2)


def soft_edge(frame: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Soft edges (an HED stand-in): blurred Sobel gradient magnitude, normalized."""
    gray = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), sigma)
    magnitude = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    blurred = cv2.GaussianBlur(magnitude, (0, 0), sigma)
    edges = cv2.normalize(blurred, np.empty_like(blurred), 0, 255, cv2.NORM_MINMAX)
    return np.repeat(edges.astype(np.uint8)[:, :, None], 3, axis=2)


def upscale(frame: np.ndarray, scale_factor: float = 2.0) -> np.ndarray:
    """Lanczos resize by ``scale_factor`` (1-4): an image post-processing step for larger output."""
    if not 1.0 <= float(scale_factor) <= 4.0:
        raise EngineError("processor 'upscale': scale_factor must be in 1..4")
    height, width = frame.shape[:2]
    size = (round(width * scale_factor), round(height * scale_factor))
    return cv2.resize(frame, size, interpolation=cv2.INTER_LANCZOS4)


PREPROCESSORS: dict[str, Preprocessor] = {
    "passthrough": passthrough,
    "canny": canny,
    "blur": blur,
    "sharpen": sharpen,
    "color": color,
    "standard_lineart": standard_lineart,
    "lineart": standard_lineart,
    "soft_edge": soft_edge,
    "upscale": upscale,
}


def preprocessor(name: str, params: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """The weight-free preprocessor ``name`` bound to ``params``; ``EngineError`` if either is unusable."""
    if name not in PREPROCESSORS:
        reason = "needs model weights this server does not have" if name in NEURAL else "is unknown"
        available = ", ".join(sorted([*PREPROCESSORS, *NEURAL_PREPROCESSORS]))
        raise EngineError(f"preprocessor {name!r} {reason}; available: {available}")
    return bind(PREPROCESSORS[name], params, f"preprocessor {name!r}")


def check_preprocessor(name: str, params: Mapping[str, Any]) -> None:
    """Raise ``EngineError`` if ``name`` with ``params`` can never run; loads nothing."""
    if name in NEURAL_PREPROCESSORS:
        check_neural_params(name, params)
    else:
        preprocessor(name, params)


def bind(function: Callable[..., Any], params: Mapping[str, Any], label: str) -> Callable[..., Any]:
    """``function`` with keyword ``params`` fixed, after checking it accepts them."""
    signature = inspect.signature(function)
    positional = [p for p in signature.parameters.values() if p.default is inspect.Parameter.empty]
    try:
        signature.bind(*[None] * len(positional), **params)
    except TypeError:
        accepted = [p.name for p in signature.parameters.values() if p.default is not inspect.Parameter.empty]
        raise EngineError(f"{label} takes parameters {accepted}, got {sorted(params)}") from None
    return lambda *args: function(*args, **params)
