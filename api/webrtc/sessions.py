"""WHIP and WHEP sessions: one peer connection each, closed exactly once.

A session owns its peer connection, the background tasks that move its
frames and the relay peers it joined; :meth:`Session.close` undoes all of
it whatever ends the session (DELETE, a failed connection, no video in
time, the stream being deleted, server shutdown). The registry finds
sessions by id for DELETE and by stream for the close hook.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiortc import RTCPeerConnection

from api.streams.manager import Stream, StreamListener
from api.webrtc.fanout import EncoderPool

log = logging.getLogger("api.webrtc")

Kind = Literal["whip", "whep"]
#: ended sessions remembered for a late DELETE
ENDED_KEPT = 1024


@dataclass(frozen=True)
class WebRTCSettings:
    """Knobs for both directions.

    ``ice_servers`` go to our own peer connections and to clients in ``Link``
    headers: ``"stun:host:port"`` strings, or mappings with ``urls`` and
    optional ``username``/``credential`` for TURN. Empty (the default) means
    host candidates only and no request to any outside server.
    """

    ice_servers: tuple[Any, ...] = ()
    #: a WHIP session that has delivered no video frame by then is closed
    first_frame_timeout: float = 5.0
    #: a WHEP session whose connection is not up by then is closed
    connect_timeout: float = 15.0
    #: WHEP viewers of a stream share one encoder per codec (see fanout.py)
    shared_encoding: bool = True
    #: bits per second of the shared encoders (per-viewer encoders adapt on their own)
    output_bitrate: int = 1_500_000


@dataclass(eq=False)
class Session:
    """One WHIP publisher or WHEP viewer; the URL ``.../{whip,whep}/{id}`` names it."""

    kind: Kind
    stream: Stream
    pc: RTCPeerConnection
    id: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    etag: str = field(default_factory=lambda: f'"{secrets.token_hex(8)}"')
    started: float = field(default_factory=time.monotonic)
    #: monotonic time of the first video frame received (WHIP)
    first_frame_at: float | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    #: synchronous releases (relay peers), run once at close
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    #: called once after close, with the reason (the registry unlinks the session)
    on_closed: list[Callable[[Session, str], None]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _closing: bool = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` for the session's lifetime; it is cancelled at close."""
        task = asyncio.create_task(coro, name=f"{self.kind}-{self.id[:6]}-{name}")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s failed", task.get_name(), exc_info=task.exception())
            self.close_soon(f"{task.get_name()} failed: {task.exception()!r}")

    def close_soon(self, reason: str) -> None:
        """Close from a callback or from one of the session's own tasks."""
        if not self._closing:
            asyncio.get_running_loop().create_task(self.close(reason))

    async def close(self, reason: str) -> None:
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        log.info(
            "%s session %s of stream %s closed: %s", self.kind.upper(), self.id[:6], self.stream.id, reason
        )
        current = asyncio.current_task()
        others = [t for t in self.tasks if t is not current]
        for task in others:
            task.cancel()
        for cleanup in self.cleanups:
            cleanup()
        try:
            await self.pc.close()
        finally:
            await asyncio.gather(*others, return_exceptions=True)
            for callback in self.on_closed:
                callback(self, reason)
            self.closed.set()


class SessionRegistry(StreamListener):
    """Open sessions by id; at most one WHIP publisher per stream; a deleted stream's sessions end.

    Remembers the last :data:`ENDED_KEPT` sessions that ended, so a client's
    DELETE arriving just after it closed its peer connection still succeeds.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self._ended: OrderedDict[str, tuple[Kind, str]] = OrderedDict()

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        session.on_closed.append(self._ended_now)

    def _ended_now(self, session: Session, _reason: str) -> None:
        self.sessions.pop(session.id, None)
        self._ended[session.id] = (session.kind, session.stream.id)
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def ended_recently(self, session_id: str, kind: Kind, stream: Stream) -> bool:
        return self._ended.get(session_id) == (kind, stream.id)

    def get(self, session_id: str, kind: Kind) -> Session | None:
        session = self.sessions.get(session_id)
        return session if session is not None and session.kind == kind else None

    def for_stream(self, stream_id: str, kind: Kind | None = None) -> list[Session]:
        return [
            s for s in self.sessions.values() if s.stream.id == stream_id and (kind is None or s.kind == kind)
        ]

    async def stream_closed(self, stream: Stream) -> None:
        """The stream is being deleted: end every session on it."""
        await close_all(self.for_stream(stream.id), "stream deleted")

    async def close_all(self, reason: str = "server shutdown") -> None:
        await close_all(list(self.sessions.values()), reason)


async def close_all(sessions: Iterable[Session], reason: str) -> None:
    results = await asyncio.gather(*(s.close(reason) for s in sessions), return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            log.warning("closing a session failed: %r", result)


@dataclass
class WebRTCState:
    """What the WHIP/WHEP routes need: settings, sessions and shared encoders (``Services.webrtc``)."""

    settings: WebRTCSettings
    registry: SessionRegistry = field(default_factory=SessionRegistry)
    #: shared WHEP encoders, when ``settings.shared_encoding`` is on
    encoders: EncoderPool | None = None

    def __post_init__(self) -> None:
        if self.settings.shared_encoding and self.encoders is None:
            self.encoders = EncoderPool(self.settings.output_bitrate)

    def playback_state(self, stream: Stream) -> dict[str, Any]:
        """WHEP viewers of ``stream`` and the shared encoders serving them, for the stream's status."""
        encoders = self.encoders.for_channel(stream.channel) if self.encoders is not None else []
        return {
            "viewers": len(self.registry.for_stream(stream.id, "whep")),
            "shared_encoders": [
                {"codec": e.mime, "viewers": e.viewers, "frames_encoded": e.encoded} for e in encoders
            ],
        }
