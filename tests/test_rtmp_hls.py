"""RTMP and HLS output against real servers: relay, echo worker, nginx-rtmp, output process.

Frames go producer -> relay -> echo worker -> relay -> output process
(a real subprocess) -> nginx (RTMP) or files (HLS), and are read back
with PyAV. Waits are on events or bounded polls, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from media import hls
from media.output_process import OutputProcess
from media.rtmp import TargetError, mask_url, validate_rtmp_url
from producers.echo import run_echo_worker
from producers.sender import ProducerOptions, run_producer
from producers.sources import PatternSource
from relay import Relay
from tests.nginx_rtmp import NginxRtmp, free_port, nginx_rtmp

LIMIT = 20.0
SIZE = (160, 120)


@pytest.fixture
def rtmp_server(tmp_path: Path) -> Iterator[NginxRtmp]:
    """nginx-rtmp on a free port (skips when nginx or its rtmp module is not installed)."""
    with nginx_rtmp(tmp_path / "nginx") as server:
        yield server


@contextlib.asynccontextmanager
async def pipeline(relay: Relay, channel: str) -> AsyncIterator[None]:
    """An echo worker and a producer sending distinct frames at 30 fps until the block ends."""
    ready, stop = asyncio.Event(), asyncio.Event()
    worker = asyncio.create_task(run_echo_worker(relay.url, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), LIMIT)
    options = ProducerOptions(relay=relay.url, channel=channel, fps=30, max_frames=3000, receive=False)
    producer = asyncio.create_task(run_producer(PatternSource(*SIZE), options, stop=stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(producer, worker), LIMIT)


@contextlib.asynccontextmanager
async def output(clean: bool = True, **kwargs: object) -> AsyncIterator[OutputProcess]:
    """A started :class:`OutputProcess`; SIGTERM alone must stop it (and exit 0 when ``clean``).

    A child that ignores SIGTERM is killed after ``stop_timeout`` (generous
    here, so a loaded machine is not taken for a hung child) and fails.
    """
    kwargs.setdefault("stop_timeout", LIMIT)
    out = OutputProcess(**kwargs)  # type: ignore[arg-type]
    await out.start()
    try:
        yield out
    finally:
        await out.stop()
        assert out.returncode != -signal.SIGKILL, "SIGTERM should stop the output process"
        assert not out.running and (out.returncode == 0 or not clean), out.returncode


def decode(url: str, count: int, options: dict[str, str] | None = None) -> list[np.ndarray]:
    """The first ``count`` video frames of ``url`` as RGB arrays (runs in a thread)."""
    frames: list[np.ndarray] = []
    with av.open(url, options={"rw_timeout": "10000000", **(options or {})}, timeout=LIMIT) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return frames


def assert_video(frames: list[np.ndarray], count: int) -> None:
    assert len(frames) == count
    assert {f.shape for f in frames} == {(SIZE[1], SIZE[0], 3)}
    changes = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in itertools.pairwise(frames)]
    assert max(changes) > 2.0, f"the picture never changes: {changes}"


@pytest.mark.network_service
async def test_rtmp_reaches_nginx_and_plays_back(relay: Relay, rtmp_server: NginxRtmp) -> None:
    url = rtmp_server.url("live", "test")
    async with (
        pipeline(relay, "rtmp-test"),
        output(relay_url=relay.url, channel="rtmp-test", rtmp_url=url) as out,
    ):
        assert await out.wait_for(lambda o: o.publishing, LIMIT), out.state()
        # FLV from RTMP announces audio too: without a short analyzeduration the
        # reader waits 5 s for audio that never comes
        live = {"analyzeduration": "1000000", "fflags": "nobuffer"}
        frames = await asyncio.to_thread(decode, url, 20, live)
        assert out.last_error is None
    assert_video(frames, 20)


@pytest.mark.network_service
async def test_rtmp_reconnects_when_the_server_comes_back(relay: Relay, tmp_path: Path) -> None:
    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/again"
    async with pipeline(relay, "again"), output(relay_url=relay.url, channel="again", rtmp_url=url) as out:
        with nginx_rtmp(tmp_path / "first", port):
            assert await out.wait_for(lambda o: o.publishing, LIMIT), out.state()
        assert await out.wait_for(lambda o: not o.publishing, LIMIT), out.state()
        assert out.last_error and "****" in out.last_error
        with nginx_rtmp(tmp_path / "second", port):
            assert await out.wait_for(lambda o: o.publishing, LIMIT), out.state()
        assert out.restarts == 0 and out.running


async def test_hls_playlist_plays(relay: Relay, tmp_path: Path) -> None:
    directory = hls.hls_dir_for(tmp_path / "hls", "stream_1")
    playlist = directory / hls.PLAYLIST
    async with (
        pipeline(relay, "hls-test"),
        output(
            relay_url=relay.url, channel="hls-test", hls_dir=directory, fps=10, hls_time=1, hls_list_size=4
        ) as out,
    ):
        deadline = time.monotonic() + LIMIT
        while not (playlist.is_file() and playlist.read_text().count(".ts") >= 2):
            assert time.monotonic() < deadline, f"no playlist with 2 segments: {out.state()}"
            await asyncio.sleep(0.05)  # polling the file system, bounded by the deadline
        frames = await asyncio.to_thread(decode, str(playlist), 8)
        text = playlist.read_text()
        await check_serving(directory, text)
    assert_video(frames, 8)
    assert "#EXT-X-TARGETDURATION:1\n" in text and "#EXTINF:1.0" in text, text


async def check_serving(directory: Path, playlist: str) -> None:
    """The API's HLS route, mounted the way the API mounts it, over real ASGI."""

    async def route(request: Request) -> Response:
        return await hls.hls_response(directory, request.path_params["name"])

    app = Starlette(routes=[Route("/live/video-to-video/{playback}/hls/{name:path}", route)])
    segment = next(line for line in playlist.splitlines() if line.endswith(".ts"))
    assert "/" not in segment
    base = "/live/video-to-video/pb1/hls/"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get(base + "index.m3u8")
        assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.apple.mpegurl"
        assert r.text.startswith("#EXTM3U") and "no-cache" in r.headers["cache-control"]
        r = await c.get(base + segment)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp2t"
        assert r.content[:1] == b"\x47"  # MPEG-TS sync byte
        for bad in (
            "..%2Fstream_1%2Findex.m3u8",
            "%2e%2e%2fsecret.ts",
            "..%5cindex.m3u8",
            "nginx.conf",
            "index.m3u8.tmp",
            "missing.ts",
            "sub/index.m3u8",
        ):
            assert (await c.get(base + bad)).status_code == 404, bad
    assert (await hls.hls_response(None, "index.m3u8")).status_code == 404
    for bad in ("../stream_1/index.m3u8", "/etc/passwd", "..", ".ts", "a/../index.m3u8"):
        assert (await hls.hls_response(directory, bad)).status_code == 404, bad


