"""python -m worker (sd-worker): connect to a relay and process the channels it assigns.

Reconnects by itself when the relay restarts or cannot be reached (tries
0.25, 0.5, 1, 2, 2... s apart, never more than 2 s) and announces itself
again; the relay then assigns it its channels. A channel whose engine fails
to load stays in error and loads again when its params change, or on its
own after 2, 4, 8... s (at most 60). The relay token comes from
--token or $RELAY_TOKEN (the server passes it to its own workers that way,
never on the command line).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import orjson

from common.lifeline import exit_with_parent
from common.logs import add_logging_arguments, setup_logging
from relay.client import RelayRefused
from relay.config import TOKEN_ENV, token_from_environment
from wire.frames import ImageFormat
from worker.capacity import auto_capacity
from worker.engines import ENGINES, default_engine_name
from worker.launch import LaunchOptions
from worker.runtime import WorkerOptions, run_forever

log = logging.getLogger("worker")


def _capacity(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"capacity is a number of channels (1 or more) or auto, not {text!r}"
        )
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--relay", default="ws://127.0.0.1:8765", help="relay URL (default ws://127.0.0.1:8765)")
    p.add_argument(
        "--engine",
        choices=["auto", *ENGINES],
        default="auto",
        help="auto (default): diffusion with a CUDA GPU and diffusers, filter otherwise",
    )
    p.add_argument(
        "--token",
        default=token_from_environment(),
        help=f"relay token (default: ${TOKEN_ENV}; prefer the variable: argv is visible to ps)",
    )
    p.add_argument(
        "--capacity",
        type=_capacity,
        default=None,
        help="channels served at once (default: from the hardware, 2 per core for filter, "
        "for diffusion what GPU memory holds of one shared model plus 0.5 GiB a channel, at most 8)",
    )
    p.add_argument(
        "--channel", action="append", default=[], help="serve only these channels (repeatable); default any"
    )
    p.add_argument("--name", default="", help="this worker's name in relay stats")
    p.add_argument("--model", help="diffusion model id or local path (sets params.model_id)")
    p.add_argument(
        "--acceleration",
        choices=["none", "sdpa", "xformers", "compile", "tensorrt"],
        help="diffusion acceleration (sets params.acceleration)",
    )
    p.add_argument(
        "--params",
        default="{}",
        metavar="JSON",
        help='JSON defaults under each channel\'s params, e.g. \'{"prompt": "a cat"}\'',
    )
    p.add_argument("--format", default="jpeg", help="output image format: jpeg (default) or png")
    p.add_argument("--quality", type=int, default=85, help="output JPEG quality 1-100 (default 85)")
    add_logging_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[WorkerOptions, str | None]:
    p = build_parser()
    launched = LaunchOptions.from_environment()  # a server's local worker: its options, typed
    if launched is not None:
        p.set_defaults(**launched.model_dump(exclude_none=True))
    args = p.parse_args(argv)
    try:
        params = orjson.loads(args.params)
    except orjson.JSONDecodeError as exc:
        p.error(f"--params is not valid JSON: {exc}")
    if not isinstance(params, dict):
        p.error("--params must be a JSON object")
    if args.model:
        params["model_id"] = args.model
    if args.acceleration:
        params["acceleration"] = args.acceleration
    engine = default_engine_name() if args.engine == "auto" else args.engine
    options = WorkerOptions(
        relay_url=args.relay,
        engine=engine,
        token=args.token,
        capacity=args.capacity or auto_capacity(engine),
        channels=args.channel,
        name=args.name,
        params=params,
        output_format=ImageFormat.parse(args.format),
        quality=args.quality,
    )
    return options, args.log_level


def log_engine(engine: str, launched: bool) -> None:
    """Say which engine runs: a warning for a worker started by hand on the CPU fallback (its user
    may expect a GPU), a quiet info line for a server's local worker (the server's banner says it)."""
    fallback = engine == "filter"
    level = logging.WARNING if fallback and not launched else logging.INFO
    why = " (OpenCV effects on the CPU: no CUDA GPU with diffusers here)" if fallback else ""
    log.log(level, "engine %s%s", engine, why)


def main(argv: list[str] | None = None) -> None:
    exit_with_parent()  # a server's local worker ends with it
    options, log_level = parse_args(argv)
    setup_logging(log_level)
    log_engine(options.engine, launched=LaunchOptions.from_environment() is not None)
    try:
        asyncio.run(run_forever(options))
    except RelayRefused as exc:
        raise SystemExit(f"error: the relay refused this worker: {exc}") from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
