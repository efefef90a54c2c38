"""End to end: glass-to-glass latency and output fps through the real server.

The server (REST API, relay, WHIP/WHEP, WebSocket ingest) runs in this
process on a real port, the worker as its own process (``python -m worker``,
so the engine never shares the server's GIL), and the clients run in this
process too. One 512x512 stream serves every path in turn:

  baseline            the engine called alone plus a JPEG decode and encode per
                      frame, serially: what no transport can beat
  WHIP->WHEP <codec>  an aiortc publisher sends a 30 fps track over WHIP; an
                      aiortc viewer plays the output over WHEP. Every source
                      frame carries its number as a grid of large black/white
                      blocks (16 bits, each with its complement, plus a white
                      and a black reference block), which survives VP8/H.264
                      and the effect: the default prompt "photo negative"
                      inverts, and the decoder reads polarity from the
                      references. latency = time the viewer decoded frame n -
                      time the publisher handed frame n to its encoder
  WS->WS 30 fps       bare JPEGs sent at 30 fps to /live/video-to-video/{key}/ws;
                      results come back on the same socket as relay frames
                      whose header seq is the index of the message sent
  WS->WS max, 2 in flight
                      the same socket, a new frame sent as each result arrives,
                      two outstanding

fps out counts results received during the measured window (after a warm-up
that waits for the first result); sent/recv count frames in that window.
Latency percentiles are over received frames only: frames the server drops
(latest frame wins at every hop) have no latency.

The server completes received video frames on their RTP marker bit
(``api/webrtc/jitter.py``), which also applies to this process's WHEP
viewer. ``--aiortc-jitter`` restores aiortc's own jitter buffer (a frame is
handed on only when the next one starts: one frame interval per receiver)
to measure the difference.

Run: .venv/bin/python bench/e2e.py [--seconds 10 | --quick] [--codecs vp8,h264]
     [--engine diffusion --model PATH] [--params '{"prompt": "..."}'] [--aiortc-jitter]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction

import av
import cv2
import httpx
import numpy as np
import orjson
import simplejpeg
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from websockets.asyncio.client import connect as ws_connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository first, so its packages answer imports before bench/ modules do
sys.path.insert(0, ROOT)

from api.server.app import create_app
from api.server.config import Config
from api.server.http import running
from api.server.services import services
from bench.benchutil import child_env, machine, natural_image, pct_ms
from media.codec import decode_image, encode_image
from relay.hub import Hub
from relay.local import LocalViewer
from wire.frames import decode_frame
from worker.engines import create_engine

SIZE = 512
FPS = 30
KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SDP = {"Content-Type": "application/sdp"}
STAGGER = 0.001  # seconds between back-to-back sends in the max-rate WS run
CODECS = {"vp8": "video/VP8", "h264": "video/H264"}

# -- the frame number drawn as blocks -------------------------------------------------

GRID, CELL = 6, 64  # a 6x6 grid of 64 px blocks in the middle of the frame
ORIGIN = (SIZE - GRID * CELL) // 2  # 64
BITS = 16
WHITE_REF, BLACK_REF = 0, GRID * GRID - 1
DATA_CELLS = [c for c in range(GRID * GRID) if c not in (WHITE_REF, BLACK_REF)][: 2 * BITS]
MARGIN = CELL // 4  # read only the inner half of each block


def _cell_box(cell: int) -> tuple[slice, slice]:
    row, col = divmod(cell, GRID)
    y, x = ORIGIN + row * CELL, ORIGIN + col * CELL
    return slice(y, y + CELL), slice(x, x + CELL)


def draw_code(rgb: np.ndarray, number: int) -> None:
    """Paint ``number`` (mod 2**16) into ``rgb``: bit i in block a_i, its complement in b_i."""
    rgb[_cell_box(WHITE_REF)] = 255
    rgb[_cell_box(BLACK_REF)] = 0
    for i in range(BITS):
        bit = (number >> i) & 1
        rgb[_cell_box(DATA_CELLS[i])] = 255 * bit
        rgb[_cell_box(DATA_CELLS[i + BITS])] = 255 * (1 - bit)


def read_code(luma: np.ndarray) -> int | None:
    """The number in a luma plane, or None when any block is ambiguous.

    Polarity comes from the reference blocks, so an inverted output reads the
    same; each bit must differ from its complement by at least a third of the
    reference contrast, which rejects blurred or half-updated frames.
    """
    scale = SIZE // luma.shape[0]
    origin, cell, margin = ORIGIN // scale, CELL // scale, MARGIN // scale
    grid = luma.reshape(luma.shape[0], luma.shape[1])[
        origin : origin + GRID * cell, origin : origin + GRID * cell
    ]
    blocks = grid.reshape(GRID, cell, GRID, cell)[:, margin : cell - margin, :, margin : cell - margin]
    means = blocks.mean(axis=(1, 3), dtype=np.float32).ravel().tolist()
    contrast = means[WHITE_REF] - means[BLACK_REF]
    if abs(contrast) < 60:
        return None
    number = 0
    for i in range(BITS):
        diff = (means[DATA_CELLS[i]] - means[DATA_CELLS[i + BITS]]) / contrast
        if abs(diff) < 0.33:
            return None
        number |= (diff > 0) << i
    return number


def read_code_jpeg(payload: bytes) -> int | None:
    """The number in a 512x512 JPEG, decoded at 1/8 scale (libjpeg-turbo's DCT scaling: cheap)."""
    return read_code(
        simplejpeg.decode_jpeg(payload, colorspace="GRAY", min_height=SIZE // 8, min_width=SIZE // 8)
    )


def luma_of(frame: av.VideoFrame) -> np.ndarray:
    if frame.format.name in ("yuv420p", "yuvj420p"):
        plane = frame.planes[0]
        return np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)[:, : frame.width]
    return frame.to_ndarray(format="gray")


class Background:
    """A photo-like background sliding sideways, so the video codecs see real motion."""

    def __init__(self) -> None:
        self.image = natural_image(SIZE, SIZE)

    def frame(self, number: int) -> np.ndarray:
        return np.roll(self.image, (number * 4) % SIZE, axis=1)


def restore_aiortc_jitter_buffer() -> None:
    """``--aiortc-jitter``: undo the server's marker-bit patch, for comparison."""
    from aiortc import jitterbuffer

    from api.webrtc import jitter

    jitterbuffer.JitterBuffer._remove_frame = jitter._original


# -- results ---------------------------------------------------------------------


@dataclass
class Result:
    path: str
    seconds: float = 0.0
    sent: int = 0
    received: int = 0
    latencies: list[float] = field(default_factory=list)
    note: str = ""
    #: WHIP->WHEP only: per-hop seconds of the received frames, by hop name
    hops: dict[str, list[float]] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.received / self.seconds if self.seconds else float("nan")


def relay_drops(hub: Hub, channel: str) -> dict[str, int]:
    found = hub.channels.get(channel)
    return dict(found.drops) if found is not None else {}


def note_drops(result: Result, before: dict[str, int], after: dict[str, int]) -> None:
    """Add the frames the relay dropped during ``result``'s run (latest frame wins) to its note."""
    counts = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)
    if text:
        result.note = "; ".join(filter(None, [result.note, f"relay drops: {text}"]))


