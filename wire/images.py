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


#: formats a still picture (a style image) may have: what OpenCV, the worker's decoder, reads and
#: :func:`probe_picture` can size from the header; JPEG and PNG are :class:`ImageFormat`'s labels
PICTURE_FORMATS = ("jpeg", "png", "webp", "bmp", "gif")


def probe_picture(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` of a JPEG, PNG, WebP, BMP or GIF from its header alone, so a
    decompression bomb is refused before any pixel is decoded; ``ProtocolError`` for anything else.
    """
    if data.startswith((b"\xff\xd8\xff", PNG_SIGNATURE)):
        known, width, height = probe_image(data)
        return known.label, width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt, (width, height) = "webp", _webp_size(data)
    elif data[:2] == b"BM" and len(data) >= 26:
        fmt, (width, height) = "bmp", _bmp_size(data)
    elif data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        fmt, (width, height) = "gif", struct.unpack_from("<HH", data, 6)
    else:
        raise ProtocolError("not a JPEG, PNG, WebP, BMP or GIF image", ErrorCode.BAD_IMAGE)
    if not (width and height):
        raise ProtocolError(f"{fmt} image with a zero size", ErrorCode.BAD_IMAGE)
    return fmt, width, height


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise ProtocolError("WebP without a readable header", ErrorCode.BAD_IMAGE)


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:  # OS/2 BITMAPCOREHEADER
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)  # a negative height: rows stored top-down


def check_picture(data: bytes, max_width: int, max_height: int) -> tuple[str, int, int]:
    """:func:`probe_picture`, and ``ProtocolError`` when it is wider or taller than the limits."""
    fmt, width, height = probe_picture(data)
    if width > max_width or height > max_height:
        raise ProtocolError(
            f"{width}x{height} exceeds the limit of {max_width}x{max_height}", ErrorCode.RESOLUTION_TOO_LARGE
        )
    return fmt, width, height
