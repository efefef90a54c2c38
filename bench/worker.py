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
import subprocess
import sys
import threading
import time

import benchutil  # noqa: F401  (puts the repository on sys.path)
from benchutil import free_port, machine, natural_image, pct_ms

from media.codec import decode_image, encode_image
from relay.client import connect
from wire.frames import Frame, ImageFormat, decode_frame, encode_frame
from worker.engines import create_engine
from worker.pipeline import ChannelPipeline, Events, engine_factory

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


def bench_pipeline(effect: str, payload: bytes, seconds: float, in_flight: int = 2) -> tuple[float, list[float]]:
    """Feed the pipeline keeping ``in_flight`` frames outstanding; count outputs."""
    done = threading.Semaphore(in_flight)
    latencies: list[float] = []
    sent_at: dict[int, float] = {}

    def output(frame: Frame) -> None:
        latencies.append(time.perf_counter() - sent_at.pop(frame.seq, time.perf_counter()))
        done.release()

    pipeline = ChannelPipeline("bench", engine_factory("filter"), {"effect": effect}, 0,
                               Events(output=output))
    pipeline.start()
    seq, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if not done.acquire(timeout=1):
            done.release()  # a frame was dropped as stale; keep the window full
        sent_at[seq] = time.perf_counter()
        pipeline.submit(Frame("bench", seq, time.time(), 512, 512, ImageFormat.JPEG, payload))
        seq += 1
    elapsed = time.perf_counter() - start
    pipeline.stop()
    pipeline.join(2)
    return len(latencies) / elapsed, latencies


async def bench_via_relay(effect: str, payload: bytes, seconds: float, in_flight: int = 2) -> tuple[float, list[float]]:
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": ROOT}
    relay = subprocess.Popen([sys.executable, "-m", "relay", "--port", str(port)], cwd=ROOT, env=env)
    worker = None
    try:
        for _ in range(100):
            try:
                ws, _ = await connect(url, "producer", "bench")
                break
            except OSError:
                await asyncio.sleep(0.05)  # waiting for the relay process to listen
        else:
            raise RuntimeError("relay did not start")
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--relay", url, "--engine", "filter",
                                   "--params", f'{{"effect": "{effect}"}}'], cwd=ROOT, env=env)
        latencies: list[float] = []
        sent_at: dict[int, float] = {}
        seq = 0

        async def send_one() -> None:
            nonlocal seq
            sent_at[seq] = time.perf_counter()
            await ws.send(encode_frame(Frame("bench", seq, time.time(), 512, 512, ImageFormat.JPEG, payload)))
            seq += 1

        # warm up until the worker answers
        while True:
            await send_one()
            try:
                message = await asyncio.wait_for(ws.recv(), 0.5)
            except asyncio.TimeoutError:
                continue
            if isinstance(message, bytes):
                break
        for _ in range(in_flight):
            await send_one()
        start = time.perf_counter()
        count = 0
        while time.perf_counter() - start < seconds:
            try:
                message = await asyncio.wait_for(ws.recv(), 1)
            except asyncio.TimeoutError:
                await send_one()  # a dropped frame: refill the window
                continue
            if isinstance(message, bytes):
                frame = decode_frame(message)
                if frame.seq in sent_at:
                    latencies.append(time.perf_counter() - sent_at.pop(frame.seq))
                count += 1
                await send_one()
        elapsed = time.perf_counter() - start
        await ws.close()
        return count / elapsed, latencies
    finally:
        for process in (worker, relay):
            if process is not None:
                process.terminate()
                process.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        rows.append(("pipeline", *bench_pipeline(effect, payload, args.seconds)))
        rows.append(("worker via relay", *asyncio.run(bench_via_relay(effect, payload, args.seconds))))
        for name, fps, lat in rows:
            p50 = f"{pct_ms(lat, 0.5):8.2f}" if lat else f"{'':>8}"
            p99 = f"{pct_ms(lat, 0.99):8.2f}" if lat else f"{'':>8}"
            print(f"{effect:<10} {name:<18} {fps:8.1f} {fps / alone:9.0%} {p50} {p99}")


if __name__ == "__main__":
    main()
