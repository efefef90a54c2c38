"""JSON control messages: handshake, parameters, stats, errors, seed-002 images.

``decode_control`` turns a text message into a typed model or raises
:class:`ProtocolError`; the ``*_message`` builders return plain dicts that
``encode_control`` serialises. Unknown fields are ignored for forward
compatibility; unknown message types are errors.
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from wire.errors import ProtocolError
from wire.frames import CHANNEL_PATTERN, ImageFormat

PROTOCOL_VERSION = 1
DEFAULT_CHANNEL = "default"


class Role(enum.StrEnum):
    PRODUCER = "producer"
    WORKER = "worker"
    VIEWER = "viewer"


class ErrorCode(enum.StrEnum):
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


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


Channel = Annotated[str, Field(pattern=CHANNEL_PATTERN.pattern)]


class Hello(_Message):
    """First message of every connection: who I am and where I go."""

    type: Literal["hello"]
    role: Role
    channel: Channel = DEFAULT_CHANNEL
    token: str | None = None
    protocol: int = PROTOCOL_VERSION
    # viewers: which frames to receive; producers receive outputs unless "none".
    receive: Literal["output", "input", "both", "none"] = "output"
    # "json" makes the relay send images as seed-002 base64 messages.
    encoding: Literal["binary", "json"] = "binary"
    # workers: how many channels they serve at once; an empty channel list
    # means "any channel the relay assigns".
    capacity: int = Field(default=1, ge=1, le=1024)
    channels: list[Channel] = Field(default_factory=list)
    name: str = Field(default="", max_length=128)
    engine: str = Field(default="", max_length=64)


class Params(_Message):
    """New parameters for a channel; merged into the channel's current ones."""

    type: Literal["params"]
    params: dict[str, Any]
    channel: Channel | None = None
    replace: bool = False
    version: int | None = None


class StatsRequest(_Message):
    type: Literal["stats"]


class WorkerReport(_Message):
    """A worker's news about a channel: an engine error, a reload, its own timings."""

    type: Literal["report"]
    channel: Channel
    event: Literal["error", "reloading", "ready", "stats"]
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class LegacyImage(_Message):
    """The base64 image message of seed 002."""

    type: Literal["image"]
    format: str = "jpeg"
    data: bytes
    timestamp: float | None = None
    seq: int | None = Field(default=None, ge=0, lt=2**64)  # our addition; seed clients omit it

    @field_validator("data", mode="before")
    @classmethod
    def _b64(cls, value: Any) -> bytes:
        if not isinstance(value, str):
            raise ValueError("data must be a base64 string")  # noqa: TRY004 (pydantic turns ValueError into a 422)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("data is not valid base64") from None

    @property
    def image_format(self) -> ImageFormat:
        return ImageFormat.parse(self.format)


class Ping(_Message):
    type: Literal["ping"]


ControlMessage = Annotated[
    Hello | Params | StatsRequest | WorkerReport | LegacyImage | Ping,
    Field(discriminator="type"),
]
_control = TypeAdapter(ControlMessage)


def decode_control(text: str | bytes) -> Hello | Params | StatsRequest | WorkerReport | LegacyImage | Ping:
    """Parse a text message; raise :class:`ProtocolError` naming what is wrong."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("message has no string 'type' field")
    try:
        return _control.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "union_tag_invalid":
            raise ProtocolError(f"unknown message type {kind!r}") from None
        code = ErrorCode.BAD_IMAGE if kind == "image" else ErrorCode.BAD_MESSAGE
        if kind == "hello" and "role" in where:
            code = ErrorCode.BAD_ROLE
        elif "channel" in where:
            code = ErrorCode.BAD_CHANNEL
        raise ProtocolError(f"bad {kind!r} message: {where}: {first['msg']}", code.value) from None


def encode_control(message: dict[str, Any]) -> str:
    """Serialise a control message (a dict with a ``type``) to a text frame."""
    return orjson.dumps(message).decode()


def error_message(code: str | ErrorCode, message: str, **extra: Any) -> dict[str, Any]:
    code = code.value if isinstance(code, ErrorCode) else code
    return {"type": "error", "code": code, "message": message, **extra}


def welcome_message(role: Role, channel: str, session: str, limits: dict[str, Any]) -> dict[str, Any]:
    return {"type": "welcome", "role": role.value, "channel": channel, "session": session,
            "protocol": PROTOCOL_VERSION, "limits": limits}


def assign_message(channel: str, params: dict[str, Any], version: int) -> dict[str, Any]:
    return {"type": "assign", "channel": channel, "params": params, "version": version}


def release_message(channel: str) -> dict[str, Any]:
    return {"type": "release", "channel": channel}


def params_message(channel: str, params: dict[str, Any], version: int) -> dict[str, Any]:
    return {"type": "params", "channel": channel, "params": params, "version": version}


def status_message(channel: str, state: str, **extra: Any) -> dict[str, Any]:
    return {"type": "status", "channel": channel, "state": state, **extra}


LEGACY_ACK = {"type": "ack", "status": "received"}


def legacy_image_message(fmt: ImageFormat, payload: bytes, timestamp: float, **extra: Any) -> dict[str, Any]:
    """A seed-002 image message; ``extra`` carries our additions (seq, channel)."""
    return {"type": "image", "format": fmt.label, "data": base64.b64encode(payload).decode(),
            "timestamp": timestamp, **extra}
