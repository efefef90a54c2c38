"""Relay throughput and latency against a bare forwarder and the seed-002 baseline.

    .venv/bin/python -m bench.relay            # full run, ~1.5 min on 2 cores
    .venv/bin/python -m bench.relay --quick    # ~20 s: 30 fps and max rate only, short windows
    .venv/bin/python -m bench.relay --json     # machine-readable result on stdout
    .venv/bin/python -m bench.relay --repeat 3 --quiet-wait 10   # on a shared machine
    .venv/bin/python -m bench.relay --only relay --profile /tmp/relay.prof  # cProfile the relay

Each server runs in its own process (see ``bench/relay_servers.py``); every
client (producers, viewers, echo workers) runs in this process. Both use
uvloop when it is installed. Per channel there is one producer and one viewer
(plus one echo worker for the "echo" path). Frames are one 512x512 JPEG of a
synthetic landscape (simplejpeg, quality 85, 4:2:0, ~51 KB) stamped with a
sequence number and ``time.time()`` at send time.

Cases, for 1 and 10 channels:

* ``relay in->viewer``: this relay, viewers ask for the producer's input
  frames (``receive="input"``), no worker.
* ``relay via echo``: this relay, an echo worker turns each input frame into an
  output frame; viewers get outputs (two hops through the relay).
* ``bare forwarder``: the limit, binary messages forwarded unparsed.
* ``naive b64 deflate``: the seed-002 base64 JSON relay with websockets'
  defaults (per-message deflate ON on both ends).
* ``naive b64 plain``: the same naive relay with ``compression=None``.

Modes: ``30fps`` per channel, paced on a monotonic schedule; ``max``, open
loop: each producer sends as fast as its socket accepts (``await send``);
``window``, closed loop: a producer sends as fast as it can while at most
``WINDOW`` of its frames have not reached its viewer, which measures how much
a server delivers when it is not also drowning in frames it will drop.

Metrics, measured over a window after a warm-up: delivered frames/s and MB/s
(WebSocket message bytes received by viewers: base64 makes the naive relay's
messages 4/3 larger), latency p50/p99 (receive time - send time stamped by the
producer, same clock), drops (frames sent in the window that no viewer got
by the end of a grace period), CPU of the server process and of this client
process (% of one core), the server's CPU time per delivered frame (which
does not depend on whether the client process is the bottleneck) and the busy
CPU of everything else on the machine during the window: on a shared 2-core
machine other load halves the figures, so such rows are flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import multiprocessing as mp
import os
import platform
import re
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # ``python bench/relay.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import websockets

from bench.relay_servers import server_process
from wire.frames import HEADER, MAGIC, VERSION, FrameKind, ImageFormat

SEQ_TS = struct.Struct("!Qd")  # sequence number and timestamp, at offset 8 of a frame header
CASES = (  # (label, server, path)
    ("relay in->viewer", "relay", "input"),
    ("relay via echo", "relay", "echo"),
    ("bare forwarder", "bare", "input"),
    ("naive b64 deflate", "naive", "input"),
    ("naive b64 plain", "naive-plain", "input"),
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MODES = ("30fps", "max", "window")
WINDOW = 4  # closed-loop mode: frames a producer may have in flight
BUSY = 0.2  # cores of other load during a window above which its row is flagged


# -- the image ----------------------------------------------------------------


def landscape(size: int = 512, seed: int = 7) -> np.ndarray:
    """A natural-looking RGB picture: sky, clouds, sun, hills, grain, trees, text."""
    import cv2

    rng = np.random.default_rng(seed)
    h = w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = y / h
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 90 + 120 * t
    img[..., 1] = 140 + 80 * t
    img[..., 2] = 230 - 30 * t
    clouds = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 12)
    img += (np.clip(clouds / clouds.std(), 0, None) * 25 * (1 - t))[..., None]
    sun = np.clip(1 - np.hypot(x - 0.74 * w, y - 0.21 * h) / (0.12 * w), 0, 1) ** 0.5 * 120
    img += sun[..., None] * np.array([1, 0.9, 0.5], np.float32)
    for base, amp, colour in ((0.55, 40, (70, 110, 60)), (0.66, 30, (50, 95, 40)), (0.80, 20, (90, 80, 45))):
        ph = rng.uniform(0, 6.28, 3)
        xs = x[0]
        ridge = base * h + amp * (
            np.sin(xs / 70 + ph[0]) + 0.5 * np.sin(xs / 23 + ph[1]) + 0.25 * np.sin(xs / 9 + ph[2])
        )
        mask = cv2.GaussianBlur((y > ridge[None, :]).astype(np.float32), (0, 0), 1.0)[..., None]
        shade = np.array(colour, np.float32) * (1 + 0.3 * (y - base * h) / h)[..., None]
        img = img * (1 - mask) + shade * mask
    fine = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 0.8)
    medium = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 3)
    ground = np.clip((y - 0.49 * h) / (0.51 * h), 0, 1)
    img += ((fine / fine.std()) * 11 * (0.3 + ground) + (medium / medium.std()) * 8)[..., None]
    for _ in range(14):
        cx, cy = int(rng.uniform(0, w)), int(rng.uniform(0.64 * h, 0.98 * h))
        r = int(rng.uniform(8, 22))
        leaf = tuple(float(c) for c in rng.uniform(20, 70, 3) * [0.6, 1.3, 0.5])
        cv2.circle(img, (cx, cy - r), r, leaf, -1, cv2.LINE_AA)
        cv2.rectangle(img, (cx - 2, cy - r), (cx + 2, cy + 4), (70, 50, 30), -1)
    out = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    cv2.putText(out, "relay bench", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2, cv2.LINE_AA)
    return out


def test_jpeg() -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(landscape(), quality=85, colorspace="RGB", colorsubsampling="420")


# -- machine --------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "loop": loop,
        "platform": platform.platform(terse=True),
    }


# -- one case ---------------------------------------------------------------------


@dataclass
class Stream:
    """One channel's clients and how its messages are made and read."""

    name: str
    producer: Any
    viewers: list[Any]
    extra: list[Any]  # echo workers
    make: Callable[[int, float], bytes | str]
    parse: Callable[[bytes | str], tuple[int, float] | None]
    sent: list[float] = field(default_factory=list)  # send time of seq i
    received: list[list[tuple[float, int, float, int]]] = field(default_factory=list)
    acks: int = 0
    latest: int = -1  # highest sequence number a viewer got (closed-loop mode)
    progress: asyncio.Event = field(default_factory=asyncio.Event)


