"""A real RTMP server for tests: nginx with the rtmp module, in a temporary directory.

Runs ``nginx`` in the foreground as one process (``daemon off``,
``master_process off``: no user switch, nothing left behind) with every path
inside the test's directory, listening on a free port of 127.0.0.1. When
nginx or its rtmp module is missing the test is skipped with the install
command; ``.ci/install-system-deps`` installs both in CI. Use it as a
fixture with ``with nginx_rtmp(tmp_path / "nginx") as server: yield server``.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL = "apt-get install -y nginx libnginx-mod-rtmp (or run .ci/install-system-deps)"
MODULE = "ngx_rtmp_module.so"
MODULE_DIRS = (
    "/usr/lib/nginx/modules",
    "/usr/lib64/nginx/modules",
    "/usr/share/nginx/modules",
    "/usr/local/nginx/modules",
    "/etc/nginx/modules",
)
START_TIMEOUT = 10.0


@dataclass
class NginxRtmp:
    port: int
    directory: Path

    def url(self, app: str = "live", key: str = "test") -> str:
        return f"rtmp://127.0.0.1:{self.port}/{app}/{key}"


def _version_info(nginx: str) -> str:
    run = subprocess.run([nginx, "-V"], check=False, capture_output=True, text=True, timeout=10)
    return run.stdout + run.stderr


def find_nginx_rtmp() -> tuple[str, str | None]:
    """``(nginx binary, load_module line or None when rtmp is built in)``; skips the test if absent."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx") if Path(p).is_file()), None
    )
    if nginx is None:
        pytest.skip(f"nginx is not installed: {INSTALL}")
    info = _version_info(nginx)
    if re.search(r"--add-module=\S*rtmp", info):
        return nginx, None
    dirs = list(MODULE_DIRS)
    match = re.search(r"--modules-path=(\S+)", info)
    if match:
        dirs.insert(0, match.group(1))
    # Debian enables it with /etc/nginx/modules-enabled/50-mod-rtmp.conf -> modules/ngx_rtmp_module.so
    for conf in Path("/etc/nginx/modules-enabled").glob("*.conf"):
        with contextlib.suppress(OSError):
            found = re.search(r"load_module\s+(\S*ngx_rtmp_module\.so)", conf.read_text())
            if found and Path(found.group(1)).is_absolute():
                dirs.insert(0, str(Path(found.group(1)).parent))
    for directory in dirs:
        module = Path(directory) / MODULE
        if module.is_file():
            return nginx, f"load_module {module};"
    pytest.skip(f"nginx has no rtmp module ({MODULE} not found): {INSTALL}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(directory: Path, port: int, load_module: str | None) -> str:
    return f"""{load_module or ""}
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        chunk_size 4096;
        application live {{
            live on;
            record off;
            wait_key on;
            wait_video on;
        }}
    }}
}}
"""


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@contextlib.contextmanager
def nginx_rtmp(directory: Path, port: int | None = None) -> Iterator[NginxRtmp]:
    """Run an RTMP server until the block ends; fails (does not skip) if nginx will not start."""
    nginx, load_module = find_nginx_rtmp()
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = directory / "nginx.conf"
    conf.write_text(_config(directory, port, load_module))
    log = directory / "stderr.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [nginx, "-p", str(directory), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                errors = log.read_text(errors="replace")
                with contextlib.suppress(OSError):
                    errors += (directory / "error.log").read_text(errors="replace")
                pytest.fail(f"nginx did not start listening on {port}: {errors.strip()}")
            time.sleep(0.02)  # polling a TCP connect, bounded by the deadline
        yield NginxRtmp(port, directory)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
