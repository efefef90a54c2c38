"""The viewer window and the screen producer on a real X display (Xvfb).

A virtual X server stands in for a desktop: the viewer (a subprocess, as a
user runs it) shows the worker's output in an SDL window there, and the test
reads the display back with mss to find the processed frame on screen. The
screen producer then captures that window and its frames come back through
the relay. Keys and the window's close button are pressed through XTest and
an X client message, the way a desktop delivers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import cv2
import mss
import numpy as np
import orjson
import pytest

from media.codec import decode_image
from producers.viewer import ViewerOptions, run_viewer
from relay import Relay
from tests.helpers import picture
from wire.frames import Frame

ROOT = Path(__file__).resolve().parents[1]
SCREEN = (640, 480)
IMAGE = (256, 192)
#: rows at the top of the window that hold the fps overlay (left out of exact comparisons)
LABEL_ROWS = 48
#: how long a picture may take to appear: worker and viewer start as processes on a busy machine
APPEAR_S = 60.0
EXIT_S = 20.0

pytestmark = [
    pytest.mark.network_service,  # Xvfb
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Xvfb is an X11 server"),
    pytest.mark.skipif(
        shutil.which("Xvfb") is None,
        reason="Xvfb is not installed (Debian: apt-get install xvfb; .ci/install-system-deps does it)",
    ),
    pytest.mark.skipif(
        ctypes.util.find_library("Xtst") is None,
        reason="libXtst is not installed (Debian: apt-get install libxtst6)",
    ),
]


# -- the display ------------------------------------------------------------------


@pytest.fixture
def display(tmp_path: Path) -> Iterator[str]:
    """A fresh Xvfb on a free display number; ``-displayfd`` says which one once it is ready."""
    log = tmp_path / "xvfb.log"
    read_end, write_end = os.pipe()
    with log.open("wb") as stderr:
        server = subprocess.Popen(
            [
                "Xvfb",
                "-displayfd",
                str(write_end),
                "-screen",
                "0",
                f"{SCREEN[0]}x{SCREEN[1]}x24",
                "-nolisten",
                "tcp",
            ],
            pass_fds=(write_end,),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 30)
        number = os.read(read_end, 64).decode().strip() if ready else ""
        if not number:
            pytest.fail(f"Xvfb did not start:\n{log.read_text()[-2000:]}")
        yield f":{number}"
    finally:
        os.close(read_end)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def grab(display: str) -> np.ndarray:
    """The whole screen as RGB."""
    with mss.MSS(display=display) as screen:
        shot = np.asarray(screen.grab(screen.monitors[1]))
    return cv2.cvtColor(shot, cv2.COLOR_BGRA2RGB)


def locate(screen: np.ndarray, image: np.ndarray) -> tuple[int, int, float]:
    """Where ``image`` (below its label rows) best matches the screen: x, y of the image's
    top-left corner and the mean absolute difference there."""
    body = image[LABEL_ROWS:]
    scores = cv2.matchTemplate(screen, body, cv2.TM_SQDIFF)
    _, _, (x, y), _ = cv2.minMaxLoc(scores)
    shown = screen[y : y + body.shape[0], x : x + body.shape[1]]
    return x, y - LABEL_ROWS, float(np.abs(shown.astype(int) - body.astype(int)).mean())


class _X:
    """The few Xlib and XTest calls the tests need, through ctypes (no extra package)."""

    def __init__(self, display: str) -> None:
        self.x11 = ctypes.CDLL(ctypes.util.find_library("X11"))
        self.xtst = ctypes.CDLL(ctypes.util.find_library("Xtst"))
        c = ctypes
        self.x11.XOpenDisplay.restype = c.c_void_p
        self.x11.XOpenDisplay.argtypes = [c.c_char_p]
        self.x11.XDefaultRootWindow.restype = c.c_ulong
        self.x11.XDefaultRootWindow.argtypes = [c.c_void_p]
        self.x11.XStringToKeysym.restype = c.c_ulong
        self.x11.XStringToKeysym.argtypes = [c.c_char_p]
        self.x11.XKeysymToKeycode.restype = c.c_ubyte
        self.x11.XKeysymToKeycode.argtypes = [c.c_void_p, c.c_ulong]
        self.x11.XInternAtom.restype = c.c_ulong
        self.x11.XInternAtom.argtypes = [c.c_void_p, c.c_char_p, c.c_int]
        self.x11.XQueryTree.argtypes = [
            c.c_void_p,
            c.c_ulong,
            c.POINTER(c.c_ulong),
            c.POINTER(c.c_ulong),
            c.POINTER(c.POINTER(c.c_ulong)),
            c.POINTER(c.c_uint),
        ]
        self.x11.XGetWindowProperty.argtypes = [
            c.c_void_p,
            c.c_ulong,
            c.c_ulong,
            c.c_long,
            c.c_long,
            c.c_int,
            c.c_ulong,
            c.POINTER(c.c_ulong),
            c.POINTER(c.c_int),
            c.POINTER(c.c_ulong),
            c.POINTER(c.c_ulong),
            c.POINTER(c.POINTER(c.c_ubyte)),
        ]
        self.x11.XFree.argtypes = [c.c_void_p]
        self.x11.XSendEvent.argtypes = [c.c_void_p, c.c_ulong, c.c_int, c.c_long, c.c_void_p]
        self.x11.XSync.argtypes = [c.c_void_p, c.c_int]
        self.x11.XCloseDisplay.argtypes = [c.c_void_p]
        self.xtst.XTestFakeMotionEvent.argtypes = [c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_ulong]
        self.xtst.XTestFakeKeyEvent.argtypes = [c.c_void_p, c.c_uint, c.c_int, c.c_ulong]
        self.dpy = self.x11.XOpenDisplay(display.encode())
        assert self.dpy, f"cannot open X display {display}"

    def close(self) -> None:
        self.x11.XCloseDisplay(self.dpy)

    def press(self, key: str, x: int, y: int) -> None:
        """Put the pointer at (x, y) (keyboard focus follows it) and tap ``key`` (a keysym name)."""
        code = self.x11.XKeysymToKeycode(self.dpy, self.x11.XStringToKeysym(key.encode()))
        assert code, f"no keycode for {key}"
        self.xtst.XTestFakeMotionEvent(self.dpy, -1, x, y, 0)
        self.xtst.XTestFakeKeyEvent(self.dpy, code, 1, 0)
        self.xtst.XTestFakeKeyEvent(self.dpy, code, 0, 0)
        self.x11.XSync(self.dpy, 0)

    def windows(self) -> dict[str, int]:
        """Top-level windows by title."""
        c = ctypes
        root, parent = c.c_ulong(), c.c_ulong()
        children, count = c.POINTER(c.c_ulong)(), c.c_uint()
        self.x11.XQueryTree(
            self.dpy,
            self.x11.XDefaultRootWindow(self.dpy),
            c.byref(root),
            c.byref(parent),
            c.byref(children),
            c.byref(count),
        )
        found = {self.title(children[i]): children[i] for i in range(count.value)}
        if children:
            self.x11.XFree(children)
        return found

    def title(self, window: int) -> str:
        """The window's _NET_WM_NAME (UTF-8: what SDL sets), empty when it has none."""
        c = ctypes
        kind, bits, items, left = c.c_ulong(), c.c_int(), c.c_ulong(), c.c_ulong()
        data = c.POINTER(c.c_ubyte)()
        self.x11.XGetWindowProperty(
            self.dpy,
            window,
            self.x11.XInternAtom(self.dpy, b"_NET_WM_NAME", 0),
            0,
            1024,
            0,
            self.x11.XInternAtom(self.dpy, b"UTF8_STRING", 0),
            c.byref(kind),
            c.byref(bits),
            c.byref(items),
            c.byref(left),
            c.byref(data),
        )
        if not data:
            return ""
        text = c.string_at(data, items.value).decode()
        self.x11.XFree(data)
        return text

    def close_window(self, window: int) -> None:
        """What a window manager's close button sends: WM_PROTOCOLS / WM_DELETE_WINDOW."""
        c = ctypes

        class ClientMessage(c.Structure):
            _fields_ = [  # noqa: RUF012 - ctypes reads the layout from this class attribute
                ("type", c.c_int),
                ("serial", c.c_ulong),
                ("send_event", c.c_int),
                ("display", c.c_void_p),
                ("window", c.c_ulong),
                ("message_type", c.c_ulong),
                ("format", c.c_int),
                ("data", c.c_long * 5),
                ("pad", c.c_char * 96),
            ]

        event = ClientMessage(
            type=33,
            window=window,
            format=32,  # 33: ClientMessage
            message_type=self.x11.XInternAtom(self.dpy, b"WM_PROTOCOLS", 0),
        )
        event.data[0] = self.x11.XInternAtom(self.dpy, b"WM_DELETE_WINDOW", 0)
        assert self.x11.XSendEvent(self.dpy, window, 0, 0, c.byref(event))
        self.x11.XSync(self.dpy, 0)


