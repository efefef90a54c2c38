"""``python -m api.doctor``: what this machine can run, and what to install for the rest.

Checks Python, the core and GPU packages, CUDA, TensorRT, xformers, the
Hugging Face model cache and the ports the server uses. Prints one line per
check; ``--json`` for machines. Exit status 1 when something the CPU-only
default needs is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from api.config import ConfigError, load_config

CORE = ["websockets", "orjson", "pydantic", "numpy", "simplejpeg", "cv2", "fastapi", "uvicorn",
        "aiortc", "av", "prometheus_client", "pydantic_settings", "yaml"]
DISTRIBUTIONS = {"cv2": "opencv-python-headless", "yaml": "pyyaml", "prometheus_client": "prometheus-client",
                 "pydantic_settings": "pydantic-settings"}
GPU = {"torch": "pip install torch==2.13.0 (a CUDA build on GPU machines)",
       "diffusers": "pip install -r requirements-diffusion.txt",
       "transformers": "pip install -r requirements-diffusion.txt",
       "xformers": "pip install xformers (matching your torch build), or use acceleration sdpa",
       "tensorrt": "pip install tensorrt polygraphy onnx (CUDA machines only)"}
PORTS = {"api": 8080, "relay": 8765, "rtsp": 8554, "rtmp": 1935, "hls": 8888, "whip": 8889, "whep": 8890}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = False


def version_of(module: str) -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return None


def check_module(module: str, fix: str, required: bool) -> Check:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is as bad as a missing one
        return Check(module, False, f"not importable: {type(exc).__name__}: {exc}"[:160], fix, required)
    return Check(module, True, version_of(module) or "installed", "", required)


def check_cuda() -> Check:
    try:
        import torch
    except ImportError:
        return Check("cuda", False, "torch is not installed", GPU["torch"])
    if not torch.cuda.is_available():
        return Check("cuda", False, f"torch {torch.__version__} sees no CUDA device (engine 'filter' will be used)",
                     "on a GPU machine install the CUDA build of torch==2.13.0 and an NVIDIA driver")
    props = torch.cuda.get_device_properties(0)
    return Check("cuda", True, f"{props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}")


def check_model_cache(model_id: str) -> Check:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    if Path(model_id).is_dir():
        return Check("model", True, f"{model_id} is a local directory")
    cached = sorted(p.name.removeprefix("models--").replace("--", "/") for p in hub.glob("models--*")) \
        if hub.is_dir() else []
    detail = f"cache {hub}: {len(cached)} model(s)" + (f" ({', '.join(cached[:5])})" if cached else "")
    if model_id in cached:
        return Check("model", True, f"{model_id} cached; {detail}")
    return Check("model", False, f"{model_id} not cached; {detail}",
                 f"download it once with network access: huggingface-cli download {model_id}")


def check_port(name: str, port: int, host: str = "127.0.0.1") -> Check:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return Check(f"port {port}", False, f"{name}: in use ({exc.strerror})",
                         f"stop what uses it or pick another port for {name}")
    return Check(f"port {port}", True, f"{name}: free")


def run_checks(model_id: str, ports: dict[str, int]) -> list[Check]:
    checks = [Check("python", sys.version_info >= (3, 11), sys.version.split()[0],
                    "use Python 3.11 or newer", required=True)]
    checks += [check_module(m, "pip install -r requirements.txt", True) for m in CORE]
    checks.append(check_cuda())
    checks += [check_module(m, fix, False) for m, fix in GPU.items() if m != "torch"]
    checks.append(check_model_cache(model_id))
    checks += [check_port(name, port) for name, port in ports.items()]
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m api.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML configuration file (for the model and ports)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ports = {**PORTS, "api": config.server.port, "relay": config.relay.port}
    checks = run_checks(config.model.model_id, ports)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "--  ")
            print(f"{mark} {c.name:<20} {c.detail}")
            if not c.ok and c.fix:
                print(f"     {'':<20} fix: {c.fix}")
    return 1 if any(c.required and not c.ok for c in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
