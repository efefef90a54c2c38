"""Helpers shared by the benchmarks: machine description, test images, percentile cells."""

from __future__ import annotations

import os
import platform
import socket
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# for this process only: the benches import tests.tiny_models, and a lent GPU machine has no install
sys.path.insert(0, ROOT)

from common.percentiles import percentiles_ms  # after the path: no install needed


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def natural_image(width: int = 512, height: int = 512, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth gradients, shapes and mild noise (~50 KB as JPEG q85)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [128 + 100 * np.sin(x / 60 + seed), 128 + 100 * np.cos(y / 45), 128 + 80 * np.sin((x + y) / 90)],
        axis=-1,
    )
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    for _ in range(12):
        center = tuple(int(v) for v in rng.integers(0, min(width, height), 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(image, center, int(rng.integers(10, 80)), color, -1)
    return cv2.GaussianBlur(image, (3, 3), 0)


def child_env() -> dict[str, str]:
    """The environment for a child ``sys.executable -m ...``: ours, unchanged.

    The project is an installed package; where it is not (a lent GPU
    machine), the children run with ``cwd=ROOT``, which ``-m`` puts first on
    ``sys.path``. The repository never goes on PYTHONPATH.
    """
    return dict(os.environ)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct_cells(samples: list[float], decimals: int = 2) -> str:
    """p50 and p99 in ms as two 8-wide table cells, blank when there are no samples."""
    if not samples:
        return f"{'':>8} {'':>8}"
    return f"{pct_ms(samples, 0.5):8.{decimals}f} {pct_ms(samples, 0.99):8.{decimals}f}"


def pct_ms(samples: list[float], q: float) -> float:
    """The ``q`` percentile in ms (:func:`common.percentiles.percentiles_ms`); NaN when there are no
    samples.
    """
    (value,) = percentiles_ms(samples, (q,)).values()
    return float("nan") if value is None else value
