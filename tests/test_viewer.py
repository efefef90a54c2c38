"""The viewer against a real relay: saved files, MP4 output, raw input, ends and errors.

The window itself is tested on a real (virtual) display in tests/test_desktop.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import av
import pytest

from media.codec import decode_image
from producers import cli
from producers.echo import run_echo_worker
from producers.sender import ProducerOptions, ProducerReport, run_producer
from producers.sources import PatternSource
from producers.viewer import ViewerError, ViewerOptions, ViewerReport, run_viewer
from relay import Relay, RelayConfig
from wire.frames import Frame

LIMIT = 10


@contextlib.asynccontextmanager
async def relay(echo: bool = True) -> AsyncIterator[Relay]:
    async with Relay(RelayConfig(port=0)) as r:
        if not echo:
            yield r
            return
        ready, stop = asyncio.Event(), asyncio.Event()
        worker = asyncio.create_task(run_echo_worker(r.url, ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), LIMIT)
        try:
            yield r
        finally:
            stop.set()
            await asyncio.wait_for(worker, LIMIT)


async def view_while_producing(
    url: str,
    options: ViewerOptions,
    size: tuple[int, int] = (160, 120),
    fps: float = 0,
    on_frame: Callable[[Frame], None] | None = None,
) -> tuple[ViewerReport, ProducerReport]:
    """Start the viewer, then produce (one frame in flight at a time, at ``fps``; 0 = as fast
    as possible) until the viewer is done."""
    ready = asyncio.Event()
    viewer = asyncio.create_task(run_viewer(options, ready=ready, on_frame=on_frame))
    await asyncio.wait_for(ready.wait(), LIMIT)
    done = asyncio.Event()
    viewer.add_done_callback(lambda _: done.set())
    producer = ProducerOptions(relay=url, fps=fps, max_in_flight=1, max_frames=1000)
    produced = await asyncio.wait_for(run_producer(PatternSource(*size), producer, stop=done), LIMIT)
    return await asyncio.wait_for(viewer, LIMIT), produced


@pytest.mark.asyncio
async def test_save_writes_decodable_jpeg_files(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    async with relay() as r:
        options = ViewerOptions(relay=r.url, show=False, save_dir=out, max_frames=10)
        report, produced = await view_while_producing(r.url, options)
    assert report.frames == report.saved == 10 and produced.received >= 10
    files = sorted(out.iterdir())
    assert len(files) == 10
    assert all(re.fullmatch(r"\d{8}\.jpg", f.name) for f in files)
    for f in files:
        assert decode_image(f.read_bytes()).shape == (120, 160, 3)
    assert report.latency_ms["p50"] >= 0


def read_mp4(path: Path) -> tuple[str, list[av.VideoFrame], float, float]:
    """Codec name, every decoded frame, duration in seconds and average fps of an MP4."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        duration = float(stream.duration * stream.time_base)
        return stream.codec_context.name, frames, duration, float(stream.average_rate)


@pytest.mark.asyncio
async def test_mp4_is_h264_at_the_rate_frames_arrived(tmp_path: Path) -> None:
    """8 frames paced at 5 fps make a clip of about 1.6 s, not 8 / 30 s as with a fixed rate."""
    n, fps = 8, 5.0
    path = tmp_path / "out.mp4"
    seen: list[float] = []  # when on_frame ran: a clock of the test's own
    async with relay() as r:
        options = ViewerOptions(relay=r.url, show=False, mp4=path, max_frames=n)
        report, _ = await view_while_producing(
            r.url, options, size=(175, 143), fps=fps, on_frame=lambda _: seen.append(time.monotonic())
        )
    codec, frames, duration, average_fps = read_mp4(path)
    assert codec == "h264" and report.mp4_frames == len(frames) == n
    assert {(f.width, f.height, f.format.name) for f in frames} == {(174, 142, "yuv420p")}
    starts = [float(f.pts * f.time_base) for f in frames]
    assert starts[0] == 0 and all(b > a for a, b in itertools.pairwise(starts))
    # the last frame starts at the last arrival; it lasts the mean interval
    assert starts[-1] == pytest.approx(report.span, abs=1e-4)
    assert duration == pytest.approx(report.mp4_seconds, abs=1e-4)
    assert duration == pytest.approx(report.span * n / (n - 1), rel=1e-3)
    assert average_fps == pytest.approx((n - 1) / report.span, rel=0.01)  # the received rate
    # the arrival span is the real one (an independent clock, a generous factor) and is
    # paced: a fixed 30 fps clip would last 8 / 30 s
    assert 0.5 < starts[-1] / (seen[-1] - seen[0]) < 2.0
    assert duration > 2 * n / 30
    assert f"wrote {n} frames to the MP4 (H.264)" in report.summary()


@pytest.mark.asyncio
async def test_mp4_frames_show_what_arrived(tmp_path: Path) -> None:
    """Pixels survive the trip: the MP4's frames look like the frames the viewer received."""
    path = tmp_path / "out.mp4"
    received: list[Frame] = []
    async with relay() as r:
        options = ViewerOptions(relay=r.url, show=False, mp4=path, max_frames=6)
        report, _ = await view_while_producing(r.url, options, size=(176, 144), on_frame=received.append)
    _, frames, _, _ = read_mp4(path)
    assert report.mp4_frames == len(frames) == len(received) == 6
    for frame, sent in zip(frames, received, strict=True):
        error = abs(
            frame.to_ndarray(format="rgb24").astype(int) - decode_image(sent.payload).astype(int)
        ).mean()
        assert error < 8, error


