"""The server's generated API key, kept in its data directory so it survives restarts.

A user who configures no key gets one generated on the first start; later
starts read the same file, so clients (and the web page's saved key) keep
working. The file is created with mode 0600 and is never rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path

from api.streams import ids

APP_DIR = "streamdiffusion-server"
KEY_FILE = "api_key"


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/streamdiffusion-server``, else ``~/.local/share/streamdiffusion-server``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / APP_DIR


def load_or_create_api_key(data_dir: Path) -> tuple[str, Path]:
    """The key stored in ``data_dir``, or a new one written there (0600); returns it and the file."""
    path = data_dir / KEY_FILE
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key, path
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ids.api_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    return key, path
