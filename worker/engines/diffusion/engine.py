"""The diffusion engine: StreamDiffusion img2img/txt2img on diffusers models, for one channel.

``load`` builds everything (models, acceleration, warm-up); ``update``
applies hot parameters by recomputing only what they touch (cached prompt
embeddings, schedule constants, seed noise, ControlNet scales);
``process`` runs one stream-batch step per call. The model
(:class:`~.model.DiffusionModel`), the channel's state (:class:`~.lane.Lane`)
and the step (:func:`~.step.run_step`) are the same pieces that
:mod:`.shared` batches across channels.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from worker.engines.base import Engine, EngineError
from worker.engines.diffusion.acceleration import COMPILED
from worker.engines.diffusion.lane import Lane, check, describe
from worker.engines.diffusion.model import LOAD_STEPS, DiffusionModel, pick_device
from worker.engines.diffusion.params import DiffusionParams, parse_params, reload_fields
from worker.engines.diffusion.step import run_step, warm_up
from worker.engines.diffusion.stream import unet_batch_sizes

BATCH_SHAPE_FIELDS = ("t_index_list", "cfg_type", "guidance_scale")  # hot, yet they set the UNet's batch size

__all__ = ["DiffusionEngine", "pick_device", "recompiling_fields"]


class DiffusionEngine(Engine):
    """StreamDiffusion on a Stable Diffusion (XL) model; see ``params.DiffusionParams``."""

    name = "diffusion"

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``device`` and ``dtype`` default to ``pick_device()``; tests set float16 to run the CUDA dtype on a
        CPU.
        """
        super().__init__(params)
        self._config = parse_params(self.params)
        check(self._config)
        picked_device, picked_dtype = pick_device()
        self._model = DiffusionModel(self._config, device or picked_device, dtype or picked_dtype)
        self._lane: Lane | None = None
        self._lock = threading.Lock()

    @property
    def batch_size(self) -> int:
        return self._config.frame_buffer_size

    @property
    def output_size(self) -> tuple[int, int]:
        return (self._config.width, self._config.height)

    def load(self) -> None:
        self._model.load(self.on_progress)
        self._lane = Lane(self._model, self._config)
        self.progress("warming up", LOAD_STEPS - 1, LOAD_STEPS)
        warm_up(self._model, self._lane)

    def update(self, params: Mapping[str, Any]) -> set[str]:
        new = parse_params({**self.params, **params})
        check(new)
        reload = reload_fields(self._config, new) | recompiling_fields(self._model, self._config, new)
        applied = new.model_copy(update={name: getattr(self._config, name) for name in reload})
        with self._lock:
            if self._lane is not None:
                self._lane.apply(applied, previous=self._lane.config)
            self._config = applied
            self.params.update({k: v for k, v in params.items() if k not in reload})
        return reload

    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._lane is None:
            raise EngineError("the diffusion engine is not loaded")
        if len(frames) != self.batch_size:
            raise EngineError(f"process needs {self.batch_size} frames, got {len(frames)}")
        with self._lock, torch.inference_mode():
            (result,) = run_step(self._model, [(self._lane, frames)])
        if isinstance(result, Exception):
            raise result
        return result

    def info(self) -> dict[str, Any]:
        return describe(self.name, self._config, self._lane) | self._model.info()

    def close(self) -> None:
        with self._lock:
            self._lane = None
            self._model.close()


def recompiling_fields(model: DiffusionModel, current: DiffusionParams, new: DiffusionParams) -> set[str]:
    """Hot fields whose change here would give a compiled UNet a new batch size.

    The next frame would then recompile (or build a TensorRT engine) on the
    hot path and stall the stream for a minute or more, so with a compiled
    UNet these fields reload instead: the old engine serves until the new
    one, compiled for the new shape, is warm.
    """
    if model.accelerated is None or model.accelerated.mode not in COMPILED:
        return set()
    if _unet_batch_sizes(new) == _unet_batch_sizes(current):
        return set()
    return {name for name in BATCH_SHAPE_FIELDS if getattr(new, name) != getattr(current, name)}


def _unet_batch_sizes(config: DiffusionParams) -> frozenset[int]:
    return unet_batch_sizes(
        len(config.t_index_list),
        config.frame_buffer_size,
        config.cfg_type,
        config.guidance_scale,
        config.use_denoising_batch,
    )