def binary_maker(channel: str, jpeg: bytes) -> Callable[[int, float], bytes]:
    name = channel.encode()
    pack = HEADER.pack

    def make(seq: int, ts: float) -> bytes:
        header = pack(
            MAGIC, VERSION, FrameKind.INPUT, ImageFormat.JPEG, 0, len(name), 0, seq, ts, 512, 512, 0
        )
        return b"".join((header, name, jpeg))

    return make


def parse_binary(message: bytes | str) -> tuple[int, float] | None:
    if isinstance(message, str):
        return None  # control message (status, assign...)
    return SEQ_TS.unpack_from(message, 8)


def naive_maker(jpeg: bytes) -> Callable[[int, float], str]:
    # json.dumps's output for the seed's message, built without re-escaping 68 KB per frame
    # (the client is not what is measured); "seq" is our addition for counting drops.
    head = '{"type": "image", "format": "jpeg", "data": "' + base64.b64encode(jpeg).decode()
    json.loads(head + '", "timestamp": 1.5, "seq": 0}')  # it is valid JSON

    def make(seq: int, ts: float) -> str:
        return f'{head}", "timestamp": {ts!r}, "seq": {seq}}}'

    return make


_TAIL = re.compile(r'"timestamp": ([0-9.e+-]+), "seq": (\d+)\}$')


