"""Structured, quiet-by-default logging shared by every command."""

from __future__ import annotations

import logging
import sys


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=relay msg="..."``: greppable and machine-readable."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace('"', "'")
        line = (f'ts={self.formatTime(record, "%Y-%m-%dT%H:%M:%S")} level={record.levelname.lower()} '
                f'logger={record.name} msg="{message}"')
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(verbose: bool = False, level: str | None = None) -> None:
    """Warnings only unless ``verbose`` or ``level`` ("debug", "info"...) says otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if level is None:
        level = "info" if verbose else "warning"
    root.setLevel(level.upper())
    # the lines that tell a user what is running stay visible when quiet
    for name in ("embedded",):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)
