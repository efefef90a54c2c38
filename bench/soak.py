"""Soak: the real server for minutes with streams, viewers coming and going, worker kills and fuzz.

``python -m api`` with its filter workers (one supervised process, capacity
for every stream), N streams fed at a fixed rate through the stream-key
WebSocket ingest, MJPEG viewers joining and leaving, the worker killed with
SIGKILL at an interval, and malformed requests and messages on the side.

Prints, per stream: frames sent and delivered back, frames the stream's
status counts as dropped by the newest-frame rule, result gaps over 2 s
(and how many started within 5 s of a kill), MJPEG viewers and their
frames; then RSS of every server process at start and end. Goal: no gap
over 2 s except right after a kill, RSS growth under 5%, and sent =
delivered + newest-frame drops (+ frames in flight at the end).

    .venv/bin/python bench/soak.py                      # 4 streams, 30 fps, 10 minutes, kill every 2 min
    .venv/bin/python bench/soak.py --minutes 3 --kill-every 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: bench/ is not a package root then
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx
import simplejpeg
import websockets

from bench.benchutil import ROOT, free_port, machine, natural_image
from tests.helpers import child_pids
from wire.frames import FrameKind, decode_frame

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GAP_S = 2.0
AFTER_KILL_S = 5.0


@dataclass
class StreamLoad:
    id: str
    key: str
    playback: str
    sent: int = 0
    delivered: int = 0
    last_result: float = 0.0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (start, length)
    viewer_sessions: int = 0
    viewer_frames: int = 0


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def feed(stream: StreamLoad, url: str, fps: float, stop: asyncio.Event) -> None:
    """Send JPEGs at ``fps`` over the stream-key ingest and count the results; reconnect if cut."""
    image = simplejpeg.encode_jpeg(natural_image(512, 512, seed=len(stream.id)), quality=85)
    ws_url = url.replace("http://", "ws://") + f"/live/video-to-video/{stream.key}/ws"
    while not stop.is_set():
        with contextlib.suppress(OSError, websockets.ConnectionClosed):
            async with websockets.connect(ws_url, compression=None, max_size=2**24) as ws:
                receiver = asyncio.create_task(_results(stream, ws))
                try:
                    next_at = time.monotonic()
                    while not stop.is_set():
                        await ws.send(image)
                        stream.sent += 1
                        next_at += 1 / fps
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
                finally:
                    receiver.cancel()
                    await asyncio.gather(receiver, return_exceptions=True)
        if not stop.is_set():
            await asyncio.sleep(0.2)


async def _results(stream: StreamLoad, ws: websockets.ClientConnection) -> None:
    async for message in ws:
        if isinstance(message, bytes) and decode_frame(message).kind == FrameKind.OUTPUT:
            now = time.monotonic()
            if stream.last_result and now - stream.last_result > GAP_S:
                stream.gaps.append((stream.last_result, now - stream.last_result))
            stream.last_result = now
            stream.delivered += 1


async def viewers(
    streams: list[StreamLoad], client: httpx.AsyncClient, stop: asyncio.Event, rng: random.Random
) -> None:
    """MJPEG viewers joining and leaving: each watches a random stream for 2-8 s."""

    async def watch(stream: StreamLoad, seconds: float) -> None:
        stream.viewer_sessions += 1
        with contextlib.suppress(httpx.HTTPError, TimeoutError):
            async with (
                asyncio.timeout(seconds),
                client.stream("GET", f"/live/video-to-video/{stream.playback}/mjpeg") as response,
            ):
                async for chunk in response.aiter_bytes():
                    stream.viewer_frames += chunk.count(b"--frame")

    tasks: set[asyncio.Task[None]] = set()
    while not stop.is_set():
        task = asyncio.create_task(watch(rng.choice(streams), rng.uniform(2, 8)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 2))
    await asyncio.gather(*tasks, return_exceptions=True)


async def fuzz(
    url: str, relay: str, client: httpx.AsyncClient, stop: asyncio.Event, rng: random.Random
) -> int:
    """Malformed requests and messages at a few per second: nothing may disturb the streams."""
    sent = 0
    garbage = [
        b"",
        b"\x00" * 64,
        b"{",
        b'{"type": "params", "params": ' + b"[" * 500,
        os.urandom(2048),
        b'{"type": "hello", "role": "worker", "protocol": 999}',
        b'{"type": "stats"}',
    ]
    while not stop.is_set():
        choice = rng.randrange(4)
        with contextlib.suppress(Exception):  # refusals are what we want here
            if choice == 0:
                await client.post(
                    "/v1/streams", content=rng.choice(garbage), headers={"Content-Type": "application/json"}
                )
            elif choice == 1:
                await client.post(
                    "/v1/streams",
                    json={"pipeline": "streamdiffusion", "params": {"seed": "x" * rng.randrange(1, 5000)}},
                )
            elif choice == 2:
                async with asyncio.timeout(2), websockets.connect(relay + "/soak-fuzz") as ws:
                    await ws.send(rng.choice(garbage))
                    with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
                        await asyncio.wait_for(ws.recv(), 0.5)
            else:
                bogus = url.replace("http://", "ws://") + "/live/video-to-video/stk_nope/ws"
                async with asyncio.timeout(2), websockets.connect(bogus) as ws:
                    await ws.send(os.urandom(100))
        sent += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0.1, 0.5))
    return sent


async def killer(server_pid: int, every: float, stop: asyncio.Event, kills: list[float]) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        for worker in child_pids(server_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
                kills.append(time.monotonic())


async def run(args: argparse.Namespace) -> int:
    data = Path(tempfile.mkdtemp(prefix="sd-soak-"))
    http_port, relay_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "api",
        "--port",
        str(http_port),
        "--relay-port",
        str(relay_port),
        "--data-dir",
        str(data),
        "--api-key",
        KEY,
        "--engine",
        "filter",
        "--capacity",
        str(args.streams),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url, relay = f"http://127.0.0.1:{http_port}", f"ws://127.0.0.1:{relay_port}"
    stop, kills, rng = asyncio.Event(), [], random.Random(args.seed)
    try:
        while b"api ready" not in await asyncio.wait_for(process.stdout.readline(), 60):
            pass
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
            streams = []
            for _ in range(args.streams):
                body = (
                    await client.post(
                        "/v1/streams",
                        json={"pipeline": "streamdiffusion", "params": {"prompt": "photo negative"}},
                    )
                ).json()
                streams.append(StreamLoad(body["id"], body["stream_key"], body["output_playback_id"]))
            feeders = [asyncio.create_task(feed(s, url, args.fps, stop)) for s in streams]
            await asyncio.sleep(args.warmup)  # let every stream reach its steady state before measuring RSS
            pids = [process.pid, *child_pids(process.pid)]
            rss_start = {pid: rss_mb(pid) for pid in pids}
            side = [
                asyncio.create_task(viewers(streams, client, stop, rng)),
                asyncio.create_task(fuzz(url, relay, client, stop, rng)),
                asyncio.create_task(killer(process.pid, args.kill_every, stop, kills)),
            ]
            started = time.monotonic()
            for s in streams:
                s.sent = s.delivered = 0
                s.gaps.clear()
            await asyncio.sleep(args.minutes * 60)
            rss_end = {pid: rss_mb(pid) for pid in [process.pid, *child_pids(process.pid)]}
            drops = {}
            for s in streams:
                status = (await client.get(f"/v1/streams/{s.id}/status")).json()["data"]
                drops[s.id] = sum(status.get("drops", {}).values())
            stop.set()
            results = await asyncio.gather(*feeders, *side, return_exceptions=True)
            fuzzed = results[len(feeders) + 1]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
        shutil.rmtree(data, ignore_errors=True)
    elapsed = time.monotonic() - started
    print(
        f"soak: {args.streams} streams at {args.fps:g} fps for {elapsed / 60:.1f} min, worker killed "
        f"{len(kills)} times (every {args.kill_every:g} s), {fuzzed} malformed requests; {machine()}"
    )
    print(
        f"{'stream':<22} {'sent':>7} {'delivered':>9} {'fps out':>7} {'drops':>6} {'gaps>2s':>7} "
        f"{'after kill':>10} {'longest':>7} {'viewers':>7} {'mjpeg frames':>12}"
    )
    worst_other_gap = 0.0
    for s in streams:
        after_kill = [
            g for g in s.gaps if any(0 <= g[0] - k <= AFTER_KILL_S or 0 <= k - g[0] <= g[1] for k in kills)
        ]
        other = [g for g in s.gaps if g not in after_kill]
        worst_other_gap = max([worst_other_gap, *(g[1] for g in other)])
        longest = max((g[1] for g in s.gaps), default=0.0)
        print(
            f"{s.id:<22} {s.sent:>7} {s.delivered:>9} {s.delivered / elapsed:>7.1f} {drops[s.id]:>6} "
            f"{len(s.gaps):>7} {len(after_kill):>10} {longest:>6.1f}s {s.viewer_sessions:>7} "
            f"{s.viewer_frames:>12}"
        )
    print(
        "RSS MB (start -> end): "
        + "; ".join(
            f"pid {pid}{' server' if pid == process.pid else ''}: {rss_start.get(pid) or 0:.0f} -> "
            f"{rss_end.get(pid) or 0:.0f}"
            for pid in sorted(set(rss_start) | set(rss_end))
        )
    )
    server_growth = (rss_end[process.pid] or 0) / (rss_start[process.pid] or 1) - 1
    print(
        f"server RSS growth {server_growth * 100:+.1f}%; longest gap not right after a kill "
        f"{worst_other_gap:.1f} s"
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=4, help="streams fed at once (default 4)")
    p.add_argument("--fps", type=float, default=30.0, help="input rate of each stream (default 30)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long to measure (default 10)")
    p.add_argument(
        "--kill-every", type=float, default=120.0, help="seconds between worker kills (default 120)"
    )
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring (default 10)")
    p.add_argument("--seed", type=int, default=1, help="random seed for viewers and fuzz")
    args = p.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
