"""ControlNet preprocessors that run a network on the engine's device: ``depth``, ``hed``, ``openpose``.

Each model loads once per engine, when the engine loads, and is kept for hot
updates; ``preprocessor_params.model_id`` picks the weights (a change of it
is a reload, see ``ControlNetParams.structure``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from worker.engines.diffusion.depth import (
    DEFAULT_DEPTH_MODEL,
    DEPTH_PREPROCESSORS,
    DepthEstimator,
    check_depth_params,
)
from worker.engines.diffusion.hed import (
    DEFAULT_HED_MODEL,
    HEDDetector,
    HEDNetwork,
    check_hed_params,
    load_hed_weights,
)
from worker.engines.diffusion.loading import pretrained
from worker.engines.diffusion.pose import (
    DEFAULT_POSE_MODEL,
    POSE_PREPROCESSORS,
    PoseEstimator,
    check_pose_params,
)

NEURAL_PREPROCESSORS = DEPTH_PREPROCESSORS | POSE_PREPROCESSORS | {"hed"}


def check_neural_params(name: str, params: Mapping[str, Any]) -> None:
    """``EngineError`` for parameters the preprocessor ``name`` does not take; loads nothing."""
    if name in DEPTH_PREPROCESSORS:
        check_depth_params(params)
    elif name in POSE_PREPROCESSORS:
        check_pose_params(params)
    else:
        check_hed_params(params)


class NeuralPreprocessors:
    """The networks an engine's ControlNets use, loaded once per (kind, model id)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self._device, self._dtype = device, dtype
        self._models: dict[tuple[str, str], Callable[..., np.ndarray]] = {}

    def preprocessor(self, name: str, params: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
        check_neural_params(name, params)
        if name in DEPTH_PREPROCESSORS:
            depth = self._model("depth", str(params.get("model_id", DEFAULT_DEPTH_MODEL)))
            resolution = int(params.get("detect_resolution", 518))
            return lambda frame: depth(frame, resolution)
        if name in POSE_PREPROCESSORS:
            pose = self._model("pose", str(params.get("model_id", DEFAULT_POSE_MODEL)))
            threshold = float(params.get("threshold", 0.3))
            return lambda frame: pose(frame, threshold)
        return self._model("hed", str(params.get("model_id", DEFAULT_HED_MODEL)))

    def _model(self, kind: str, model_id: str) -> Callable[..., np.ndarray]:
        if (kind, model_id) not in self._models:
            self._models[(kind, model_id)] = self._load(kind, model_id)
        return self._models[(kind, model_id)]

    def _load(self, kind: str, model_id: str) -> Callable[..., np.ndarray]:
        if kind == "depth":
            return DepthEstimator(model_id, self._device, self._dtype)
        if kind == "pose":
            return PoseEstimator(model_id, self._device, self._dtype)
        network = pretrained(
            lambda source, **kw: HEDNetwork.from_state_dict(load_hed_weights(source, **kw)),
            model_id,
            "HED model",
        )
        return HEDDetector(network, self._device, self._dtype)
