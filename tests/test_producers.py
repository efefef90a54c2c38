"""Producers against a real relay on loopback: sources, pacing, results, legacy mode, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from media.codec import decode_image
from producers import cli
from producers.echo import run_echo_worker
from producers.meter import percentiles_ms
from producers.sender import ProducerOptions, ProducerReport, run_producer
from producers.sources import (
    DirectorySource,
    PatternSource,
    ScreenSource,
    Source,
    SourceError,
    StaticSource,
    VideoSource,
)
from relay import Relay, RelayConfig
from wire.frames import Frame, ImageFormat

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 10  # seconds: a hung test fails instead of blocking the suite


def write_image(path: Path, value: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    w, h = size
    img = np.full((h, w, 3), value, np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)  # red in RGB, to catch channel order mistakes
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return img


def write_video(path: Path, frames: int, size: tuple[int, int] = (96, 64), fps: float = 25.0) -> None:
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((h, w, 3), i * 20 % 256, np.uint8))
    writer.release()


def read_all(source: Source) -> list[np.ndarray]:
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames


@contextlib.asynccontextmanager
async def relay_with_echo() -> AsyncIterator[tuple[Relay, list[dict[str, Any]]]]:
    """A relay on a free port with an echo worker attached; yields the relay and the
    control messages the worker saw."""
    async with Relay(RelayConfig(port=0)) as relay:
        ready, stop = asyncio.Event(), asyncio.Event()
        seen: list[dict[str, Any]] = []
        worker = asyncio.create_task(run_echo_worker(relay.url, ready=ready, stop=stop, seen=seen))
        await asyncio.wait_for(ready.wait(), LIMIT)
        try:
            yield relay, seen
        finally:
            stop.set()
            await asyncio.wait_for(worker, LIMIT)


# -- sources ------------------------------------------------------------------


def test_pattern_frames_are_distinct_and_sized() -> None:
    source = PatternSource(160, 120)
    frames = [source.read() for _ in range(5)]
    for frame in frames:
        assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
    for a, b in itertools.pairwise(frames):
        assert not np.array_equal(a, b)
    assert np.array_equal(PatternSource(160, 120).frame(3), frames[3])  # reproducible


def test_static_source_reads_rgb_and_reuses_the_array(tmp_path: Path) -> None:
    expected = write_image(tmp_path / "a.png", 40)
    source = StaticSource(tmp_path / "a.png")
    first = source.read()
    assert np.array_equal(first, expected)
    assert source.read() is first  # the sender encodes it once


def test_directory_source_sorted_looping_and_skipping(tmp_path: Path) -> None:
    for name, value in (("b.png", 20), ("a.png", 10), ("c.jpg", 30)):
        write_image(tmp_path / name, value)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    looping = DirectorySource(tmp_path)
    values = [int(looping.read()[-1, -1, 1]) for _ in range(6)]
    assert np.allclose(values, [10, 20, 30, 10, 20, 30], atol=3)  # a, b, (broken skipped), c
    once = DirectorySource(tmp_path, loop=False)
    assert np.allclose([int(f[-1, -1, 1]) for f in read_all(once)], [10, 20, 30], atol=3)


def test_video_source_reads_every_frame_and_loops(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, 5)
    with VideoSource(path) as once:
        frames = read_all(once)
        assert once.native_fps == pytest.approx(25.0)
    assert len(frames) == 5 and frames[0].shape == (64, 96, 3)
    with VideoSource(path, loop=True) as looping:
        assert sum(looping.read() is not None for _ in range(12)) == 12


@pytest.mark.parametrize(
    "make",
    [
        lambda p: StaticSource(p / "missing.jpg"),
        lambda p: DirectorySource(p / "missing"),
        DirectorySource,  # exists but holds no images
        lambda p: VideoSource(p / "missing.mp4"),
        StaticSource,  # a directory, not a file
    ],
)
def test_missing_sources_raise_source_error(tmp_path: Path, make: Any) -> None:
    with pytest.raises(SourceError):
        make(tmp_path)


def test_screen_without_display_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the no-display check is for Linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(SourceError, match="display"):
        ScreenSource((100, 100, 512, 512))


# -- through the relay ----------------------------------------------------------


@pytest.mark.asyncio
async def test_results_come_back_in_order_with_params() -> None:
    async with relay_with_echo() as (relay, seen):
        results: list[Frame] = []
        options = ProducerOptions(
            relay=relay.url, fps=0, max_frames=30, max_in_flight=2, params={"prompt": "a cat"}
        )
        report = await asyncio.wait_for(
            run_producer(PatternSource(128, 96), options, on_result=results.append), LIMIT
        )
    assert report.sent == report.received == 30
    assert report.dropped == report.unanswered == 0 and report.closed is None
    assert [f.seq for f in results] == list(range(30))
    assert (results[0].width, results[0].height) == (128, 96)
    assert decode_image(results[-1].payload).shape == (96, 128, 3)
    assert set(report.latency_ms) == {"p50", "p90", "p99", "max"}
    assert report.params_version == 1
    assert any(m["type"] == "params" and m["params"] == {"prompt": "a cat"} for m in seen)
    assert results[-1].params_version == 1


@pytest.mark.asyncio
async def test_flooding_accounts_for_every_frame() -> None:
    """With no window the relay keeps only the newest frame: whatever it drops is
    counted, and the last frame always comes back."""
    async with relay_with_echo() as (relay, _):
        seqs: list[int] = []
        options = ProducerOptions(relay=relay.url, fps=0, max_frames=60)
        report = await asyncio.wait_for(
            run_producer(PatternSource(64, 64), options, on_result=lambda f: seqs.append(f.seq)), LIMIT
        )
    assert report.sent == 60
    assert report.received + report.dropped + report.unanswered == 60
    assert seqs == sorted(set(seqs)) and seqs[-1] == 59


@pytest.mark.asyncio
async def test_resize_and_png(tmp_path: Path) -> None:
    write_image(tmp_path / "in.jpg", 90, size=(200, 100))
    async with relay_with_echo() as (relay, _):
        results: list[Frame] = []
        options = ProducerOptions(
            relay=relay.url, fps=0, max_frames=3, max_in_flight=1, format=ImageFormat.PNG, resize=(64, 32)
        )
        report = await asyncio.wait_for(
            run_producer(StaticSource(tmp_path / "in.jpg"), options, on_result=results.append), LIMIT
        )
    assert report.received == 3
    assert all(f.format is ImageFormat.PNG and (f.width, f.height) == (64, 32) for f in results)
    assert decode_image(results[0].payload, ImageFormat.PNG).shape == (32, 64, 3)


@pytest.mark.asyncio
async def test_fps_follows_an_absolute_schedule() -> None:
    async with Relay(RelayConfig(port=0)) as relay:
        options = ProducerOptions(relay=relay.url, fps=50, max_frames=10, receive=False)
        started = time.monotonic()
        report = await asyncio.wait_for(run_producer(PatternSource(64, 64), options), LIMIT)
        took = time.monotonic() - started
    assert report.sent == 10
    # never ahead of the schedule: the last frame went out at tick 9 + skipped ticks, due at tick / 50 s
    assert (9 + report.late) / 50 - 0.01 <= report.elapsed <= took


@pytest.mark.asyncio
async def test_no_worker_does_not_wait_for_results() -> None:
    async with Relay(RelayConfig(port=0)) as relay:
        # waiting for results would take an hour and the wait_for below would fail
        options = ProducerOptions(
            relay=relay.url, fps=0, max_frames=20, max_in_flight=1, drain_timeout=3600, in_flight_timeout=3600
        )
        report = await asyncio.wait_for(run_producer(PatternSource(64, 64), options), LIMIT)
    assert report.sent == 20 and report.received == 0 and report.unanswered <= 20


@pytest.mark.asyncio
async def test_stop_event_ends_an_endless_source() -> None:
    async with relay_with_echo() as (relay, _):
        stop = asyncio.Event()

        def on_result(frame: Frame) -> None:
            if frame.seq >= 4:
                stop.set()

        options = ProducerOptions(relay=relay.url, fps=200, max_in_flight=1)
        report = await asyncio.wait_for(
            run_producer(PatternSource(64, 64), options, stop=stop, on_result=on_result), LIMIT
        )
    assert report.received >= 5 and report.sent == report.received + report.dropped + report.unanswered


@pytest.mark.asyncio
async def test_legacy_mode_gets_acks_and_results(tmp_path: Path) -> None:
    write_image(tmp_path / "in.png", 128)
    async with relay_with_echo() as (relay, seen):
        results: list[Frame] = []
        options = ProducerOptions(
            relay=relay.url, fps=0, max_frames=10, max_in_flight=1, legacy=True, params={"strength": 0.5}
        )
        report = await asyncio.wait_for(
            run_producer(StaticSource(tmp_path / "in.png"), options, on_result=results.append), LIMIT
        )
    assert report.sent == report.acks == report.received == 10
    assert [f.seq for f in results] == list(range(10))
    assert decode_image(results[0].payload).shape == (48, 64, 3)
    assert report.errors == {}
    assert any(m["type"] == "params" and m["params"] == {"strength": 0.5} for m in seen)


@pytest.mark.asyncio
async def test_relay_shutdown_ends_the_producer() -> None:
    relay = Relay(RelayConfig(port=0))
    await relay.start()
    stop_relay = asyncio.Event()

    async def close_after_first_result() -> None:
        await stop_relay.wait()
        await relay.close()

    ready, worker_stop = asyncio.Event(), asyncio.Event()
    worker = asyncio.create_task(run_echo_worker(relay.url, ready=ready, stop=worker_stop))
    await asyncio.wait_for(ready.wait(), LIMIT)
    closer = asyncio.create_task(close_after_first_result())
    options = ProducerOptions(relay=relay.url, fps=100, max_in_flight=1, reconnect=0)
    report = await asyncio.wait_for(
        run_producer(PatternSource(64, 64), options, on_result=lambda f: stop_relay.set()), LIMIT
    )
    await closer
    worker_stop.set()
    await asyncio.wait_for(worker, LIMIT)
    assert report.closed and "shutting down" in report.closed
    assert report.reconnects == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("legacy", [False, True], ids=["hello", "seed-002"])
async def test_a_restarted_relay_gets_the_same_channel_and_params_again(legacy: bool) -> None:
    """The relay shuts down mid-run and comes back on its port: the producer reconnects, sends its
    params again and its frames come back again; the report counts the reconnect."""
    config = RelayConfig(port=free_port())
    first = Relay(config)
    await first.start()
    ready, worker_stop = asyncio.Event(), asyncio.Event()
    worker = asyncio.create_task(run_echo_worker(first.url, ready=ready, stop=worker_stop))
    await asyncio.wait_for(ready.wait(), LIMIT)
    results: list[Frame] = []
    restarted, stop = asyncio.Event(), asyncio.Event()

    def on_result(frame: Frame) -> None:
        results.append(frame)
        if not restarted.is_set():
            restarted.set()  # the first result: restart the relay now
        elif second_worker_seen and frame.seq > first_seq_after:
            stop.set()  # a result through the new relay: done

    second_worker_seen: list[dict[str, Any]] = []
    first_seq_after = -1
    options = ProducerOptions(
        relay=first.url,
        channel="cam",
        fps=50,
        max_in_flight=1,
        params={"prompt": "a cat"},
        legacy=legacy,
        reconnect=LIMIT,
    )
    producing = asyncio.create_task(
        run_producer(PatternSource(64, 64), options, stop=stop, on_result=on_result)
    )
    await asyncio.wait_for(restarted.wait(), LIMIT)
    await first.close()  # "shutdown" to every peer, then their sockets close
    await asyncio.wait_for(worker, LIMIT)
    first_seq_after = results[-1].seq
    async with Relay(config) as second:
        ready, worker_stop = asyncio.Event(), asyncio.Event()
        worker = asyncio.create_task(
            run_echo_worker(second.url, ready=ready, stop=worker_stop, seen=second_worker_seen)
        )
        await asyncio.wait_for(ready.wait(), LIMIT)
        report = await asyncio.wait_for(producing, LIMIT)
        worker_stop.set()
        await asyncio.wait_for(worker, LIMIT)
    assert report.reconnects == 1 and report.closed is None
    assert results[-1].seq > first_seq_after and report.received == len(results)
    # frames sent while the new relay had no worker yet are counted nowhere but in sent
    assert report.received + report.dropped + report.unanswered <= report.sent
    # the new relay got the same channel and the same params from the producer
    assert any(m["type"] == "assign" and m["channel"] == "cam" for m in second_worker_seen)
    assert any(m["type"] == "params" and m["params"] == {"prompt": "a cat"} for m in second_worker_seen)
    if legacy:
        assert report.acks >= report.received


@pytest.mark.asyncio
async def test_a_relay_that_drops_the_connection_ends_the_run_without_reconnect() -> None:
    """No ``shutdown`` and no close frame (the relay process died): with reconnect 0 the run
    ends and says so, and the command's exit code is 1 (it was 0 before)."""
    async with relay_with_echo() as (relay, _):
        first = asyncio.Event()

        async def drop_every_socket() -> None:
            await first.wait()
            for ws in list(relay._connections):
                ws.transport.abort()  # what a killed process leaves: no close frame

        dropper = asyncio.create_task(drop_every_socket())
        options = ProducerOptions(relay=relay.url, fps=100, max_in_flight=1, reconnect=0)
        report = await asyncio.wait_for(
            run_producer(PatternSource(64, 64), options, on_result=lambda f: first.set()), LIMIT
        )
        await dropper
    assert report.closed == "connection to the relay lost"
    assert report.received >= 1


