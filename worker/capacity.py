"""How many channels a worker serves at once when nobody says: from the hardware.

The filter engine costs a few milliseconds of one core per frame, so two
channels per core keep 30 fps each. The diffusion engine shares one model
across the channels that fit it and batches their frames into one UNet call
(:mod:`worker.engines.diffusion.shared`), so a channel costs the model once
plus its own share of activations and state. Its capacity is what GPU memory
holds of that, at most :data:`DIFFUSION_MAX` (past which a batch's step gets
too slow for 30 fps per stream on one GPU).

The byte figures are estimates for sd-turbo at 512x512 in float16 (weights
and TAESD about 2.6 GiB, plus workspace; a stream's latents, noise, prompt
embeddings and batch activations); on the CPU, 4 streams measured 1.12x the
memory of one (bench/README.md). The GPU runbook (``bench/gpu/run.sh``)
prints the streams rows that should replace them.
"""

from __future__ import annotations

import importlib.util
import os

FILTER_PER_CORE = 2
FILTER_MAX = 16
#: one shared model: weights, TAESD, CUDA workspace (estimate)
DIFFUSION_MODEL_BYTES = 4 * 2**30
#: each channel on it: its state and its rows of the batch's activations (estimate)
DIFFUSION_BYTES_PER_CHANNEL = 2**29
DIFFUSION_MAX = 8


def auto_capacity(engine: str) -> int:
    if engine == "diffusion":
        return diffusion_capacity(gpu_memory_bytes())
    return max(1, min(FILTER_MAX, FILTER_PER_CORE * (os.cpu_count() or 1)))


def diffusion_capacity(memory: int) -> int:
    """Channels that ``memory`` bytes of GPU hold on one shared model (1 without a GPU)."""
    room = (memory - DIFFUSION_MODEL_BYTES) // DIFFUSION_BYTES_PER_CHANNEL
    return max(1, min(DIFFUSION_MAX, room))


def gpu_memory_bytes() -> int:
    """The first CUDA device's memory, 0 without one (torch is imported only if installed)."""
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.get_device_properties(0).total_memory)
