"""How many channels a worker serves at once when nobody says: from the hardware.

The filter engine costs a few milliseconds of one core per frame, so two
channels per core keep 30 fps each. The diffusion engine loads one model per
channel today (no batching across channels yet), so its capacity is GPU
memory over an estimated per-channel cost; :data:`DIFFUSION_BYTES_PER_CHANNEL`
is an estimate for sd-turbo at 512x512 in float16 (weights, TAESD, activations)
until the GPU runbook measures it.
"""

from __future__ import annotations

import importlib.util
import os

FILTER_PER_CORE = 2
FILTER_MAX = 16
DIFFUSION_BYTES_PER_CHANNEL = 4 * 2**30


def auto_capacity(engine: str) -> int:
    if engine == "diffusion":
        return max(1, gpu_memory_bytes() // DIFFUSION_BYTES_PER_CHANNEL)
    return max(1, min(FILTER_MAX, FILTER_PER_CORE * (os.cpu_count() or 1)))


def gpu_memory_bytes() -> int:
    """The first CUDA device's memory, 0 without one (torch is imported only if installed)."""
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.get_device_properties(0).total_memory)
