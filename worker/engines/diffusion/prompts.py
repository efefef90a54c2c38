"""Prompt embeddings: encoded once per text, blended per update.

Text encoders cost far more than a blend, so each distinct text is encoded
once and kept (bounded LRU); changing prompt weights or the interpolation
method on a hot update only re-blends cached tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from worker.engines.diffusion.blending import blend, normalize_weights
from worker.engines.diffusion.stream import Conditioning


class PromptEncoder:
    """Encodes prompts with a diffusers pipeline's ``encode_prompt`` (SD or SDXL)."""

    def __init__(self, pipe: Any, size: tuple[int, int], cache_size: int = 64) -> None:
        self._pipe = pipe
        self._is_xl = getattr(pipe, "text_encoder_2", None) is not None
        width, height = size
        self._time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        self._cache: OrderedDict[str, Conditioning] = OrderedDict()
        self._cache_size = cache_size

    def encode(self, text: str) -> Conditioning:
        """Conditioning for one text (batch of one), from the cache when possible."""
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        cond = self._encode(text)
        self._cache[text] = cond
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return cond

    def blend(self, prompts: Sequence[tuple[str, float]], method: str, normalize: bool) -> Conditioning:
        """Weighted blend of several prompts' embeddings (pooled SDXL embeds blend alike)."""
        conds = [self.encode(text) for text, _ in prompts]
        weights = normalize_weights([w for _, w in prompts], normalize)
        embeds = blend([c.embeds for c in conds], weights, method)
        pooled = [c.pooled for c in conds if c.pooled is not None]  # all of them (SDXL) or none
        return Conditioning(embeds, blend(pooled, weights, method) if pooled else None, conds[0].time_ids)

    @torch.inference_mode()
    def _encode(self, text: str) -> Conditioning:
        pipe = self._pipe
        device = pipe.unet.device
        if not self._is_xl:
            embeds, _ = pipe.encode_prompt(text, device, 1, False)
            return Conditioning(embeds)
        embeds, _, pooled, _ = pipe.encode_prompt(text, device=device, do_classifier_free_guidance=False)
        time_ids = self._time_ids.to(device, embeds.dtype)
        return Conditioning(embeds, pooled.to(embeds.dtype), time_ids)
