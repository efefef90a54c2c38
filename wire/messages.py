"""JSON control messages from clients to the relay: handshake, params, stats, reports, seed-002 images.

Every control message is a frozen pydantic model with a literal ``type``;
:func:`decode_control` turns a text message into one (or raises
:class:`ProtocolError` with an :class:`ErrorCode`) and :func:`encode_control`
turns a model back into text. What the relay sends back is in
:mod:`wire.relay_messages`, decoded the same way. Unknown fields are ignored
for forward compatibility; unknown message types are errors. Frames are
never models: they stay bytes (:mod:`wire.frames`).
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Mapping
from typing import Annotated, Any, Literal, cast

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from wire.errors import ErrorCode, ProtocolError, UnknownMessageType
from wire.frames import CHANNEL_PATTERN, ImageFormat

PROTOCOL_VERSION = 1
#: the protocol versions this side speaks; a hello naming another is refused
SUPPORTED_PROTOCOLS = frozenset({PROTOCOL_VERSION})
DEFAULT_CHANNEL = "default"


class Role(enum.StrEnum):
    PRODUCER = "producer"
    WORKER = "worker"
    VIEWER = "viewer"


class Receive(enum.StrEnum):
    """Which frames a producer or viewer gets: the worker's output, the producers' input, both, none."""

    OUTPUT = "output"
    INPUT = "input"
    BOTH = "both"
    NONE = "none"


class Encoding(enum.StrEnum):
    """How the relay sends a peer its frames: binary frames, or seed-002 base64 JSON."""

    BINARY = "binary"
    JSON = "json"


class ReportEvent(enum.StrEnum):
    """What a worker's ``report`` is about."""

    ERROR = "error"
    RELOADING = "reloading"
    READY = "ready"
    STATS = "stats"
    #: a slow load's progress: ``data`` has ``stage``, and when known ``done``, ``total``, ``unit``
    #: (steps or bytes), ``fraction`` and ``eta_s``
    PROGRESS = "progress"


class Message(BaseModel):
    """Base of every control message: immutable, extra fields ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


Channel = Annotated[str, Field(pattern=CHANNEL_PATTERN.pattern)]


def _image_format(value: Any) -> ImageFormat:
    if isinstance(value, ImageFormat):
        return value
    if not isinstance(value, str):
        raise ValueError("format must be a string: jpeg or png")
    return ImageFormat.parse(value)


#: a string on the wire (``"jpeg"``, ``"JPG"``, ``"png"``...: the spellings seed-002 clients use),
#: an :class:`ImageFormat` once validated; an unknown name is ImageFormat.parse's ProtocolError
#: (bad_image), which decoding re-raises as is
ImageFormatName = Annotated[ImageFormat, PlainValidator(_image_format)]


def _supported_protocol(version: int) -> int:
    if version not in SUPPORTED_PROTOCOLS:
        raise ProtocolError(
            f"protocol version {version} is not supported; this side speaks "
            f"{', '.join(map(str, sorted(SUPPORTED_PROTOCOLS)))}",
            ErrorCode.UNSUPPORTED_PROTOCOL,
        )
    return version


#: a hello's ``protocol``: an unknown version is ProtocolError(unsupported_protocol), re-raised as is
ProtocolVersion = Annotated[int, AfterValidator(_supported_protocol)]


class Hello(Message):
    """First message of every connection: who I am and where I go."""

    type: Literal["hello"] = "hello"
    role: Role
    channel: Channel = DEFAULT_CHANNEL
    token: str | None = None
    protocol: ProtocolVersion = PROTOCOL_VERSION
    # viewers: which frames to receive; producers receive outputs unless "none".
    receive: Receive = Receive.OUTPUT
    # "json" makes the relay send images as seed-002 base64 messages.
    encoding: Encoding = Encoding.BINARY
    # workers: how many channels they serve at once; an empty channel list
    # means "any channel the relay assigns".
    capacity: int = Field(default=1, ge=1, le=1024)
    channels: list[Channel] = Field(default_factory=list)
    name: str = Field(default="", max_length=128)
    engine: str = Field(default="", max_length=64)


class Params(Message):
    """A producer's new parameters for its channel; merged into the current ones."""

    type: Literal["params"] = "params"
    params: dict[str, Any]
    channel: Channel | None = None
    replace: bool = False
    version: int | None = None