def parse_naive(message: bytes | str) -> tuple[int, float] | None:
    if not isinstance(message, str):
        return None
    m = _TAIL.search(message, len(message) - 80)
    if m is None:
        return None
    return int(m.group(2)), float(m.group(1))


async def open_streams(server: str, path: str, port: int, names: list[str], jpeg: bytes) -> list[Stream]:
    url = f"ws://127.0.0.1:{port}"
    streams = []
    for name in names:
        if server == "relay":
            from relay.client import connect

            extra = []
            if path == "echo":
                worker, _ = await connect(url, "worker", capacity=1, channels=[name], name="echo")
                extra.append(worker)
            viewer, _ = await connect(url, "viewer", name, receive="input" if path == "input" else "output")
            producer, _ = await connect(url, "producer", name, receive="none")
            s = Stream(name, producer, [viewer], extra, binary_maker(name, jpeg), parse_binary)
        elif server == "bare":
            viewer = await websockets.connect(f"{url}/{name}?role=viewer", compression=None, max_size=None)
            producer = await websockets.connect(
                f"{url}/{name}?role=producer", compression=None, max_size=None
            )
            s = Stream(name, producer, [viewer], [], binary_maker(name, jpeg), parse_binary)
        else:
            kwargs: dict[str, Any] = {} if server == "naive" else {"compression": None}
            viewer = await websockets.connect(f"{url}/{name}", **kwargs)
            producer = await websockets.connect(f"{url}/{name}", **kwargs)
            s = Stream(name, producer, [viewer], [], naive_maker(jpeg), parse_naive)
        for ws in (s.producer, *s.viewers, *s.extra):
            ws.close_timeout = 1
        s.received = [[] for _ in s.viewers]
        streams.append(s)
    return streams


async def _produce(s: Stream, mode: str, phase: float, running: list[bool]) -> None:
    """Send frames: paced at ``mode`` fps ("30fps"), as fast as the socket takes them
    ("max"), or with at most WINDOW frames not yet seen by the viewer ("window")."""
    ws, make, sent = s.producer, s.make, s.sent
    clock, wall = time.perf_counter, time.time
    rate = float(mode[:-3]) if mode.endswith("fps") else 0.0
    period = 1 / rate if rate else 0.0
    due = clock() + phase * period
    seq = 0
    try:
        while running[0]:
            if rate:
                delay = due - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -period:  # fell a whole frame behind: do not burst to catch up
                    due = clock()
                due += period
            elif mode == "window":
                while s.latest < seq - WINDOW and running[0]:
                    s.progress.clear()
                    try:  # the timeout covers a frame the relay dropped for a newer one
                        await asyncio.wait_for(s.progress.wait(), 0.05)
                    except TimeoutError:
                        break
            ts = wall()
            await ws.send(make(seq, ts))
            sent.append(ts)
            seq += 1
            if not rate:
                await asyncio.sleep(0)  # let the viewers in this process run
    except websockets.ConnectionClosed:
        pass


async def _view(s: Stream, ws: Any, log: list) -> None:
    wall, parse, progress = time.time, s.parse, s.progress
    try:
        async for message in ws:
            now = wall()
            got = parse(message)
            if got is not None:
                log.append((now, got[0], got[1], len(message)))
                if got[0] > s.latest:
                    s.latest = got[0]
                    progress.set()
    except websockets.ConnectionClosed:
        pass


async def _drain(s: Stream) -> None:
    try:
        async for _ in s.producer:  # acks (naive) and status messages (relay)
            s.acks += 1
    except websockets.ConnectionClosed:
        pass


async def _echo(ws: Any) -> None:
    try:
        async for message in ws:
            if isinstance(message, bytes):
                out = bytearray(message)
                out[3] = FrameKind.OUTPUT
                await ws.send(out)
    except websockets.ConnectionClosed:
        pass


