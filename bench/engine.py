"""Diffusion engine throughput: fps and latency per acceleration option and frame batch.

With CUDA it builds sd-turbo (SD 2.1 UNet, OpenCLIP-H text encoder, TAESD)
at 512x512 and sdxl-turbo (SDXL UNet, CLIP-L + OpenCLIP-bigG, TAESDXL) at
1024x1024 from their real configs with random weights (nothing is
downloaded: speed does not depend on the weights), saves them and loads
them through the engine's normal loading code. Without CUDA (or with
--tiny) it uses the tiny test model at 512x512 instead, with only the
none and sdpa rows unless --accelerations asks for more.

Each row is one engine (model, acceleration, frame_buffer_size) with
Daydream's default params (3 denoising steps, RCFG self, guidance 1.0):
fps counts frames out, latency is one ``process`` call.

The streams rows run 1, 2, 4, 8... streams (each its own prompt and seed)
at once, every stream always with a frame pending: **batched** on one shared
model (the worker's way: one UNet call per step for every stream), then
**separate**, each stream on a model and thread of its own (one engine per
channel, as before issue 13). Latency: a frame's submission to its result.
The memory rows load 1 stream, N streams batched and 2 streams separate, each
in a fresh process, run a few steps and report its resident memory (and the
GPU's peak allocation with CUDA).

Run: .venv/bin/python bench/engine.py [--tiny] [--models sd-turbo,sdxl-turbo]
     [--accelerations none,sdpa,...] [--batches 1,2,3,4] [--calls 20]
     [--streams 1,2,4,8] [--stream-seconds 3] [--memory 4]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchutil  # noqa: F401  (puts the repository on sys.path)
import torch
from benchutil import machine, natural_image, pct_cells, pct_ms
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from worker_paths import bench_pipeline, bench_via_relay

from media.codec import encode_image
from tests.tiny_models import build_tiny_models, byte_tokenizer
from worker.engines.base import Result
from worker.engines.diffusion import DiffusionEngine
from worker.engines.diffusion.channel import DiffusionChannel
from worker.engines.diffusion.shared import SharedDiffusion
from worker.pool import SharedPool

ACCELERATIONS = ["none", "sdpa", "xformers", "compile", "tensorrt"]
# Frames a producer keeps outstanding in the worker rows: enough that decode, relay hops and encode
# (about 3 ms together) never leave the engine waiting at 100+ fps.
IN_FLIGHT = 3
# On a CPU xformers and tensorrt fall back to sdpa, and compile takes a minute per row.
CPU_ACCELERATIONS = ["none", "sdpa"]

SD21_UNET = {
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "sample_size": 64,
    "use_linear_projection": True,
}
SDXL_UNET = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}
OPENCLIP_H = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
OPENCLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
TURBO_SCHEDULER = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


def text_encoder(config: dict, projection: bool = False) -> torch.nn.Module:
    full = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **config,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(full)


def build_full(name: str, root: Path) -> tuple[Path, Path]:
    """Save a random-weight sd-turbo / sdxl-turbo pipeline and TAESD(XL); return their directories.

    Saved in fp16 on CUDA (as the engine runs there) and fp32 on a CPU.
    """
    print(f"building {name} from its configs (random weights)...", file=sys.stderr, flush=True)
    tokenizer = byte_tokenizer()  # real CLIP vocabularies can't be downloaded; token ids don't affect speed
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        scheduler = EulerDiscreteScheduler(**TURBO_SCHEDULER)
        if name == "sd-turbo":
            pipe = StableDiffusionPipeline(
                vae=AutoencoderKL(**SD_VAE),
                text_encoder=text_encoder(OPENCLIP_H),
                tokenizer=tokenizer,
                unet=UNet2DConditionModel(**SD21_UNET),
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            pipe = StableDiffusionXLPipeline(
                vae=AutoencoderKL(**SD_VAE, force_upcast=True),
                text_encoder=text_encoder(CLIP_L),
                text_encoder_2=text_encoder(OPENCLIP_BIGG, projection=True),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=UNet2DConditionModel(**SDXL_UNET),
                scheduler=scheduler,
            )
        pipe.to(dtype).save_pretrained(root / name)
        AutoencoderTiny().to(dtype).save_pretrained(root / f"{name}-taesd")
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return root / name, root / f"{name}-taesd"


def engine_params(
    model_dir: Path, vae_dir: Path, size: int, acceleration: str, batch: int, **extra: object
) -> dict:
    """Daydream's defaults on a local model, with ``extra`` on top."""
    return {
        "model_id": str(model_dir),
        "vae_id": str(vae_dir),
        "width": size,
        "height": size,
        "acceleration": acceleration,
        "frame_buffer_size": batch,
        "use_lcm_lora": False,
        **extra,
    }


