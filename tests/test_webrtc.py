"""WHIP in, WHEP out, with real aiortc peers on loopback, real HTTP and a real filter worker.

The stream's prompt "negative" makes the filter engine invert colours, so
what the WHEP viewer sees must be the inverse of what the WHIP publisher
sends, at the stream's size.
"""

from __future__ import annotations

import asyncio
import time

import av
import httpx
import numpy as np
import pytest
from aiortc import (
    AudioStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RTCP_PSFB_PLI, RtcpPsfbPacket

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from api.webrtc import WebRTCSettings
from api.webrtc.fanout import MAX_BACKLOG, PacketTrack, SharedEncoder, VideoEncoder
from api.webrtc.signaling import link_header
from relay import RelayConfig
from relay.hub import Hub
from relay.local import LocalProducer
from tests.api_fixtures import AUTH, KEY, api, create_stream, eventually, worker  # noqa: F401
from tests.helpers import EchoWorker, jpeg, server_config

SDP = {"Content-Type": "application/sdp"}
BACKGROUND = (200, 60, 30)
WIDTH, HEIGHT = 384, 448  # the stream's size; the publisher sends 320x240


class PatternTrack(VideoStreamTrack):
    """A flat colour with a small white square sliding across: moving, with a known mean colour."""

    def __init__(self, width: int = 320, height: int = 240) -> None:
        super().__init__()
        self.width, self.height = width, height
        self.count = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()  # paces the source at 30 fps
        rgb = np.empty((self.height, self.width, 3), np.uint8)
        rgb[:] = BACKGROUND
        x = (self.count * 4) % (self.width - 16)
        rgb[self.height // 2 - 8 : self.height // 2 + 8, x : x + 16] = 255
        self.count += 1
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


class SilentTrack(VideoStreamTrack):
    """A video track that never produces a frame."""

    async def recv(self) -> av.VideoFrame:
        await asyncio.Future()
        raise AssertionError("unreachable")


def prefer(transceiver: RTCRtpTransceiver, mime: str) -> None:
    codecs = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType in (mime, "video/rtx")])


def peer() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only


async def offer(pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription.sdp


async def publish(
    client: httpx.AsyncClient,
    url: str,
    track: VideoStreamTrack,
    codec: str = "video/VP8",
    audio: bool = False,
) -> tuple[RTCPeerConnection, httpx.Response]:
    pc = peer()
    if audio:  # as OBS and browsers send: audio first, then video
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    prefer(pc.addTransceiver(track, direction="sendonly"), codec)
    response = await client.post(url, content=await offer(pc), headers=SDP)
    assert response.status_code == 201, response.text
    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    return pc, response


async def play(
    client: httpx.AsyncClient, url: str, codec: str = "video/VP8"
) -> tuple[RTCPeerConnection, RTCRtpTransceiver, httpx.Response]:
    pc = peer()
    transceiver = pc.addTransceiver("video", direction="recvonly")
    prefer(transceiver, codec)
    response = await client.post(url, content=await offer(pc), headers=SDP)
    assert response.status_code == 201, response.text
    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    return pc, transceiver, response


def registry(client: httpx.AsyncClient):
    return services(client.app).webrtc.registry


@pytest.mark.parametrize("codec", ["video/H264", "video/VP8"])
async def test_whip_in_whep_out_inverted(api, worker, codec):
    stream = await create_stream(api, width=WIDTH, height=HEIGHT)
    whep_pc, transceiver, whep = await play(api, stream["output_stream_url"], codec)
    started = time.perf_counter()
    whip_pc, whip = await publish(api, stream["whip_url"], PatternTrack(), codec)
    post_ms = (time.perf_counter() - started) * 1000
    try:
        name = codec.split("/")[1]
        for response, direction in ((whip, "recvonly"), (whep, "sendonly")):
            assert response.headers["content-type"] == "application/sdp"
            assert response.headers["etag"]
            assert f"a={direction}" in response.text and f"{name}/90000" in response.text
            other = "VP8" if name == "H264" else "H264"
            assert f"{other}/90000" not in response.text
            assert "a=candidate:" in response.text  # all candidates, no trickle
        assert whip.headers["location"].startswith(stream["whip_url"] + "/")
        assert whep.headers["location"].startswith(stream["output_stream_url"] + "/")
        assert whip.headers["livepeer-playback-url"] == stream["output_stream_url"]
        exposed = whip.headers["access-control-expose-headers"]
        assert all(h in exposed for h in ("Location", "ETag", "Link", "Livepeer-Playback-URL"))
        assert "link" not in whip.headers  # no ICE servers configured

        track = transceiver.receiver.track
        first = await asyncio.wait_for(track.recv(), 15)
        first_ms = (time.perf_counter() - started) * 1000
        frames = [first] + [await asyncio.wait_for(track.recv(), 5) for _ in range(5)]
        for frame in frames:
            assert (frame.width, frame.height) == (WIDTH, HEIGHT)
        mean = frames[-1].to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)
        expected = 255 - np.array(BACKGROUND)
        assert np.all(np.abs(mean - expected) < 25), (mean, expected)
        print(
            f"\n{codec}: WHIP POST->201 {post_ms:.0f} ms, first WHEP frame {first_ms:.0f} ms "
            f"after the WHIP POST"
        )

        sessions = registry(api).for_stream(stream["id"])
        assert sorted(s.kind for s in sessions) == ["whep", "whip"]
        deleted = await api.delete(whip.headers["location"])
        assert deleted.status_code == 200
        assert [s.kind for s in registry(api).for_stream(stream["id"])] == ["whep"]
        assert (await api.delete(whip.headers["location"])).status_code == 200  # ended: DELETE is idempotent
        channel = services(api.app).relay.hub.channels[stream["id"]]
        assert not channel.producers
        assert (await api.delete(whep.headers["location"])).status_code == 200
        assert registry(api).sessions == {} and not channel.viewers
    finally:
        await whip_pc.close()
        await whep_pc.close()


