"""Trickle ICE for WHIP and WHEP sessions (RFC 9725 section 4.3): candidates sent after the offer.

A client PATCHes an ``application/trickle-ice-sdpfrag`` body (RFC 8840)
with its ICE credentials, ``m=``/``a=mid:`` lines and ``a=candidate:``
lines, maybe ``a=end-of-candidates``. :func:`parse_sdpfrag` is pure;
:func:`add_candidates` hands the result to the session's peer connection.
A fragment with other ICE credentials than the offer's asks for an ICE
restart, which we do not support (405, as the RFC allows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiortc import RTCIceCandidate, RTCPeerConnection
from aiortc.sdp import candidate_from_sdp

MEDIA_TYPE = "application/trickle-ice-sdpfrag"


class BadFragment(ValueError):
    """The body is not a usable SDP fragment; the message says why."""


@dataclass
class Fragment:
    ufrag: str | None = None
    pwd: str | None = None
    #: (mid, candidate line after ``a=candidate:``)
    candidates: list[tuple[str | None, str]] = field(default_factory=list)
    end_of_candidates: bool = False


def parse_sdpfrag(text: str) -> Fragment:
    fragment, mid = Fragment(), None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("a=ice-ufrag:"):
            fragment.ufrag = line.removeprefix("a=ice-ufrag:")
        elif line.startswith("a=ice-pwd:"):
            fragment.pwd = line.removeprefix("a=ice-pwd:")
        elif line.startswith("m="):
            mid = None
        elif line.startswith("a=mid:"):
            mid = line.removeprefix("a=mid:")
        elif line.startswith("a=candidate:"):
            fragment.candidates.append((mid, line.removeprefix("a=candidate:")))
        elif line == "a=end-of-candidates":
            fragment.end_of_candidates = True
    return fragment


def remote_ufrag(pc: RTCPeerConnection) -> str | None:
    description = pc.remoteDescription
    if description is None:
        return None
    for line in description.sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            return line.removeprefix("a=ice-ufrag:").strip()
    return None


def is_restart(pc: RTCPeerConnection, fragment: Fragment) -> bool:
    return fragment.ufrag is not None and fragment.ufrag != remote_ufrag(pc)


async def add_candidates(pc: RTCPeerConnection, fragment: Fragment) -> int:
    """Give the fragment's candidates to ``pc``; returns how many. With BUNDLE every candidate
    belongs to the one transport of the first media section, whatever mid it names."""
    transceivers = pc.getTransceivers()
    if not transceivers:
        raise BadFragment("the session has no media to add candidates to")
    first = transceivers[0].mid
    for _mid, line in fragment.candidates:
        try:
            candidate = candidate_from_sdp(line)
        except (ValueError, IndexError) as exc:
            raise BadFragment(f"not an ICE candidate: {line[:80]!r} ({exc})") from None
        candidate.sdpMid = first
        await _add(pc, candidate)
    if fragment.end_of_candidates:
        await _add(pc, None)
    return len(fragment.candidates)


async def _add(pc: RTCPeerConnection, candidate: RTCIceCandidate | None) -> None:
    try:
        await pc.addIceCandidate(candidate)
    except ValueError as exc:  # after end-of-candidates (the offer may have said so already)
        if candidate is not None:
            raise BadFragment(str(exc)) from None