# -- baseline ----------------------------------------------------------------------


def bench_baseline(engine_name: str, params: dict, seconds: float) -> Result:
    """decode JPEG -> engine -> encode JPEG, serially, timed per frame."""
    background = Background()
    payloads = [encode_image(background.frame(i)) for i in range(8)]
    engine = create_engine(engine_name, params)
    engine.load()
    batch = engine.batch_size
    for i in range(3):  # warm-up (CUDA graphs, caches)
        engine.process([decode_image(payloads[i % 8])] * batch)
    result = Result("baseline: JPEG dec + engine + JPEG enc")
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        outs = engine.process([decode_image(payloads[(n + k) % 8]) for k in range(batch)])
        for out in outs:
            encode_image(out)
        result.latencies.append(time.perf_counter() - t0)
        n += batch
    result.seconds = time.perf_counter() - start
    result.sent = result.received = n
    engine.close()
    return result


# -- WHIP -> WHEP --------------------------------------------------------------------


class CounterTrack(MediaStreamTrack):
    """A 30 fps video track whose frame n shows n as blocks; remembers when each left."""

    kind = "video"

    def __init__(self, fps: int = FPS) -> None:
        super().__init__()
        self.period = 1 / fps
        self.background = Background()
        self.count = 0
        self.sent_at: dict[int, float] = {}
        self._due: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.perf_counter()
        if self._due is None:
            self._due = now
        elif self._due > now:
            await asyncio.sleep(self._due - now)
        # late (the sender was slow) -> no burst to catch up: the next frame is one period on
        self._due = max(self._due, time.perf_counter()) + self.period
        number = self.count
        self.count += 1
        rgb = self.background.frame(number)
        draw_code(rgb, number)
        frame = av.VideoFrame.from_ndarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
        frame.pts, frame.time_base = number * 3000, Fraction(1, 90_000)
        self.sent_at[number & 0xFFFF] = time.perf_counter()
        return frame


