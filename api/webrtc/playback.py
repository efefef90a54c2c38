"""WHEP playback: a stream's output frames to any number of WebRTC viewers.

The codec is the first of H.264 / VP8 in the viewer's offer. By default
viewers of a stream share one encoder per codec (``fanout.py``); with
``WebRTCSettings.shared_encoding`` off each viewer gets its own relay viewer
(latest frame wins) and its own encoder, which adapts its bitrate to that
viewer's network at the cost of one encode per viewer and frame.
"""

from __future__ import annotations

import asyncio

from aiortc import RTCPeerConnection, sdp

from api.streams.manager import Stream
from api.webrtc.fanout import EncoderPool, PacketTrack, forward_keyframe_requests
from api.webrtc.sessions import Session, SessionRegistry, WebRTCSettings
from api.webrtc.signaling import BadOffer, accept_offer, answer, peer_connection
from api.webrtc.tracks import OutputTrack
from relay.hub import Hub
from relay.local import LocalViewer


async def open_whep(
    hub: Hub,
    registry: SessionRegistry,
    settings: WebRTCSettings,
    stream: Stream,
    offer: str,
    encoders: EncoderPool | None = None,
) -> tuple[Session, str]:
    """Answer ``offer`` with the stream's output as a send-only video track.

    With ``encoders`` the track carries the stream's shared encoder's packets.
    """
    pc = peer_connection(settings)
    track: OutputTrack | PacketTrack | None = None
    try:
        await accept_offer(pc, offer, "whep")
        video = next((t for t in pc.getTransceivers() if t.kind == "video"), None)
        if video is None:
            raise BadOffer("the offer has no video to send", "WEBRTC/NO_VIDEO")
        track = PacketTrack() if encoders is not None else OutputTrack(LocalViewer(hub, stream.channel))
        sender = pc.addTrack(track)
        video.direction = "sendonly"  # even for a sendrecv offer: we never take the viewer's video
        sdp_answer = await answer(pc)
        if isinstance(track, PacketTrack):
            forward_keyframe_requests(sender, track)
            track.attach(encoders.get(hub, stream.channel, _video_codec(pc)))
    except BaseException:
        if track is not None:
            track.stop()
        await pc.close()
        raise
    session = Session("whep", stream, pc)
    session.cleanups.append(track.stop)  # stops the track and leaves the channel or the shared encoder
    connected = asyncio.Event()

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState == "connected":
            connected.set()
        elif pc.connectionState in ("failed", "closed"):
            session.close_soon(f"connection {pc.connectionState}")

    registry.add(session)
    session.spawn(_connect_watchdog(session, connected, settings.connect_timeout), "watchdog")
    return session, sdp_answer


def _video_codec(pc: RTCPeerConnection) -> str:
    """The codec our answer chose for video: the first one of its video section."""
    description = sdp.SessionDescription.parse(pc.localDescription.sdp)
    return next(m for m in description.media if m.kind == "video").rtp.codecs[0].mimeType


async def _connect_watchdog(session: Session, connected: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(connected.wait(), timeout)
    except TimeoutError:
        session.close_soon(f"not connected within {timeout:g} s")
