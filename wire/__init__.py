"""The wire protocol shared by the relay, workers, producers, viewers and the API.

Pure functions and models only: nothing here touches a socket, so every part
of the system (and the fuzz tests) encodes and decodes messages the same way.
Frames stay bytes (:mod:`wire.frames`); control messages are typed models,
client to relay in :mod:`wire.messages`, relay to peers in
:mod:`wire.relay_messages`. See ``docs/protocol.md`` for the specification.
"""

from wire.errors import ErrorCode, ProtocolError, UnknownMessageType
from wire.frames import Frame, FrameKind, ImageFormat, decode_frame, encode_frame
from wire.messages import (
    ClientMessage,
    Encoding,
    Hello,
    Receive,
    ReportEvent,
    Role,
    decode_control,
    encode_control,
)
from wire.relay_messages import ChannelState, EngineState, RelayMessage, decode_relay_message

__all__ = [
    "ChannelState",
    "ClientMessage",
    "Encoding",
    "EngineState",
    "ErrorCode",
    "Frame",
    "FrameKind",
    "Hello",
    "ImageFormat",
    "ProtocolError",
    "Receive",
    "RelayMessage",
    "ReportEvent",
    "Role",
    "UnknownMessageType",
    "decode_control",
    "decode_frame",
    "decode_relay_message",
    "encode_control",
    "encode_frame",
]
