"""SDP offer/answer for WHIP and WHEP, with every client mistake mapped to a clear 400.

aiortc parses almost anything without complaint ("hello" is a valid
description with no media), so an offer is checked here for what the
protocol needs before a peer connection sees it: a video section in a
direction that fits (WHIP clients send, WHEP clients receive). Codecs are
negotiated by aiortc in the offer's order, so the client's
``setCodecPreferences`` picks H.264 (constrained baseline) or VP8.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription, sdp
from aiortc.exceptions import OperationError

from api.webrtc.sessions import Kind, WebRTCSettings

#: offer bodies above this are refused (a real offer is a few KiB)
MAX_OFFER_BYTES = 64 * 1024

#: directions of the client's video section that each endpoint accepts
_WANTED = {"whip": ("sendonly", "sendrecv"), "whep": ("recvonly", "sendrecv")}


class BadOffer(Exception):
    """The offer cannot be answered; ``code`` is the error code for the 400 body."""

    def __init__(self, message: str, code: str = "WEBRTC/BAD_SDP") -> None:
        super().__init__(message)
        self.message, self.code = message, code


def ice_server(entry: str | Mapping[str, Any]) -> RTCIceServer:
    if isinstance(entry, str):
        return RTCIceServer(urls=entry)
    return RTCIceServer(
        urls=entry["urls"], username=entry.get("username"), credential=entry.get("credential")
    )


def peer_connection(settings: WebRTCSettings) -> RTCPeerConnection:
    """A peer connection with exactly the configured ICE servers.

    Passing an explicit (possibly empty) list matters: with none, aiortc
    falls back to Google's public STUN server, which costs a round trip to
    the internet (or a timeout offline) on every offer.
    """
    return RTCPeerConnection(RTCConfiguration(iceServers=[ice_server(e) for e in settings.ice_servers]))


def link_header(ice_servers: Iterable[str | Mapping[str, Any]]) -> str | None:
    """RFC 9725 ``Link: <url>; rel="ice-server"`` entries, or None when there are none."""
    links = []
    for entry in ice_servers:
        server = ice_server(entry)
        urls = [server.urls] if isinstance(server.urls, str) else list(server.urls)
        for url in urls:
            link = f'<{url}>; rel="ice-server"'
            if server.username and server.credential:
                link += (
                    f'; username="{server.username}"; credential="{server.credential}"'
                    '; credential-type="password"'
                )
            links.append(link)
    return ", ".join(links) or None


def check_offer(text: str, kind: Kind) -> None:
    """Raise ``BadOffer`` unless ``text`` has a video section a ``kind`` endpoint can answer."""
    if not text.strip():
        raise BadOffer("empty SDP offer")
    if not text.lstrip().startswith("v=0"):
        raise BadOffer("not an SDP offer (it must start with 'v=0')")
    try:
        description = sdp.SessionDescription.parse(text)
    except Exception as exc:  # noqa: BLE001 - aiortc's parser raises whatever its split/int calls raise
        raise BadOffer(f"invalid SDP offer: {exc}") from None
    videos = [m for m in description.media if m.kind == "video"]
    if not videos:
        raise BadOffer("the offer has no video section", "WEBRTC/NO_VIDEO")
    if not any(m.direction in _WANTED[kind] for m in videos):
        verb = "send" if kind == "whip" else "receive"
        raise BadOffer(
            f"the offer's video must {verb} ({' or '.join(_WANTED[kind])}); got {videos[0].direction}",
            "WEBRTC/BAD_DIRECTION",
        )
    if any(m.kind not in ("audio", "video", "application") for m in description.media):
        raise BadOffer("the offer has an unsupported media section")


async def accept_offer(pc: RTCPeerConnection, text: str, kind: Kind) -> None:
    """Check and apply the client's offer to ``pc``."""
    check_offer(text, kind)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="offer"))
    except OperationError as exc:
        raise BadOffer(
            f"no codec in common: video must be H.264 (constrained baseline, "
            f"packetization-mode 1) or VP8 ({exc})",
            "WEBRTC/UNSUPPORTED_CODEC",
        ) from None
    except Exception as exc:  # noqa: BLE001 - a malformed line fails in aiortc's parsing code
        raise BadOffer(f"invalid SDP offer: {exc}") from None


async def answer(pc: RTCPeerConnection) -> str:
    """Create and apply our answer; aiortc gathers all candidates before returning it."""
    await pc.setLocalDescription(await pc.createAnswer())
    return pc.localDescription.sdp
