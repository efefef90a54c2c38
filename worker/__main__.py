"""``python -m worker``: connect to a relay and process the channels it assigns."""

from __future__ import annotations

import argparse
import asyncio
import logging

import orjson

from common.logs import setup_logging
from relay.client import RelayRefused
from wire.frames import ImageFormat
from worker.engines import ENGINES, default_engine_name
from worker.runtime import WorkerOptions, run_forever

log = logging.getLogger("worker")


def parse_args(argv: list[str] | None = None) -> tuple[WorkerOptions, bool]:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    p.add_argument("--relay", default="ws://127.0.0.1:8765", help="relay URL")
    p.add_argument("--engine", choices=["auto", *ENGINES], default="auto",
                   help="auto: diffusion with a CUDA GPU, filter otherwise")
    p.add_argument("--token", help="relay token")
    p.add_argument("--capacity", type=int, default=1, help="channels served at once")
    p.add_argument("--channel", action="append", default=[],
                   help="serve only these channels (repeatable); default any")
    p.add_argument("--name", default="", help="shown in relay stats")
    p.add_argument("--model", help="diffusion model id or local path (sets params.model_id)")
    p.add_argument("--params", default="{}", help="JSON defaults under each channel's params")
    p.add_argument("--format", default="jpeg", help="output image format: jpeg or png")
    p.add_argument("--quality", type=int, default=85, help="output JPEG quality")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    try:
        params = orjson.loads(args.params)
    except orjson.JSONDecodeError as exc:
        p.error(f"--params is not valid JSON: {exc}")
    if not isinstance(params, dict):
        p.error("--params must be a JSON object")
    if args.model:
        params["model_id"] = args.model
    engine = default_engine_name() if args.engine == "auto" else args.engine
    options = WorkerOptions(
        relay_url=args.relay, engine=engine, token=args.token, capacity=args.capacity,
        channels=args.channel, name=args.name, params=params,
        output_format=ImageFormat.parse(args.format), quality=args.quality)
    return options, args.verbose


def main(argv: list[str] | None = None) -> None:
    options, verbose = parse_args(argv)
    setup_logging(verbose)
    log.warning("engine %s%s", options.engine, " (OpenCV effects on the CPU: no CUDA GPU with "
                "diffusers here)" if options.engine == "filter" else "")
    try:
        asyncio.run(run_forever(options))
    except RelayRefused as exc:
        raise SystemExit(f"error: the relay refused this worker: {exc}") from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
