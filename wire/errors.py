"""The single exception every decoder in :mod:`wire` raises, and its codes."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` message: the same strings on the wire as before they were typed."""

    BAD_MESSAGE = "bad_message"
    BAD_IMAGE = "bad_image"
    BAD_CHANNEL = "bad_channel"
    BAD_ROLE = "bad_role"
    FRAME_TOO_LARGE = "frame_too_large"
    RESOLUTION_TOO_LARGE = "resolution_too_large"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_CHANNEL = "unknown_channel"
    TOO_MANY_CHANNELS = "too_many_channels"
    NOT_ALLOWED = "not_allowed"
    ENGINE_ERROR = "engine_error"
    #: a hello naming a protocol version this side does not speak
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    #: a params message, or the channel's params once merged, over ``max_params_bytes``
    #: (worker reports too)
    PARAMS_TOO_LARGE = "params_too_large"
    #: control messages faster than the relay's per-connection rate: the excess is dropped
    RATE_LIMITED = "rate_limited"
    #: no hello within the relay's hello timeout (and no open channels to fall back on)
    HELLO_TIMEOUT = "hello_timeout"


class ProtocolError(ValueError):
    """A message that does not follow the protocol.

    ``code`` is an :class:`ErrorCode`, so a server can answer the peer with
    ``Error.of(exc)`` directly. A code given as a string must be one of its values.
    """

    def __init__(self, message: str, code: ErrorCode | str = ErrorCode.BAD_MESSAGE) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)


class UnknownMessageType(ProtocolError):
    """A well-formed message whose ``type`` this side does not know.

    A relay refuses it; a client may ignore it (a newer relay's addition).
    """
