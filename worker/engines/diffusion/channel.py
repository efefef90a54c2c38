"""A channel's diffusion engine in a worker: its lane on a model shared with the channels that fit it.

``load`` joins the :class:`~.shared.SharedDiffusion` for the channel's
:func:`~.model.share_key` (building it if no channel holds one), or builds a
model of its own when its params cannot share (IP-Adapter, compiled UNet).
Hot params change only this channel's lane. Params that need a reload give a
new engine as ever; when the new params still fit the same model (a new
filter threshold, mode or denoising layout) the new engine's ``load`` is just
a new lane on it, without loading weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from worker.engines.base import Done, EngineError, SubmittingEngine
from worker.engines.diffusion.engine import recompiling_fields
from worker.engines.diffusion.lane import Lane, check, describe
from worker.engines.diffusion.model import pick_device, share_key
from worker.engines.diffusion.params import parse_params, reload_fields
from worker.engines.diffusion.shared import SharedDiffusion
from worker.pool import SharedPool


def _close(shared: SharedDiffusion) -> None:
    shared.close()


#: the worker's loaded models, one per share key
MODELS: SharedPool[SharedDiffusion] = SharedPool(_close)


class DiffusionChannel(SubmittingEngine):
    """The diffusion engine as a worker's channel runs it: frames batched with other channels'."""

    name = "diffusion"

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        *,
        pool: SharedPool[SharedDiffusion] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params)
        self._config = parse_params(self.params)
        check(self._config)
        picked_device, picked_dtype = pick_device()
        self._device, self._dtype = device or picked_device, dtype or picked_dtype
        self._pool = MODELS if pool is None else pool
        self._key: Hashable | None = None
        self._shared: SharedDiffusion | None = None
        self._lane: Lane | None = None

    @property
    def batch_size(self) -> int:
        return self._config.frame_buffer_size

    @property
    def output_size(self) -> tuple[int, int]:
        return (self._config.width, self._config.height)

    @property
    def shared(self) -> SharedDiffusion | None:
        """The model this channel runs on (None before ``load`` and after ``close``)."""
        return self._shared

    def load(self) -> None:
        config = self._config
        key = share_key(config, self._device, self._dtype)
        shared = self._build() if key is None else self._pool.acquire(key, self._build)
        try:
            self._lane = shared.add_lane(config)
        except BaseException:
            self._let_go(shared, key)
            raise
        self._shared, self._key = shared, key

    def update(self, params: Mapping[str, Any]) -> set[str]:
        new = parse_params({**self.params, **params})
        check(new)
        reload = reload_fields(self._config, new)
        if self._shared is not None:
            reload |= recompiling_fields(self._shared.model, self._config, new)
        applied = new.model_copy(update={name: getattr(self._config, name) for name in reload})
        if self._shared is not None and self._lane is not None:
            self._shared.apply(self._lane, applied)
        self._config = applied
        self.params.update({k: v for k, v in params.items() if k not in reload})
        return reload

    def submit(self, frames: Sequence[np.ndarray], done: Done) -> None:
        if self._shared is None or self._lane is None:
            raise EngineError("the diffusion engine is not loaded")
        if len(frames) != self.batch_size:
            raise EngineError(f"submit needs {self.batch_size} frames, got {len(frames)}")
        self._shared.submit(self._lane, frames, done)

    def info(self) -> dict[str, Any]:
        info = describe(self.name, self._config, self._lane) | {"shareable": self._key is not None}
        if self._shared is not None:
            info |= self._shared.model.info() | self._shared.info()
        return info

    def close(self) -> None:
        shared, lane, key = self._shared, self._lane, self._key
        self._shared = self._lane = None
        if shared is None or lane is None:
            return
        with contextlib.suppress(EngineError):  # the model closed already
            shared.remove_lane(lane)
        self._let_go(shared, key)

    def _build(self) -> SharedDiffusion:
        shared = SharedDiffusion(self._config, self._device, self._dtype)
        try:
            shared.load(self.on_progress)
        except BaseException:
            shared.close()  # what a half-done load holds (GPU memory) must not pile up over retries
            raise
        return shared

    def _let_go(self, shared: SharedDiffusion, key: Hashable | None) -> None:
        if key is None:
            shared.close()
        else:
            self._pool.release(key)
