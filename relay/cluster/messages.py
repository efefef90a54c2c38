"""What relay nodes say to each other over NATS: subjects and messages, no I/O.

Frames travel as the bytes peers sent (the wire format, header and image),
on core NATS subjects, so nothing is stored and a slow subscriber loses
frames, never delays them:

- ``sd.ch.<channel>.in``: input frames from the producers of each node;
- ``sd.ch.<channel>.out``: output frames from the worker serving the channel;
- ``sd.ch.<channel>.ctl``: the worker's reports (JSON, the ``report`` message);
- ``sd.node.hb``: every node's heartbeat (its workers, what they serve);
- ``sd.node.<node>``: requests to one node (assign, release, params).

Channel names may hold dots, which NATS reads as token separators: they
become ``~`` (never in a channel name), so each name is one token.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, field_serializer

from wire.frames import FrameKind
from wire.messages import Message
from wire.relay_messages import Assign, ChannelParams, EngineState, Release

PREFIX = "sd"
HEARTBEAT_SUBJECT = f"{PREFIX}.node.hb"


def channel_subject(channel: str, what: Literal["in", "out", "ctl"]) -> str:
    return f"{PREFIX}.ch.{channel.replace('.', '~')}.{what}"


def frame_subject(channel: str, kind: FrameKind) -> str:
    return channel_subject(channel, "in" if kind is FrameKind.INPUT else "out")


def node_subject(node: str) -> str:
    return f"{PREFIX}.node.{node}"


class WorkerInfo(Message):
    """One of a node's own workers, as its heartbeat describes it."""

    id: str
    capacity: int
    pinned: list[str] = Field(default_factory=list)
    name: str = ""
    engine: str = ""
    #: the channels it serves, each with the node that gave it the channel
    channels: dict[str, str] = Field(default_factory=dict)

    def free_for(self, node: str) -> int:
        """Slots ``node`` may count on: its capacity less what other nodes gave it.

        What ``node`` gave it itself it already counts (in the worker's
        ``assigned`` there), even before this heartbeat shows it.
        """
        return self.capacity - sum(1 for home in self.channels.values() if home != node)


class Claim(Message):
    """A channel a node would give a worker to, as its heartbeat says (see :func:`owner`)."""

    #: its own producers feed it (else the API holds it open): such nodes come first
    producers: bool
    #: the engine state there (what the other nodes show while this one serves it)
    state: EngineState = EngineState.WAITING_FOR_WORKER
    #: the worker serving it for this node, if any
    worker: str | None = None
    #: its input and output rates there (the owner's producers feed it: the other nodes show these)
    fps_in: float = 0.0
    fps_out: float = 0.0


def owner(channel: str, claims: dict[str, Claim], home: str | None = None) -> str:
    """The node that gives ``channel`` its worker: one answer on every node that sees the same claims.

    Nodes whose producers feed the channel come before nodes that only hold it
    open (the worker's input is then local to its home: its idle timer sees
    it), then ``home``, the node that created the stream (every node knows it
    from the stream's record at once, before any heartbeat); among equals,
    rendezvous hashing spreads channels over nodes and moves only the
    channels of a node that comes or goes.
    """

    def rank(node: str) -> tuple[bool, bool, bytes]:
        digest = hashlib.blake2b(f"{node}\0{channel}".encode(), digest_size=8).digest()
        return claims[node].producers, node == home, digest

    return max(claims, key=rank)


class Heartbeat(Message):
    """A node is alive (sent every ``cluster_heartbeat_s``, and at once on changes); ``bye``: leaving."""

    type: Literal["heartbeat"] = "heartbeat"
    node: str
    workers: list[WorkerInfo] = Field(default_factory=list)
    #: the frame subjects (``sd.ch.<channel>.in`` / ``.out``) it subscribes to: the other nodes
    #: publish a channel's frames only while some node wants them; None (a node that does not
    #: say): every frame
    wants: list[str] | None = None
    #: the channels it would give a worker to (its producers or API hold them): one node, their
    #: :func:`owner`, does
    homes: dict[str, Claim] = Field(default_factory=dict)
    bye: bool = False

    @field_serializer("homes")
    def _compact_claims(self, homes: dict[str, Claim]) -> dict[str, dict[str, Any]]:
        """Each claim without its default fields: an API node claims every stream, 4 times a second."""
        return {name: claim.model_dump(mode="json", exclude_defaults=True) for name, claim in homes.items()}


class AssignWorker(Assign):
    """To a worker's node: give ``channel`` to ``worker`` for ``home`` (a request: the reply says if
    it did)."""

    home: str
    worker: str


class ReleaseWorker(Release):
    """To a worker's node: ``home`` no longer needs ``channel`` served."""

    home: str


class UpdateParams(ChannelParams):
    """The channel's full params: from its home to its worker's node, or from a node whose producers
    changed them to the channel's owner.
    """

    home: str


class Reply(Message):
    """The answer to :class:`AssignWorker`."""

    type: Literal["reply"] = "reply"
    ok: bool
    reason: str = ""


NodeRequest = AssignWorker | ReleaseWorker | UpdateParams
NodeMessage = Heartbeat | NodeRequest | Reply
_node_message: TypeAdapter[NodeMessage] = TypeAdapter(Annotated[NodeMessage, Field(discriminator="type")])


def encode(message: Message) -> bytes:
    return message.model_dump_json().encode()


def decode(data: bytes) -> NodeMessage:
    """A node's message; raises ``pydantic.ValidationError`` for anything else."""
    return _node_message.validate_json(data)
