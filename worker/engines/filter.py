"""``filter``: real OpenCV effects on the CPU, for machines without a GPU.

Every parameter is hot. ``effect`` picks the look; without it, words in the
``prompt`` do ("a pencil sketch of..." gives ``sketch``), so the same
Daydream params that drive the diffusion engine give a visible change here.
With ``width`` and ``height`` the output has that size; input of another
aspect ratio is cropped or padded (``fit``, :mod:`media.fit`), never stretched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from media.fit import FitMode, fit_rgb, mode_of
from worker.engines.base import Engine, EngineError


def cartoon(rgb: np.ndarray) -> np.ndarray:
    small = cv2.pyrDown(rgb)
    smooth = cv2.bilateralFilter(small, 7, 60, 60)
    smooth = cv2.resize(smooth, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    gray = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 5)
    edges = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 4)
    quantized = (smooth // 32) * 32 + 16
    return cv2.bitwise_and(quantized, quantized, mask=edges)


def edges(rgb: np.ndarray) -> np.ndarray:
    gray = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    lines = cv2.Canny(gray, 60, 140)
    return cv2.cvtColor(lines, cv2.COLOR_GRAY2RGB)


def sketch(rgb: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    blur = cv2.GaussianBlur(255 - gray, (21, 21), 0)
    pencil = cv2.divide(gray, 255 - blur, scale=256)
    return cv2.cvtColor(pencil, cv2.COLOR_GRAY2RGB)


_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)


def sepia(rgb: np.ndarray) -> np.ndarray:
    return cv2.transform(rgb, _SEPIA)  # saturates to uint8


def invert(rgb: np.ndarray) -> np.ndarray:
    return 255 - rgb


def posterize(rgb: np.ndarray) -> np.ndarray:
    return (rgb // 64) * 64 + 32


def _colormap(code: int) -> Callable[[np.ndarray], np.ndarray]:
    def apply(rgb: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return cv2.cvtColor(cv2.applyColorMap(gray, code), cv2.COLOR_BGR2RGB)

    return apply


EFFECTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "cartoon": cartoon,
    "edges": edges,
    "sketch": sketch,
    "sepia": sepia,
    "invert": invert,
    "posterize": posterize,
    "ocean": _colormap(cv2.COLORMAP_OCEAN),
    "inferno": _colormap(cv2.COLORMAP_INFERNO),
    "neon": _colormap(cv2.COLORMAP_TURBO),
    "autumn": _colormap(cv2.COLORMAP_AUTUMN),
}

#: words in a prompt that choose an effect, checked in order
PROMPT_WORDS: list[tuple[tuple[str, ...], str]] = [
    (("sketch", "pencil", "drawing", "charcoal"), "sketch"),
    (("edge", "outline", "line art", "lineart", "wireframe"), "edges"),
    (("sepia", "vintage", "old photo", "antique"), "sepia"),
    (("negative", "invert"), "invert"),
    (("poster", "pop art", "warhol"), "posterize"),
    (("ocean", "underwater", "sea", "blue"), "ocean"),
    (("fire", "lava", "inferno", "hell"), "inferno"),
    (("neon", "cyberpunk", "synthwave", "psychedelic"), "neon"),
    (("autumn", "sunset", "golden"), "autumn"),
    (("cartoon", "anime", "comic", "illustration"), "cartoon"),
]
DEFAULT_EFFECT = "cartoon"


def effect_for(params: Mapping[str, Any]) -> str:
    """The effect ``params`` ask for: ``effect`` if given, else the prompt's words."""
    effect = params.get("effect")
    if effect:
        if effect not in EFFECTS:
            raise EngineError(f"unknown effect {effect!r}; choose one of {sorted(EFFECTS)}")
        return effect
    prompt = params.get("prompt") or ""
    if isinstance(prompt, list):  # Daydream's weighted form: [[text, weight], ...]
        prompt = " ".join(str(item[0]) for item in prompt if item)
    text = str(prompt).lower()
    for words, name in PROMPT_WORDS:
        if any(word in text for word in words):
            return name
    return DEFAULT_EFFECT


class FilterEngine(Engine):
    name = "filter"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self.effect = effect_for(self.params)
        self.strength = _strength(self.params)
        self._size = _size(self.params)
        self.fit = _fit(self.params)

    @property
    def output_size(self) -> tuple[int, int] | None:
        return self._size

    def update(self, params: Mapping[str, Any]) -> set[str]:
        merged = {**self.params, **params}
        effect, strength, size, fit = effect_for(merged), _strength(merged), _size(merged), _fit(merged)
        self.params, self.effect, self.strength, self._size, self.fit = merged, effect, strength, size, fit
        return set()

    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self._one(frame) for frame in frames]

    def _one(self, rgb: np.ndarray) -> np.ndarray:
        if self._size is not None:  # another aspect ratio is cropped or padded, never stretched
            rgb = fit_rgb(rgb, self._size, self.fit)
        out = EFFECTS[self.effect](rgb)
        if self.strength < 1.0:
            out = cv2.addWeighted(out, self.strength, rgb, 1.0 - self.strength, 0)
        return out

    def info(self) -> dict[str, Any]:
        return {"engine": self.name, "device": "cpu", "effect": self.effect, "effects": sorted(EFFECTS)}


def _strength(params: Mapping[str, Any]) -> float:
    value = params.get("strength", 1.0)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise EngineError(f"strength must be a number in 0..1, not {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise EngineError(f"strength must be in 0..1, not {value}")
    return value


def _fit(params: Mapping[str, Any]) -> FitMode:
    try:
        return mode_of(params)
    except ValueError as exc:
        raise EngineError(str(exc)) from None


def _size(params: Mapping[str, Any]) -> tuple[int, int] | None:
    width, height = params.get("width"), params.get("height")
    if width is None and height is None:
        return None
    try:
        width, height = int(width), int(height)  # type: ignore[arg-type]  # None: TypeError, below
    except (TypeError, ValueError):
        raise EngineError("width and height must both be integers") from None
    if not (8 <= width <= 4096 and 8 <= height <= 4096):
        raise EngineError(f"size {width}x{height} outside 8..4096")
    return width, height
