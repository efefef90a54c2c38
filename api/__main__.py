"""``python -m api``: the HTTP API, the relay and local workers in one command.

Configuration: ``--config FILE`` (or ``$STREAMDIFFUSION_CONFIG``), then
``STREAMDIFFUSION_*`` environment variables, then these flags; see
``api/config.py`` and ``config.example.yaml``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from typing import Any

import yaml

from api.app import create_app
from api.config import ConfigError, example_yaml, load_config
from api.server import bind, uvicorn_server
from api.settings import ServerSettings
from api.workers import resolve_engine
from common.logs import setup_logging

log = logging.getLogger("embedded")

#: flag -> (section, option); only flags given on the command line override
FLAGS: dict[str, tuple[str, str]] = {
    "host": ("server", "host"), "port": ("server", "port"), "public_url": ("server", "public_url"),
    "api_key": ("server", "api_keys"), "max_queue_size": ("server", "max_queue_size"),
    "relay_host": ("relay", "host"), "relay_port": ("relay", "port"), "token": ("relay", "tokens"),
    "max_frame_bytes": ("relay", "max_frame_bytes"), "max_width": ("relay", "max_width"),
    "max_height": ("relay", "max_height"), "max_channels": ("relay", "max_channels"),
    "insecure": ("relay", "insecure"), "workers": ("workers", "count"),
    "engine": ("workers", "engine"), "capacity": ("workers", "capacity"),
    "worker_arg": ("workers", "args"), "model": ("model", "model_id"),
    "acceleration": ("model", "acceleration"), "log_level": ("logging", "level"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m api", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML configuration file")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    p.add_argument("--example-config", action="store_true", help="print every option as YAML and exit")
    p.add_argument("--host", help="HTTP address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="HTTP port (default 8080; 0: any free port)")
    p.add_argument("--public-url", help="base URL clients use, for whip_url and friends")
    p.add_argument("--api-key", action="append", help="Bearer key for /v1 (repeatable)")
    p.add_argument("--max-queue-size", type=int, help="seed-001 sessions at once (0: no limit)")
    p.add_argument("--relay-host", help="relay address (default 127.0.0.1)")
    p.add_argument("--relay-port", type=int, help="relay port (default 8765; 0: any free port)")
    p.add_argument("--token", action="append", help="relay token (repeatable)")
    p.add_argument("--max-frame-bytes", type=int)
    p.add_argument("--max-width", type=int)
    p.add_argument("--max-height", type=int)
    p.add_argument("--max-channels", type=int)
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow a non-loopback relay with no tokens")
    p.add_argument("--workers", type=int, help="local worker processes (default 1; 0: none)")
    p.add_argument("--engine", choices=["auto", "filter", "diffusion"])
    p.add_argument("--capacity", type=int, help="channels each local worker serves")
    p.add_argument("--worker-arg", action="append", help="extra worker argument, e.g. --worker-arg=-v")
    p.add_argument("--model", help="default model id or local path")
    p.add_argument("--acceleration", choices=["none", "sdpa", "xformers", "compile", "tensorrt"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("-v", "--verbose", action="store_const", const="info", dest="log_level")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, dict[str, Any]] = {}
    for flag, (section, option) in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.setdefault(section, {})[option] = value
    return overrides


def instructions(http_url: str, relay_url: str, api_key: str, token: str | None) -> str:
    auth = f" --token {token}" if token else ""
    return "\n".join([
        f"relay ready at {relay_url}",
        f"api ready at {http_url} (key: {api_key})",
        f"  web page:      {http_url}/",
        f"  send frames:   python -m producers pattern --relay {relay_url}{auth}",
        f"                 python -m producers webcam  --relay {relay_url}{auth}",
        f"  watch output:  python -m producers view --relay {relay_url}{auth}",
        f"  save output:   python -m producers view --save out/ --relay {relay_url}{auth}",
        (
            f"  change look:   python -m producers pattern --params '{{\"prompt\": \"a pencil sketch\"}}' "
            f"--relay {relay_url}{auth}"
        ),
        (
            f"  create stream: curl -X POST {http_url}/v1/streams -H 'Authorization: Bearer {api_key}' "
            "-H 'Content-Type: application/json' -d '{\"pipeline\": \"streamdiffusion\", \"params\": {}}'"
        ),
    ])


async def serve(settings: ServerSettings) -> None:
    if settings.engine == "auto" and resolve_engine("auto") == "filter":
        log.info("no CUDA GPU with diffusers found: local workers use engine 'filter' "
                 "(OpenCV effects on the CPU)")
    app = create_app(settings)
    sock = bind(settings.host, settings.port)
    server = uvicorn_server(app)
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    http_url = f"http://{shown_host}:{sock.getsockname()[1]}"

    async def announce(app_) -> None:
        print(instructions(http_url, app_.state.relay_url, next(iter(settings.api_keys)),
                           next(iter(settings.relay.tokens), None)), flush=True)

    app.state.startup_hooks.append(announce)
    await server.serve(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.example_config:
        print(example_yaml())
        return
    try:
        config = load_config(args.config, overrides_from_args(args))
        settings = config.server_settings()
        settings.relay.check()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return
    setup_logging(level=config.logging.level)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
