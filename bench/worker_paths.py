"""The worker's two paths, fed JPEG frames with two in flight: in-process threads, and processes over a relay.

Shared by ``bench/worker.py`` (filter engine) and ``bench/engine.py`` (diffusion, the >=100 fps
target's path).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import benchutil  # noqa: F401  (puts the repository on sys.path)
from benchutil import ROOT, child_env, free_port

from relay.client import connect
from wire.frames import Frame, ImageFormat, decode_frame, encode_frame
from worker.pipeline import ChannelPipeline, Events, engine_factory


def bench_pipeline(
    engine: str, params: dict, payload: bytes, size: tuple[int, int], seconds: float, in_flight: int = 2
) -> tuple[float, list[float]]:
    """Feed the pipeline keeping ``in_flight`` frames outstanding; count outputs after the first one."""
    done = threading.Semaphore(0)
    latencies: list[float] = []
    sent_at: dict[int, float] = {}

    def output(frame: Frame) -> None:
        latencies.append(time.perf_counter() - sent_at.pop(frame.seq, time.perf_counter()))
        done.release()

    pipeline = ChannelPipeline("bench", engine_factory(engine), params, 0, Events(output=output))
    pipeline.start()
    seq = 0

    def submit() -> None:
        nonlocal seq
        sent_at[seq] = time.perf_counter()
        pipeline.submit(Frame("bench", seq, time.time(), *size, ImageFormat.JPEG, payload))
        seq += 1

    while not done.acquire(timeout=0.5):  # warm-up: the engine loads (and compiles) before the first output
        submit()
    latencies.clear()
    for _ in range(in_flight):
        submit()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        done.acquire(timeout=1)  # on timeout a frame was dropped as stale: refill the window anyway
        submit()
    elapsed = time.perf_counter() - start
    pipeline.stop()
    pipeline.join(120)  # let a slow engine finish its frame before the next row starts
    return len(latencies) / elapsed, latencies


async def bench_via_relay(
    engine: str, params: dict, payload: bytes, size: tuple[int, int], seconds: float, in_flight: int = 2
) -> tuple[float, list[float]]:
    """Relay and worker as processes; a producer keeps ``in_flight`` frames outstanding after a warm-up."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    env = child_env()
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
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "--relay",
                url,
                "--engine",
                engine,
                "--params",
                json.dumps(params),
            ],
            cwd=ROOT,
            env=env,
        )
        latencies: list[float] = []
        sent_at: dict[int, float] = {}
        seq = 0

        async def send_one() -> None:
            nonlocal seq
            sent_at[seq] = time.perf_counter()
            await ws.send(encode_frame(Frame("bench", seq, time.time(), *size, ImageFormat.JPEG, payload)))
            seq += 1

        # warm up until the worker answers (it loads its engine first)
        while True:
            await send_one()
            try:
                message = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            if isinstance(message, bytes):
                break
        sent_at.clear()
        for _ in range(in_flight):
            await send_one()
        start = time.perf_counter()
        count = 0
        while time.perf_counter() - start < seconds:
            try:
                message = await asyncio.wait_for(ws.recv(), 1)
            except TimeoutError:
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