def bench_row(params: dict, calls: int) -> dict:
    """Load one engine, time ``calls`` process() calls on distinct frames."""
    engine = DiffusionEngine(params)
    started = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - started
    batch, size = params["frame_buffer_size"], params["width"]
    frames = [natural_image(size, size, seed=i) for i in range(batch)]
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        engine.process(frames)
        latencies.append(time.perf_counter() - started)
    effective = engine.info()["acceleration"]
    engine.close()
    del engine
    gc.collect()
    torch._dynamo.reset()
    acceleration = params["acceleration"]
    return {
        "acceleration": acceleration if effective == acceleration else f"{acceleration}->{effective}",
        "batch": batch,
        "fps": batch * calls / sum(latencies),
        "p50": pct_ms(latencies, 0.50),
        "p99": pct_ms(latencies, 0.99),
        "load_s": load_s,
    }


def bench_through_worker(name: str, params: dict, size: int, seconds: float, calls: int) -> None:
    """The target's path: one denoising step, JPEG in and out, through the worker's threads and the relay."""
    payload = encode_image(natural_image(size, size))
    engine_fps = bench_row(params, calls)["fps"]
    rows = [
        ("engine alone", engine_fps, []),
        ("worker pipeline", *bench_pipeline("diffusion", params, payload, (size, size), seconds, IN_FLIGHT)),
        (
            "worker via relay",
            *asyncio.run(bench_via_relay("diffusion", params, payload, (size, size), seconds, IN_FLIGHT)),
        ),
    ]
    for path, fps, latencies in rows:
        print(
            f"{name:<12} {f'{size}x{size}':>9} {params['acceleration']:<12} {path:<17} {fps:8.2f} "
            f"{fps / engine_fps:6.0%} {pct_cells(latencies, 1)}",
            flush=True,
        )


def stream_params(params: dict, index: int) -> dict:
    """Stream ``index``'s own prompt and seed on top of ``params``."""
    return {**params, "prompt": f"stream {index}: a painting of a harbour", "seed": 100 + index}


def load_streams(params: dict, count: int, batched: bool) -> list[DiffusionChannel]:
    """``count`` channel engines: on one shared model, or each on a model (and thread) of its own."""
    shared: SharedPool[SharedDiffusion] = SharedPool(SharedDiffusion.close)
    channels = []
    for index in range(count):
        pool = shared if batched else SharedPool(SharedDiffusion.close)
        channel = DiffusionChannel(stream_params(params, index), pool=pool)
        channel.load()
        channels.append(channel)
    return channels


def saturate(
    channels: list[DiffusionChannel], frames: list, seconds: float
) -> tuple[float, float, list[list[float]]]:
    """Keep a frame pending on every channel; the measured seconds, CPU seconds and each stream's latencies.

    Each result's callback (on the engine's thread) submits the stream's next frame at once, so every
    step finds every stream's frame waiting. One result per stream first, untimed (warm-up).
    """
    lock = threading.Lock()
    latencies: list[list[float]] = [[] for _ in channels]
    sent = [0.0] * len(channels)
    state = {"measuring": False, "stopping": False}
    first = threading.Semaphore(0)
    stopped = threading.Semaphore(0)
    errors: list[Exception] = []

    def submitter(index: int):  # type: ignore[no-untyped-def]
        warm = [False]

        def done(result: Result) -> None:
            now = time.perf_counter()
            if isinstance(result, Exception):
                errors.append(result)
                state["stopping"] = True
            with lock:
                if state["measuring"]:
                    latencies[index].append(now - sent[index])
                stopping = state["stopping"]
            if not warm[0]:
                warm[0] = True
                first.release()
            if stopping:
                stopped.release()
                return
            sent[index] = time.perf_counter()
            channels[index].submit([frames[index]], done)

        return done

    for index, channel in enumerate(channels):
        sent[index] = time.perf_counter()
        channel.submit([frames[index]], submitter(index))
    for _ in channels:
        first.acquire()
    with lock:
        state["measuring"] = True
        for stream in latencies:
            stream.clear()
    start, cpu = time.perf_counter(), time.process_time()
    time.sleep(seconds)  # the measured period (a benchmark, not synchronisation)
    with lock:
        state["measuring"], state["stopping"] = False, True
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    for _ in channels:
        stopped.acquire()  # every stream's last frame is done: nothing runs into the next row
    if errors:
        raise errors[0]
    return elapsed, cpu, latencies


