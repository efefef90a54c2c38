"""Worker runtime overhead: frames/s of the full worker against the engine called alone.

Rows, for each filter effect at 512x512 JPEG:
  engine alone        engine.process on an already decoded frame (the ceiling)
  serial              decode + engine + encode in one loop (no pipelining)
  pipeline            the worker's ChannelPipeline (three threads), fed in-process
  worker via relay    relay and worker as separate processes, a producer keeping
                      two frames in flight, fps counted at the producer

Run: .venv/bin/python bench/worker.py [--seconds 3] [--effects cartoon,sepia]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import benchutil  # noqa: F401  (puts the repository on sys.path)
from benchutil import machine, natural_image, pct_cells
from worker_paths import bench_pipeline, bench_via_relay

from media.codec import decode_image, encode_image
from wire.frames import ImageFormat
from worker.engines import create_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_engine_alone(effect: str, rgb, seconds: float) -> float:
    engine = create_engine("filter", {"effect": effect})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.process([rgb])
        n += 1
    return n / (time.perf_counter() - start)


def bench_serial(effect: str, payload: bytes, seconds: float) -> float:
    engine = create_engine("filter", {"effect": effect})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        out = engine.process([decode_image(payload, ImageFormat.JPEG)])[0]
        encode_image(out)
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--effects", default="cartoon,edges,sepia")
    args = parser.parse_args()
    rgb = natural_image()
    payload = encode_image(rgb)
    print(f"machine: {machine()}")
    print(f"frame: 512x512 JPEG q85, {len(payload) / 1024:.1f} KiB; filter engine\n")
    print(f"{'effect':<10} {'path':<18} {'fps':>8} {'vs engine':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for effect in args.effects.split(","):
        alone = bench_engine_alone(effect, rgb, args.seconds)
        rows = [("engine alone", alone, []), ("serial", bench_serial(effect, payload, args.seconds), [])]
        params = {"effect": effect}
        rows.append(("pipeline", *bench_pipeline("filter", params, payload, (512, 512), args.seconds)))
        rows.append(
            (
                "worker via relay",
                *asyncio.run(bench_via_relay("filter", params, payload, (512, 512), args.seconds)),
            )
        )
        for name, fps, lat in rows:
            print(f"{effect:<10} {name:<18} {fps:8.1f} {fps / alone:9.0%} {pct_cells(lat)}")


if __name__ == "__main__":
    main()
