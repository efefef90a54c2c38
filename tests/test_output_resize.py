"""RTMP and HLS outputs follow a change of picture size, read back by real players.

Frames go producer -> relay -> echo worker -> relay -> output process (a
real subprocess) -> nginx-rtmp or HLS files, and are decoded with FFmpeg
(PyAV) the way a player does: one reader connected across the change, and
one that comes after it. The pictures carry a disc, so a stretched output
(the old behaviour: every size scaled to the first one) shows an ellipse.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from api.server.services import services
from media import hls
from media.codec import encode_image
from producers.echo import run_echo_worker
from relay import Relay
from relay.client import connect
from tests.api_fixtures import api, worker  # noqa: F401  (fixtures)
from tests.helpers import input_frame
from tests.nginx_rtmp import NginxRtmp
from tests.test_api import wait_until_ready
from tests.test_rtmp_hls import LIMIT, output, rtmp_server  # noqa: F401  (fixture)

FIRST, SECOND = (320, 240), (256, 384)  # 4:3, then 2:3: a stretch between them is plain to see
LIVE = {"analyzeduration": "1000000", "fflags": "nobuffer", "rw_timeout": "10000000"}


def disc_picture(size: tuple[int, int], seed: int) -> np.ndarray:
    """A white disc (diameter: half the shorter side) on dark grey, a moving mark in a corner."""
    width, height = size
    rgb = np.full((height, width, 3), 40, np.uint8)
    cv2.circle(rgb, (width // 2, height // 2), min(size) // 4, (255, 255, 255), -1)
    x = (seed * 3) % (width // 4)
    rgb[:8, x : x + 8] = (255, 0, 0)
    return rgb


def disc_box(rgb: np.ndarray, inverted: bool = False) -> tuple[int, int]:
    """Width and height of the disc's bounding box (bright, or dark in an inverted picture)."""
    gray = rgb.mean(axis=2)
    ys, xs = np.nonzero(gray < 105 if inverted else gray > 150)
    ys, xs = ys[ys > 10], xs[ys > 10]  # not the corner mark
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def assert_round_disc(
    rgb: np.ndarray, size: tuple[int, int], diameter: float | None = None, inverted: bool = False
) -> None:
    """``rgb`` is ``size`` and its disc is as wide as tall, ``diameter`` across (default: as drawn
    for ``size``)."""
    assert (rgb.shape[1], rgb.shape[0]) == size
    width, height = disc_box(rgb, inverted)
    diameter = diameter or 2 * (min(size) // 4) + 1
    assert abs(width - height) <= 4 and abs(width - diameter) <= 6, (width, height, diameter)


class Producer:
    """Sends disc pictures at about 30 fps, at ``self.size`` (change it to resize the stream)."""

    def __init__(self, url: str, channel: str, size: tuple[int, int] = FIRST, token: str | None = None):
        self.url, self.channel, self.size, self.token = url, channel, size, token

    async def run(self) -> None:
        ws, _ = await connect(self.url, "producer", self.channel, self.token, receive="none")
        try:
            for seq in range(100_000):
                size = self.size
                payload = encode_image(disc_picture(size, seq))
                await ws.send(input_frame(seq, payload, self.channel, *size))
                await asyncio.sleep(1 / 30)  # the camera's frame rate, not a synchronisation
        finally:
            await ws.close()


@contextlib.asynccontextmanager
async def echoing(relay: Relay, channel: str) -> AsyncIterator[Producer]:
    ready, stop = asyncio.Event(), asyncio.Event()
    worker = asyncio.create_task(run_echo_worker(relay.url, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), LIMIT)
    producer = Producer(relay.url, channel)
    task = asyncio.create_task(producer.run())
    try:
        yield producer
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.wait_for(worker, LIMIT)


class Player(threading.Thread):
    """Decodes ``url`` from now on, as a player does, until it has ``wanted`` frames of ``size``."""

    def __init__(self, url: str, size: tuple[int, int], wanted: int = 10, options: dict | None = None):
        super().__init__(daemon=True)
        self.url, self.size, self.wanted, self.options = url, size, wanted, options or {}
        self.sizes: list[tuple[int, int]] = []
        self.last: np.ndarray | None = None
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with av.open(self.url, options=self.options, timeout=LIMIT) as container:
                for frame in container.decode(video=0):
                    self.sizes.append((frame.width, frame.height))
                    if (frame.width, frame.height) == self.size:
                        self.last = frame.to_ndarray(format="rgb24")
                    if self.stop.is_set() or self.sizes.count(self.size) >= self.wanted:
                        return
        except (OSError, av.FFmpegError) as exc:  # reported by the test
            self.error = exc

    async def finish(self) -> None:
        await asyncio.to_thread(self.join, LIMIT * 2)
        self.stop.set()
        assert not self.is_alive(), f"the player is stuck after {self.sizes[-3:]}"


@pytest.mark.network_service
async def test_rtmp_output_follows_a_size_change(relay: Relay, rtmp_server: NginxRtmp) -> None:
    url = rtmp_server.url("live", "resize")
    async with (
        echoing(relay, "resize") as producer,
        output(relay_url=relay.url, channel="resize", rtmp_url=url) as out,
    ):
        assert await out.wait_for(lambda o: o.size == FIRST, LIMIT), out.state()
        across = Player(url, SECOND, options=LIVE)  # connected before the change, plays through it
        across.start()
        await asyncio.to_thread(_wait_for_frames, across)
        producer.size = SECOND
        assert await out.wait_for(lambda o: o.size == SECOND and o.publishing, LIMIT), out.state()
        await across.finish()
        after = Player(url, SECOND, wanted=3, options=LIVE)  # a player that starts afterwards
        after.start()
        await after.finish()
        assert out.restarts == 0 and out.running, out.state()
    assert across.error is None and after.error is None, (across.error, after.error)
    assert across.sizes[0] == FIRST and across.sizes[-1] == SECOND, across.sizes
    assert set(after.sizes) == {SECOND}, after.sizes
    assert across.last is not None and after.last is not None
    assert_round_disc(across.last, SECOND)
    assert_round_disc(after.last, SECOND)


async def test_hls_output_follows_a_size_change(relay: Relay, tmp_path: Path) -> None:
    directory = hls.hls_dir_for(tmp_path / "hls", "resize")
    playlist = directory / hls.PLAYLIST
    async with (
        echoing(relay, "hls-resize") as producer,
        output(relay_url=relay.url, channel="hls-resize", hls_dir=directory, fps=10, hls_list_size=10) as out,
    ):
        await _wait_for_playlist(playlist, lambda text: text.count("#EXTINF") >= 2)
        before = playlist.read_text()
        producer.size = SECOND
        assert await out.wait_for(lambda o: o.size == SECOND, LIMIT), out.state()
        text = await _wait_for_playlist(playlist, lambda text: _segments_after_break(text) >= 2)
        player = Player(str(playlist), SECOND, wanted=5)  # FFmpeg's HLS player, from the list's start
        player.start()
        await player.finish()
    assert player.error is None, player.error
    assert player.sizes[0] == FIRST and player.sizes[-1] == SECOND, player.sizes
    assert player.last is not None
    assert_round_disc(player.last, SECOND)
    # one playlist going on: same first segment, numbers rising, a discontinuity, never an end
    first = _segment_numbers(before)[0]
    numbers = _segment_numbers(text)
    assert numbers[0] == first and numbers == sorted(set(numbers)), (before, text)
    assert "#EXT-X-ENDLIST" not in text and text.count("#EXT-X-DISCONTINUITY") == 2, text
    new_segment = text.rsplit("#EXT-X-DISCONTINUITY", 1)[1].split()[-1]
    with av.open(str(directory / new_segment)) as container:
        frame = next(container.decode(video=0))
    assert (frame.width, frame.height) == SECOND


def _wait_for_frames(player: Player) -> None:
    """Until the player decodes its first frames (it connects and probes first)."""
    deadline = time.monotonic() + LIMIT
    while len(player.sizes) < 3 and player.error is None:
        assert time.monotonic() < deadline, "the player never started"
        time.sleep(0.05)  # polling another thread's progress, bounded by the deadline


async def _wait_for_playlist(playlist: Path, ready) -> str:
    deadline = time.monotonic() + LIMIT
    while True:
        text = playlist.read_text() if playlist.is_file() else ""
        if ready(text):
            return text
        assert time.monotonic() < deadline, f"the playlist never got there: {text}"
        await asyncio.sleep(0.05)  # polling the file system, bounded by the deadline


def _segments_after_break(text: str) -> int:
    """Segments listed after the second discontinuity (the first opens the playlist)."""
    parts = text.split("#EXT-X-DISCONTINUITY")
    return parts[2].count("#EXTINF") if len(parts) > 2 else 0


def _segment_numbers(text: str) -> list[int]:
    return [int(line[len(hls.SEGMENT_PREFIX) : -3]) for line in text.splitlines() if line.endswith(".ts")]


@pytest.mark.network_service
async def test_a_patched_stream_size_reaches_rtmp_and_hls(api, worker, rtmp_server: NginxRtmp) -> None:
    """PATCH 512x512 -> 640x384 with the filter worker (photo negative): both outputs follow, the
    square input cropped to the new shape, the disc round (it was squeezed into 512x512 before)."""
    url = rtmp_server.url("live", "patched")
    stream = (
        await api.post(
            "/v1/streams",
            json={"pipeline": "streamdiffusion", "output_rtmp_url": url, "params": {"prompt": "negative"}},
        )
    ).json()
    sid = stream["id"]
    await asyncio.wait_for(wait_until_ready(api, sid), 15)
    running = services(api.app)
    producer = Producer(running.relay_url, sid, size=(512, 512), token=stream["stream_key"])
    feeder = asyncio.create_task(producer.run())
    try:
        assert (await api.get(stream["hls_url"], timeout=30)).status_code == 200  # starts HLS
        rtmp, hls_out = running.outputs.rtmp[sid], running.outputs.hls[sid]
        for out in (rtmp, hls_out):
            assert await out.wait_for(lambda o: o.size == (512, 512), LIMIT), out.state()
        patched = await api.patch(f"/v1/streams/{sid}", json={"params": {"width": 640, "height": 384}})
        assert patched.status_code == 200
        for out in (rtmp, hls_out):
            assert await out.wait_for(lambda o: o.size == (640, 384), LIMIT), out.state()
        player = Player(url, (640, 384), wanted=3, options=LIVE)
        player.start()
        await player.finish()
        assert player.error is None and set(player.sizes) == {(640, 384)}, (player.error, player.sizes)
        assert player.last is not None
        assert_round_disc(player.last, (640, 384), diameter=257 * 1.25, inverted=True)
        playlist = hls_out.hls_dir / hls.PLAYLIST
        text = await _wait_for_playlist(playlist, lambda text: _segments_after_break(text) >= 1)
        new_segment = text.rsplit("#EXT-X-DISCONTINUITY", 1)[1].split()[-1]
        with av.open(str(playlist.parent / new_segment)) as container:
            frame = next(container.decode(video=0))
        assert_round_disc(frame.to_ndarray(format="rgb24"), (640, 384), diameter=257 * 1.25, inverted=True)
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
