"""The wire protocol shared by the relay, workers, producers, viewers and the API.

Pure functions only: nothing here touches a socket, so every part of the
system (and the fuzz tests) encodes and decodes messages the same way.
See ``docs/protocol.md`` for the specification.
"""

from wire.errors import ProtocolError
from wire.frames import Frame, FrameKind, ImageFormat, decode_frame, encode_frame
from wire.messages import (
    ErrorCode,
    Hello,
    Role,
    decode_control,
    encode_control,
    error_message,
)

__all__ = [
    "ErrorCode",
    "Frame",
    "FrameKind",
    "Hello",
    "ImageFormat",
    "ProtocolError",
    "Role",
    "decode_control",
    "decode_frame",
    "encode_control",
    "encode_frame",
    "error_message",
]
