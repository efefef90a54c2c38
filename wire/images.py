"""Read an encoded image's format and size from its header, without decoding pixels.

The relay uses this to refuse non-image bytes and oversize resolutions at a
cost of microseconds per frame.
"""

from __future__ import annotations

import struct

from wire.errors import ErrorCode, ProtocolError
from wire.frames import ImageFormat

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_MAX_JPEG_SEGMENTS = 256


def probe_image(data: bytes) -> tuple[ImageFormat, int, int]:
    """Return ``(format, width, height)`` or raise ``ProtocolError(code='bad_image')``."""
    if data.startswith(b"\xff\xd8\xff"):
        width, height = _jpeg_size(data)
        return ImageFormat.JPEG, width, height
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ProtocolError("PNG without an IHDR chunk", ErrorCode.BAD_IMAGE)
        width, height = struct.unpack_from("!II", data, 16)
        if not (width and height):
            raise ProtocolError("PNG with a zero size", ErrorCode.BAD_IMAGE)
        return ImageFormat.PNG, width, height
    raise ProtocolError("payload is neither a JPEG nor a PNG image", ErrorCode.BAD_IMAGE)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    size = len(data)
    for _ in range(_MAX_JPEG_SEGMENTS):
        while pos < size and data[pos] == 0xFF and pos + 1 < size and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > size or data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from("!H", data, pos + 2)
        if length < 2:
            break
        if marker in _JPEG_SOF:
            if pos + 9 > size:
                break
            height, width = struct.unpack_from("!HH", data, pos + 5)
            if not (width and height):
                raise ProtocolError("JPEG with a zero size", ErrorCode.BAD_IMAGE)
            return width, height
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            break
        pos += 2 + length
    raise ProtocolError("JPEG without a readable frame header", ErrorCode.BAD_IMAGE)