@contextlib.contextmanager
def x_client(display: str) -> Iterator[_X]:
    client = _X(display)
    try:
        yield client
    finally:
        client.close()


# -- processes ----------------------------------------------------------------------


class Child:
    """A ``python -m ...`` subprocess whose output goes to files under the test's tmp_path."""

    def __init__(self, process: asyncio.subprocess.Process, out: Path, err: Path) -> None:
        self.process, self.out, self.err = process, out, err

    def output(self) -> str:
        return (
            f"{self.out.stem} stdout:\n{self.out.read_text()[-3000:]}\n"
            f"{self.out.stem} stderr:\n{self.err.read_text()[-3000:]}"
        )

    def check_running(self) -> None:
        if self.process.returncode is not None:
            pytest.fail(f"{self.out.stem} exited early ({self.process.returncode}):\n{self.output()}")

    async def exited(self, timeout: float = EXIT_S) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            pytest.fail(f"{self.out.stem} is still running after {timeout:g} s:\n{self.output()}")


@contextlib.asynccontextmanager
async def child(
    tmp_path: Path,
    name: str,
    *args: str,
    display: str | None = None,
) -> AsyncIterator[Child]:
    """Run ``python -m args...``; stopped (SIGTERM, then SIGKILL) when the block ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    if display is not None:
        env["DISPLAY"] = display
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *args, cwd=ROOT, env=env, stdout=stdout, stderr=stderr
        )
    try:
        yield Child(process, out, err)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def until_on_screen(
    display: str,
    image: np.ndarray,
    watched: list[Child],
) -> tuple[int, int, np.ndarray]:
    """Poll the screen until ``image`` is shown (within a bounded time); its position and
    the screen region it occupies, label rows included."""
    deadline = time.monotonic() + APPEAR_S
    best = float("inf")
    while time.monotonic() < deadline:
        for c in watched:
            c.check_running()
        screen = await asyncio.to_thread(grab, display)
        x, y, error = locate(screen, image)
        best = min(best, error)
        if error < 2 and y >= 0:
            return x, y, screen[y : y + image.shape[0], x : x + image.shape[1]]
        await asyncio.sleep(0.2)  # the next look, not a synchronisation
    details = "\n".join(c.output() for c in watched)
    pytest.fail(f"the picture did not appear in {APPEAR_S:g} s (best mean difference {best:.1f})\n{details}")


def write_png(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def summary_frames(viewer: Child) -> int:
    """The frame count the viewer printed in its JSON report as it ended."""
    return int(orjson.loads(viewer.out.read_text().strip().splitlines()[-1])["frames"])


# -- tests -------------------------------------------------------------------------


async def test_viewer_window_shows_the_processed_frames(display: str, relay: Relay, tmp_path: Path) -> None:
    """relay + filter worker + producer + ``python -m producers view``: the inverted picture
    is on screen under an fps label, and q ends the viewer cleanly with its report."""
    image = picture(*IMAGE, seed=3)
    expected = 255 - image  # the filter's invert effect at full strength, lossless PNG all along
    source = write_png(tmp_path / "known.png", image)
    async with contextlib.AsyncExitStack() as stack:
        worker = await stack.enter_async_context(
            child(
                tmp_path,
                "worker",
                "worker",
                "--relay",
                relay.url,
                "--engine",
                "filter",
                "--format",
                "png",
                "--channel",
                "desk",
            )
        )
        producer = await stack.enter_async_context(
            child(
                tmp_path,
                "producer",
                "producers",
                "static",
                str(source),
                "--relay",
                relay.url,
                "--channel",
                "desk",
                "--format",
                "png",
                "--fps",
                "10",
                "--duration",
                "300",
                "--params",
                '{"effect": "invert", "strength": 1}',
                "--quiet",
            )
        )
        viewer = await stack.enter_async_context(
            child(
                tmp_path,
                "viewer",
                "producers",
                "view",
                "--relay",
                relay.url,
                "--channel",
                "desk",
                "--json",
                "--quiet",
                display=display,
            )
        )
        x, y, shown = await until_on_screen(display, expected, [worker, producer, viewer])

        label = np.abs(shown[:LABEL_ROWS].astype(int) - expected[:LABEL_ROWS].astype(int)).max(-1)
        assert 100 < (label > 100).sum() < label.size // 2  # text strokes over a matching picture
        assert np.abs(shown[LABEL_ROWS:].astype(int) - expected[LABEL_ROWS:].astype(int)).max() <= 2

        with x_client(display) as x11:
            assert "desk - stream viewer" in x11.windows()
            x11.press("q", x + IMAGE[0] // 2, y + IMAGE[1] // 2)
        assert await viewer.exited() == 0, viewer.output()
        assert summary_frames(viewer) >= 1


async def test_screen_producer_sends_what_the_display_shows(
    display: str, relay: Relay, tmp_path: Path
) -> None:
    """A known picture in the viewer window; ``python -m producers screen --region`` over it;
    its frames arrive through the relay with that picture. Closing the window ends the viewer."""
    image = picture(*IMAGE, seed=5)
    source = write_png(tmp_path / "known.png", image)
    body = image[LABEL_ROWS:]
    received: list[Frame] = []
    async with contextlib.AsyncExitStack() as stack:
        producer = await stack.enter_async_context(
            child(
                tmp_path,
                "producer",
                "producers",
                "static",
                str(source),
                "--relay",
                relay.url,
                "--channel",
                "cam",
                "--format",
                "png",
                "--fps",
                "10",
                "--duration",
                "300",
                "--no-receive",
                "--quiet",
            )
        )
        viewer = await stack.enter_async_context(
            child(
                tmp_path,
                "viewer",
                "producers",
                "view",
                "--relay",
                relay.url,
                "--channel",
                "cam",
                "--input",
                "--json",
                "--quiet",
                display=display,
            )
        )
        x, y, _ = await until_on_screen(display, image, [producer, viewer])

        ready = asyncio.Event()
        collector = asyncio.create_task(
            run_viewer(
                ViewerOptions(relay=relay.url, channel="shot", receive="input", show=False, max_frames=3),
                ready=ready,
                on_frame=received.append,
            )
        )
        stack.push_async_callback(asyncio.gather, collector, return_exceptions=True)
        stack.callback(collector.cancel)
        await asyncio.wait_for(ready.wait(), 10)
        await stack.enter_async_context(
            child(
                tmp_path,
                "screen",
                "producers",
                "screen",
                "--region",
                f"{x},{y + LABEL_ROWS},{body.shape[1]},{body.shape[0]}",
                "--relay",
                relay.url,
                "--channel",
                "shot",
                "--format",
                "png",
                "--fps",
                "5",
                "--no-receive",
                "--quiet",
                display=display,
            )
        )
        report = await asyncio.wait_for(collector, APPEAR_S)

        assert report.frames == len(received) == 3
        for frame in received:
            assert (frame.width, frame.height) == (body.shape[1], body.shape[0])
            assert np.abs(decode_image(frame.payload).astype(int) - body.astype(int)).max() <= 2

        with x_client(display) as x11:
            x11.close_window(x11.windows()["cam - stream viewer"])
        assert await viewer.exited() == 0, viewer.output()
        assert summary_frames(viewer) >= 1
