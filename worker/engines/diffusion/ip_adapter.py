"""IP-Adapter (style image) through diffusers' ``load_ip_adapter``.

Only the ``regular`` adapter for SD 1.5 and SDXL is supported: ``faceid``
needs insightface face embeddings, and no IP-Adapter exists for SD 2.1
(sd-turbo). ``model_id`` is h94/IP-Adapter or a directory laid out like it
(``models/ip-adapter_sd15.safetensors`` and ``models/image_encoder/``; the
same under ``sdxl_models/``). The style image arrives as a ``data:`` URL; fetching https URLs
belongs to the API, which must refuse private addresses.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import cv2
import numpy as np
import torch

from relay.config import RelayConfig
from wire.errors import ProtocolError
from wire.images import check_picture
from worker.engines.base import EngineError
from worker.engines.diffusion.loading import pretrained
from worker.engines.diffusion.params import IPAdapterParams

WEIGHTS = {  # keyed by "is SDXL": (subfolder, weight file)
    False: ("models", "ip-adapter_sd15.safetensors"),
    True: ("sdxl_models", "ip-adapter_sdxl.safetensors"),
}
SD2_CROSS_ATTENTION_DIM = 1024
#: widest and tallest style image decoded: the relay's default frame limits, which the API applies
#: too (from the relay's settings); checked from the header, so a decompression bomb is never decoded
MAX_STYLE_SIZE = (RelayConfig.max_width, RelayConfig.max_height)


def check_supported(params: IPAdapterParams) -> None:
    """Reject what can never load, before any weights are read."""
    if params.type == "faceid":
        raise EngineError(
            "ip_adapter type 'faceid' needs insightface face embeddings, which this server lacks"
        )


def load_ip_adapter(pipe: Any, is_xl: bool, params: IPAdapterParams) -> None:
    """Install the adapter's attention processors and image encoder into ``pipe``."""
    if not is_xl and pipe.unet.config.cross_attention_dim == SD2_CROSS_ATTENTION_DIM:
        raise EngineError("IP-Adapter works with SD 1.5 and SDXL models only, not SD 2.x (sd-turbo)")
    subfolder, weight_name = WEIGHTS[is_xl]
    pretrained(
        lambda source, **kw: pipe.load_ip_adapter(source, subfolder=subfolder, weight_name=weight_name, **kw),
        params.model_id,
        "IP-Adapter",
    )


@torch.inference_mode()
def style_embeds(pipe: Any, url: str | None, size: tuple[int, int]) -> torch.Tensor:
    """Image embeddings of the style image (a neutral grey one when there is none)."""
    image = decode_data_url(url) if url else np.full((size[1], size[0], 3), 127, dtype=np.uint8)
    embeds = pipe.prepare_ip_adapter_image_embeds(
        ip_adapter_image=[image],
        ip_adapter_image_embeds=None,
        device=pipe.unet.device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
    )
    return embeds[0]


def decode_data_url(url: str, max_size: tuple[int, int] = MAX_STYLE_SIZE) -> np.ndarray:
    """An RGB array from a ``data:image/...;base64,...`` URL (JPEG, PNG, WebP, BMP or GIF).

    Its size is read from the header first: the API checks it too, but params can reach a worker
    by other roads (a relay client, an older stored stream).
    """
    header, _, payload = url.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise EngineError("ip_adapter_style_image_url must be a data:image/...;base64 URL here")
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise EngineError(f"ip_adapter_style_image_url is not valid base64: {exc}") from None
    try:
        check_picture(raw, *max_size)
    except ProtocolError as exc:
        raise EngineError(f"ip_adapter_style_image_url: {exc}") from None
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise EngineError("ip_adapter_style_image_url does not hold a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
