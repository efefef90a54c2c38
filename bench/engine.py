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

Run: .venv/bin/python bench/engine.py [--tiny] [--models sd-turbo,sdxl-turbo]
     [--accelerations none,sdpa,...] [--batches 1,2,3,4] [--calls 20]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import tempfile
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
from worker.engines.diffusion import DiffusionEngine

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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    full = args.full or (cuda and not args.tiny)
    accelerations = args.accelerations.split(",")
    batches = [int(b) for b in args.batches.split(",")]
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


if __name__ == "__main__":
    main()