async def mean_colour(track, frames: int = 4) -> np.ndarray:
    """The mean RGB of the last of ``frames`` frames received on ``track``."""
    for _ in range(frames):
        frame = await asyncio.wait_for(track.recv(), 15)
    return frame.to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)


async def test_viewers_share_one_encoder_per_codec(api, worker):
    stream = await create_stream(api, width=WIDTH, height=HEIGHT)
    channel = stream["id"]
    whip_pc, _ = await publish(api, stream["whip_url"], PatternTrack())
    viewers = [
        await play(api, stream["output_stream_url"], codec)
        for codec in ("video/VP8", "video/VP8", "video/H264")
    ]
    encoders = services(api.app).webrtc.encoders
    try:
        for _pc, transceiver, _response in viewers:
            assert np.all(
                np.abs(await mean_colour(transceiver.receiver.track) - (255 - np.array(BACKGROUND))) < 25
            )
        assert len(encoders) == 2  # VP8 and H.264, each encoding every frame once
        assert len(services(api.app).relay.hub.channels[channel].viewers) == 2  # one relay viewer per encoder
        vp8 = encoders.get(services(api.app).relay.hub, channel, "video/VP8")
        assert vp8.viewers == 2
        whep = (await api.get(f"/v1/streams/{channel}/status")).json()["data"]["gateway_status"]["outputs"][
            "whep"
        ]
        assert whep["viewers"] == 3
        assert sorted((e["codec"], e["viewers"]) for e in whep["shared_encoders"]) == [
            ("video/H264", 1),
            ("video/VP8", 2),
        ]
        assert all(e["frames_encoded"] > 0 for e in whep["shared_encoders"])
        metrics = (await api.get("/metrics")).text
        assert f'sd_stream_webrtc_sessions{{kind="whep",stream="{channel}"}} 3.0' in metrics
        assert f'sd_stream_webrtc_sessions{{kind="whip",stream="{channel}"}} 1.0' in metrics
        assert "sd_whep_shared_encoders 2.0" in metrics

        # A picture loss report from a viewer reaches the shared encoder through aiortc's RTCP handling.
        await eventually(lambda: not vp8.keyframe_requested, 5, "the joins' keyframe to go out")
        viewer_session = registry(api).get(viewers[0][2].headers["location"].rsplit("/", 1)[1], "whep")
        sender = viewer_session.pc.getSenders()[0]
        await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=sender._ssrc))
        assert vp8.keyframe_requested

        for index, (pc, _transceiver, response) in enumerate(viewers):
            assert (await api.delete(response.headers["location"])).status_code == 200
            await pc.close()
            assert len(encoders) == [2, 1, 0][index]  # an encoder goes with its last viewer
        assert not services(api.app).relay.hub.channels[channel].viewers
    finally:
        await whip_pc.close()
        for pc, _transceiver, _response in viewers:
            await pc.close()


