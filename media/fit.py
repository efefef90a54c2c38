"""Fitting a picture of one aspect ratio into a stream of another, without distorting it.

``crop`` scales the picture to cover the stream size and cuts the centre
(nothing is squeezed; the edges of the wider side are lost); ``pad`` scales
it to fit inside and letterboxes the rest in black (everything stays; bars
appear). Stretching is never offered: a 4:3 camera in a square stream would
turn circles into ellipses. Every place that brings input to a stream's size
(the WHIP ingest, the filter engine, the diffusion engine's ``resize``) goes
through :func:`plan`, so they all agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

FitMode = Literal["crop", "pad"]
FIT_MODES: tuple[FitMode, ...] = ("crop", "pad")
#: what Daydream does with input of another aspect ratio (its runner crops to the model's size)
DEFAULT_FIT: FitMode = "crop"
#: the params key a stream or channel names its mode with
PARAM = "fit"


def fit_mode(value: object) -> FitMode:
    """``value`` as a mode (None: the default); ``ValueError`` naming the choices otherwise."""
    if value is None:
        return DEFAULT_FIT
    if value not in FIT_MODES:
        raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, not {value!r}")
    return value


def mode_of(params: Mapping[str, Any]) -> FitMode:
    """The mode ``params`` ask for under :data:`PARAM`; ``ValueError`` for an unknown one."""
    return fit_mode(params.get(PARAM))


@dataclass(frozen=True)
class Fit:
    """How a ``source`` size reaches a ``target`` size: scale to ``scaled``, then cut or pad at ``offset``.

    ``offset`` is where the target's top-left corner sits in the scaled picture
    (crop) or where the scaled picture sits in the target (pad).
    """

    mode: FitMode
    target: tuple[int, int]
    scaled: tuple[int, int]
    offset: tuple[int, int]

    def place(self, scaled: np.ndarray) -> np.ndarray:
        """The target-sized picture from one already scaled to :attr:`scaled` (``HxWxC``)."""
        (width, height), (x, y) = self.target, self.offset
        if self.mode == "crop":
            return scaled[y : y + height, x : x + width]
        canvas = np.zeros((height, width, *scaled.shape[2:]), dtype=scaled.dtype)
        canvas[y : y + scaled.shape[0], x : x + scaled.shape[1]] = scaled
        return canvas


def plan(source: tuple[int, int], target: tuple[int, int], mode: FitMode = DEFAULT_FIT) -> Fit:
    """The scale and offset that bring ``source`` = ``(width, height)`` to ``target`` keeping its shape."""
    (src_w, src_h), (width, height) = source, target
    ratios = (width / src_w, height / src_h)
    scale = max(ratios) if mode == "crop" else min(ratios)
    if mode == "crop":  # cover: at least the target on both sides
        scaled = (max(width, round(src_w * scale)), max(height, round(src_h * scale)))
        offset = ((scaled[0] - width) // 2, (scaled[1] - height) // 2)
    else:  # inside: at most the target on both sides
        scaled = (max(1, min(width, round(src_w * scale))), max(1, min(height, round(src_h * scale))))
        offset = ((width - scaled[0]) // 2, (height - scaled[1]) // 2)
    return Fit(mode, target, scaled, offset)


def fit_rgb(rgb: np.ndarray, size: tuple[int, int], mode: FitMode = DEFAULT_FIT) -> np.ndarray:
    """``rgb`` (``HxWxC``) at ``size`` = ``(width, height)``, cropped or padded, never stretched.

    Area interpolation when shrinking, linear when growing; the same array when
    it already has the size.
    """
    height, width = rgb.shape[:2]
    if (width, height) == size:
        return rgb
    fit = plan((width, height), size, mode)
    if fit.scaled != (width, height):
        shrink = fit.scaled[0] * fit.scaled[1] < width * height
        rgb = cv2.resize(rgb, fit.scaled, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return fit.place(rgb)
