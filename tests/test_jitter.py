"""aiortc's jitter buffer, patched: a video frame completes on its marker packet."""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from api.webrtc.jitter import complete_frames_on_marker


def packet(seq: int, timestamp: int, marker: bool, data: bytes) -> RtpPacket:
    p = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq, timestamp=timestamp)
    p._data = data  # what aiortc's depacketiser leaves for the jitter buffer
    return p


def test_video_frame_completes_on_its_marker_packet():
    assert complete_frames_on_marker()
    buffer = JitterBuffer(capacity=128, is_video=True)
    assert buffer.add(packet(10, 3000, False, b"ab"))[1] is None
    frame = buffer.add(packet(11, 3000, True, b"cd"))[1]
    assert frame is not None and (frame.data, frame.timestamp) == (b"abcd", 3000)
    # the next frame, with a packet missing in the middle, waits for it
    assert buffer.add(packet(12, 6000, False, b"ef"))[1] is None
    assert buffer.add(packet(14, 6000, True, b"ij"))[1] is None
    frame = buffer.add(packet(13, 6000, False, b"gh"))[1]
    assert frame is not None and frame.data == b"efghij"


def test_frames_without_markers_still_complete_when_the_next_one_starts():
    complete_frames_on_marker()
    buffer = JitterBuffer(capacity=128, is_video=True)
    buffer.add(packet(1, 100, False, b"x"))
    frame = buffer.add(packet(2, 200, False, b"y"))[1]
    assert frame is not None and frame.data == b"x"


def test_audio_keeps_prefetch():
    complete_frames_on_marker()
    buffer = JitterBuffer(capacity=16, prefetch=4)
    frames = [buffer.add(packet(i, i * 160, True, bytes([i])))[1] for i in range(4)]
    assert frames == [None, None, None, None]  # aiortc's audio prefetch, markers ignored
