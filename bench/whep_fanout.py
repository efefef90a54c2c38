"""WHEP fan-out: server CPU and delivered fps as viewers of one stream grow, shared encoder vs one per viewer.

``python -m api`` runs in its own process (filter engine, one local worker);
the bench feeds one 512x512 stream at 30 fps over the WebSocket ingest and
opens N aiortc WHEP viewers (VP8) in its own process. "server cpu" is the
API process alone (relay, HTTP, WebRTC and the encoders; the worker is a
separate process), measured from /proc over the window. The baseline is
``server.whep_shared_encoder: false`` (one JPEG decode and one VP8 encode per
viewer and frame), run in the same invocation.

Run: .venv/bin/python bench/whep_fanout.py [--viewers 1,2,4,8] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time

import benchutil  # noqa: F401  (puts the repository on sys.path)
import httpx
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from benchutil import ROOT, child_env, free_port, machine, natural_image
from websockets.asyncio.client import connect as ws_connect

from media.codec import encode_image

KEY = "bench-key"
FPS = 30


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_server(shared: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = child_env() | {"STREAMDIFFUSION_SERVER__WHEP_SHARED_ENCODER": "true" if shared else "false"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "api",
            "--port",
            str(port),
            "--relay-port",
            "0",
            "--api-key",
            KEY,
            "--workers",
            "1",
            "--engine",
            "filter",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base) as client:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/health")).json().get("workers"):  # up, with its worker joined
                    return server, base
            await asyncio.sleep(0.1)
    server.kill()
    raise RuntimeError("the server did not become healthy")


async def feed(base: str, stream_key: str, stop: asyncio.Event) -> None:
    """Send 30 fps of JPEG input over the WebSocket ingest; read and drop the results."""
    payloads = [encode_image(natural_image(512, 512, seed=i)) for i in range(8)]
    url = base.replace("http://", "ws://") + f"/live/video-to-video/{stream_key}/ws"
    async with ws_connect(url, compression=None, max_size=16 * 2**20) as ws:

        async def drain() -> None:
            async for _ in ws:
                pass

        reader = asyncio.create_task(drain())
        started, sent = time.monotonic(), 0
        while not stop.is_set():
            await ws.send(payloads[sent % len(payloads)])
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / FPS - time.monotonic()))
        reader.cancel()


class Viewer:
    """An aiortc WHEP viewer that counts decoded frames."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.frames = 0
        self.first = asyncio.Event()

    async def open(self, client: httpx.AsyncClient, url: str) -> None:
        transceiver = self.pc.addTransceiver("video", direction="recvonly")
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences([c for c in codecs if c.mimeType in ("video/VP8", "video/rtx")])
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await client.post(
            url, content=self.pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
        )
        response.raise_for_status()
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        self.task = asyncio.create_task(self._count(transceiver.receiver.track))

    async def _count(self, track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frames += 1
                self.first.set()

    async def close(self) -> None:
        self.task.cancel()
        await self.pc.close()


async def measure(shared: bool, viewers: int, seconds: float) -> dict:
    server, base = await start_server(shared)
    stop = asyncio.Event()
    try:
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        ) as client:
            response = await client.post(
                "/v1/streams", json={"pipeline": "streamdiffusion", "params": {"prompt": "photo negative"}}
            )
            stream = response.json()
            feeder = asyncio.create_task(feed(base, stream["stream_key"], stop))
            peers = [Viewer() for _ in range(viewers)]
            for peer in peers:
                await peer.open(client, stream["output_stream_url"])
            await asyncio.wait_for(asyncio.gather(*(p.first.wait() for p in peers)), 30)
            await asyncio.sleep(1.0)  # settle: encoders warm, jitter buffers filled
            counts, cpu, started = [p.frames for p in peers], cpu_seconds(server.pid), time.monotonic()
            await asyncio.sleep(seconds)
            elapsed = time.monotonic() - started
            fps = [(p.frames - c) / elapsed for p, c in zip(peers, counts, strict=True)]
            server_cpu = (cpu_seconds(server.pid) - cpu) / elapsed
            stop.set()
            await feeder
            for peer in peers:
                await peer.close()
    finally:
        server.terminate()
        server.wait(10)
    return {"fps_mean": sum(fps) / len(fps), "fps_min": min(fps), "cpu": server_cpu}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--viewers", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"stream: 512x512, {FPS} fps in over the WebSocket ingest, VP8 out, filter engine\n")
    print(
        f"{'encoding':<12} {'viewers':>7} {'server cpu':>10} {'cpu/viewer':>10} "
        f"{'fps mean':>8} {'fps min':>8}"
    )
    for count in (int(v) for v in args.viewers.split(",")):
        for shared in (True, False):
            row = await measure(shared, count, args.seconds)
            print(
                f"{'shared' if shared else 'per viewer':<12} {count:>7} {row['cpu']:>10.0%} "
                f"{row['cpu'] / count:>10.0%} {row['fps_mean']:>8.1f} {row['fps_min']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
