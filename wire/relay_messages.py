"""JSON control messages from the relay to its peers, and the states they carry.

The relay builds these models and encodes them with
:func:`wire.messages.encode_control` (in-process peers get the models
themselves); workers, producers and viewers decode them with
:func:`decode_relay_message`. Field order is the order on the wire.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Any, Literal, cast

from pydantic import Field, TypeAdapter

from wire.errors import ErrorCode, ProtocolError
from wire.messages import (
    PROTOCOL_VERSION,
    Channel,
    ClientType,
    LegacyImage,
    Message,
    Report,
    Role,
    decode_with,
)


class EngineState(enum.StrEnum):
    """Where a channel's engine is, from the relay's side (``engine_state`` in stats)."""

    WAITING_FOR_WORKER = "waiting_for_worker"
    LOADING = "loading"
    READY = "ready"
    RELOADING = "reloading"
    ERROR = "error"
    #: no input for ``idle_release_s``: its worker slot was given back until input returns
    IDLE = "idle"
    #: in-process sessions only: their channel is gone
    CLOSED = "closed"


class ChannelState(enum.StrEnum):
    """A ``status`` message's news: the channel lost its worker, or got one."""

    WAITING_FOR_WORKER = "waiting_for_worker"
    ASSIGNED = "assigned"
    #: no input for ``idle_release_s``: the worker slot was given back; input brings one again
    IDLE = "idle"


class Welcome(Message):
    type: Literal["welcome"] = "welcome"
    role: Role
    channel: Channel
    session: str
    protocol: int = PROTOCOL_VERSION
    limits: dict[str, Any] = Field(default_factory=dict)


class Error(Message):
    """A refused message; the connection goes on (except during the handshake)."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str

    @classmethod
    def of(cls, exc: ProtocolError) -> Error:
        return cls(code=exc.code, message=str(exc))


class Assign(Message):
    """To a worker: start serving ``channel`` with these params."""

    type: Literal["assign"] = "assign"
    channel: Channel
    params: dict[str, Any]
    version: int


class Release(Message):
    type: Literal["release"] = "release"
    channel: Channel


class ChannelParams(Message):
    """To a worker: a channel's new full params (a producer's ``params`` merged in)."""

    type: Literal["params"] = "params"
    channel: Channel
    params: dict[str, Any]
    version: int


class ParamsAck(Message):
    type: Literal["params_ack"] = "params_ack"
    channel: Channel
    version: int


class Status(Message):
    """To producers and viewers: the channel's worker changed (``worker`` only when assigned).

    While waiting: the channel's place in the queue (1: next to be served)
    and the slots it waits for, ``in_use`` of ``slots`` (the workers'
    capacity, or for an anonymous channel its share of it). Sent again
    whenever these change.
    """

    type: Literal["status"] = "status"
    channel: Channel
    state: ChannelState
    worker: str | None = None
    position: int | None = None
    in_use: int | None = None
    slots: int | None = None

    @property
    def detail(self) -> str:
        """What a person reads: ``waiting for a slot: 4 of 4 in use (2nd in the queue)``."""
        if self.state is ChannelState.ASSIGNED:
            return "a worker is serving this stream"
        if self.state is ChannelState.IDLE:
            return "idle: no input for a while, so its worker slot was given back; input brings it back"
        if not self.slots:
            return "waiting for a worker: none is connected"
        place = f" ({_ordinal(self.position)} in the queue)" if self.position else ""
        return f"waiting for a slot: {self.in_use} of {self.slots} in use{place}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class StatsReply(Message):
    type: Literal["stats"] = "stats"
    channels: dict[str, dict[str, Any]]
    workers: list[dict[str, Any]]


class Pong(Message):
    type: Literal["pong"] = "pong"
    #: the relay's clock (seconds since the epoch): seed-002 clients log it
    timestamp: float | None = None


class Shutdown(Message):
    type: Literal["shutdown"] = "shutdown"
    message: str = ""


class Ack(Message):
    """Seed 002: each image a producer sends is acknowledged."""

    type: Literal["ack"] = "ack"
    status: Literal["received"] = "received"


class Registered(Message):
    """Seed 002: the answer to ``register``; ``channel`` (ours) is where the client's images go."""

    type: Literal["registered"] = "registered"
    client_type: ClientType
    timestamp: float
    channel: Channel | None = None


class PromptUpdated(Message):
    """Seed 002: the answer to a ``prompt_update`` the relay applied (refusals are ``error``)."""

    type: Literal["prompt_updated"] = "prompt_updated"
    status: Literal["success"] = "success"
    prompt: str
    timestamp: float
    version: int | None = None


class LegacyResult(LegacyImage):
    """Seed 002: an image as the relay sends it to a JSON peer, with our additions."""

    channel: Channel | None = None
    kind: Literal["input", "output"] = "output"


RelayMessage = (
    Welcome
    | Error
    | Assign
    | Release
    | ChannelParams
    | ParamsAck
    | Status
    | StatsReply
    | Report
    | Pong
    | Shutdown
    | Ack
    | Registered
    | PromptUpdated
    | LegacyResult
)
_relay = TypeAdapter(Annotated[RelayMessage, Field(discriminator="type")])


def decode_relay_message(message: str | bytes | Mapping[str, Any]) -> RelayMessage:
    """A text message from the relay as a model.

    Raises :class:`ProtocolError`; :class:`wire.errors.UnknownMessageType`
    (a subclass) for a type this side does not know, which a client may ignore.
    """
    return cast(RelayMessage, decode_with(_relay, message))