class StatsRequest(Message):
    type: Literal["stats"] = "stats"


class Report(Message):
    """A worker's news about a channel (an engine error, a reload, its timings); forwarded as is."""

    type: Literal["report"] = "report"
    channel: Channel
    event: ReportEvent
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class LegacyImage(Message):
    """The base64 image message of seed 002 (as a producer or a JSON worker sends it)."""

    type: Literal["image"] = "image"
    # data before format: a message wrong in both is refused for its data, as it always was
    data: bytes
    #: what the client says it sent; the relay checks it against the image's own header
    #: (the same check, and error, as a binary frame's header gets). None: not said.
    format: ImageFormatName | None = None
    timestamp: float | None = None
    seq: int | None = Field(default=None, ge=0, lt=2**64)  # our addition; seed clients omit it

    @field_validator("data", mode="before")
    @classmethod
    def _b64(cls, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value  # built in process from the image itself (JSON has no bytes)
        if not isinstance(value, str):
            # a ValueError, not a TypeError: pydantic turns it into a 422
            raise ValueError("data must be a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("data is not valid base64") from None


class Ping(Message):
    type: Literal["ping"] = "ping"


class ClientType(enum.StrEnum):
    """What a seed-002 client registers as: it sends images, or it receives them."""

    PRODUCER = "producer"
    CONSUMER = "consumer"


class Register(Message):
    """Seed 002: the example's scripts say what they are before anything else (answered ``registered``)."""

    type: Literal["register"] = "register"
    client_type: ClientType


class PromptUpdate(Message):
    """Seed 002: a new prompt for the sender's channel, from its next frame on."""

    type: Literal["prompt_update"] = "prompt_update"
    prompt: str
    timestamp: float | None = None


ClientMessage = Hello | Params | StatsRequest | Report | LegacyImage | Ping | Register | PromptUpdate
_client = TypeAdapter(Annotated[ClientMessage, Field(discriminator="type")])


def decode_control(message: str | bytes | Mapping[str, Any]) -> ClientMessage:
    """A client's text message (or its parsed JSON) as a model; :class:`ProtocolError` says what is wrong."""
    return cast(ClientMessage, decode_with(_client, message))


def decode_with(adapter: TypeAdapter[Any], message: str | bytes | Mapping[str, Any]) -> Any:
    """Parse and validate ``message`` against a discriminated union of message models."""
    if isinstance(message, Mapping):
        obj: Any = message
    else:
        try:
            obj = orjson.loads(message)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"message is not valid JSON: {exc}") from None
    if not isinstance(obj, Mapping):
        raise ProtocolError("message must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("message has no string 'type' field")
    try:
        return adapter.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "union_tag_invalid":
            raise UnknownMessageType(f"unknown message type {kind!r}") from None
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, ProtocolError):
            raise cause from None
        where = ".".join(str(p) for p in first["loc"])
        code = ErrorCode.BAD_IMAGE if kind == "image" else ErrorCode.BAD_MESSAGE
        if kind == "hello" and "role" in where:
            code = ErrorCode.BAD_ROLE
        elif "channel" in where:
            code = ErrorCode.BAD_CHANNEL
        raise ProtocolError(f"bad {kind!r} message: {where}: {first['msg']}", code) from None


def encode_control(message: Message | Mapping[str, Any]) -> str:
    """Serialise a control message to a text frame.

    Fields left ``None`` are omitted (``status`` has a ``worker`` only once
    assigned); field order is the models' order, so the JSON is the same bytes
    the relay sent before its messages were typed.
    """
    if isinstance(message, Message):
        message = message.model_dump(exclude_none=True)
    return orjson.dumps(message).decode()


def legacy_image_message(fmt: ImageFormat, payload: bytes, timestamp: float, **extra: Any) -> dict[str, Any]:
    """A seed-002 image message; ``extra`` carries our additions (seq, channel, kind).

    A frame, not a control message: built from bytes on the way out, never a model.
    """
    return {
        "type": "image",
        "format": fmt.label,
        "data": base64.b64encode(payload).decode(),
        "timestamp": timestamp,
        **extra,
    }