async def test_one_encoder_per_viewer_when_sharing_is_off(api, worker):
    services(api.app).webrtc.encoders = None
    stream = await create_stream(api, width=WIDTH, height=HEIGHT)
    whip_pc, _ = await publish(api, stream["whip_url"], PatternTrack())
    viewers = [await play(api, stream["output_stream_url"]) for _ in range(2)]
    try:
        for _pc, transceiver, _response in viewers:
            assert np.all(
                np.abs(await mean_colour(transceiver.receiver.track) - (255 - np.array(BACKGROUND))) < 25
            )
        assert len(services(api.app).relay.hub.channels[stream["id"]].viewers) == 2
    finally:
        for pc in (whip_pc, *(v[0] for v in viewers)):
            await pc.close()


async def test_a_viewer_starts_at_a_keyframe_and_skips_ahead_when_behind():
    hub = Hub(RelayConfig())
    shared = SharedEncoder(hub, "ch", "video/VP8", 500_000, on_idle=lambda encoder: None)
    encoder = VideoEncoder("video/VP8", 500_000)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(12)]
    key, *deltas = [encoder.encode(image, 3000 * i, keyframe=i in (0, 10)) for i, image in enumerate(images)]
    assert key.keyframe and not deltas[0].keyframe and deltas[9].keyframe
    track = PacketTrack()
    track.attach(shared)
    shared._keyframe = False
    track.deliver(deltas[0])  # before any keyframe: useless to a decoder
    track.deliver(key)
    for delta in deltas[1 : MAX_BACKLOG + 1]:  # one more than the backlog holds
        track.deliver(delta)
    assert track.resyncs == 1 and shared.keyframe_requested
    track.deliver(deltas[6])  # still waiting for a keyframe
    track.deliver(deltas[9])  # the keyframe
    track.deliver(deltas[10])
    assert [(await track.recv()).pts for _ in range(2)] == [30000, 33000]
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()
    shared.close()


async def test_an_undecodable_output_frame_is_skipped_not_fatal(api, caplog):
    """A worker's bad frame (a JPEG header with no image data) must not end playback for every viewer."""
    hub = services(api.app).relay.hub
    stream = await create_stream(api)
    echo = await EchoWorker(services(api.app).relay_url, services(api.app).relay_token).start()
    serving = asyncio.create_task(echo.serve())
    shared = SharedEncoder(hub, stream["id"], "video/VP8", 500_000, on_idle=lambda encoder: None)
    track = PacketTrack()
    track.attach(shared)
    producer = LocalProducer(hub, stream["id"])
    good = jpeg(64, 64)
    bad = good[: good.index(b"\xff\xda")] + b"\xff\xd9"
    try:
        producer.publish(good, 64, 64)
        await asyncio.wait_for(track.recv(), 10)
        producer.publish(bad, 64, 64)
        await eventually(lambda: "event=whep_bad_frame" in caplog.text, 10, "the bad frame to be skipped")
        producer.publish(good, 64, 64)
        await asyncio.wait_for(track.recv(), 10)
        assert shared.encoded == 2 and not shared._task.done()
    finally:
        track.stop()
        producer.close()
        serving.cancel()
        await echo.ws.close()