@pytest.mark.asyncio
async def test_input_frames_reach_a_viewer_without_a_worker(tmp_path: Path) -> None:
    async with relay(echo=False) as r:
        options = ViewerOptions(relay=r.url, show=False, receive="input", save_dir=tmp_path, max_frames=5)
        ready = asyncio.Event()
        viewer = asyncio.create_task(run_viewer(options, ready=ready))
        await asyncio.wait_for(ready.wait(), LIMIT)
        done = asyncio.Event()
        viewer.add_done_callback(lambda _: done.set())
        await asyncio.wait_for(
            run_producer(
                PatternSource(64, 64), ProducerOptions(relay=r.url, fps=200, receive=False), stop=done
            ),
            LIMIT,
        )
        report = await viewer
    assert report.frames == 5 and len(list(tmp_path.glob("*.jpg"))) == 5


@pytest.mark.asyncio
async def test_both_kinds_are_saved_apart(tmp_path: Path) -> None:
    async with relay() as r:
        options = ViewerOptions(relay=r.url, show=False, receive="both", save_dir=tmp_path, max_frames=8)
        report, _ = await view_while_producing(r.url, options, size=(64, 64))
    names = {p.name for p in tmp_path.iterdir()}
    assert report.frames == 8 and len(names) == 8
    assert {n.split("_")[1] for n in names} <= {"input.jpg", "output.jpg"}
    assert "00000000_input.jpg" in names


@pytest.mark.asyncio
async def test_duration_ends_an_idle_viewer() -> None:
    async with relay(echo=False) as r:
        report = await asyncio.wait_for(
            run_viewer(ViewerOptions(relay=r.url, show=False, duration=0.2)), LIMIT
        )
    assert report.frames == 0 and report.closed is None and report.elapsed >= 0.19


@pytest.mark.asyncio
async def test_relay_shutdown_is_reported() -> None:
    r = Relay(RelayConfig(port=0))
    await r.start()
    ready = asyncio.Event()
    viewer = asyncio.create_task(run_viewer(ViewerOptions(relay=r.url, show=False, reconnect=0), ready=ready))
    await asyncio.wait_for(ready.wait(), LIMIT)
    await r.close()
    report = await asyncio.wait_for(viewer, LIMIT)
    assert report.closed and "shutting down" in report.closed and report.reconnects == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["shutdown", "dropped"])
async def test_the_viewer_joins_the_channel_again_when_the_relay_comes_back(tmp_path: Path, how: str) -> None:
    """The relay goes away (saying ``shutdown``, or its sockets just drop) and a new one listens on
    the port: the viewer joins the channel again and keeps saving the frames that come."""
    config = RelayConfig(port=free_port())
    first = Relay(config)
    await first.start()
    got: list[Frame] = []
    more, ready, stop_viewer = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def on_frame(frame: Frame) -> None:
        got.append(frame)
        more.set()

    options = ViewerOptions(
        relay=first.url, channel="cam", receive="input", show=False, save_dir=tmp_path, reconnect=LIMIT
    )
    viewer = asyncio.create_task(run_viewer(options, ready=ready, stop=stop_viewer, on_frame=on_frame))
    await asyncio.wait_for(ready.wait(), LIMIT)
    once = ProducerOptions(relay=first.url, channel="cam", fps=0, max_frames=1, receive=False, reconnect=0)
    await asyncio.wait_for(run_producer(PatternSource(64, 64), once), LIMIT)
    await asyncio.wait_for(more.wait(), LIMIT)
    if how == "dropped":
        for ws in list(first._connections):
            ws.transport.abort()  # what a killed relay leaves: no shutdown, no close frame
    await first.close()
    more.clear()
    async with Relay(config) as second:
        # frames go out until the viewer, back on the channel, gets one (it may still be reconnecting)
        stop_producing = asyncio.Event()

        async def stop_when_seen() -> None:
            await more.wait()
            stop_producing.set()

        watcher = asyncio.create_task(stop_when_seen())
        again = ProducerOptions(relay=second.url, channel="cam", fps=50, receive=False, reconnect=0)
        await asyncio.wait_for(run_producer(PatternSource(64, 64), again, stop=stop_producing), LIMIT)
        await watcher
        stop_viewer.set()
        report = await asyncio.wait_for(viewer, LIMIT)
    assert report.reconnects == 1 and report.closed is None
    assert report.frames == len(got) >= 2 and report.saved == report.frames
    assert "reconnected to the relay 1 time(s)" in report.summary()


def free_display() -> str:
    """A display name no X server answers on here (no lock file, no socket)."""
    for number in range(4000, 5000):
        if not (os.path.exists(f"/tmp/.X{number}-lock") or os.path.exists(f"/tmp/.X11-unix/X{number}")):
            return f":{number}"
    raise AssertionError("no free display number")


@pytest.mark.asyncio
async def test_window_on_a_display_that_does_not_answer_is_a_viewer_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISPLAY", free_display())
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)
    with pytest.raises(ViewerError, match=r"cannot open a window.*--save DIR or --mp4 PATH"):
        await run_viewer(ViewerOptions(relay="ws://127.0.0.1:1", show=True))


def test_cli_view_without_display_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server without a display: the viewer says how to run headless, before connecting."""
    monkeypatch.setattr(cli, "setup_logging", lambda verbose: None)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert cli.main(["view", "--relay", "ws://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "no display" in err and "--save" in err and "--mp4" in err
