"""WHIP ingest (RFC 9725): a publisher's WebRTC video becomes the stream's input frames.

One publisher per stream: a new WHIP session replaces the previous one
(closing it) rather than being refused with 409, so a client that
reconnects after a network change is not locked out until its old session
times out. A session that delivers no video within
``first_frame_timeout`` seconds is closed, as Daydream does.
"""

from __future__ import annotations

import asyncio
import logging
import time

import av
from aiortc.mediastreams import MediaStreamError

from api.streams.manager import Stream
from api.webrtc.sessions import Session, SessionRegistry, WebRTCSettings, close_all
from api.webrtc.signaling import BadOffer, accept_offer, answer, peer_connection
from api.webrtc.tracks import LatestFrame, discard
from media.codec import encode_image
from media.fit import FitMode, plan
from relay.hub import Hub
from relay.local import LocalSession
from wire.messages import Receive, Role

log = logging.getLogger("api.webrtc")


async def open_whip(
    hub: Hub, registry: SessionRegistry, settings: WebRTCSettings, stream: Stream, offer: str
) -> tuple[Session, str]:
    """Answer ``offer`` and start ingesting; returns the session and the SDP answer.

    Raises ``signaling.BadOffer`` for offers we cannot answer; the peer
    connection is closed then.
    """
    pc = peer_connection(settings)
    try:
        await accept_offer(pc, offer, "whip")
        video = next((t for t in pc.getTransceivers() if t.kind == "video" and t.receiver.track), None)
        if video is None:
            raise BadOffer("the offer has no video to receive", "WEBRTC/NO_VIDEO")
        sdp_answer = await answer(pc)
    except BaseException:
        await pc.close()
        raise
    session = Session("whip", stream, pc)
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio" and transceiver.receiver.track is not None:
            session.spawn(discard(transceiver.receiver.track), "audio")

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState in ("failed", "closed"):
            session.close_soon(f"connection {pc.connectionState}")

    previous = registry.for_stream(stream.id, "whip")
    registry.add(session)
    publisher = LocalSession(hub, stream.channel, Role.PRODUCER, Receive.NONE)
    session.cleanups.append(publisher.close)
    first_frame = asyncio.Event()
    session.spawn(_ingest(session, LatestFrame(video.receiver.track), publisher, first_frame), "ingest")
    session.spawn(_watchdog(session, first_frame, settings.first_frame_timeout), "watchdog")
    await close_all(previous, "replaced by a new publisher")
    return session, sdp_answer


async def _ingest(
    session: Session, frames: LatestFrame, publisher: LocalSession, first_frame: asyncio.Event
) -> None:
    """Newest decoded frame -> stream-sized JPEG (in a thread) -> the channel, until the track ends."""
    stream = session.stream
    try:
        while True:
            frame = await frames.get()
            if not first_frame.is_set():
                session.first_frame_at = time.monotonic()
                first_frame.set()
            size = (stream.width, stream.height)  # read per frame: a PATCH may resize or change the fit
            payload = await asyncio.to_thread(fitted_jpeg, frame, size, stream.fit)
            publisher.publish(payload)  # the hub reads its format and size
    except MediaStreamError:
        session.close_soon("publisher's video ended")
    finally:
        await frames.close()


def fitted_jpeg(frame: av.VideoFrame, size: tuple[int, int], fit: FitMode) -> bytes:
    """``frame`` at the stream's ``size`` (cropped or padded, :mod:`media.fit`) as a JPEG.

    One swscale call converts YUV to RGB and scales; the crop or the bars are
    array slicing. Runs in a thread.
    """
    how = plan((frame.width, frame.height), size, fit)
    rgb = frame.to_ndarray(format="rgb24", width=how.scaled[0], height=how.scaled[1])
    return encode_image(how.place(rgb))


async def _watchdog(session: Session, first_frame: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(first_frame.wait(), timeout)
    except TimeoutError:
        session.close_soon(f"no video within {timeout:g} s")