def test_a_report_without_results_prints_no_round_trip_line() -> None:
    report = ProducerReport(sent=5, elapsed=1.0, latency_ms=percentiles_ms([]))
    assert report.latency_ms == {"p50": None, "p90": None, "p99": None, "max": None}
    assert "round trip" not in report.summary() and "None" not in report.summary()
    report.latency_ms = percentiles_ms([0.004])
    assert "round trip ms: p50 4.0" in report.summary()


# -- the command line ---------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "producers", *args],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=LIMIT * 2,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, proc.stdout, proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_missing_file_exits_2_without_traceback() -> None:
    code, _out, err = run_cli("static", "/no/such/image.jpg")
    assert code == 2
    assert "error: image not found: /no/such/image.jpg" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (("--mode=directory", "--source=/no/such/dir"), "directory not found"),
        (("video", "/no/such/clip.mp4"), "video not found"),
        (("static",), "needs a source"),
        (("screen", "--region", "1,2,3"), "x,y,w,h"),
        (("pattern", "--params", "[1, 2]"), "JSON object"),
        (("pattern", "--channel", "bad channel!"), "bad channel name"),
        (("view", "--mp4", "/no/such/dir/out.mp4"), "does not exist"),
    ],
)
def test_cli_usage_errors_exit_2(
    args: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "setup_logging", lambda verbose: None)  # keep pytest's logging
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse rejects bad option values itself
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_unreachable_relay_exits_1() -> None:
    code, _out, err = run_cli(
        "pattern", "--relay", f"ws://127.0.0.1:{free_port()}", "--max-frames", "1", "--reconnect", "0"
    )
    assert code == 1
    assert "cannot connect" in err and "Traceback" not in err


@pytest.mark.asyncio
async def test_cli_seed_form_streams_a_static_image(tmp_path: Path) -> None:
    write_image(tmp_path / "img.jpg", 70)
    async with relay_with_echo() as (relay, _):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "producers",
            "--mode=static",
            f"--source={tmp_path / 'img.jpg'}",
            f"--websocket_uri={relay.url}",
            "--format=PNG",
            "--fps=0",
            "--max-frames=5",
            "--max-in-flight=1",
            "--json",
            "--quiet",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), LIMIT * 2)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["sent"] == report["received"] == 5 and report["width"] == 64
