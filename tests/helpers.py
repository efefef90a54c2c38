"""Real protocol peers for tests: frames, a raw echo worker, receive helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection

from api.server.config import Config
from media.codec import encode_image
from relay.client import connect
from wire.frames import Frame, FrameKind, ImageFormat, decode_frame, encode_frame

TIMEOUT = 15.0


def picture(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth, structured RGB image (gradients and a disc), different per seed."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), np.full_like(x, (seed * 37) % 256)],
        axis=-1,
    ).astype(np.uint8)
    cv2.circle(rgb, ((seed * 7) % width, height // 2), max(4, height // 4), (255, 255, 255), -1)
    return rgb


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return encode_image(picture(width, height, seed), ImageFormat.JPEG)


def noise_png(width: int, height: int) -> bytes:
    """An incompressible PNG: big frames that fill socket buffers quickly."""
    rgb = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode_image(rgb, ImageFormat.PNG)


def input_frame(
    seq: int,
    payload: bytes,
    channel: str = "default",
    width: int = 64,
    height: int = 48,
    fmt: ImageFormat = ImageFormat.JPEG,
) -> bytes:
    return encode_frame(
        Frame(
            channel=channel,
            seq=seq,
            timestamp=time.time(),
            width=width,
            height=height,
            format=fmt,
            payload=payload,
        )
    )


async def recv_json(ws: ClientConnection, type_: str | None = None, **match: Any) -> dict[str, Any]:
    """Next text message (of ``type_`` with fields equal to ``match``), skipping others."""

    async def loop() -> dict[str, Any]:
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                continue
            data = orjson.loads(message)
            if (type_ is None or data.get("type") == type_) and all(
                data.get(k) == v for k, v in match.items()
            ):
                return data

    return await asyncio.wait_for(loop(), TIMEOUT)


async def recv_frame(ws: ClientConnection) -> Frame:
    """Next binary frame, skipping text messages."""

    async def loop() -> Frame:
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                return decode_frame(message)

    return await asyncio.wait_for(loop(), TIMEOUT)


class EchoWorker:
    """A minimal worker speaking the protocol by hand: returns each input as its output.

    A test controls its pace: :meth:`serve` echoes ``count`` frames, and a
    worker that is started but not served is a stalled one (read ``ws``
    directly to see what reached it).
    """

    def __init__(self, url: str, token: str | None = None, max_queue: int = 16) -> None:
        self.url, self.token, self.max_queue = url, token, max_queue
        self.received: list[int] = []
        self.assigned: asyncio.Queue[str] = asyncio.Queue()
        #: the ``params`` messages it was sent: (channel, params)
        self.params: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.ws: ClientConnection | None = None
        self.session = ""

    async def start(self) -> EchoWorker:
        self.ws, welcome = await connect(self.url, "worker", token=self.token, max_queue=self.max_queue)
        self.session = welcome["session"]
        return self

    async def serve(self, count: int | None = None) -> None:
        """Echo ``count`` frames (forever when None)."""
        assert self.ws is not None
        done = 0
        while count is None or done < count:
            message = await self.ws.recv()
            if isinstance(message, str):
                data = orjson.loads(message)
                if data.get("type") == "assign":
                    self.assigned.put_nowait(data["channel"])
                elif data.get("type") == "params":
                    self.params.put_nowait((data["channel"], data["params"]))
                continue
            frame = decode_frame(message)
            self.received.append(frame.seq)
            out = frame.as_output(frame.payload, frame.format, frame.width, frame.height, 1)
            assert out.kind is FrameKind.OUTPUT
            await self.ws.send(encode_frame(out))
            done += 1

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[EchoWorker]:
        """Started and echoing every frame until the block ends; then stopped and closed."""
        await self.start()
        task = asyncio.create_task(self.serve())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a relay closing first
                await task
            await self.close()


# -- the server in process --------------------------------------------------------


def server_config(key: str | None, **sections: dict[str, Any]) -> Config:
    """An in-process test server's configuration: any free ports, no local workers, API key ``key``
    (None: one is generated); ``sections`` add options by section, e.g. ``server={"max_queue_size": 2}``,
    ``relay={"max_channels": 1}``."""
    values: dict[str, dict[str, Any]] = {
        "server": {"port": 0, "api_keys": [key] if key else []},
        "relay": {"port": 0},
        "workers": {"count": 0},
    }
    for name, options in sections.items():
        values[name] = {**values.get(name, {}), **options}
    return Config(**values)


# -- the server command as a process ---------------------------------------------


def child_pids(pid: int) -> list[int]:
    """Live children of ``pid``, from /proc (parents from ``stat``: not every kernel has ``children``)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                children.append(int(entry.name))
    return children


async def start_server(*args: str, data_dir: Path, **kwargs: Any) -> tuple[asyncio.subprocess.Process, str]:
    """``python -m api`` on free ports with its state in ``data_dir`` (never the user's own); returns the
    process and what it printed up to its ``api key`` line. ``kwargs`` go to the subprocess (``env``,
    ``stderr``)."""
    from tests.test_commands import ROOT

    kwargs.setdefault("stderr", asyncio.subprocess.DEVNULL)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "api",
        "--port",
        "0",
        "--relay-port",
        "0",
        "--data-dir",
        str(data_dir),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        **kwargs,
    )
    lines: list[str] = []
    while not lines or not lines[-1].startswith("  api key:"):
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()  # type: ignore[union-attr]
        assert line, "the server exited before it was ready"
        lines.append(line)
    return process, "".join(lines)


async def stop_server(process: asyncio.subprocess.Process) -> int:
    """SIGTERM, and the exit status (unless it has ended already)."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 15)


# -- Debian's Chromium for the browser tests (never `playwright install`) ------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-fake-ui-for-media-stream",  # getUserMedia gets the fake camera, no prompt
    "--use-fake-device-for-media-stream",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: screenshots kept after a run (gitignored)
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", Path(__file__).resolve().parent.parent / "artifacts"))
