"""Structured, quiet-by-default logging shared by every command."""

from __future__ import annotations

import argparse
import logging
import sys

LEVELS = ("debug", "info", "warning", "error")


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=relay msg="..."``: greppable and machine-readable."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace('"', "'")
        line = (
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} level={record.levelname.lower()} "
            f'logger={record.name} msg="{message}"'
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str | None = None) -> None:
    """Warnings only unless ``level`` ("debug", "info"...) says otherwise.

    The ``embedded`` logger stays at info even when quiet: ``python -m api``
    (``sd-server``) tells a user through it which engine its local workers
    fell back to, and that must be seen. The name is spelled in
    ``api/__main__.py`` too: rename both together.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or "warning").upper())
    # the lines that tell a user what is running stay visible when quiet
    for name in ("embedded",):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``-v``, the same on every command; read back with ``args.log_level``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--log-level", choices=LEVELS, default=None, help="how much to log on stderr (default warning: quiet)"
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="info",
        help="log more: the same as --log-level info",
    )
