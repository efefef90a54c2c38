"""``python -m relay``: run the relay on its own."""

from __future__ import annotations

import argparse
import asyncio
import os

from common.logs import setup_logging
from relay.config import DEFAULT_PORT, RelayConfig
from relay.server import serve


def parse_args(argv: list[str] | None = None) -> RelayConfig:
    p = argparse.ArgumentParser(prog="python -m relay", description=__doc__)
    add_relay_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log every join and assignment")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    return relay_config_from_args(args)


def add_relay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token", action="append", default=[],
                   help="accepted token (repeatable); also RELAY_TOKENS=a,b. None: no token needed")
    p.add_argument("--max-frame-bytes", type=int, default=RelayConfig.max_frame_bytes)
    p.add_argument("--max-width", type=int, default=RelayConfig.max_width)
    p.add_argument("--max-height", type=int, default=RelayConfig.max_height)
    p.add_argument("--max-channels", type=int, default=RelayConfig.max_channels)
    p.add_argument("--channel", action="append", default=[],
                   help="allow only these channel names (repeatable); default any")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening beyond loopback with no tokens")


def relay_config_from_args(args: argparse.Namespace) -> RelayConfig:
    env_tokens = [t for t in os.environ.get("RELAY_TOKENS", "").split(",") if t]
    return RelayConfig(
        host=args.host, port=args.port, tokens=frozenset(args.token + env_tokens),
        max_frame_bytes=args.max_frame_bytes, max_width=args.max_width,
        max_height=args.max_height, max_channels=args.max_channels,
        allowed_channels=frozenset(args.channel), insecure=args.insecure,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        config.check()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
