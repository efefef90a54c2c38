"""The ``hed`` ControlNet preprocessor: soft edges from lllyasviel's Apache-2.0 HED network.

The weights are ``ControlNetHED.pth`` from ``lllyasviel/Annotators`` (the
file ControlNet's HED models were trained with), or a local directory that
holds that file. The network is five VGG-style blocks; each block's
one-channel side output is upsampled to the frame, and the edge map is the
sigmoid of their mean. Block widths and depths are read from the weights, so
any checkpoint of this shape loads (tests use a narrow one).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from torch import nn

from worker.engines.base import EngineError
from worker.engines.diffusion.vision import frame_tensor, grey_frame

DEFAULT_HED_MODEL = "lllyasviel/Annotators"
WEIGHTS_FILE = "ControlNetHED.pth"
BLOCKS = 5


def check_hed_params(params: Mapping[str, Any]) -> None:
    if set(params) - {"model_id"}:
        raise EngineError(f"preprocessor 'hed' takes parameters ['model_id'], got {sorted(params)}")


class ConvBlock(nn.Module):
    """3x3 convolutions with ReLU, then a 1x1 projection to one edge channel."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(a, b, 3, padding=1) for a, b in itertools.pairwise(widths)))
        self.projection = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, x: torch.Tensor, downsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if downsample:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNetwork(nn.Module):
    """Takes RGB in 0-255 (it subtracts its own learned mean); returns one side output per block."""

    def __init__(self, block_widths: list[list[int]]) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for index, widths in enumerate(block_widths, start=1):
            self.add_module(f"block{index}", ConvBlock(widths))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> HEDNetwork:
        """Build the network the weights describe (widths from the conv shapes) and load them."""
        widths = []
        for block in range(1, BLOCKS + 1):
            convs = sorted(
                int(k.split(".")[2])
                for k in state
                if k.startswith(f"block{block}.convs.") and k.endswith(".weight")
            )
            if not convs:
                raise EngineError(f"HED weights lack block{block}")
            first = state[f"block{block}.convs.0.weight"]
            widths.append(
                [first.shape[1], *(state[f"block{block}.convs.{i}.weight"].shape[0] for i in convs)]
            )
        network = cls(widths)
        network.load_state_dict(dict(state))
        return network

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for index in range(1, BLOCKS + 1):
            h, side = getattr(self, f"block{index}")(h, downsample=index > 1)
            sides.append(side)
        return sides


def load_hed_weights(source: str, local_files_only: bool = False) -> dict[str, torch.Tensor]:
    """``ControlNetHED.pth`` from a local directory or a hub repository."""
    if os.path.isdir(source):
        path = os.path.join(source, WEIGHTS_FILE)
    else:
        path = hf_hub_download(source, WEIGHTS_FILE, local_files_only=local_files_only)
    return torch.load(path, map_location="cpu", weights_only=True)


class HEDDetector:
    """RGB uint8 frame in, grey soft-edge frame of the same size out."""

    def __init__(self, network: HEDNetwork, device: torch.device, dtype: torch.dtype) -> None:
        self.network = network.to(device=device, dtype=dtype).eval()
        self._device, self._dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        sides = self.network(frame_tensor(frame, self._device, self._dtype, scale=1.0))  # it wants 0-255
        upsampled = [
            F.interpolate(s.float(), size=(height, width), mode="bilinear", align_corners=False)
            for s in sides
        ]
        return grey_frame(torch.sigmoid(torch.cat(upsampled, dim=1).mean(dim=1))[0])