async def test_refused_rtmp_reports_error_and_restarts(relay: Relay) -> None:
    url = f"rtmp://127.0.0.1:{free_port()}/live/secret-key"
    async with (
        pipeline(relay, "refused"),
        output(relay_url=relay.url, channel="refused", rtmp_url=url, restart_delay=0.1) as out,
    ):
        assert await out.wait_for(lambda o: o.last_error is not None, LIMIT), out.state()
        assert "refused" in out.last_error and "secret-key" not in out.last_error, out.last_error
        assert out.running and not out.publishing and out.restarts == 0
        # a child that dies is restarted
        assert out.pid is not None
        first = out.pid
        os.kill(first, signal.SIGKILL)
        assert await out.wait_for(lambda o: o.restarts == 1 and o.ready, LIMIT), out.state()
        assert out.pid != first and "exited with code -9" in (out.last_error or "")


async def test_hung_rtmp_server_is_cut_off_and_retried(relay: Relay) -> None:
    """A server that accepts TCP but never answers the RTMP handshake: FFmpeg blocks
    holding the GIL; the watchdog ends the child and the manager restarts it."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never replies
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            pipeline(relay, "hung"),
            output(
                relay_url=relay.url,
                channel="hung",
                rtmp_url=f"rtmp://127.0.0.1:{port}/live/k",
                stall_timeout=1,
                restart_delay=0.1,
                clean=False,
            ) as out,
        ):  # may be mid-handshake
            assert await out.wait_for(lambda o: o.restarts >= 1 and o.ready, LIMIT), out.state()
            assert "exited with code 1" in (out.last_error or ""), out.last_error
            assert not out.publishing
    finally:
        server.close()


async def test_child_exits_when_stdin_closes(tmp_path: Path) -> None:
    """The API dying closes the pipe: the child must not outlive it (relay unreachable meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "media.output_process",
        "--relay",
        f"ws://127.0.0.1:{free_port()}",
        "--channel",
        "x",
        "--hls",
        str(tmp_path / "h"),
        "--status",
        "--watch-stdin",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    events = []
    while "relay_error" not in events:
        line = await asyncio.wait_for(proc.stdout.readline(), LIMIT)
        assert line, "the child ended early"
        events.append(json.loads(line)["event"])
    assert events[0] == "ready"
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), LIMIT) == 0
    _, stderr = await proc.communicate()
    assert b"cannot connect to the relay" in stderr


async def test_stop_during_start_leaves_no_child(tmp_path: Path) -> None:
    """A stream deleted while its output is still spawning: the late child must be stopped too."""
    out = OutputProcess(f"ws://127.0.0.1:{free_port()}", "x", hls_dir=tmp_path / "h")
    await asyncio.gather(out.start(), out.stop())  # stop() runs while start() awaits the spawn
    assert out.pid is not None and not out.running and out.returncode is not None


async def test_child_runs_as_an_installed_module_with_our_environment(tmp_path: Path) -> None:
    """No repository on PYTHONPATH: the package is installed; the rest of the environment is inherited."""
    root = str(Path(__file__).resolve().parents[1])
    async with output(relay_url=f"ws://127.0.0.1:{free_port()}", channel="x", hls_dir=tmp_path / "h") as out:
        assert await out.wait_for(lambda o: o.ready, LIMIT)
        environ = Path(f"/proc/{out.pid}/environ").read_bytes().decode().split("\0")
    variables = dict(item.split("=", 1) for item in environ if "=" in item)
    assert root not in variables.get("PYTHONPATH", "").split(os.pathsep)
    assert variables.get("TMPDIR") == os.environ.get("TMPDIR")


def test_urls_are_checked_and_masked(tmp_path: Path) -> None:
    assert validate_rtmp_url("rtmp://h/app/key") == "rtmp://h/app/key"
    for bad in ("http://h/app/key", "rtmp:///app/key", "rtmp://h/app", "rtmp://h:99999/a/k"):
        with pytest.raises(TargetError):
            validate_rtmp_url(bad)
    assert mask_url("rtmp://u:pw@h:1935/app/KEY") == "rtmp://****@h:1935/app/****"
    assert mask_url("rtmp://h/KEYONLY") == "rtmp://h/****"  # no app: the lone segment is the key
    with pytest.raises(ValueError):
        hls.hls_dir_for(tmp_path, "../x")
    assert hls.hls_dir_for(tmp_path, "abc_1") == tmp_path / "abc_1"
    with pytest.raises(ValueError):
        OutputProcess("ws://x", "c")
