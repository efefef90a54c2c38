"""The README's first command on this clone, as a new user runs it: `make run`, then frames through it.

Run by .ci/run before `make test`, so .venv holds the core requirements
only: an import that only the dev or diffusion requirements satisfy fails
here. Standard library only (it runs before any install). Steps:

1. `make run ARGS="--port P --relay-port R"` in its own process group, up to
   "api ready" (the install included);
2. GET /health answers;
3. `python -m producers view --save DIR` and `python -m producers pattern`
   for a few seconds; the viewer must have saved processed JPEG frames;
4. Ctrl-C (SIGINT to the group, as a terminal sends it): every process of the
   group ends, and the server's temporary directory is left empty.

Exit status 0 when all holds; otherwise 1 with the server's output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = ROOT / ".venv" / "bin" / "python"
INSTALL_TIMEOUT_S = 900
STREAM_SECONDS = 6
STOP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fail(message: str, log: Path | None = None) -> None:
    print(f"smoke: FAIL: {message}", flush=True)
    if log is not None and log.exists():
        print("---- make run output (last 60 lines) ----")
        print("\n".join(log.read_text(errors="replace").splitlines()[-60:]))
    raise SystemExit(1)


def wait_for_line(log: Path, needle: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll the server's output file for ``needle`` while the server lives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            fail(f"`make run` exited with {process.returncode} before {needle!r}", log)
        time.sleep(0.5)
    fail(f"no {needle!r} within {timeout:.0f} s", log)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGINT to the whole group, as Ctrl-C in a terminal; every process must end by itself."""
    pgid = process.pid
    os.killpg(pgid, signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
        process.poll()
    if group_alive(pgid):
        left = subprocess.run(
            ["ps", "-o", "pid,args", "-g", str(pgid)], check=False, capture_output=True, text=True
        ).stdout
        os.killpg(pgid, signal.SIGKILL)
        fail(f"processes still running {STOP_TIMEOUT_S} s after Ctrl-C:\n{left}", log)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sd-smoke-"))
    server_tmp, saved, log = work / "tmp", work / "frames", work / "server.log"
    server_tmp.mkdir()
    http_port, relay_port = free_port(), free_port()
    relay = f"ws://127.0.0.1:{relay_port}"
    env = {
        **os.environ,
        "TMPDIR": str(server_tmp),
        "PYTHONUNBUFFERED": "1",
        "STREAMDIFFUSION_SERVER__DATA_DIR": str(work / "data"),
    }
    started = time.monotonic()
    with log.open("wb") as out:
        server = subprocess.Popen(
            ["make", "run", f"ARGS=--port {http_port} --relay-port {relay_port}"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        wait_for_line(log, "api ready", server, INSTALL_TIMEOUT_S)
        print(f"smoke: `make run` reached 'api ready' in {time.monotonic() - started:.0f} s", flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as response:
            health = json.load(response)
        print(f"smoke: /health: status {health.get('status')}, version {health.get('version')}", flush=True)
        if response.status != 200 or "version" not in health:
            fail(f"/health answered {response.status}: {health}", log)

        viewer = subprocess.Popen(
            [
                str(PY),
                "-m",
                "producers",
                "view",
                "--relay",
                relay,
                "--save",
                str(saved),
                "--duration",
                str(STREAM_SECONDS + 4),
                "--quiet",
            ],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        producer = subprocess.run(
            [
                str(PY),
                "-m",
                "producers",
                "pattern",
                "--relay",
                relay,
                "--duration",
                str(STREAM_SECONDS),
                "--fps",
                "15",
                "--quiet",
            ],
            check=False,
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        viewer_out = viewer.communicate(timeout=60)[0].decode(errors="replace")
        print(f"smoke: producer: {producer.stdout.strip()}", flush=True)
        print(f"smoke: viewer: {viewer_out.strip()}", flush=True)
        if producer.returncode != 0 or viewer.returncode != 0:
            fail(
                f"producer exited {producer.returncode}, viewer {viewer.returncode}:\n"
                f"{producer.stderr}\n{viewer_out}",
                log,
            )
        frames = sorted(saved.glob("*.jpg"))
        if not frames or not all(f.read_bytes()[:2] == b"\xff\xd8" for f in frames):
            fail(f"the viewer saved {len(frames)} JPEG frames in {saved}", log)
        print(f"smoke: the viewer saved {len(frames)} processed frames", flush=True)
    finally:
        if group_alive(server.pid):
            stop_group(server, log)
    server.wait(timeout=10)
    leftovers = sorted(p.name for p in server_tmp.iterdir())
    if leftovers:
        fail(f"the server left {leftovers} in its temporary directory", log)
    shutil.rmtree(work)
    print(
        f"smoke: ok: stopped cleanly, no process or temporary file left ({time.monotonic() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
