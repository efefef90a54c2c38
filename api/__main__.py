"""``python -m api``: the relay and one local worker, ready for producers and viewers."""

from __future__ import annotations

import argparse
import asyncio

from api.embedded import EmbeddedOptions, run_embedded
from common.logs import setup_logging
from relay.__main__ import add_relay_arguments, relay_config_from_args


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m api", description=__doc__)
    add_relay_arguments(p)
    p.add_argument("--workers", type=int, default=1, help="local worker processes (0: none)")
    p.add_argument("--engine", default="auto", help="auto, filter or diffusion")
    p.add_argument("--worker-arg", action="append", default=[],
                   help="extra argument for each worker, e.g. --worker-arg=--model=PATH")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    config = relay_config_from_args(args)
    try:
        config.check()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    options = EmbeddedOptions(relay=config, workers=args.workers, engine=args.engine,
                              worker_args=args.worker_arg)
    try:
        asyncio.run(run_embedded(options))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
