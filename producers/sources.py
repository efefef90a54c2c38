"""Frame sources: each yields ``HxWx3`` uint8 RGB arrays, one per ``read()``.

Sources open (and validate) their input in the constructor, so a missing
file or device fails with :class:`SourceError` before any connection is
made. ``read()`` may block (a webcam waits for its next frame); the sender
calls it from one dedicated thread, never from the event loop.
``read()`` returns ``None`` when the source is exhausted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Self

import cv2
import numpy as np

log = logging.getLogger("producers")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class SourceError(RuntimeError):
    """A source cannot be opened or read: a user error, reported without a traceback."""


class Source:
    """Base class: ``read()`` the next frame or ``None`` at the end; ``close()`` when done."""

    #: frames per second the source itself runs at, when it knows (video files).
    native_fps: float | None = None

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release files and devices."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bgr_to_rgb(bgr: np.ndarray) -> np.ndarray:
    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    if bgr.shape[2] == 4:
        return cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_image(path: Path) -> np.ndarray:
    """Read an image file as RGB, or raise :class:`SourceError` saying why not."""
    if not path.exists():
        raise SourceError(f"image not found: {path}")
    if not path.is_file():
        raise SourceError(f"not a file: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SourceError(f"cannot read {path} as an image (JPEG, PNG, BMP, WebP, TIFF)")
    return _bgr_to_rgb(bgr)


class StaticSource(Source):
    """One image repeated forever. Returns the same array object each time, so the
    sender encodes it once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.image = read_image(self.path)

    def read(self) -> np.ndarray:
        return self.image


class DirectorySource(Source):
    """The images of a directory in sorted name order, looping by default.

    Files are read lazily, one per frame; unreadable ones are skipped with a warning.
    """

    def __init__(self, path: str | os.PathLike[str], loop: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"directory not found: {self.path}")
        if not self.path.is_dir():
            raise SourceError(f"not a directory: {self.path}")
        self.files = sorted(
            p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.files:
            raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {self.path}")
        self.loop = loop
        self._index = 0
        self._bad: set[Path] = set()

    def read(self) -> np.ndarray | None:
        while len(self._bad) < len(self.files):
            if self._index >= len(self.files):
                if not self.loop:
                    return None
                self._index = 0
            path = self.files[self._index]
            self._index += 1
            if path in self._bad:
                continue
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is not None:
                return _bgr_to_rgb(bgr)
            log.warning("skipping unreadable image %s", path)
            self._bad.add(path)
        raise SourceError(f"none of the images in {self.path} could be read")


class VideoSource(Source):
    """A video file through OpenCV; optionally loops back to the start at the end."""

    def __init__(self, path: str | os.PathLike[str], loop: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"video not found: {self.path}")
        self.loop = loop
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise SourceError(f"cannot open {self.path} as a video")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.native_fps = fps if fps and 0 < fps < 1000 else None
        self._frames_read = 0

    def read(self) -> np.ndarray | None:
        ok, bgr = self._cap.read()
        if not ok and self.loop and self._frames_read:
            self._cap.release()  # reopening is more reliable than seeking in every container
            self._cap = cv2.VideoCapture(str(self.path))
            self._frames_read = 0
            ok, bgr = self._cap.read()
        if not ok:
            if not self._frames_read:
                raise SourceError(f"no frames could be decoded from {self.path}")
            return None
        self._frames_read += 1
        return _bgr_to_rgb(bgr)

    def close(self) -> None:
        self._cap.release()


class WebcamSource(Source):
    """A camera through OpenCV. The first frame is read at once to prove the device works."""

    def __init__(self, device: int = 0, width: int | None = None, height: int | None = None) -> None:
        self.device = device
        logging_ = cv2.utils.logging
        level = logging_.getLogLevel()
        logging_.setLogLevel(logging_.LOG_LEVEL_ERROR)  # our error says it better than its warnings
        try:
            self._cap = cv2.VideoCapture(device)
        finally:
            logging_.setLogLevel(level)
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"cannot open webcam {device}: no such device or it is busy (try --device N)")
        if width and height:
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # stale buffered frames add latency
        ok, bgr = self._cap.read()
        if not ok:
            self._cap.release()
            raise SourceError(f"webcam {device} opened but returned no frame")
        self._first: np.ndarray | None = _bgr_to_rgb(bgr)

    def read(self) -> np.ndarray | None:
        if self._first is not None:
            frame, self._first = self._first, None
            return frame
        ok, bgr = self._cap.read()
        if not ok:
            raise SourceError(f"webcam {self.device} stopped delivering frames")
        return _bgr_to_rgb(bgr)

    def close(self) -> None:
        self._cap.release()


