"""Binary frame messages: a fixed 32-byte header, the channel name, the image.

Layout (big-endian)::

    0  2  magic b"SD"
    2  1  version (1)
    3  1  kind: 1 input (producer -> worker), 2 output (worker -> viewers)
    4  1  image format: 1 JPEG, 2 PNG
    5  1  flags (reserved, 0)
    6  1  channel name length in bytes (1..64)
    7  1  reserved (0)
    8  8  sequence number (uint64), chosen by the producer, kept by the worker
    16 8  capture timestamp (float64, seconds since the epoch, producer clock)
    24 2  width (uint16)
    26 2  height (uint16)
    28 4  params version (uint32) the worker used; 0 for input frames
    32 n  channel name, UTF-8
    32+n  the encoded image

The relay reads only the header and the image's own header (see
:func:`probe_image`); it never decodes pixels.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from dataclasses import dataclass, replace

from wire.errors import ErrorCode, ProtocolError

MAGIC = b"SD"
VERSION = 1
HEADER = struct.Struct("!2sBBBBBBQdHHI")
HEADER_SIZE = HEADER.size  # 32
MAX_CHANNEL_BYTES = 64
MAX_SEQUENCE = 2**64 - 1
MAX_PARAMS_VERSION = 2**32 - 1
CHANNEL_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class FrameKind(enum.IntEnum):
    INPUT = 1
    OUTPUT = 2


class ImageFormat(enum.IntEnum):
    JPEG = 1
    PNG = 2

    @classmethod
    def parse(cls, name: str) -> ImageFormat:
        """Accept the spellings people use: ``jpeg``, ``JPG``, ``png``..."""
        key = name.strip().lower()
        if key in ("jpeg", "jpg", "image/jpeg"):
            return cls.JPEG
        if key in ("png", "image/png"):
            return cls.PNG
        raise ProtocolError(f"unsupported image format {name!r}: use jpeg or png", ErrorCode.BAD_IMAGE)

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Frame:
    """One image travelling through the system with its routing metadata."""

    channel: str
    seq: int
    timestamp: float
    width: int
    height: int
    format: ImageFormat
    payload: bytes
    kind: FrameKind = FrameKind.INPUT
    params_version: int = 0

    def as_output(
        self, payload: bytes, fmt: ImageFormat, width: int, height: int, params_version: int
    ) -> Frame:
        """The result frame for this input: same channel, sequence number and timestamp."""
        return replace(
            self,
            kind=FrameKind.OUTPUT,
            payload=payload,
            format=fmt,
            width=width,
            height=height,
            params_version=params_version,
        )


def validate_channel(name: str) -> str:
    if not isinstance(name, str) or not CHANNEL_PATTERN.match(name):
        raise ProtocolError(
            f"bad channel name {name!r}: 1-64 characters from A-Z a-z 0-9 _ . -", ErrorCode.BAD_CHANNEL
        )
    return name


def encode_frame(frame: Frame) -> bytes:
    """Serialise ``frame``; raises :class:`ProtocolError` for values that do not fit."""
    channel = validate_channel(frame.channel).encode()
    if not 0 <= frame.seq <= MAX_SEQUENCE:
        raise ProtocolError(f"sequence number {frame.seq} out of range")
    if not (0 <= frame.width <= 0xFFFF and 0 <= frame.height <= 0xFFFF):
        raise ProtocolError(f"size {frame.width}x{frame.height} out of range")
    if not 0 <= frame.params_version <= MAX_PARAMS_VERSION:
        raise ProtocolError(f"params version {frame.params_version} out of range")
    header = HEADER.pack(
        MAGIC,
        VERSION,
        frame.kind,
        frame.format,
        0,
        len(channel),
        0,
        frame.seq,
        frame.timestamp,
        frame.width,
        frame.height,
        frame.params_version,
    )
    return b"".join((header, channel, frame.payload))


_KINDS = {int(k): k for k in FrameKind}
_FORMATS = {int(f): f for f in ImageFormat}
# decode_frame's lookups: Enum calls and the channel regex cost ~5 us per frame
_CHANNELS: dict[bytes, str] = {}  # channel names already validated, by their bytes
_MAX_CACHED_CHANNELS = 4096


def decode_frame(data: bytes) -> Frame:
    """Parse a binary message; any malformed input raises :class:`ProtocolError`."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"binary message of {len(data)} bytes is shorter than a frame header")
    (
        magic,
        version,
        kind,
        fmt,
        _flags,
        channel_len,
        _reserved,
        seq,
        timestamp,
        width,
        height,
        params_version,
    ) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("binary message does not start with the frame magic b'SD'")
    if version != VERSION:
        raise ProtocolError(f"unsupported frame version {version}, expected {VERSION}")
    frame_kind = _KINDS.get(kind)
    if frame_kind is None:
        raise ProtocolError(f"unknown frame kind {kind}")
    image_format = _FORMATS.get(fmt)
    if image_format is None:
        raise ProtocolError(f"unknown image format code {fmt}", ErrorCode.BAD_IMAGE)
    if not 1 <= channel_len <= MAX_CHANNEL_BYTES:
        raise ProtocolError(f"channel length {channel_len} outside 1..{MAX_CHANNEL_BYTES}")
    end = HEADER_SIZE + channel_len
    if len(data) < end:
        raise ProtocolError("binary message ends inside the channel name")
    name = bytes(data[HEADER_SIZE:end])
    channel = _CHANNELS.get(name)
    if channel is None:
        try:
            channel = name.decode()
        except UnicodeDecodeError:
            raise ProtocolError("channel name is not UTF-8", ErrorCode.BAD_CHANNEL) from None
        validate_channel(channel)
        if len(_CHANNELS) >= _MAX_CACHED_CHANNELS:
            _CHANNELS.clear()
        _CHANNELS[name] = channel
    if not math.isfinite(timestamp):
        raise ProtocolError("timestamp is not a finite number")
    return Frame(
        channel, seq, timestamp, width, height, image_format, bytes(data[end:]), frame_kind, params_version
    )
