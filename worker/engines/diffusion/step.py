"""One batched step over the lanes of one model: each lane's newest frames in, each lane's outputs out.

Per lane: image preprocessing, the similar-image filter and ControlNet
preprocessing. Together: one VAE encode, one UNet call per denoising round
(:func:`~.stream.drive_together`; lanes with more steps or sequential
denoising take more rounds), one VAE decode. Per lane again: latent and
image post-processing. Every row of a batch is computed independently of the
others (group norms and attention are per sample), so a lane's output is its
output alone, up to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.engines.diffusion.acceleration import COMPILED, heartbeat
from worker.engines.diffusion.images import tensor_to_frames
from worker.engines.diffusion.lane import Lane
from worker.engines.diffusion.model import DiffusionModel
from worker.engines.diffusion.stream import UNetCall, drive_together

log = logging.getLogger(__name__)

WARM_UP_CALLS = {"compile": 3, "tensorrt": 2}  # CUDA graphs record on the 2nd call, replay from the 3rd

#: a lane's result: its output frames, or the error that stopped them
Result = list[np.ndarray] | Exception


@dataclass
class _Active:
    index: int
    lane: Lane
    images: torch.Tensor


def run_step(model: DiffusionModel, work: Sequence[tuple[Lane, Sequence[np.ndarray]]]) -> list[Result]:
    """Process each lane's frames; one result per lane, in order.

    An error in one lane's own processing (its preprocessors) is that lane's result; an error of the
    model (UNet, VAE) raises, since every lane in the batch shared it.
    """
    results: list[Result | None] = [None] * len(work)
    active: list[_Active] = []
    for index, (lane, frames) in enumerate(work):
        try:
            begun = lane.begin(frames)
        except Exception as exc:  # noqa: BLE001 - one channel's bad settings must not stop the others
            results[index] = exc
            continue
        if isinstance(begun, list):
            results[index] = begun
        else:
            active.append(_Active(index, lane, begun))
    if active:
        for item, frames in zip(active, _denoise(model, active), strict=True):
            try:
                results[item.index] = item.lane.finish(frames)
            except Exception as exc:  # noqa: BLE001 - as above
                results[item.index] = exc
    return [r if r is not None else RuntimeError("no result") for r in results]


def _denoise(model: DiffusionModel, active: list[_Active]) -> list[list[np.ndarray]]:
    """Encode, denoise and decode the active lanes' images together."""
    img2img = [item for item in active if item.lane.config.mode == "img2img"]
    encoded: dict[int, torch.Tensor] = {}
    if img2img:
        latents = model.loaded.codec.encode(_cat([item.images for item in img2img]))
        sizes = [len(item.images) for item in img2img]
        encoded = {item.index: part for item, part in zip(img2img, latents.split(sizes), strict=True)}
    denoisings = [
        item.lane.stream.denoise(item.lane.start_latents(encoded.get(item.index))) for item in active
    ]
    inputs = [item.lane.inputs() for item in active]

    def predict(calls: list[tuple[int, UNetCall]]) -> list[torch.Tensor]:
        return model.loaded.predictor.predict([(call, inputs[lane]) for lane, call in calls])

    x0s = drive_together(denoisings, predict)
    x0s = [item.lane.finish_latents(x0) for item, x0 in zip(active, x0s, strict=True)]
    frames = tensor_to_frames(model.loaded.codec.decode(_cat(x0s)))
    out, start = [], 0
    for x0 in x0s:
        out.append(frames[start : start + len(x0)])
        start += len(x0)
    return out


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def warm_up(model: DiffusionModel, lane: Lane) -> None:
    """Run a few frames so compilation and autotuning happen before going live; reset the lane after.

    A compiled mode that fails here falls back to SDPA with a logged reason.
    """
    config = lane.config
    grey = [np.full((config.height, config.width, 3), 127, np.uint8)] * config.frame_buffer_size
    mode = model.loaded.accelerated.mode

    def once() -> None:
        (result,) = run_step(model, [(lane, grey)])
        if isinstance(result, Exception):
            raise result

    try:
        with heartbeat(f"warming up ({mode})"), torch.inference_mode():
            for _ in range(WARM_UP_CALLS.get(mode, 1)):
                once()
    except Exception as exc:
        if mode not in COMPILED:
            raise
        log.warning("acceleration %s failed while warming up (%s); falling back to sdpa", mode, exc)
        model.accelerate("sdpa")
        with torch.inference_mode():
            once()
    lane.reset()