def _busy_cpu() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS  # user..steal, not guest (counted in user)


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def wait_quiet(limit: float, threshold: float = 0.25) -> float:
    """Wait up to ``limit`` s for the machine's other load to fall under ``threshold`` cores."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = _busy_cpu()
        await asyncio.sleep(0.25)
        if (_busy_cpu() - before) / 0.25 < threshold:
            break
    return time.monotonic() - start


async def run_case(
    server: str,
    path: str,
    port: int,
    server_pid: int,
    channels: int,
    mode: str,
    warmup: float,
    duration: float,
    jpeg: bytes,
    tag: str,
    grace: float = 0.3,
) -> dict[str, Any]:
    names = [f"{tag}-{i}" for i in range(channels)]
    streams = await open_streams(server, path, port, names, jpeg)
    running = [True]
    tasks = []
    for s in streams:
        for ws, log in zip(s.viewers, s.received, strict=False):
            tasks.append(asyncio.create_task(_view(s, ws, log)))
        tasks.append(asyncio.create_task(_drain(s)))
        tasks += [asyncio.create_task(_echo(w)) for w in s.extra]
    producers = [asyncio.create_task(_produce(s, mode, i / channels, running)) for i, s in enumerate(streams)]
    await asyncio.sleep(warmup)
    t0, srv0, cli0, all0 = time.time(), _proc_cpu(server_pid), time.process_time(), _busy_cpu()
    await asyncio.sleep(duration)
    t1, srv1, cli1, all1 = time.time(), _proc_cpu(server_pid), time.process_time(), _busy_cpu()
    running[0] = False
    await asyncio.sleep(grace)  # frames in flight still count as delivered (not in the rate)
    for task in producers:
        task.cancel()
    conns = [ws for s in streams for ws in (s.producer, *s.viewers, *s.extra)]
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    await asyncio.gather(*tasks, *producers, return_exceptions=True)

    span = t1 - t0
    sent = delivered = nbytes = drops = 0
    latencies = []
    for s in streams:
        window = [seq for seq, ts in enumerate(s.sent) if t0 <= ts <= t1]
        sent += len(window)
        for log in s.received:
            got = set()
            for now, seq, ts, size in log:
                got.add(seq)
                if t0 <= now <= t1:
                    delivered += 1
                    nbytes += size
                    latencies.append(now - ts)
            drops += sum(1 for seq in window if seq not in got)
    lat = np.array(latencies) * 1000 if latencies else None
    return {
        "sent_fps": sent / span,
        "fps": delivered / span,
        "mb_s": nbytes / span / 1e6,
        "p50_ms": None if lat is None else float(np.percentile(lat, 50)),
        "p99_ms": None if lat is None else float(np.percentile(lat, 99)),
        "drops": drops,
        "sent": sent,
        "delivered": delivered,
        "server_cpu": (srv1 - srv0) / span,
        "client_cpu": (cli1 - cli0) / span,
        # busy CPU of everything else on the machine: other load skews the figures
        "other_cpu": max(0.0, (all1 - all0) - (srv1 - srv0) - (cli1 - cli0)) / span,
        "server_us_per_frame": (srv1 - srv0) / delivered * 1e6 if delivered else None,
    }


def _client_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# -- the whole run --------------------------------------------------------------------


def run(args: argparse.Namespace, report: Callable[[str], None]) -> dict[str, Any]:
    jpeg = test_jpeg()
    ctx = mp.get_context("spawn")
    results = []
    wanted = [c for c in CASES if not args.only or c[1] in args.only]
    by_server: dict[str, list[tuple[str, str]]] = {}
    for label, server, path in wanted:
        by_server.setdefault(server, []).append((label, path))
    loops = set()
    for server, paths in by_server.items():
        parent, child = ctx.Pipe()
        profile = args.profile if server == "relay" else None
        proc = ctx.Process(target=server_process, args=(server, child, profile), daemon=True)
        proc.start()
        port, loop_name = parent.recv()
        loops.add(loop_name)
        try:
            with asyncio.Runner(loop_factory=_client_loop) as runner:
                for label, path in paths:
                    for channels in args.channels:
                        for mode in args.modes:
                            duration = args.duration_paced if mode.endswith("fps") else args.duration_max
                            tries = []
                            for attempt in range(args.repeat):
                                waited = runner.run(wait_quiet(args.quiet_wait)) if args.quiet_wait else 0.0
                                tag = f"{server}-{path}-{channels}-{mode}-{attempt}"
                                r = runner.run(
                                    run_case(
                                        server,
                                        path,
                                        port,
                                        proc.pid,
                                        channels,
                                        mode,
                                        args.warmup,
                                        duration,
                                        jpeg,
                                        tag,
                                        args.grace,
                                    )
                                )
                                r["waited_s"] = round(waited, 2)
                                tries.append(r)
                            # the least disturbed try: the one the rest of the machine loaded least
                            r = min(tries, key=lambda t: t["other_cpu"])
                            r.update(
                                label=label,
                                server=server,
                                path=path,
                                channels=channels,
                                mode=mode,
                                tries=len(tries),
                            )
                            results.append(r)
                            report(_row(r))
        finally:
            parent.send("stop")
            if parent.poll(10):
                parent.recv()
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
    return {
        "jpeg_bytes": len(jpeg),
        "server_loops": sorted(loops),
        "results": results,
        "ratios": ratios(results),
    }


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    index = {(r["label"], r["channels"], r["mode"]): r["fps"] for r in results}
    out = []
    for mode in ("max", "window"):
        for channels in sorted({r["channels"] for r in results}):
            for ours in ("relay in->viewer", "relay via echo"):
                for ref in ("bare forwarder", "naive b64 deflate", "naive b64 plain"):
                    a, b = index.get((ours, channels, mode)), index.get((ref, channels, mode))
                    if a and b:
                        out.append(
                            {"mode": mode, "channels": channels, "ours": ours, "vs": ref, "ratio": a / b}
                        )
    return out


HEAD = (
    f"{'case':<18} {'ch':>3} {'mode':>6} {'sent/s':>7} {'recv/s':>7} {'MB/s':>6} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'drops':>6} {'srv cpu':>7} {'cli cpu':>7} "
    f"{'srv us/f':>8} {'other':>5}"
)


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _row(r: dict[str, Any]) -> str:
    flag = "!" if r["other_cpu"] > BUSY else " "
    return (
        f"{r['label']:<18} {r['channels']:>3} {r['mode']:>6} {r['sent_fps']:>7.0f} "
        f"{r['fps']:>7.0f} {r['mb_s']:>6.1f} {_num(r['p50_ms'], 7, 2)} {_num(r['p99_ms'], 7, 2)} "
        f"{r['drops']:>6} {r['server_cpu']:>7.0%} {r['client_cpu']:>7.0%} "
        f"{_num(r['server_us_per_frame'], 8, 0)} {r['other_cpu']:>4.0%}{flag}"
    )


def format_report(machine: dict[str, Any], out: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        (
            f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
            f"websockets {machine['websockets']}, {machine['loop']} (servers on "
            f"{', '.join(out['server_loops'])})"
        ),
        (
            f"frames: 512x512 JPEG q85 4:2:0, {out['jpeg_bytes']} bytes; warm-up {args.warmup:g} s, "
            f"window {args.duration_paced:g} s at 30 fps, {args.duration_max:g} s otherwise; "
            f"best of {args.repeat} (least other load)"
        ),
        "",
        HEAD,
        "-" * len(HEAD),
    ]
    lines += [_row(r) for r in out["results"]]
    lines += [
        "",
        "modes: 30fps = paced per channel; max = open loop, each producer sends as fast as its",
        f"socket accepts; window = closed loop, at most {WINDOW} frames per producer not yet at its viewer.",
        "MB/s: message bytes at the viewers (base64 is 4/3 of the JPEG). Latency: viewer receive",
        "time - producer send time. drops: sent in the window, never received. cpu: % of one core",
        "(server process / this client process). srv us/f: server CPU per delivered frame.",
        f"other: busy CPU of the rest of the machine during the window (! above {BUSY:.0%}: skewed).",
        "naive b64 deflate = websockets defaults, per-message deflate ON (as a naive server has it,",
        "clients too); naive b64 plain = the same server and clients with compression=None.",
        "",
        "throughput ratios (delivered frames/s):",
    ]
    for q in out["ratios"]:
        lines.append(
            f"  {q['mode']:>6} {q['channels']:>2} ch  {q['ours']:<16} / {q['vs']:<17} = {q['ratio']:6.2f}x"
        )
    busy = [r for r in out["results"] if r["other_cpu"] > BUSY]
    if busy:
        lines.append(
            f"\nwarning: {len(busy)} case(s) ran while other processes used more than "
            f"{BUSY:.0%} of a core (marked !); rerun on a quiet machine or with "
            "--repeat 3 --quiet-wait 10"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows (~20 s in all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--channels", type=int, nargs="+", default=[1, 10])
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: all; with --quick: 30fps and max")
    p.add_argument(
        "--only", nargs="+", choices=["relay", "bare", "naive", "naive-plain"], help="run only these servers"
    )
    p.add_argument("--warmup", type=float)
    p.add_argument("--duration-max", type=float, help="window at max rate and closed loop, seconds")
    p.add_argument("--duration-paced", type=float, help="window at 30 fps, seconds")
    p.add_argument(
        "--repeat", type=int, default=1, help="run each case N times, keep the try with the least other load"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each case wait up to S seconds for the machine to be idle",
    )
    p.add_argument(
        "--profile", metavar="FILE", help="run the relay's process under cProfile and write the stats to FILE"
    )
    args = p.parse_args(argv)
    quick = args.quick
    if args.modes is None:
        args.modes = ["30fps", "max"] if quick else list(MODES)
    args.grace = 0.15 if quick else 0.3
    if args.warmup is None:
        args.warmup = 0.25 if quick else 0.5
    if args.duration_max is None:
        args.duration_max = 0.6 if quick else 2.0
    if args.duration_paced is None:
        args.duration_paced = 0.5 if quick else 1.5
    return args


Run = Callable[[argparse.Namespace, Callable[[str], None]], dict[str, Any]]
Formatter = Callable[[dict[str, Any], dict[str, Any], argparse.Namespace], str]


def run_and_print(
    args: argparse.Namespace, head: str, run: Run, format_report: Formatter, settings: dict[str, Any]
) -> None:
    """A bench's run with its machine, date, settings and runtime: JSON on stdout with ``--json``,
    else progress lines on stderr and the report on stdout (bench/relay.py, bench/cluster.py).
    """
    machine = machine_info()
    started = time.monotonic()
    report = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    if not args.json:
        print(head, file=sys.stderr, flush=True)
    out = run(args, report)
    out.update(
        machine=machine,
        date=datetime.date.today().isoformat(),
        settings=settings,
        runtime_s=round(time.monotonic() - started, 1),
    )
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    else:
        print(format_report(machine, out, args))
        print(f"\nruntime {out['runtime_s']} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = {
        "warmup_s": args.warmup,
        "window_s": args.duration_max,
        "window_30fps_s": args.duration_paced,
        "channels": args.channels,
        "modes": args.modes,
        "repeat": args.repeat,
        "closed_loop_window": WINDOW,
    }
    run_and_print(args, HEAD, run, format_report, settings)
    if args.profile:
        import pstats

        stats = pstats.Stats(args.profile, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
