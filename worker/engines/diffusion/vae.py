"""Image <-> latent conversion for the full VAE (AutoencoderKL) and the tiny one (TAESD).

Both take and give images in [-1, 1]; latents are in the UNet's (scaled) space.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

from worker.engines.diffusion.loading import module_to


class LatentCodec:
    """Wraps a diffusers VAE; the full VAE's mean is used, so encoding is deterministic."""

    def __init__(self, vae: AutoencoderKL | AutoencoderTiny, dtype: torch.dtype) -> None:
        self.vae = vae
        self.is_tiny = isinstance(vae, AutoencoderTiny)
        # SDXL's full VAE overflows in fp16 (config.force_upcast); run it in fp32 then.
        self._dtype = (
            torch.float32 if getattr(vae.config, "force_upcast", False) and not self.is_tiny else dtype
        )
        self._model_dtype = dtype
        if vae.dtype != self._dtype:
            module_to(vae, self._dtype)
        self._scale: float = vae.config["scaling_factor"]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self._dtype)
        if self.is_tiny:
            latents = self.vae.encode(images).latents
        else:
            latents = self.vae.encode(images).latent_dist.mode()
        return (latents * self._scale).to(self._model_dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self._dtype) / self._scale
        return self.vae.decode(latents).sample.to(self._model_dtype)
