"""The viewer against a real relay: saved files, MP4 output, raw input, ends and errors."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import pytest

from media.codec import decode_image
from producers import cli
from producers.echo import run_echo_worker
from producers.sender import ProducerOptions, ProducerReport, run_producer
from producers.sources import PatternSource
from producers.viewer import ViewerError, ViewerOptions, ViewerReport, run_viewer
from relay import Relay, RelayConfig

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


async def view_while_producing(url: str, options: ViewerOptions, size: tuple[int, int] = (160, 120),
                               ) -> tuple[ViewerReport, ProducerReport]:
    """Start the viewer, then produce (one frame in flight at a time) until the viewer is done."""
    ready = asyncio.Event()
    viewer = asyncio.create_task(run_viewer(options, ready=ready))
    await asyncio.wait_for(ready.wait(), LIMIT)
    done = asyncio.Event()
    viewer.add_done_callback(lambda _: done.set())
    producer = ProducerOptions(relay=url, fps=0, max_in_flight=1, max_frames=1000)
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


@pytest.mark.asyncio
async def test_mp4_has_every_frame(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    async with relay() as r:
        options = ViewerOptions(relay=r.url, show=False, mp4=path, fps=24, max_frames=12)
        report, _ = await view_while_producing(r.url, options, size=(176, 144))
    assert report.mp4_frames == 12
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    read = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (144, 176, 3)
        read += 1
    cap.release()
    assert read == 12


@pytest.mark.asyncio
async def test_input_frames_reach_a_viewer_without_a_worker(tmp_path: Path) -> None:
    async with relay(echo=False) as r:
        options = ViewerOptions(relay=r.url, show=False, receive="input", save_dir=tmp_path,
                                max_frames=5)
        ready = asyncio.Event()
        viewer = asyncio.create_task(run_viewer(options, ready=ready))
        await asyncio.wait_for(ready.wait(), LIMIT)
        done = asyncio.Event()
        viewer.add_done_callback(lambda _: done.set())
        await asyncio.wait_for(run_producer(
            PatternSource(64, 64), ProducerOptions(relay=r.url, fps=200, receive=False), stop=done),
            LIMIT)
        report = await viewer
    assert report.frames == 5 and len(list(tmp_path.glob("*.jpg"))) == 5


@pytest.mark.asyncio
async def test_both_kinds_are_saved_apart(tmp_path: Path) -> None:
    async with relay() as r:
        options = ViewerOptions(relay=r.url, show=False, receive="both", save_dir=tmp_path,
                                max_frames=8)
        report, _ = await view_while_producing(r.url, options, size=(64, 64))
    names = {p.name for p in tmp_path.iterdir()}
    assert report.frames == 8 and len(names) == 8
    assert {n.split("_")[1] for n in names} <= {"input.jpg", "output.jpg"}
    assert "00000000_input.jpg" in names


@pytest.mark.asyncio
async def test_duration_ends_an_idle_viewer() -> None:
    async with relay(echo=False) as r:
        report = await asyncio.wait_for(
            run_viewer(ViewerOptions(relay=r.url, show=False, duration=0.2)), LIMIT)
    assert report.frames == 0 and report.closed is None and report.elapsed >= 0.19


@pytest.mark.asyncio
async def test_relay_shutdown_is_reported() -> None:
    r = Relay(RelayConfig(port=0))
    await r.start()
    ready = asyncio.Event()
    viewer = asyncio.create_task(run_viewer(ViewerOptions(relay=r.url, show=False), ready=ready))
    await asyncio.wait_for(ready.wait(), LIMIT)
    await r.close()
    report = await asyncio.wait_for(viewer, LIMIT)
    assert report.closed and "shutting down" in report.closed


@pytest.mark.asyncio
async def test_window_without_gui_says_what_to_install() -> None:
    if not re.search(r"GUI:\s+NONE", cv2.getBuildInformation()):
        pytest.skip("this OpenCV has GUI support")
    with pytest.raises(ViewerError, match="opencv-python"):
        await run_viewer(ViewerOptions(relay="ws://127.0.0.1:1", show=True))


def test_cli_view_without_gui_exits_2(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "setup_logging", lambda verbose: None)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert cli.main(["view", "--relay", "ws://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "--save" in err and "--mp4" in err