class ScreenSource(Source):
    """Screen capture with mss (imported lazily: it needs a display).

    ``region`` is ``(x, y, width, height)``; default the whole ``monitor``.
    The mss handle is created in the thread that reads (X11 handles are per thread).
    """

    def __init__(self, region: tuple[int, int, int, int] | None = None, monitor: int = 1) -> None:
        try:
            import mss
        except ImportError:
            raise SourceError("screen capture needs mss: pip install mss") from None
        if (
            os.name == "posix"
            and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
            and os.uname().sysname == "Linux"
        ):
            raise SourceError(
                "screen capture needs a display: $DISPLAY is not set "
                "(run it in a desktop session, or use the pattern/video modes)"
            )
        self._grabber: Any = None
        try:
            with mss.mss() as sct:
                monitors = sct.monitors
        except Exception as exc:  # noqa: BLE001 - mss raises ScreenShotError, X errors, OSError
            raise SourceError(f"screen capture is not available here: {exc}") from None
        if not 0 <= monitor < len(monitors):
            raise SourceError(f"no monitor {monitor}: this screen has {len(monitors) - 1}")
        if region is None:
            mon = monitors[monitor]
            self.area = {
                "left": mon["left"],
                "top": mon["top"],
                "width": mon["width"],
                "height": mon["height"],
            }
        else:
            x, y, w, h = region
            if w <= 0 or h <= 0:
                raise SourceError(f"region {region} has no area")
            self.area = {"left": x, "top": y, "width": w, "height": h}

    def read(self) -> np.ndarray:
        if self._grabber is None:
            import mss

            self._grabber = mss.mss()
        shot = self._grabber.grab(self.area)
        return cv2.cvtColor(np.asarray(shot), cv2.COLOR_BGRA2RGB)

    def close(self) -> None:
        if self._grabber is not None:
            self._grabber.close()
            self._grabber = None


class PatternSource(Source):
    """An animated test pattern so the whole pipeline runs with no media at all.

    A scrolling colour gradient, a bouncing disc, a rotating bar and the frame
    number: every frame differs, motion is easy to judge by eye, and the
    picture is fully determined by the frame index (reproducible runs).
    """

    def __init__(self, width: int = 512, height: int = 512) -> None:
        if width < 16 or height < 16:
            raise SourceError(f"pattern size {width}x{height} is too small (16x16 at least)")
        self.width, self.height = width, height
        self.index = 0
        xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
        ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        self._x = np.broadcast_to(xs, (height, width))
        self._y = np.broadcast_to(ys, (height, width))
        self._diag = ((self._x + self._y) / 2).astype(np.uint8)

    def frame(self, index: int) -> np.ndarray:
        """The pattern's frame number ``index``."""
        w, h = self.width, self.height
        shift = (index * 4) % 256
        img = np.empty((h, w, 3), np.uint8)
        img[..., 0] = (self._x + shift).astype(np.uint16) % 256
        img[..., 1] = (self._y + 2 * shift).astype(np.uint16) % 256
        img[..., 2] = self._diag
        r = max(4, min(w, h) // 8)
        t = index / 30.0
        cx = int(r + (w - 2 * r) * (0.5 + 0.5 * np.sin(t * 1.3)))
        cy = int(r + (h - 2 * r) * (0.5 + 0.5 * np.sin(t * 1.9 + 1.0)))
        cv2.circle(img, (cx, cy), r, (255, 255, 255), -1, cv2.LINE_AA)
        angle = t * 2.0
        c = np.array([w / 2, h / 2])
        d = np.array([np.cos(angle), np.sin(angle)]) * min(w, h) * 0.4
        p1, p2 = (c - d).astype(int), (c + d).astype(int)
        cv2.line(
            img,
            (int(p1[0]), int(p1[1])),
            (int(p2[0]), int(p2[1])),
            (0, 0, 0),
            max(2, min(w, h) // 40),
            cv2.LINE_AA,
        )
        scale = max(0.4, min(w, h) / 400)
        cv2.putText(
            img,
            f"{index:06d}",
            (8, int(32 * scale) + 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 0, 0),
            max(1, int(3 * scale)),
            cv2.LINE_AA,
        )
        return img

    def read(self) -> np.ndarray:
        img = self.frame(self.index)
        self.index += 1
        return img
