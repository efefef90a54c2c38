"""WHEP playback: a stream's output frames to any number of WebRTC viewers.

Each viewer gets its own relay viewer (latest frame wins) and its own
encoder, so one slow viewer never holds back another; the codec is the
first of H.264 / VP8 in the viewer's offer.
"""

from __future__ import annotations

import asyncio

from api.streams import Stream
from api.webrtc.sessions import Session, SessionRegistry, WebRTCSettings
from api.webrtc.signaling import BadOffer, accept_offer, answer, peer_connection
from api.webrtc.tracks import OutputTrack
from relay.hub import Hub
from relay.local import LocalViewer


async def open_whep(hub: Hub, registry: SessionRegistry, settings: WebRTCSettings,
                    stream: Stream, offer: str) -> tuple[Session, str]:
    """Answer ``offer`` with the stream's output as a send-only video track."""
    pc = peer_connection(settings)
    viewer: LocalViewer | None = None
    try:
        await accept_offer(pc, offer, "whep")
        video = next((t for t in pc.getTransceivers() if t.kind == "video"), None)
        if video is None:
            raise BadOffer("the offer has no video to send", "WEBRTC/NO_VIDEO")
        viewer = LocalViewer(hub, stream.channel)
        track = OutputTrack(viewer)
        pc.addTrack(track)
        video.direction = "sendonly"  # even for a sendrecv offer: we never take the viewer's video
        sdp_answer = await answer(pc)
    except BaseException:
        if viewer is not None:
            viewer.close()
        await pc.close()
        raise
    session = Session("whep", stream, pc)
    session.cleanups.append(track.stop)  # stops the track and leaves the channel
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


async def _connect_watchdog(session: Session, connected: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(connected.wait(), timeout)
    except TimeoutError:
        session.close_soon(f"not connected within {timeout:g} s")
