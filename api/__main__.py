"""``python -m api``: the HTTP API, the relay and local workers in one command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

from api.app import create_app
from api.server import bind, uvicorn_server
from api.settings import ServerSettings
from api.workers import resolve_engine
from common.logs import setup_logging
from relay.__main__ import relay_config_from_args
from relay.config import DEFAULT_PORT, RelayConfig

log = logging.getLogger("embedded")


def parse_args(argv: list[str] | None = None) -> tuple[ServerSettings, bool]:
    p = argparse.ArgumentParser(prog="python -m api", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default loopback only)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (0: any free port)")
    p.add_argument("--public-url", help="base URL clients use, for whip_url and friends")
    p.add_argument("--api-key", action="append", default=[],
                   help="accepted Bearer key for /v1 (repeatable; also STREAMDIFFUSION_API_KEYS=a,b); "
                        "none: one is generated and printed")
    p.add_argument("--relay-host", default="127.0.0.1")
    p.add_argument("--relay-port", type=int, default=DEFAULT_PORT, help="0: any free port")
    p.add_argument("--token", action="append", default=[], help="relay token (repeatable)")
    p.add_argument("--max-frame-bytes", type=int, default=RelayConfig.max_frame_bytes)
    p.add_argument("--max-width", type=int, default=RelayConfig.max_width)
    p.add_argument("--max-height", type=int, default=RelayConfig.max_height)
    p.add_argument("--max-channels", type=int, default=RelayConfig.max_channels)
    p.add_argument("--channel", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--insecure", action="store_true", help="relay beyond loopback with no tokens")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (0: none)")
    p.add_argument("--engine", default="auto", help="auto, filter or diffusion")
    p.add_argument("--worker-arg", action="append", default=[],
                   help="extra argument for each worker, e.g. --worker-arg=--model=PATH")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    relay_args = argparse.Namespace(**{**vars(args), "host": args.relay_host, "port": args.relay_port})
    keys = [k for k in os.environ.get("STREAMDIFFUSION_API_KEYS", "").split(",") if k]
    settings = ServerSettings(host=args.host, port=args.port, public_url=args.public_url,
                              api_keys=frozenset(args.api_key + keys),
                              relay=relay_config_from_args(relay_args), workers=args.workers,
                              engine=args.engine, worker_args=args.worker_arg)
    return settings, args.verbose


def instructions(http_url: str, relay_url: str, api_key: str, token: str | None) -> str:
    auth = f" --token {token}" if token else ""
    return "\n".join([
        f"relay ready at {relay_url}",
        f"api ready at {http_url} (key: {api_key})",
        f"  send frames:   python -m producers pattern --relay {relay_url}{auth}",
        f"                 python -m producers webcam  --relay {relay_url}{auth}",
        f"  watch output:  python -m producers view --relay {relay_url}{auth}",
        f"  save output:   python -m producers view --save out/ --relay {relay_url}{auth}",
        f"  change look:   python -m producers pattern --params '{{\"prompt\": \"a pencil sketch\"}}' "
        f"--relay {relay_url}{auth}",
        f"  create stream: curl -X POST {http_url}/v1/streams -H 'Authorization: Bearer {api_key}' "
        "-H 'Content-Type: application/json' -d '{\"pipeline\": \"streamdiffusion\", \"params\": {}}'",
    ])


async def serve(settings: ServerSettings) -> None:
    if settings.engine == "auto" and resolve_engine("auto") == "filter":
        log.info("no CUDA GPU with diffusers found: local workers use engine 'filter' "
                 "(OpenCV effects on the CPU)")
    app = create_app(settings)
    sock = bind(settings.host, settings.port)
    server = uvicorn_server(app)
    http_url = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:" \
               f"{sock.getsockname()[1]}"

    async def announce(app_) -> None:
        print(instructions(http_url, app_.state.relay_url, next(iter(settings.api_keys)),
                           next(iter(settings.relay.tokens), None)), flush=True)

    app.state.startup_hooks.append(announce)
    await server.serve(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    settings, verbose = parse_args(argv)
    setup_logging(verbose)
    try:
        settings.relay.check()
        if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
            log.warning("listening on %s: use --api-key so the key survives restarts", settings.host)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
