"""python -m api (sd-server): the HTTP API, the relay and local workers in one command.

Configuration, lowest first: defaults, the YAML file (--config FILE or
$STREAMDIFFUSION_CONFIG), a .env file in the working directory, then
STREAMDIFFUSION_<SECTION>__<OPTION> environment variables, then these flags.
--example-config lists every option.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from api.server.app import create_app
from api.server.config import ENV_PREFIX, Config, ConfigError, example_yaml, load_config
from api.server.http import uvicorn_server
from api.server.keyfile import default_data_dir, load_or_create_api_key
from api.server.services import services
from api.streams.manager import check_named_streams
from common.listen import PortInUse, listen
from common.logs import add_logging_arguments, setup_logging
from worker.engines import default_engine_name

log = logging.getLogger("embedded")

#: flag -> "section.option" of the configuration; type, choices and help come from that field
FLAGS: dict[str, str] = {
    "--host": "server.host",
    "--port": "server.port",
    "--public-url": "server.public_url",
    "--api-key": "server.api_keys",
    "--data-dir": "server.data_dir",
    "--origin": "server.origins",
    "--max-queue-size": "server.max_queue_size",
    "--relay-host": "relay.host",
    "--relay-port": "relay.port",
    "--token": "relay.tokens",
    "--max-frame-bytes": "relay.max_frame_bytes",
    "--max-width": "relay.max_width",
    "--max-height": "relay.max_height",
    "--max-channels": "relay.max_channels",
    "--insecure": "relay.insecure",
    "--workers": "workers.count",
    "--engine": "workers.engine",
    "--capacity": "workers.capacity",
    "--worker-arg": "workers.args",
    "--model": "model.model_id",
    "--acceleration": "model.acceleration",
}


def _field(path: str) -> Any:
    section, option = path.split(".")
    return Config.model_fields[section].annotation.model_fields[option]  # type: ignore[union-attr]


def add_config_flag(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """One flag for one config option, typed and documented by the option's pydantic field."""
    field = _field(path)
    annotation, default = field.annotation, field.get_default(call_default_factory=True)
    optional = [a for a in typing.get_args(annotation) if a is not type(None)]
    if type(None) in typing.get_args(annotation) and len(optional) == 1:
        annotation = optional[0]  # ``int | None``: an int flag (None is "not given")
    env = f"{ENV_PREFIX}{path.replace('.', '__').upper()}"
    help_text = field.description or ""
    if default not in (None, [], False):
        help_text += f" (default {default})"
    help_text += f"; env {env}"
    dest, metavar = path.replace(".", "__"), path.split(".")[1].upper()
    if annotation is bool:
        parser.add_argument(flag, dest=dest, action="store_true", default=None, help=help_text)
    elif typing.get_origin(annotation) is list:
        parser.add_argument(
            flag,
            dest=dest,
            action="append",
            metavar=metavar.removesuffix("S"),
            help=help_text + " (repeatable)",
        )
    elif typing.get_origin(annotation) is typing.Literal:
        parser.add_argument(flag, dest=dest, choices=typing.get_args(annotation), help=help_text)
    else:
        kind = int if annotation is int else float if annotation is float else str
        parser.add_argument(flag, dest=dest, type=kind, metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m api", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML configuration file (default $STREAMDIFFUSION_CONFIG)")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    p.add_argument("--example-config", action="store_true", help="print every option as YAML and exit")
    for flag, path in FLAGS.items():
        add_config_flag(p, flag, path)
    add_logging_arguments(p)
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, as nested sections for :func:`load_config`."""
    overrides: dict[str, dict[str, Any]] = {}
    for path in [*FLAGS.values(), "logging.level"]:
        value = getattr(args, path.replace(".", "__"), None) if path != "logging.level" else args.log_level
        if value is not None:
            section, option = path.split(".")
            overrides.setdefault(section, {})[option] = value
    return overrides


def python_command(executable: str = sys.executable, cwd: str | None = None) -> str:
    """How to name this interpreter in a command the user copies: its path from the working
    directory when it lives there (``.venv/bin/python`` after ``make run``, whose virtual
    environment is not active in the user's shell), else its full path inside a virtual
    environment, else ``python``."""
    here = Path(cwd or os.getcwd())
    path = Path(executable)
    with contextlib.suppress(ValueError):
        relative = path.relative_to(here)
        return str(relative) if relative.parent != Path(".") else f"./{relative}"
    return executable if sys.prefix != sys.base_prefix else "python"


def instructions(
    http_url: str,
    relay_url: str,
    api_key: str,
    key_source: str,
    token: bool,
    python: str = "python",
    engine_note: str | None = None,
) -> str:
    auth = "RELAY_TOKEN=<relay token> " if token else ""
    lines = [
        f"relay ready at {relay_url}",
        f"api ready at {http_url}",
        f"  api key:       {api_key} ({key_source})",
        f"  web page:      {http_url}/",
    ]
    if engine_note:
        lines.append(f"  engine:        {engine_note}")
    return "\n".join(
        [
            *lines,
            f"  send frames:   {auth}{python} -m producers pattern --relay {relay_url}",
            f"                 {auth}{python} -m producers webcam  --relay {relay_url}",
            f"  watch output:  {auth}{python} -m producers view --relay {relay_url}",
            f"  save output:   {auth}{python} -m producers view --save out/ --relay {relay_url}",
            (
                f"  change look:   {auth}{python} -m producers pattern "
                f'--params \'{{"prompt": "a pencil sketch"}}\' '
                f"--relay {relay_url}"
            ),
            (
                f"  create stream: curl -X POST {http_url}/v1/streams -H 'Authorization: Bearer {api_key}' "
                '-H \'Content-Type: application/json\' -d \'{"pipeline": "streamdiffusion", "params": {}}\''
            ),
            (
                f"  feed a stream: {python} -m producers pattern --channel <stream id> "
                f"--token <stream key> --relay {relay_url}"
            ),
            (
                "  more workers:  configure a relay token (--token), then "
                f"RELAY_TOKEN=<token> {python} -m worker --relay {relay_url}"
            ),
        ]
    )


def resolve_api_key(config: Config) -> tuple[str, str]:
    """The key to show and where it comes from; generates and keeps one when none is configured."""
    if config.server.api_keys:
        return "$API_KEY", "as configured"
    assert config.server.data_dir is not None
    key, path = load_or_create_api_key(Path(config.server.data_dir))
    config.server.api_keys = [key]
    return key, f"kept in {path}"


async def serve(config: Config) -> None:
    http_sock = _listen_or_exit(config.server.host, config.server.port, "HTTP", "--port", "server.port")
    relay_sock = _listen_or_exit(config.relay.host, config.relay.port, "relay", "--relay-port", "relay.port")
    config.server.data_dir = config.server.data_dir or str(default_data_dir())
    api_key, key_source = resolve_api_key(config)
    engine_note = None
    if config.workers.count and config.workers.engine == "auto" and default_engine_name() == "filter":
        engine_note = "'filter' (OpenCV effects on the CPU): no CUDA GPU with diffusers found"
    app = create_app(config, relay_socket=relay_sock)
    server = uvicorn_server(app)
    shown_host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::", "") else config.server.host
    http_url = f"http://{shown_host}:{http_sock.getsockname()[1]}"

    async def announce() -> None:
        await app.state.ready.wait()
        print(
            instructions(
                http_url,
                services(app).relay_url,
                api_key,
                key_source,
                bool(config.relay.tokens),
                python=python_command(),
                engine_note=engine_note,
            ),
            flush=True,
        )

    announcing = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[http_sock])
    finally:
        announcing.cancel()


def _listen_or_exit(host: str, port: int, what: str, flag: str, path: str) -> Any:
    try:
        return listen(host, port)
    except PortInUse as exc:
        env = f"{ENV_PREFIX}{path.replace('.', '__').upper()}"
        print(
            f"error: {what} {exc}: stop what uses it, or pick another with {flag} (or {env})", file=sys.stderr
        )
        raise SystemExit(1) from None


def print_quietly(text: str) -> None:
    """Print, ending quietly when the reader goes away early (``--print-config | head``)."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.example_config:
        print_quietly(example_yaml())
        return
    try:
        config = load_config(args.config, overrides_from_args(args))
        config.relay_config().check()
        check_named_streams(config)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print_quietly(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return
    setup_logging(config.logging.level)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