class Tap:
    """When frame n first shows up in the channel's input or output, seen from inside the server.

    A relay viewer like the WHEP session's own (its own latest-frame slot, so
    it holds nobody back); it reads the number from a 1/8-scale JPEG decode.
    """

    def __init__(self, hub: Hub, channel: str, receive: str) -> None:
        self.viewer = LocalViewer(hub, channel, receive)
        self.seen: dict[int, float] = {}
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for frame in self.viewer.frames():
            at = time.perf_counter()
            number = read_code_jpeg(frame.payload)
            if number is not None:
                self.seen.setdefault(number, at)

    async def close(self) -> None:
        self.viewer.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _prefer(transceiver: RTCRtpTransceiver, mime: str) -> None:
    codecs = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType in (mime, "video/rtx")])


async def _negotiate(client: httpx.AsyncClient, url: str, pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    response = await client.post(url, content=pc.localDescription.sdp, headers=SDP)
    if response.status_code != 201:
        raise RuntimeError(f"{url}: {response.status_code} {response.text}")
    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    return response.headers["location"]


async def bench_webrtc(
    client: httpx.AsyncClient, hub: Hub, stream: dict, codec: str, seconds: float, warmup_timeout: float
) -> Result:
    result = Result(f"WHIP->WHEP {codec.upper()} {FPS} fps")
    viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiving = viewer.addTransceiver("video", direction="recvonly")
    _prefer(receiving, CODECS[codec])
    publisher = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    source = CounterTrack()
    _prefer(publisher.addTransceiver(source, direction="sendonly"), CODECS[codec])
    locations = []
    undecodable = 0
    taps = {"input": Tap(hub, stream["id"], "input"), "output": Tap(hub, stream["id"], "output")}
    received: list[tuple[int, float]] = []
    try:
        locations.append(await _negotiate(client, stream["output_stream_url"], viewer))
        locations.append(await _negotiate(client, stream["whip_url"], publisher))
        track = receiving.receiver.track
        deadline = time.perf_counter() + warmup_timeout
        unreadable = 0
        while True:  # warm-up: until a frame with a readable number comes back
            frame = await asyncio.wait_for(track.recv(), max(0.1, deadline - time.perf_counter()))
            if read_code(luma_of(frame)) is not None:
                break
            unreadable += 1
            if unreadable >= 5 * FPS:
                result.note = "no readable frame number: the effect destroys the blocks"
                return result
        sent_before = source.count
        drops_before = relay_drops(hub, stream["id"])
        seen: set[int] = set()
        start = time.perf_counter()
        while (now := time.perf_counter()) - start < seconds:
            try:
                frame = await asyncio.wait_for(track.recv(), 5)
            except TimeoutError:
                result.note = "the viewer got no frame for 5 s"
                break
            received_at = time.perf_counter()
            number = read_code(luma_of(frame))
            if number is None:
                undecodable += 1
                continue
            sent_at = source.sent_at.get(number)
            if sent_at is None or sent_at < start or number in seen:
                continue  # sent during the warm-up, or a repeat
            seen.add(number)
            result.latencies.append(received_at - sent_at)
            received.append((number, received_at))
        result.seconds = now - start
        result.sent = source.count - sent_before
        result.received = len(result.latencies)
        if undecodable:
            result.note = f"{undecodable} frames unreadable"
        note_drops(result, drops_before, relay_drops(hub, stream["id"]))
        hops = {"publisher -> server input": [], "input -> worker output": [], "output -> viewer": []}
        for number, received_at in received:
            at_input, at_output = taps["input"].seen.get(number), taps["output"].seen.get(number)
            if at_input is not None and at_output is not None:
                hops["publisher -> server input"].append(at_input - source.sent_at[number])
                hops["input -> worker output"].append(at_output - at_input)
                hops["output -> viewer"].append(received_at - at_output)
        result.hops = hops
    finally:
        for tap in taps.values():
            await tap.close()
        for location in reversed(locations):
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(location)
        source.stop()
        await publisher.close()
        await viewer.close()
    return result


# -- WebSocket -> WebSocket ------------------------------------------------------------


class WsClient:
    """One ingest socket: ``send`` stamps each message with its index (the server's seq)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.seq = 0
        self.sent_at: dict[int, float] = {}
        self.arrivals: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def send(self, payload: bytes) -> int:
        seq = self.seq
        self.seq += 1
        self.sent_at[seq] = time.perf_counter()
        await self.ws.send(payload)
        return seq

    async def _read(self) -> None:
        async for message in self.ws:
            if isinstance(message, bytes):
                now = time.perf_counter()
                self.arrivals.put_nowait((decode_frame(message).seq, now))

    def drain(self) -> None:
        while not self.arrivals.empty():
            self.arrivals.get_nowait()


async def _ws_warmup(client: WsClient, payload: bytes, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while True:
        mine = await client.send(payload)
        try:
            while True:
                seq, _ = await asyncio.wait_for(client.arrivals.get(), 0.5)
                if seq == mine:
                    return
        except TimeoutError:
            if time.perf_counter() > deadline:
                raise RuntimeError("no result over the WebSocket") from None


async def bench_ws_paced(client: WsClient, payloads: list[bytes], seconds: float) -> Result:
    result = Result(f"WS->WS {FPS} fps")
    first = client.seq
    start = time.perf_counter()

    async def sender() -> None:
        due = start
        while (now := time.perf_counter()) - start < seconds:
            if due > now:
                await asyncio.sleep(due - now)
            due = max(due, time.perf_counter()) + 1 / FPS
            await client.send(payloads[client.seq % len(payloads)])
            result.sent += 1

    task = asyncio.create_task(sender())
    try:
        while (now := time.perf_counter()) - start < seconds:
            try:
                seq, at = await asyncio.wait_for(client.arrivals.get(), max(0.01, start + seconds - now))
            except TimeoutError:
                break
            if seq >= first and seq in client.sent_at:
                result.latencies.append(at - client.sent_at.pop(seq))
    finally:
        await task
    result.seconds = time.perf_counter() - start
    result.received = len(result.latencies)
    return result


async def bench_ws_max(client: WsClient, payloads: list[bytes], seconds: float, in_flight: int = 2) -> Result:
    """Keep ``in_flight`` frames outstanding. Results come in seq order, so a result
    for seq s means every older outstanding frame was dropped: refill for those too."""
    result = Result(f"WS->WS max, {in_flight} in flight")
    pending: set[int] = set()
    start = time.perf_counter()

    async def top_up() -> None:
        first = True
        while len(pending) < in_flight:
            if not first:  # two sends in one go would meet in the relay's slot for the worker:
                await asyncio.sleep(STAGGER)  # the older one replaced before it leaves
            first = False
            pending.add(await client.send(payloads[client.seq % len(payloads)]))
            result.sent += 1

    await top_up()
    while time.perf_counter() - start < seconds:
        try:
            seq, at = await asyncio.wait_for(client.arrivals.get(), 2)
        except TimeoutError:
            pending.clear()  # all lost: start a new window
            await top_up()
            continue
        if seq not in pending:
            continue
        result.latencies.append(at - client.sent_at.pop(seq))
        pending.difference_update({s for s in pending if s <= seq})
        await top_up()
    result.seconds = time.perf_counter() - start
    result.received = len(result.latencies)
    return result


async def bench_ws(
    base_url: str, hub: Hub, stream: dict, seconds: float, warmup_timeout: float
) -> list[Result]:
    background = Background()
    payloads = [encode_image(background.frame(i)) for i in range(FPS)]
    url = base_url.replace("http://", "ws://", 1) + f"/live/video-to-video/{stream['stream_key']}/ws"
    async with ws_connect(url, compression=None, max_size=16 * 2**20) as ws:
        client = WsClient(ws)
        try:
            await _ws_warmup(client, payloads[0], warmup_timeout)
            before = relay_drops(hub, stream["id"])
            paced = await bench_ws_paced(client, payloads, seconds)
            note_drops(paced, before, relay_drops(hub, stream["id"]))
            await asyncio.sleep(0.5)  # let the paced run's last results land
            client.drain()
            before = relay_drops(hub, stream["id"])
            fastest = await bench_ws_max(client, payloads, seconds)
            note_drops(fastest, before, relay_drops(hub, stream["id"]))
        finally:
            client.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client.reader
    return [paced, fastest]


# -- orchestration -----------------------------------------------------------------------


async def run(args: argparse.Namespace, params: dict) -> tuple[list[Result], dict]:
    app = create_app(Config(server={"port": 0, "api_keys": [KEY]}, relay={"port": 0}, workers={"count": 0}))
    if args.aiortc_jitter:
        restore_aiortc_jitter_buffer()
    results: list[Result] = []
    async with (
        running(app) as base_url,
        httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=30) as client,
    ):
        command = [
            sys.executable,
            "-m",
            "worker",
            "--relay",
            services(app).relay_url,
            "--engine",
            args.engine,
        ]
        if args.model:
            command += ["--model", args.model]
        # the embedded relay's token (configured, or generated at start) reaches the worker by environment
        token = services(app).relay_token
        worker = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, env={**child_env(), "RELAY_TOKEN": token}
        )
        try:
            response = await client.post(
                "/v1/streams", json={"pipeline": "streamdiffusion", "params": params}
            )
            response.raise_for_status()
            stream = response.json()
            hub = services(app).relay.hub
            for codec in args.codecs:
                results.append(
                    await bench_webrtc(client, hub, stream, codec, args.seconds, args.warmup_timeout)
                )
                await asyncio.sleep(1.0)  # the closed sessions' last frames leave the pipeline
            results += await bench_ws(base_url, hub, stream, args.seconds, args.warmup_timeout)
            status = (await client.get(f"/v1/streams/{stream['id']}/status")).json()["data"]
            await client.delete(f"/v1/streams/{stream['id']}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                worker.terminate()
            try:
                await asyncio.wait_for(worker.wait(), 10)
            except TimeoutError:
                worker.kill()
                await worker.wait()
    return results, stream | {"status": status}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per path")
    parser.add_argument("--quick", action="store_true", help="4 s per path")
    parser.add_argument("--codecs", default="vp8,h264", help="WHIP/WHEP codecs to run: vp8,h264")
    parser.add_argument("--engine", default="filter", help="worker engine (filter, diffusion)")
    parser.add_argument("--model", help="diffusion model id or local path (the stream's model_id)")
    parser.add_argument("--params", default="{}", help="JSON stream params over the defaults")
    parser.add_argument(
        "--aiortc-jitter",
        action="store_true",
        help="use aiortc's own jitter buffer (one frame interval later per receiver)",
    )
    parser.add_argument(
        "--warmup-timeout",
        type=float,
        default=None,
        help="seconds to wait for the first result (default 30; 600 for diffusion)",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds = 4.0
    args.codecs = [c.strip().lower() for c in args.codecs.split(",") if c.strip()]
    if unknown := [c for c in args.codecs if c not in CODECS]:
        parser.error(f"unknown codec {unknown[0]!r}: use {', '.join(CODECS)}")
    if args.warmup_timeout is None:
        args.warmup_timeout = 30.0 if args.engine == "filter" else 600.0
    params = {"prompt": "photo negative", "width": SIZE, "height": SIZE}
    if args.model:
        params["model_id"] = args.model
    params.update(orjson.loads(args.params))

    load = os.getloadavg()[0]
    started = time.perf_counter()
    results, stream = asyncio.run(run(args, params))
    baseline = bench_baseline(args.engine, stream["params"], min(args.seconds, 3.0))
    results.insert(0, baseline)
    info = stream["status"].get("engine") or {}
    detail = ", ".join(f"{k} {info[k]}" for k in ("effect", "device", "model_id") if info.get(k))

    print(f"machine: {machine()}; load average before the run {load:.2f}")
    print(
        f"engine: {args.engine}{f' ({detail})' if detail else ''}, stream {SIZE}x{SIZE}, "
        f"prompt {params.get('prompt')!r}; source {FPS} fps, {args.seconds:g} s measured per path"
    )
    print(
        "server + clients in this process, worker in its own process"
        + (
            "; aiortc's own jitter buffer"
            if args.aiortc_jitter
            else "; video frames complete on the RTP marker bit"
        )
        + "\n"
    )
    base_p50 = pct_ms(baseline.latencies, 0.5)
    print(f"{'path':<40} {'fps out':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50-base':>9} {'sent':>6} {'recv':>6}")
    for r in results:
        p50, p99 = pct_ms(r.latencies, 0.5), pct_ms(r.latencies, 0.99)
        cells = [f"{r.fps:.1f}", f"{p50:.1f}", f"{p99:.1f}", "" if r is baseline else f"{p50 - base_p50:.1f}"]
        if not r.latencies:
            cells = ["-"] * 4
        print(
            f"{r.path:<40} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} {cells[3]:>9} "
            f"{r.sent:6d} {r.received:6d}" + (f"  ({r.note})" if r.note else "")
        )
    hopped = [r for r in results if r.hops]
    if hopped:
        names = list(hopped[0].hops)
        print("\nWHIP->WHEP by hop, p50 / p99 ms (timed inside the server by relay taps):")
        print(f"{'path':<40}" + "".join(f" {name:>27}" for name in names))
        for r in hopped:
            print(
                f"{r.path:<40}"
                + "".join(
                    f" {pct_ms(r.hops[n], 0.5):13.1f} / {pct_ms(r.hops[n], 0.99):5.1f}".rjust(28)
                    for n in names
                )
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
