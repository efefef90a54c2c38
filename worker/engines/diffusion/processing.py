"""Daydream's processing blocks: image filters around the model, feedback loops in latent space.

``image_preprocessing`` runs on input frames before encoding,
``image_postprocessing`` on output frames; ``latent_preprocessing`` on the
encoded input latents, ``latent_postprocessing`` on the denoised ones. Image
blocks take the weight-free preprocessors plus ``feedback`` (blend in the
previous output frame); latent blocks take ``latent_feedback`` (blend in
the previous output latents), which steadies the stream over time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from worker.engines.base import EngineError
from worker.engines.diffusion.params import ProcessingParams
from worker.engines.diffusion.preprocessors import PREPROCESSORS, bind


def feedback(frame: np.ndarray, previous: np.ndarray | None, feedback_strength: float = 0.15) -> np.ndarray:
    """Blend the previous output frame into ``frame``."""
    if previous is None or previous.shape != frame.shape:
        return frame
    return cv2.addWeighted(frame, 1.0 - feedback_strength, previous, feedback_strength, 0)


def latent_feedback(
    latents: torch.Tensor, previous: torch.Tensor | None, feedback_strength: float = 0.15
) -> torch.Tensor:
    """Blend the previous output latents into ``latents``."""
    if previous is None or previous.shape != latents.shape:
        return latents
    return torch.lerp(latents, previous, feedback_strength)


class ImageChain:
    """The enabled image processors of a block, in order."""

    def __init__(self, block: ProcessingParams | None, label: str) -> None:
        self._steps: list[tuple[bool, Callable[..., np.ndarray]]] = []
        for spec in block.active() if block else []:
            if spec.type == "feedback":
                self._steps.append((True, bind(feedback, spec.params, f"{label} processor 'feedback'")))
            elif spec.type in PREPROCESSORS:
                self._steps.append(
                    (False, bind(PREPROCESSORS[spec.type], spec.params, f"{label} processor {spec.type!r}"))
                )
            else:
                names = ", ".join(sorted([*PREPROCESSORS, "feedback"]))
                raise EngineError(
                    f"{label} processor {spec.type!r} is not supported here; available: {names}"
                )

    def __call__(
        self, frames: Sequence[np.ndarray], previous: Sequence[np.ndarray] | None
    ) -> list[np.ndarray]:
        out = list(frames)
        for needs_previous, step in self._steps:
            if needs_previous:
                out = [step(f, previous[i] if previous else None) for i, f in enumerate(out)]
            else:
                out = [step(f) for f in out]
        return out


class LatentChain:
    """The enabled latent processors of a block (only ``latent_feedback`` exists)."""

    def __init__(self, block: ProcessingParams | None, label: str) -> None:
        self._steps: list[Callable[..., Any]] = []
        for spec in block.active() if block else []:
            if spec.type != "latent_feedback":
                raise EngineError(
                    f"{label} processor {spec.type!r} is not supported here; available: latent_feedback"
                )
            self._steps.append(bind(latent_feedback, spec.params, f"{label} processor 'latent_feedback'"))

    def __call__(self, latents: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        for step in self._steps:
            latents = step(latents, previous)
        return latents
