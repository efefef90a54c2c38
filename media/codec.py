"""JPEG and PNG to and from RGB arrays.

simplejpeg for JPEG (fastest here, see ../shared/media-notes.md; 4:2:0
subsampling made explicit because its default, 4:4:4, costs twice as much),
OpenCV for PNG. All functions release the GIL in their C code, so a thread
pool runs them in parallel with the engine.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

from wire.errors import ProtocolError
from wire.frames import ImageFormat

DEFAULT_QUALITY = 85


def encode_image(
    rgb: np.ndarray, fmt: ImageFormat = ImageFormat.JPEG, quality: int = DEFAULT_QUALITY
) -> bytes:
    """Encode an ``HxWx3`` uint8 RGB array."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if fmt == ImageFormat.JPEG:
        return simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB", colorsubsampling="420")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_image(data: bytes, fmt: ImageFormat | None = None) -> np.ndarray:
    """Decode to an ``HxWx3`` uint8 RGB array; bad bytes raise ``ProtocolError``."""
    if fmt is None:
        fmt = ImageFormat.JPEG if data[:2] == b"\xff\xd8" else ImageFormat.PNG
    try:
        if fmt == ImageFormat.JPEG:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except (ValueError, cv2.error) as exc:
        raise ProtocolError(f"cannot decode {fmt.label} image: {exc}", "bad_image") from None
    if bgr is None:
        raise ProtocolError(f"cannot decode {fmt.label} image", "bad_image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize when needed; area interpolation when shrinking, linear when growing."""
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    shrink = width * height < w * h
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
