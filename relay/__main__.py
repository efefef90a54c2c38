"""python -m relay (sd-relay): run the relay on its own.

Listens on loopback only unless --host says otherwise; a non-loopback
address needs at least one token (--token or RELAY_TOKEN) and no open
channels, or --insecure. Browsers (any Origin header) are refused unless
their origin is given with --origin.
Stops on Ctrl-C or SIGTERM, telling every client first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from common.listen import PortInUse
from common.logs import add_logging_arguments, setup_logging
from relay.config import DEFAULT_PORT, TOKEN_ENV, RelayConfig
from relay.server import Relay

LEGACY_TOKEN_ENV = "RELAY_TOKENS"  # read too: earlier versions documented it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m relay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = RelayConfig()
    p.add_argument(
        "--host", default=defaults.host, help="address to listen on (default 127.0.0.1: loopback only)"
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on (default {DEFAULT_PORT}; 0: any free port)",
    )
    p.add_argument(
        "--token",
        action="append",
        default=[],
        help=f"accepted token (repeatable); also ${TOKEN_ENV}=a,b. None: no token needed (loopback only)",
    )
    p.add_argument(
        "--max-frame-bytes",
        type=int,
        default=defaults.max_frame_bytes,
        metavar="BYTES",
        help=f"largest encoded frame accepted (default {defaults.max_frame_bytes})",
    )
    p.add_argument(
        "--max-width",
        type=int,
        default=defaults.max_width,
        metavar="PIXELS",
        help=f"widest frame accepted (default {defaults.max_width})",
    )
    p.add_argument(
        "--max-height",
        type=int,
        default=defaults.max_height,
        metavar="PIXELS",
        help=f"tallest frame accepted (default {defaults.max_height})",
    )
    p.add_argument(
        "--max-channels",
        type=int,
        default=defaults.max_channels,
        metavar="N",
        help=f"channels at once (default {defaults.max_channels})",
    )
    p.add_argument(
        "--max-params-bytes",
        type=int,
        default=defaults.max_params_bytes,
        metavar="BYTES",
        help="largest params message, and largest params a channel holds once merged "
        f"(JSON bytes; default {defaults.max_params_bytes})",
    )
    p.add_argument(
        "--channel",
        action="append",
        default=[],
        help="allow only these channel names (repeatable); default any",
    )
    p.add_argument(
        "--open-channels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let producers and viewers without a token join channels (default: yes when "
        "no token is configured, else no)",
    )
    p.add_argument(
        "--origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="browser origin allowed to connect, e.g. https://app.example (repeatable); "
        "default none: handshakes with an Origin header are refused",
    )
    p.add_argument(
        "--hello-timeout",
        type=float,
        default=defaults.hello_timeout,
        metavar="SECONDS",
        help="time to send a hello; a silent connection then becomes a seed-002 consumer "
        f"where open channels are allowed, else it is closed (default {defaults.hello_timeout:g})",
    )
    p.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=defaults.max_connections_per_ip,
        metavar="N",
        help="connections one address may hold, not counting those with the token "
        f"(default {defaults.max_connections_per_ip})",
    )
    p.add_argument(
        "--control-rate",
        type=float,
        default=defaults.control_rate,
        metavar="PER_S",
        help=f"control messages a connection may send per second (default {defaults.control_rate:g}; "
        "frames are not counted)",
    )
    p.add_argument(
        "--control-burst",
        type=int,
        default=defaults.control_burst,
        metavar="N",
        help=f"control messages a connection may send at once (default {defaults.control_burst})",
    )
    p.add_argument(
        "--anonymous-share",
        type=float,
        default=defaults.anonymous_share,
        metavar="SHARE",
        help="share of the workers' capacity channels opened without a credential may hold "
        f"(0-1; default {defaults.anonymous_share:g})",
    )
    p.add_argument(
        "--anonymous-channel-share",
        type=float,
        default=defaults.anonymous_channel_share,
        metavar="SHARE",
        help="share of --max-channels that clients without the relay token may open, when the relay "
        f"has tokens (0-1; default {defaults.anonymous_channel_share:g})",
    )
    p.add_argument(
        "--idle-release",
        type=float,
        default=defaults.idle_release_s,
        metavar="SECONDS",
        help="a channel without input this long gives its worker slot back until input returns "
        f"(default {defaults.idle_release_s:g}; 0: never)",
    )
    p.add_argument(
        "--nats",
        default=defaults.nats,
        metavar="URL",
        help="NATS server URL(s), comma-separated: share channels, workers and viewers with the relay "
        "nodes there (needs nats-py: pip install -e .[cluster]; default: a relay on its own)",
    )
    p.add_argument(
        "--node-name",
        default=defaults.node_name,
        metavar="NAME",
        help="this node's name in the cluster (default: a random one)",
    )
    p.add_argument("--insecure", action="store_true", help="allow listening beyond loopback with no tokens")
    add_logging_arguments(p)
    return p


def tokens_from_environment() -> list[str]:
    """``$RELAY_TOKEN`` (and the older ``$RELAY_TOKENS``), comma-separated."""
    values = (os.environ.get(TOKEN_ENV, ""), os.environ.get(LEGACY_TOKEN_ENV, ""))
    return [token for value in values for token in value.split(",") if token]


def relay_config_from_args(args: argparse.Namespace) -> RelayConfig:
    return RelayConfig(
        host=args.host,
        port=args.port,
        tokens=frozenset(args.token + tokens_from_environment()),
        max_frame_bytes=args.max_frame_bytes,
        max_width=args.max_width,
        max_height=args.max_height,
        max_channels=args.max_channels,
        max_params_bytes=args.max_params_bytes,
        allowed_channels=frozenset(args.channel),
        insecure=args.insecure,
        open_channels=args.open_channels,
        origins=frozenset(args.origin),
        hello_timeout=args.hello_timeout,
        max_connections_per_ip=args.max_connections_per_ip,
        control_rate=args.control_rate,
        control_burst=args.control_burst,
        anonymous_share=args.anonymous_share,
        anonymous_channel_share=args.anonymous_channel_share,
        idle_release_s=args.idle_release,
        nats=args.nats,
        node_name=args.node_name,
    )


async def run(config: RelayConfig) -> None:
    """Serve until SIGINT or SIGTERM, then say ``shutdown`` to every client and close."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    async with Relay(config) as relay:
        print(f"relay listening on {relay.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    config = relay_config_from_args(args)
    try:
        config.check()
        asyncio.run(run(config))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    except PortInUse as exc:
        print(f"error: {exc}: stop what uses it, or pick another port with --port", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