def bench_streams(name: str, params: dict, size: int, counts: list[int], seconds: float) -> None:
    """Aggregate and per-stream fps and latency for each stream count, batched then separate.

    Both sets of engines are loaded first and the two rows of a count run back to back, so that
    they see the same machine (other load on a shared machine moves both alike).
    """
    frames = [natural_image(size, size, seed=i) for i in range(max(counts))]
    engines = {batched: load_streams(params, max(counts), batched) for batched in (True, False)}
    for count in counts:
        for batched, channels in engines.items():
            shared = channels[0].shared
            steps, taken = (shared.steps, shared.frames) if shared else (0, 0)
            elapsed, cpu, latencies = saturate(channels[:count], frames, seconds)
            per_stream = [len(stream) / elapsed for stream in latencies]
            everything = [value for stream in latencies for value in stream]
            mean_batch = (shared.frames - taken) / max(1, shared.steps - steps) if batched and shared else 1.0
            print(
                f"{name:<12} {f'{size}x{size}':>9} {count:>7} {'batched' if batched else 'separate':<9} "
                f"{sum(per_stream):8.2f} {min(per_stream):8.2f} {max(per_stream):8.2f} "
                f"{pct_cells(everything, 1)} {mean_batch:6.2f} {cpu / max(1, len(everything)) * 1000:8.1f}",
                flush=True,
            )
    for channels in engines.values():
        for channel in channels:
            channel.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_memory(params: dict, count: int, batched: bool, steps: int) -> dict:
    """In this (fresh) process: load ``count`` streams, run ``steps`` steps; resident memory in GiB."""
    channels = load_streams(params, count, batched)
    frames = [natural_image(params["width"], params["height"], seed=i) for i in range(count)]
    for _ in range(steps):
        finished = threading.Semaphore(0)
        for channel, frame in zip(channels, frames, strict=True):
            channel.submit([frame], lambda result, finished=finished: finished.release())
        for _ in channels:
            finished.acquire()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    gib = 1024**2  # /proc/self/status counts kB
    figures = {
        "rss_gib": int(status["VmRSS"].split()[0]) / gib,
        "peak_rss_gib": int(status["VmHWM"].split()[0]) / gib,
    }
    if torch.cuda.is_available():
        figures["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    return figures


def bench_memory(name: str, params: dict, size: int, count: int, steps: int) -> None:
    """1 stream, ``count`` streams batched and 2 separate, each in a fresh process."""
    cases = [(1, True), (count, True), (2, False)]
    results = []
    for streams, batched in cases:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-child",
            json.dumps({"params": params, "count": streams, "batched": batched, "steps": steps}),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"memory child failed ({streams} streams): {done.stderr[-2000:]}", file=sys.stderr)
            continue
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        results.append((streams, batched, figures))
    one = next((f for s, b, f in results if s == 1), None)
    for streams, batched, figures in results:
        ratio = figures["rss_gib"] / one["rss_gib"] if one else float("nan")
        gpu = f"{figures['gpu_peak_gib']:8.2f}" if "gpu_peak_gib" in figures else f"{'':>8}"
        print(
            f"{name:<12} {f'{size}x{size}':>9} {streams:>7} {'batched' if batched else 'separate':<9} "
            f"{figures['rss_gib']:8.2f} {figures['peak_rss_gib']:8.2f} {ratio:7.2f}x {gpu}",
            flush=True,
        )


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (the default without CUDA)")
    parser.add_argument(
        "--full", action="store_true", help="full-size models even without CUDA (slow: a smoke run)"
    )
    parser.add_argument("--models", default="sd-turbo,sdxl-turbo", help="full-size models to build")
    parser.add_argument("--accelerations", default=",".join(ACCELERATIONS if cuda else CPU_ACCELERATIONS))
    parser.add_argument("--batches", default="1,2,3,4", help="frame_buffer_size values")
    parser.add_argument("--calls", type=int, default=20 if cuda else 4, help="timed process() calls per row")
    parser.add_argument(
        "--worker-accelerations",
        default="sdpa",
        help="accelerations for the through-the-worker rows (1 step, batch 1); empty: skip them",
    )
    parser.add_argument(
        "--seconds", type=float, default=10 if cuda else 3, help="measured seconds per worker row"
    )
    parser.add_argument(
        "--streams", default="1,2,4,8", help="stream counts for the streams rows; empty: skip"
    )
    parser.add_argument(
        "--stream-seconds", type=float, default=5 if cuda else 3, help="measured seconds per streams row"
    )
    parser.add_argument(
        "--memory", type=int, default=4, help="streams in the batched memory row (0: skip the memory rows)"
    )
    parser.add_argument("--memory-steps", type=int, default=3, help="steps each memory process runs")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args()
    if args.memory_child:
        spec = json.loads(args.memory_child)
        logging.basicConfig(level=logging.ERROR)
        figures = measure_memory(spec["params"], spec["count"], spec["batched"], spec["steps"])
        print(json.dumps(figures))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    full = args.full or (cuda and not args.tiny)
    accelerations = [a for a in args.accelerations.split(",") if a]
    batches = [int(b) for b in args.batches.split(",") if b]
    stream_counts = [int(n) for n in args.streams.split(",") if n]
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"# diffusion engine on {device}; {machine()}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if full:
            models = [
                (name, *build_full(name, root), 1024 if "xl" in name else 512)
                for name in args.models.split(",")
            ]
        else:
            tiny = build_tiny_models(root / "tiny")
            models = [("tiny-sd", tiny.sd, tiny.tiny_vae, 512)]
        if accelerations and batches:
            print(
                "\nengine: Daydream's default params (3 steps, RCFG self, guidance 1.0); "
                "latency = one process() call"
            )
            print(
                f"{'model':<12} {'size':>9} {'acceleration':<18} {'batch':>5} "
                f"{'fps':>8} {'p50 ms':>8} {'p99 ms':>8} {'load s':>7}"
            )
        for name, model_dir, vae_dir, size in models:
            for acceleration in accelerations:
                for batch in batches:
                    row = bench_row(engine_params(model_dir, vae_dir, size, acceleration, batch), args.calls)
                    print(
                        f"{name:<12} {f'{size}x{size}':>9} {row['acceleration']:<18} {row['batch']:>5} "
                        f"{row['fps']:>8.2f} {row['p50']:>8.1f} {row['p99']:>8.1f} {row['load_s']:>7.1f}",
                        flush=True,
                    )
        worker_accelerations = [a for a in args.worker_accelerations.split(",") if a]
        if worker_accelerations:
            print(
                f"\nthrough the worker: 1 step (t_index_list [32]), batch 1, JPEG q85 in and out, "
                f"{IN_FLIGHT} frames in flight"
            )
            print(
                f"{'model':<12} {'size':>9} {'acceleration':<12} {'path':<17} "
                f"{'fps':>8} {'vs eng':>6} {'p50 ms':>8} {'p99 ms':>8}"
            )
        for name, model_dir, vae_dir, size in models:
            for acceleration in worker_accelerations:
                params = engine_params(model_dir, vae_dir, size, acceleration, 1, t_index_list=[32])
                bench_through_worker(name, params, size, args.seconds, args.calls)
        if stream_counts:
            print(
                "\nstreams: 1 step (t_index_list [32]), sdpa, batch 1, a prompt and seed per stream, a frame "
                f"always pending per stream, {args.stream_seconds:g} s each; latency = submission to result"
            )
            print(
                f"{'model':<12} {'size':>9} {'streams':>7} {'engines':<9} {'fps':>8} {'min/str':>8} "
                f"{'max/str':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'cpu ms/f':>8}"
            )
        for name, model_dir, vae_dir, size in models:
            if stream_counts:
                params = engine_params(model_dir, vae_dir, size, "sdpa", 1, t_index_list=[32])
                bench_streams(name, params, size, stream_counts, args.stream_seconds)
        if args.memory:
            print(
                f"\nmemory: each row a fresh process, streams loaded and {args.memory_steps} steps run "
                "(1 step, sdpa); RSS now and peak in GiB, ratio to 1 stream"
            )
            print(
                f"{'model':<12} {'size':>9} {'streams':>7} {'engines':<9} {'rss':>8} {'peak':>8} "
                f"{'ratio':>8} {'gpu peak':>8}"
            )
        for name, model_dir, vae_dir, size in models:
            if args.memory:
                params = engine_params(model_dir, vae_dir, size, "sdpa", 1, t_index_list=[32])
                bench_memory(name, params, size, args.memory, args.memory_steps)


if __name__ == "__main__":
    main()
