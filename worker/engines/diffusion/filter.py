"""StreamDiffusion's stochastic similar-image filter.

A static camera sends near-identical frames; running the UNet on them
wastes the GPU. The filter skips a frame with a probability that grows as
its cosine similarity to the last processed frame passes ``threshold``,
but never more than ``max_skip_frame`` frames in a row.
"""

from __future__ import annotations

import random

import torch


class SimilarImageFilter:
    """Decides per input batch whether to reuse the previous output."""

    def __init__(self, threshold: float, max_skip_frame: int, seed: int = 0) -> None:
        self.threshold = threshold
        self.max_skip_frame = max_skip_frame
        self._random = random.Random(seed)
        self._previous: torch.Tensor | None = None
        self._skipped = 0

    def should_skip(self, images: torch.Tensor) -> bool:
        """True when ``images`` is close enough to the last processed input to be skipped."""
        if self._previous is not None and self._previous.shape == images.shape:
            similarity = torch.nn.functional.cosine_similarity(
                self._previous.flatten().float(), images.flatten().float(), dim=0, eps=1e-6
            ).item()
            skip = self._random.uniform(0.0, 1.0) < self.skip_probability(similarity)
            if skip and self._skipped < self.max_skip_frame:
                self._skipped += 1
                return True
        self._skipped = 0
        self._previous = images.detach().clone()
        return False

    def skip_probability(self, similarity: float) -> float:
        """0 below ``threshold``, rising linearly to 1 at identical frames."""
        if self.threshold >= 1.0:
            return 0.0
        return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - self.threshold))

    def reset(self) -> None:
        self._previous = None
        self._skipped = 0