@pytest.mark.parametrize("mime", ["video/VP8", "video/H264"])
def test_the_encoder_takes_odd_sizes_and_restarts_on_a_new_size(mime):
    encoder = VideoEncoder(mime, 500_000)
    first = encoder.encode(np.zeros((99, 101, 3), np.uint8), 0, keyframe=False)
    assert first.keyframe  # a new encoder starts with one
    assert not encoder.encode(np.zeros((99, 101, 3), np.uint8), 3000, keyframe=False).keyframe
    assert encoder.encode(np.zeros((64, 64, 3), np.uint8), 6000, keyframe=False).keyframe


async def test_signalling_errors(api):
    stream = await create_stream(api)
    whip, whep = stream["whip_url"], stream["output_stream_url"]
    wrong_type = await api.post(whip, content="v=0\r\n", headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    assert wrong_type.json()["code"] == "REQUEST/UNSUPPORTED_MEDIA_TYPE"
    assert wrong_type.headers["accept-post"] == "application/sdp"
    assert (
        await api.post(whep, content="v=0\r\n", headers={"Content-Type": "text/plain"})
    ).status_code == 415

    unknown = await api.post(whip.replace(stream["stream_key"], "stk_nope"), content="v=0", headers=SDP)
    assert unknown.status_code == 404 and unknown.json()["success"] is False
    assert (
        await api.post(whep.replace(stream["output_playback_id"], "nope"), content="v=0", headers=SDP)
    ).status_code == 404

    for body in ("garbage", "", "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"):
        bad = await api.post(whip, content=body, headers=SDP)
        assert bad.status_code == 400, body
        assert bad.json()["status"] == 400 and bad.json()["error"]

    pc = peer()
    pc.addTransceiver("video", direction="recvonly")  # a viewer's offer sent to WHIP
    wrong_direction = await api.post(whip, content=await offer(pc), headers=SDP)
    assert wrong_direction.status_code == 400
    assert wrong_direction.json()["code"] == "WEBRTC/BAD_DIRECTION"
    await pc.close()

    options = await api.options(whip)
    assert options.status_code == 204
    assert options.headers["accept-post"] == "application/sdp"
    assert options.headers["access-control-allow-origin"] == "*"
    assert "POST" in options.headers["access-control-allow-methods"]
    assert (await api.options(whep)).status_code == 204

    head = await api.head(whep)
    assert head.status_code == 200 and head.headers["content-type"] == "application/sdp"
    assert (await api.head(whep.replace(stream["output_playback_id"], "nope"))).status_code == 404
    assert (await api.delete(f"{whip}/not-a-session")).status_code == 404
    assert (await api.patch(f"{whep}/not-a-session", content="x")).status_code == 404
    assert registry(api).sessions == {}


async def test_patch_alias_and_replacement(api, worker):
    stream = await create_stream(api)
    # seed 003's alias, without any Authorization header: the stream key is the credential
    async with httpx.AsyncClient(base_url=str(api.base_url), timeout=15) as anonymous:
        first_pc, first = await publish(
            anonymous, f"/whip/{stream['stream_key']}", PatternTrack(), audio=True
        )
        assert "m=audio" in first.text and first.text.count("a=recvonly") == 2
        assert first.headers["location"].startswith(stream["whip_url"] + "/")
        patch = await anonymous.patch(
            first.headers["location"],
            content="a=end-of-candidates",
            headers={"Content-Type": "application/trickle-ice-sdpfrag"},
        )
        assert patch.status_code == 204  # a redundant end-of-candidates is harmless
        whep_pc, _transceiver, whep = await play(anonymous, stream["output_stream_url"])
        assert (await anonymous.patch(whep.headers["location"], content="x")).status_code == 415

        second_pc, second = await publish(anonymous, stream["whip_url"], PatternTrack())
        publishers = registry(api).for_stream(stream["id"], "whip")
        assert [s.id for s in publishers] == [second.headers["location"].rsplit("/", 1)[1]]
        channel = services(api.app).relay.hub.channels[stream["id"]]
        assert len(channel.producers) == 1 and len(channel.viewers) == 1

        deleted = await api.delete(f"/v1/streams/{stream['id']}")
        assert deleted.status_code == 200
        assert registry(api).sessions == {}
        assert stream["id"] not in services(api.app).relay.hub.channels
        for pc in (first_pc, whep_pc, second_pc):
            await pc.close()


async def test_session_without_video_is_closed(api):
    services(api.app).webrtc.settings = WebRTCSettings(first_frame_timeout=0.5)
    stream = await create_stream(api)
    pc, _response = await publish(api, stream["whip_url"], SilentTrack())
    try:
        assert len(registry(api).sessions) == 1
        await eventually(lambda: not registry(api).sessions, 5, "the silent session to close")
        assert not services(api.app).relay.hub.channels[stream["id"]].producers
    finally:
        await pc.close()


async def test_shutdown_closes_sessions():
    app = create_app(server_config(KEY))
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:
        stream = await create_stream(client)
        pc, _transceiver, _response = await play(client, stream["output_stream_url"])
        assert len(services(app).webrtc.registry.sessions) == 1
    assert services(app).webrtc.registry.sessions == {}
    await pc.close()


def test_link_header_lists_ice_servers():
    assert link_header([]) is None
    link = link_header(
        [
            "stun:stun.example.net:3478",
            {"urls": ["turn:turn.example.net?transport=udp"], "username": "u", "credential": "p"},
        ]
    )
    assert link == (
        '<stun:stun.example.net:3478>; rel="ice-server", '
        '<turn:turn.example.net?transport=udp>; rel="ice-server"; username="u"; '
        'credential="p"; credential-type="password"'
    )


def _without_candidates(sdp: str) -> tuple[str, str]:
    """The offer as a trickling client sends it first, and the fragment it PATCHes after (RFC 8840)."""
    lines = sdp.splitlines()
    keep = [line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates"))]
    ufrag = next(line for line in lines if line.startswith("a=ice-ufrag:"))
    pwd = next(line for line in lines if line.startswith("a=ice-pwd:"))
    mid = next(line for line in lines if line.startswith("a=mid:"))
    candidates = [line for line in lines if line.startswith("a=candidate:")]
    fragment = [ufrag, pwd, "m=video 9 UDP/TLS/RTP/SAVPF 0", mid, *candidates, "a=end-of-candidates"]
    return "\r\n".join(keep) + "\r\n", "\r\n".join(fragment) + "\r\n"


@pytest.mark.parametrize("kind", ["whip", "whep"])
async def test_trickle_ice_connects_with_candidates_sent_after_the_offer(api, worker, kind):
    stream = await create_stream(api)
    pc = peer()
    if kind == "whip":
        pc.addTransceiver(PatternTrack(), direction="sendonly")
        url = stream["whip_url"]
    else:
        pc.addTransceiver("video", direction="recvonly")
        url = stream["output_stream_url"]
    offer_sdp, fragment = _without_candidates(await offer(pc))
    assert "a=candidate:" not in offer_sdp
    response = await api.post(url, content=offer_sdp, headers=SDP)
    assert response.status_code == 201, response.text
    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    location, etag = response.headers["location"], response.headers["etag"]
    frag = {"Content-Type": "application/trickle-ice-sdpfrag"}
    try:
        stale = await api.patch(location, content=fragment, headers={**frag, "If-Match": '"other"'})
        assert stale.status_code == 412
        assert (await api.patch(location, content=fragment, headers=SDP)).status_code == 415
        restart = fragment.replace("a=ice-ufrag:", "a=ice-ufrag:new")
        assert (
            await api.patch(location, content=restart, headers={**frag, "If-Match": etag})
        ).status_code == 405
        added = await api.patch(location, content=fragment, headers={**frag, "If-Match": etag})
        assert added.status_code == 204, added.text
        await eventually(lambda: pc.connectionState == "connected", 20)
    finally:
        await pc.close()
    await eventually(lambda: not registry(api).sessions, 20)  # the server saw the peer go
    assert (await api.delete(location)).status_code == 200  # a late DELETE still succeeds
    assert (await api.delete(location.rsplit("/", 1)[0] + "/other-session")).status_code == 404
