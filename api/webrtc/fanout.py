"""WHEP playback with one encoder per stream and codec, its packets fanned out to every viewer.

Encoding is the costly part of playback (libx264 about 5.6 ms and VP8 about
3.3 ms a 512x512 frame, plus a JPEG decode), so viewers of one stream share
it, the way an SFU forwards one encoded stream: each viewer's
:class:`PacketTrack` hands aiortc ready ``av.Packet`` objects, which its
sender only packetizes, with its own sequence numbers, so NACK
retransmission stays per viewer. Viewers give up per-viewer bitrate
adaptation: every one gets ``bitrate`` (``WebRTCSettings.shared_encoding``
turns this off for networks where that matters).

Encoded frames depend on earlier ones, so a viewer cannot skip frames the
way raw-frame playback does. A viewer starts at a keyframe (joining asks for
one); one that falls ``MAX_BACKLOG`` frames behind drops its backlog, asks
for a keyframe and resumes from it; any keyframe lets a lagging viewer jump
to the present. Picture-loss reports (PLI, FIR) from a viewer ask the
shared encoder for a keyframe too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCRtpSender
from aiortc.codecs.vpx import number_of_threads
from aiortc.mediastreams import MediaStreamError

from api.webrtc.tracks import VIDEO_TIME_BASE, MonotonicPts
from media.codec import decode_image
from relay.hub import Hub
from relay.local import LocalViewer
from wire.errors import ProtocolError

log = logging.getLogger("api.webrtc")

#: encoded frames a viewer may fall behind before it skips to the next keyframe
MAX_BACKLOG = 4
CODECS = {"video/VP8": "libvpx", "video/H264": "libx264"}


@dataclass(frozen=True)
class EncodedFrame:
    packet: av.Packet
    keyframe: bool


class VideoEncoder:
    """A PyAV encoder set up as aiortc's own for the codec, so the SDP answer aiortc wrote still fits.

    Not thread-safe: one ``encode`` at a time (the shared encoder's task awaits each).
    """

    def __init__(self, mime: str, bitrate: int) -> None:
        if mime not in CODECS:
            raise ValueError(f"no shared encoder for {mime}")
        self.mime, self.bitrate = mime, bitrate
        self._codec: av.VideoCodecContext | None = None

    def encode(self, rgb: np.ndarray, pts: int, keyframe: bool) -> EncodedFrame | None:
        height, width = rgb.shape[:2]
        rgb = rgb[: height - height % 2, : width - width % 2]  # 4:2:0 needs even sides
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
        if self._codec is None or (self._codec.width, self._codec.height) != (frame.width, frame.height):
            self._codec = self._open(frame.width, frame.height)
            keyframe = True
        frame.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        packets = self._codec.encode(frame)
        if not packets:
            return None
        packet = av.Packet(b"".join(bytes(p) for p in packets))
        packet.pts, packet.time_base = pts, VIDEO_TIME_BASE
        return EncodedFrame(packet, keyframe or any(p.is_keyframe for p in packets))

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        codec = av.CodecContext.create(CODECS[self.mime], "w")
        codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
        codec.bit_rate = self.bitrate
        codec.time_base = VIDEO_TIME_BASE
        codec.framerate = Fraction(30, 1)
        if self.mime == "video/H264":
            # aiortc's H.264 answer: constrained baseline, level 3.1, no B-frames, no delay
            codec.profile = "Baseline"
            codec.options = {"level": "31", "tune": "zerolatency"}
        else:
            # aiortc's VP8 realtime settings, constant bitrate
            codec.gop_size = 3000
            codec.qmin, codec.qmax = 2, 56
            codec.options = {
                "bufsize": str(self.bitrate),
                "minrate": str(self.bitrate),
                "maxrate": str(self.bitrate),
                "cpu-used": "-6",
                "deadline": "realtime",
                "lag-in-frames": "0",
                "noise-sensitivity": "4",
                "overshoot-pct": "15",
                "partitions": "0",
                "static-thresh": "1",
                "undershoot-pct": "100",
            }
            codec.thread_count = number_of_threads(width * height, multiprocessing.cpu_count())
        return codec


class PacketTrack(MediaStreamTrack):
    """A viewer's video track of shared, already encoded frames."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[av.Packet] = deque()
        self._ready = asyncio.Event()
        self._waiting_for_keyframe = True
        self._encoder: SharedEncoder | None = None
        self.resyncs = 0  # times this viewer fell behind and skipped to a keyframe

    def attach(self, encoder: SharedEncoder) -> None:
        self._encoder = encoder
        encoder.add(self)

    def request_keyframe(self) -> None:
        if self._encoder is not None:
            self._encoder.request_keyframe()

    def deliver(self, encoded: EncodedFrame) -> None:
        """Queue ``encoded`` for aiortc's sender, keeping the decoder's chain of frames intact."""
        if encoded.keyframe:
            self._queue.clear()  # nothing before a keyframe is needed any more
            self._waiting_for_keyframe = False
        elif self._waiting_for_keyframe:
            return
        elif len(self._queue) >= MAX_BACKLOG:
            self._queue.clear()
            self._waiting_for_keyframe = True
            self.resyncs += 1
            self.request_keyframe()
            return
        self._queue.append(encoded.packet)
        self._ready.set()

    async def recv(self) -> av.Packet:  # type: ignore[override]
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        return self._queue.popleft()

    def stop(self) -> None:
        super().stop()
        self._ready.set()
        if self._encoder is not None:
            self._encoder.remove(self)
            self._encoder = None


def forward_keyframe_requests(sender: RTCRtpSender, track: PacketTrack) -> None:
    """Route the viewer's PLI/FIR to the shared encoder.

    aiortc's sender answers them by flagging its own encoder, which a
    packet track never uses; it calls ``self._send_keyframe()`` (aiortc
    1.16), so the instance attribute takes over.
    """
    sender._send_keyframe = track.request_keyframe  # type: ignore[method-assign]


@dataclass(eq=False)
class SharedEncoder:
    """Reads a channel's output once, encodes each frame once, delivers it to every attached track."""

    hub: Hub
    channel: str
    mime: str
    bitrate: int
    on_idle: Callable[[SharedEncoder], None]
    encoded: int = 0
    _tracks: set[PacketTrack] = field(default_factory=set)
    _keyframe: bool = True

    def __post_init__(self) -> None:
        self._encoder = VideoEncoder(self.mime, self.bitrate)
        self._pts = MonotonicPts()
        self._viewer = LocalViewer(self.hub, self.channel)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"whep-encoder-{self.channel}")

    @property
    def viewers(self) -> int:
        return len(self._tracks)

    def add(self, track: PacketTrack) -> None:
        self._tracks.add(track)
        self.request_keyframe()  # the new viewer can start at the next frame

    def remove(self, track: PacketTrack) -> None:
        self._tracks.discard(track)
        if not self._tracks:
            self.close()

    def request_keyframe(self) -> None:
        self._keyframe = True

    @property
    def keyframe_requested(self) -> bool:
        """Whether the next frame will be encoded as a keyframe."""
        return self._keyframe

    def close(self) -> None:
        self._viewer.close()
        self._task.cancel()
        self.on_idle(self)

    async def _run(self) -> None:
        try:
            async for frame in self._viewer.frames():
                keyframe, self._keyframe = self._keyframe, False
                try:
                    encoded = await asyncio.to_thread(self._encode, frame.payload, self._pts.next(), keyframe)
                except ProtocolError as exc:  # an undecodable output frame: skip it, keep the stream
                    log.warning(
                        "event=whep_bad_frame channel=%s seq=%d error=%s", self.channel, frame.seq, exc
                    )
                    encoded = None
                if encoded is None:
                    self._keyframe |= keyframe
                    continue
                self.encoded += 1
                for track in list(self._tracks):
                    track.deliver(encoded)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=whep_encoder_failed channel=%s codec=%s", self.channel, self.mime)
            for track in list(self._tracks):
                track.stop()

    def _encode(self, payload: bytes, pts: int, keyframe: bool) -> EncodedFrame | None:
        return self._encoder.encode(decode_image(payload), pts, keyframe)


class EncoderPool:
    """The shared encoders in use, one per (channel, codec); each goes away with its last viewer."""

    def __init__(self, bitrate: int) -> None:
        self.bitrate = bitrate
        self._encoders: dict[tuple[str, str], SharedEncoder] = {}

    def get(self, hub: Hub, channel: str, mime: str) -> SharedEncoder:
        key = (channel, mime)
        if key not in self._encoders:
            self._encoders[key] = SharedEncoder(hub, channel, mime, self.bitrate, self._forget)
        return self._encoders[key]

    def __len__(self) -> int:
        return len(self._encoders)

    def for_channel(self, channel: str) -> list[SharedEncoder]:
        return [encoder for (name, _), encoder in self._encoders.items() if name == channel]

    def _forget(self, encoder: SharedEncoder) -> None:
        with contextlib.suppress(KeyError):
            if self._encoders[(encoder.channel, encoder.mime)] is encoder:
                del self._encoders[(encoder.channel, encoder.mime)]
