"""python -m api.doctor (sd-doctor): what this machine can run, and what to install for the rest.

Checks Python, every core requirement (read from requirements.txt, or from
the installed package's metadata) and that it imports, that every module of
the project imports with them, the GPU packages, CUDA, TensorRT, xformers,
the Hugging Face model cache and the ports the server uses. Prints one line
per check; --json for machines; --core for the core checks alone (what
`make run` needs). Exit status 1 when something the CPU-only default needs
is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import re
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from common.logs import add_logging_arguments, setup_logging

DISTRIBUTION = "streamdiffusion-server"
ROOT = Path(__file__).resolve().parent.parent
#: the project's packages, every module of which must import with the core requirements alone
PROJECT_PACKAGES = ("common", "wire", "relay", "worker", "producers", "media", "api")
#: modules that need the diffusion extra (torch, diffusers): checked with the GPU packages instead
OPTIONAL_MODULES = ("worker.engines.diffusion",)
CORE_FIX = "pip install -e . (or: pip install -r requirements.txt)"
GPU = {
    "torch": "pip install torch==2.13.0 (a CUDA build on GPU machines)",
    "diffusers": "pip install -r requirements-diffusion.txt",
    "transformers": "pip install -r requirements-diffusion.txt",
    "xformers": "pip install xformers (matching your torch build), or use acceleration sdpa",
    "torch_tensorrt": "pip install torch-tensorrt (the build matching your torch and CUDA); "
    "CUDA machines only, for acceleration tensorrt",
}
PORTS = {"api": 8080, "relay": 8765, "rtsp": 8554, "rtmp": 1935, "hls": 8888, "whip": 8889, "whep": 8890}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = False


@dataclass(frozen=True)
class CoreRequirement:
    """One line of requirements.txt that applies to this machine."""

    name: str
    specifier: str


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_requirements() -> list[CoreRequirement]:
    """The core dependencies: requirements.txt in a checkout, else the installed package's metadata.

    Requirements whose environment marker excludes this machine (uvloop on
    Windows) and those of extras (``dev``, ``diffusion``) are left out.
    """
    file = ROOT / "requirements.txt"
    if file.is_file():
        lines = [line.split("#", 1)[0].strip() for line in file.read_text().splitlines()]
    else:
        try:
            lines = importlib.metadata.requires(DISTRIBUTION) or []
        except importlib.metadata.PackageNotFoundError:
            return []
    return [req for line in lines if line and not line.startswith("-") and (req := _parse(line))]


def _parse(line: str) -> CoreRequirement | None:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging is itself a core requirement: reported missing, names still checked
        match = _NAME.match(line)
        return CoreRequirement(match.group(1), "") if match and "extra ==" not in line else None
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    return CoreRequirement(req.name, str(req.specifier))


def modules_of_distributions() -> dict[str, list[str]]:
    """Normalized distribution name -> the top-level modules it installs (``opencv-python-headless`` ->
    cv2).
    """
    modules: dict[str, list[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        if module.isidentifier() and not module.startswith("_"):
            for distribution in distributions:
                modules.setdefault(normalize_name(distribution), []).append(module)
    return modules


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is as bad as a missing one
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def check_requirement(req: CoreRequirement, modules: dict[str, list[str]]) -> Check:
    """Installed, at a version the pin accepts, and every module it provides imports."""
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return Check(req.name, False, f"not installed (requires {req.name}{req.specifier})", CORE_FIX, True)
    for module in modules.get(normalize_name(req.name), []):
        if error := _import_error(module):
            return Check(
                req.name, False, f"{version} installed but `import {module}` fails: {error}", CORE_FIX, True
            )
    if req.specifier and not _version_matches(version, req.specifier):
        return Check(req.name, False, f"{version} installed, requirements say {req.specifier}", CORE_FIX)
    return Check(req.name, True, version, "", True)


def _version_matches(version: str, specifier: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return True
    return SpecifierSet(specifier).contains(version, prereleases=True)


def project_modules() -> list[str]:
    """Every module of the project's packages, except ``__main__`` entry points and the diffusion extra."""
    found: list[str] = []

    def walk(package: str, path: list[str]) -> None:
        for info in pkgutil.iter_modules(path, prefix=package + "."):
            if info.name.endswith(".__main__") or info.name.startswith(OPTIONAL_MODULES):
                continue
            found.append(info.name)
            if info.ispkg:
                walk(info.name, [str(Path(p) / info.name.rsplit(".", 1)[1]) for p in path])

    for package in PROJECT_PACKAGES:
        found.append(package)
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            walk(package, list(spec.submodule_search_locations))
    return found


