"""OBS's WHIP output, as OBS sends it: one server URL, the stream key as a Bearer token.

OBS (Settings, Stream, Service "WHIP") takes a Server URL and a Bearer
Token and POSTs an offer with Opus audio then H.264 video. Here an aiortc
client shaped like that publishes to ``POST /whip`` with a stream's key, on
the real server command, for a stream created before the server restarted
with the same data dir; a WHEP viewer must then see the stream's output.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import numpy as np
from aiortc import AudioStreamTrack, RTCSessionDescription

from tests.helpers import start_server, stop_server
from tests.test_webrtc import BACKGROUND, PatternTrack, offer, peer, play, prefer

KEY = "obs-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SDP = "application/sdp"


async def run_server(data_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    process, text = await start_server("--api-key", KEY, "--engine", "filter", data_dir=data_dir)
    return process, re.search(r"api ready at (http://\S+)", text).group(1)


async def obs_publish(url: str, bearer: str | None):
    """Opus then H.264, like OBS; the Bearer token in ``Authorization``. The peer and the response."""
    pc = peer()
    pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    prefer(pc.addTransceiver(PatternTrack(), direction="sendonly"), "video/H264")
    sdp = await offer(pc)
    assert "opus/48000" in sdp and "H264/90000" in sdp
    headers = {"Content-Type": SDP} | ({"Authorization": f"Bearer {bearer}"} if bearer else {})
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(f"{url}/whip", content=sdp, headers=headers)
    if response.status_code == 201:
        await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    return pc, response


async def test_obs_publishes_with_its_stream_key_to_the_stable_url_after_a_restart(tmp_path):
    process, url = await run_server(tmp_path)
    try:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as api:
            created = await api.post(
                "/v1/streams",
                json={"pipeline": "streamdiffusion", "params": {"prompt": "photo negative"}},
            )
            stream = created.json()
    finally:
        assert await stop_server(process) == 0

    process, url = await run_server(tmp_path)  # same data dir: the stream and its key are back
    whip_pc = whep_pc = None
    try:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as api:
            again = (await api.get(f"/v1/streams/{stream['id']}")).json()
            assert again["stream_key"] == stream["stream_key"]

            preflight = await api.options("/whip")
            assert (
                preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
            )
            assert "Authorization" in preflight.headers["access-control-allow-headers"]

            for bearer, why in ((None, "send the stream key"), ("stk_notakey", "not the stream key")):
                pc, refused = await obs_publish(url, bearer)
                await pc.close()
                assert refused.status_code == 401 and why in refused.json()["error"]
                assert refused.headers["www-authenticate"] == "Bearer"

            whip_pc, response = await obs_publish(url, stream["stream_key"])
            assert response.status_code == 201, response.text
            assert response.headers["content-type"] == SDP
            assert "H264/90000" in response.text and "a=recvonly" in response.text
            location = response.headers["location"]
            assert location.startswith(again["whip_url"] + "/")  # the stream's own session URL
            assert response.headers["livepeer-playback-url"] == again["output_stream_url"]

            whep_pc, transceiver, _ = await play(api, again["output_stream_url"], "video/H264")
            track = transceiver.receiver.track
            frames = [await asyncio.wait_for(track.recv(), 30) for _ in range(4)]
            mean = frames[-1].to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)
            expected = 255 - np.array(BACKGROUND)  # the stream's own prompt, kept across the restart
            assert np.all(np.abs(mean - expected) < 25), (mean, expected)

            assert (await api.delete(location)).status_code == 200  # OBS stops: DELETE the Location
    finally:
        for pc in (whip_pc, whep_pc):
            if pc is not None:
                await pc.close()
        assert await stop_server(process) == 0
