"""The ``openpose`` ControlNet preprocessor: ViTPose body keypoints drawn as an OpenPose skeleton.

ViTPose (transformers' ``VitPoseForPoseEstimation``, by default
``usyd-community/vitpose-base-simple``) is a top-down estimator: it finds
the 17 COCO keypoints of one person inside a box. No person detector is
loaded: the whole frame, letterboxed to the model's aspect ratio, is the
box, which suits the live-camera case of one person in view. The keypoints
are converted to OpenPose's 18 (the neck is the shoulders' midpoint) and
drawn the way ControlNet's OpenPose models were trained to read them:
coloured limbs as ellipses and coloured joints on black.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from transformers import VitPoseForPoseEstimation

from worker.engines.base import EngineError
from worker.engines.diffusion.vision import ImageNetNormalize, frame_tensor, load_network

POSE_PREPROCESSORS = frozenset({"openpose", "pose"})
DEFAULT_POSE_MODEL = "usyd-community/vitpose-base-simple"
PARAMS = {"model_id", "threshold"}

NECK = -1
#: OpenPose's 18 body points as COCO indices (NECK: between the shoulders)
OPENPOSE_FROM_COCO = (0, NECK, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
#: OpenPose's limbs, as pairs of its points
LIMBS = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)
#: one RGB colour per point (and per limb, in order), red through the hues to pink
COLOURS = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)


def check_pose_params(params: Mapping[str, Any]) -> None:
    if set(params) - PARAMS:
        raise EngineError(f"preprocessor 'openpose' takes parameters {sorted(PARAMS)}, got {sorted(params)}")
    threshold = params.get("threshold", 0.3)
    if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise EngineError("preprocessor 'openpose': threshold must be a number in 0..1")


def openpose_points(coco: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO's 17 keypoints ``(17, 2)`` and scores as OpenPose's 18 points and scores."""
    neck = (coco[5] + coco[6]) / 2, min(scores[5], scores[6])
    points = np.array([neck[0] if i == NECK else coco[i] for i in OPENPOSE_FROM_COCO], dtype=np.float32)
    confidence = np.array([neck[1] if i == NECK else scores[i] for i in OPENPOSE_FROM_COCO], dtype=np.float32)
    return points, confidence


def draw_skeleton(height: int, width: int, points: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """OpenPose's body drawing: limbs as 60%-opaque ellipses, then joints as dots, on black."""
    canvas: np.ndarray = np.zeros((height, width, 3), np.uint8)
    stick = max(2, round(4 * max(height, width) / 512))
    for index, (a, b) in enumerate(LIMBS):
        if not (visible[a] and visible[b]):
            continue
        (xa, ya), (xb, yb) = points[a], points[b]
        length = float(np.hypot(xa - xb, ya - yb))
        angle = float(np.degrees(np.arctan2(ya - yb, xa - xb)))
        polygon = np.asarray(  # already an (n, 2) array; OpenCV's stubs say a sequence of points
            cv2.ellipse2Poly(
                (int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), stick), int(angle), 0, 360, 1
            )
        )
        limb = canvas.copy()
        cv2.fillConvexPoly(limb, polygon, COLOURS[index])
        canvas = cv2.addWeighted(canvas, 0.4, limb, 0.6, 0)
    for index, (x, y) in enumerate(points):
        if visible[index]:
            cv2.circle(canvas, (int(x), int(y)), stick, COLOURS[index], thickness=-1)
    return canvas


class PoseEstimator:
    """RGB uint8 frame in, OpenPose skeleton of the same size out."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model = load_network(
            VitPoseForPoseEstimation.from_pretrained, model_id, "pose model", device, dtype
        )
        size: int | Sequence[int] = self.model.config.backbone_config.image_size
        self.input_height, self.input_width = (size, size) if isinstance(size, int) else size
        self._device, self._dtype = device, dtype
        self._normalize = ImageNetNormalize(device, dtype)

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray, threshold: float = 0.3) -> np.ndarray:
        height, width = frame.shape[:2]
        scale = min(self.input_height / height, self.input_width / width)
        inner_h, inner_w = round(height * scale), round(width * scale)
        top, left = (self.input_height - inner_h) // 2, (self.input_width - inner_w) // 2
        pixels = F.interpolate(
            frame_tensor(frame, self._device, self._dtype),
            size=(inner_h, inner_w),
            mode="bilinear",
            align_corners=False,
        )
        boxed = torch.zeros(1, 3, self.input_height, self.input_width, device=self._device, dtype=self._dtype)
        boxed[..., top : top + inner_h, left : left + inner_w] = self._normalize(pixels)
        heatmaps = self.model(pixel_values=boxed).heatmaps[0].float()  # (17, h/4, w/4)
        joints, rows, columns = heatmaps.shape
        scores, flat = heatmaps.reshape(joints, -1).max(dim=1)
        ys = ((flat // columns).float() + 0.5) * self.input_height / rows  # heatmap cell centres
        xs = ((flat % columns).float() + 0.5) * self.input_width / columns
        coco = torch.stack([(xs - left) / scale, (ys - top) / scale], dim=1).cpu().numpy()
        points, confidence = openpose_points(coco, scores.cpu().numpy())
        return draw_skeleton(height, width, points, confidence >= threshold)