def check_project_modules() -> Check:
    """The server's own modules import: catches a core module importing a package outside the core."""
    names = project_modules()
    failures = [f"{name} ({error})" for name in names if (error := _import_error(name))]
    if failures:
        shown = "; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else "")
        return Check(
            "project modules",
            False,
            f"{len(failures)} of {len(names)} fail: {shown}",
            "install what the error names, or report it: the core requirements should cover it",
            True,
        )
    return Check("project modules", True, f"{len(names)} import", "", True)


def core_checks() -> list[Check]:
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    checks = [
        Check(
            "python",
            sys.version_info >= (3, 11),
            sys.version.split()[0],
            "use Python 3.11 or newer",
            required=True,
        )
    ]
    modules = modules_of_distributions()
    requirements = core_requirements()
    if not requirements:
        checks.append(
            Check(
                "requirements",
                False,
                f"neither {ROOT / 'requirements.txt'} nor the {DISTRIBUTION} package metadata found",
                CORE_FIX,
                True,
            )
        )
    checks += [check_requirement(req, modules) for req in requirements]
    checks.append(check_project_modules())
    return checks


def check_module(module: str, fix: str) -> Check:
    if error := _import_error(module):
        return Check(module, False, f"not importable: {error}"[:160], fix)
    try:
        version = importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = "installed"
    return Check(module, True, version)


def check_cuda() -> Check:
    try:
        import torch
    except ImportError:
        return Check("cuda", False, "torch is not installed", GPU["torch"])
    if not torch.cuda.is_available():
        return Check(
            "cuda",
            False,
            f"torch {torch.__version__} sees no CUDA device (engine 'filter' will be used)",
            "on a GPU machine install the CUDA build of torch==2.13.0 and an NVIDIA driver",
        )
    props = torch.cuda.get_device_properties(0)
    return Check(
        "cuda", True, f"{props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}"
    )


def check_model_cache(model_id: str) -> Check:
    hub = Path(
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    )
    if Path(model_id).is_dir():
        return Check("model", True, f"{model_id} is a local directory")
    cached = (
        sorted(p.name.removeprefix("models--").replace("--", "/") for p in hub.glob("models--*"))
        if hub.is_dir()
        else []
    )
    detail = f"cache {hub}: {len(cached)} model(s)" + (f" ({', '.join(cached[:5])})" if cached else "")
    if model_id in cached:
        return Check("model", True, f"{model_id} cached; {detail}")
    return Check(
        "model",
        False,
        f"{model_id} not cached; {detail}",
        f"download it once on a machine with network access: hf download {model_id}",
    )


def check_port(name: str, port: int, host: str = "127.0.0.1") -> Check:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return Check(
                f"port {port}",
                False,
                f"{name}: in use ({exc.strerror})",
                f"stop what uses it or pick another port for {name}",
            )
    return Check(f"port {port}", True, f"{name}: free")


def run_checks(model_id: str, ports: dict[str, int]) -> list[Check]:
    checks = core_checks()
    checks.append(check_cuda())
    checks += [check_module(m, fix) for m, fix in GPU.items() if m != "torch"]
    checks.append(check_model_cache(model_id))
    checks += [check_port(name, port) for name, port in ports.items()]
    return checks


def print_checks(checks: list[Check], failures_only: bool = False) -> None:
    for c in checks:
        if failures_only and c.ok:
            continue
        mark = "ok  " if c.ok else ("FAIL" if c.required else "--  ")
        print(f"{mark} {c.name:<24} {c.detail}")
        if not c.ok and c.fix:
            print(f"     {'':<24} fix: {c.fix}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m api.doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML configuration file (for the model and ports)")
    p.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    p.add_argument(
        "--core",
        action="store_true",
        help="only Python, the core requirements and the project's modules; "
        "print failures and a one-line summary",
    )
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)  # what importing the modules logs (a model cache warning, say)
    if args.core:
        checks = core_checks()
    else:
        from api.server.config import (  # after the core check could say what is missing
            ConfigError,
            load_config,
        )

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        checks = run_checks(
            config.model.model_id, {**PORTS, "api": config.server.port, "relay": config.relay.port}
        )
    failed = any(c.required and not c.ok for c in checks)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    elif args.core:
        print_checks(checks, failures_only=True)
        print(
            f"doctor: core {'incomplete' if failed else 'ok'}: "
            f"{sum(c.ok for c in checks)} of {len(checks)} checks pass"
        )
    else:
        print_checks(checks)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
