"""Streams: a relay channel held open with its params, plus its public ids and URLs.

A stream's channel name is its id. Creating one asks the hub for a worker;
with none free the stream waits (state LOADING, detail ``waiting for a
slot: 4 of 4 in use (1st in the queue)``, ``queue`` its place) and never
blocks a request; a stream without input for ``relay.idle_release_s``
gives its slot back (OFFLINE, detail ``idle: ...``) until input returns. Params are stored as
the full effective set and validated with the engine's own model, so the
API and the worker agree on every default and range. A change that needs a
reload is followed to its end (:mod:`api.streams.reloads`): when the new
pipeline cannot load, the stream's params go back to what really serves and
its status names the version that failed and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from api.server.config import Config, ConfigError
from api.server.errors import ApiError, client_location, describe_validation, not_found
from api.streams import ids
from api.streams.reloads import ReloadFailure, failure, needs_reload, serving_after_failure, watch_reload
from api.streams.schemas import StreamParams
from media.fit import DEFAULT_FIT, PARAM, FitMode, fit_mode
from relay.hub import Channel, Hub
from relay.local import LocalViewer
from wire.errors import ErrorCode, ProtocolError
from wire.relay_messages import EngineState

if TYPE_CHECKING:
    from api.streams.shared import Removed


log = logging.getLogger("api.streams")

#: input frames per second under which a stream is DEGRADED_INPUT: Daydream's runner uses 15
DEGRADED_INPUT_FPS = 15.0


@dataclass
class Stream:
    id: str
    stream_key: str = field(repr=False)  # a secret: never in a log line
    playback_id: str
    pipeline: str
    params: dict[str, Any]
    name: str = ""
    output_rtmp_url: str | None = None
    created: float = field(default_factory=time.time)
    #: WHEP URL on an external republisher (MediaMTX), when one is configured
    external_whep_url: str | None = None
    #: the last change whose new pipeline failed to load (kept in the store)
    reload_failure: ReloadFailure | None = None
    #: in a cluster, the node that created it: its outputs (RTMP push, republishing) run there
    node: str = ""
    #: the params the worker runs: ``params`` except while a reload is under way
    serving: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: set when the stream stops here (deleted, or the server stops): its connections end with it
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    @property
    def channel(self) -> str:
        return self.id

    def record(self) -> dict[str, Any]:
        """What outlives the process (JSON): the stored fields, nothing of this run's state."""
        return {
            "id": self.id,
            "stream_key": self.stream_key,
            "playback_id": self.playback_id,
            "pipeline": self.pipeline,
            "params": self.params,
            "name": self.name,
            "output_rtmp_url": self.output_rtmp_url,
            "created": self.created,
            "reload_failure": self.reload_failure.to_json() if self.reload_failure else None,
            "node": self.node,
        }

    @property
    def width(self) -> int:
        return int(self.params.get("width", 512))

    @property
    def height(self) -> int:
        return int(self.params.get("height", 512))

    @property
    def fit(self) -> FitMode:
        """How input of another aspect ratio reaches the stream's size (:mod:`media.fit`)."""
        return fit_mode(self.params.get(PARAM))

    def urls(self, base_url: str) -> dict[str, str]:
        base = base_url.rstrip("/") + "/live/video-to-video"
        return {
            "whip_url": f"{base}/{self.stream_key}/whip",
            "output_stream_url": self.external_whep_url or f"{base}/{self.playback_id}/whep",
            "local_whep_url": f"{base}/{self.playback_id}/whep",
            "mjpeg_url": f"{base}/{self.playback_id}/mjpeg",
            "hls_url": f"{base}/{self.playback_id}/hls/index.m3u8",
        }

    def to_json(self, base_url: str) -> dict[str, Any]:
        urls = self.urls(base_url)
        return {
            "id": self.id,
            "stream_key": self.stream_key,
            "whip_url": urls["whip_url"],
            "output_playback_id": self.playback_id,
            "output_stream_url": urls["output_stream_url"],
            "created_at": datetime.fromtimestamp(self.created, UTC).isoformat().replace("+00:00", "Z"),
            "name": self.name,
            "author": "self-hosted",
            "from_playground": False,
            "is_smoke_test": False,
            "gateway_host": base_url.split("://", 1)[-1].rstrip("/"),
            "pipeline": self.pipeline,
            "params": self.params,
            "output_rtmp_url": self.output_rtmp_url,
            "mjpeg_url": urls["mjpeg_url"],
            "hls_url": urls["hls_url"],
        }


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Full effective params, or a 422 naming the first bad field."""
    try:
        valid = StreamParams.model_validate(params).model_dump(mode="json")
    except ValidationError as exc:
        errors = [{**e, "loc": ("params", *e["loc"])} for e in exc.errors()]
        details = [{"loc": client_location(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        raise ApiError(422, describe_validation(errors), "REQUEST/VALIDATION", details) from None
    if valid[PARAM] is None:
        del valid[PARAM]
    return valid


def check_named_streams(config: Config) -> None:
    """Refuse, before the server starts, named streams whose params a stream would refuse."""
    for index, named in enumerate(config.server.named_streams):
        try:
            validate_params({**config.stream_defaults(), **named.params})
        except ApiError as exc:
            where = f"server.named_streams[{index}] ({named.name!r})"
            raise ConfigError(f"{where}: {exc.message}") from None


def worker_params(params: dict[str, Any]) -> dict[str, Any]:
    """What the channel's worker gets: the params with ``fit`` always said (both engines take it)."""
    return {**params, PARAM: params.get(PARAM, DEFAULT_FIT)}


class StreamListener:
    """A part of the server that follows streams (outputs, WebRTC sessions); override what you need.

    The manager awaits each event in every listener, in subscription order,
    before the call that caused it returns.
    """

    async def stream_created(self, stream: Stream) -> None:
        """The stream exists and its channel is open."""

    async def stream_changed(self, stream: Stream) -> None:
        """Its outputs (``output_rtmp_url``) changed; params go to the worker through the hub."""

    async def stream_closed(self, stream: Stream) -> None:
        """It stops here (deleted, or the server stops); its channel closes right after the listeners
        return.
        """


class StoreUnavailable(RuntimeError):
    """The store cannot take a write now (the cluster's registry is unreachable): try again later."""


class StreamRecords(Protocol):
    """Where streams outlive the process: a node's SQLite file, or the cluster's shared bucket.

    ``save`` and ``delete`` raise :class:`StoreUnavailable` when the write did not happen.
    """

    async def save(self, stream: Stream) -> None: ...

    async def delete(self, stream_id: str) -> None: ...

    async def load(self) -> list[Stream]: ...


class StreamManager:
    """The streams by id, key and playback id; publishes created, changed and closed to listeners.

    With a ``store`` every change is written through, and :meth:`restore`
    brings the streams back after a restart: same ids, keys and playback
    ids, channels open again, outputs started again by the listeners. In a
    cluster the store is shared and :meth:`follow` applies here what the
    other nodes change; ``node`` is this node's name.
    """

    def __init__(self, hub: Hub, store: StreamRecords | None = None, node: str = "") -> None:
        self.hub = hub
        self.store = store
        self.node = node
        self.streams: dict[str, Stream] = {}
        self._by_key: dict[str, Stream] = {}
        self._by_playback: dict[str, Stream] = {}
        self._listeners: list[StreamListener] = []
        #: per stream, the reload being followed: its task and the relay session it reads
        self._reloads: dict[str, tuple[asyncio.Task[None], LocalViewer]] = {}

    def subscribe(self, listener: StreamListener) -> None:
        self._listeners.append(listener)

    async def create(
        self,
        pipeline: str,
        params: dict[str, Any],
        name: str = "",
        output_rtmp_url: str | None = None,
        stream_key: str | None = None,
    ) -> Stream:
        """A new stream; ``stream_key``: one the operator chose (a named stream), else a random one."""
        stream = Stream(
            id=ids.stream_id(),
            stream_key=stream_key or ids.stream_key(),
            playback_id=ids.playback_id(),
            pipeline="streamdiffusion" if pipeline.startswith("pip_") else pipeline,
            params=params,
            name=name,
            output_rtmp_url=output_rtmp_url,
            node=self.node,
        )
        await self._save(stream)
        try:
            await self._start(stream)
        except ProtocolError as exc:
            if exc.code is not ErrorCode.TOO_MANY_CHANNELS:
                raise
            if self.store is not None:
                await self.store.delete(stream.id)
            raise ApiError(
                503,
                f"the server is full: {exc}",
                "STREAMS/CAPACITY",
                {"max_channels": self.hub.config.max_channels},
                {"Retry-After": "10"},
            ) from None
        return stream

    async def ensure_named(self, name: str, stream_key: str, params: dict[str, Any]) -> Stream:
        """The stream a configuration names by its key: the one kept (restored) or a new one."""
        existing = self.by_stream_key(stream_key)
        if existing is not None:
            return existing
        return await self.create("streamdiffusion", validate_params(params), name, stream_key=stream_key)

    async def restore(self) -> int:
        """Start every stream the store holds (at server start); returns how many."""
        restored = await self.store.load() if self.store is not None else []
        for stream in restored:
            await self._start(stream)
        return len(restored)

    async def _start(self, stream: Stream) -> None:
        # keyed: relay clients need the stream key (or the relay token) to read or feed it
        self.hub.open_channel(
            stream.channel, worker_params(stream.params), key=stream.stream_key, home=stream.node or None
        )
        stream.serving = stream.params
        self.streams[stream.id] = stream
        self._by_key[stream.stream_key] = stream
        self._by_playback[stream.playback_id] = stream
        for listener in self._listeners:
            await listener.stream_created(stream)

    def get(self, stream_id: str) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise not_found()
        return stream

    def by_stream_key(self, key: str) -> Stream | None:
        return self._by_key.get(key)

    def by_playback_id(self, playback_id: str) -> Stream | None:
        return self._by_playback.get(playback_id)

    async def update(
        self,
        stream: Stream,
        patch: dict[str, Any],
        hot_only: bool = False,
        name: str | None = None,
        output_rtmp_url: str | None = None,
    ) -> Stream:
        """Merge ``patch`` into the params and send them to the worker.

        ``hot_only`` refuses (409) changes that would rebuild the pipeline.
        ``output_rtmp_url``: None leaves the RTMP output alone, "" stops it.
        """
        params = validate_params({**stream.params, **patch})
        if hot_only:
            needs = needs_reload(stream.params, params)
            if needs:
                raise ApiError(
                    409,
                    f"{', '.join(sorted(needs))} cannot change without a reload; "
                    "use PATCH /v1/streams/{id}",
                    "STREAMS/RELOAD_REQUIRED",
                    {"reload_fields": sorted(needs)},
                )
        before = (stream.params, stream.name, stream.output_rtmp_url)
        stream.params = params
        if name is not None:
            stream.name = name
        rtmp_changed = output_rtmp_url is not None and (output_rtmp_url or None) != stream.output_rtmp_url
        if output_rtmp_url is not None:
            stream.output_rtmp_url = output_rtmp_url or None
        try:
            await self._save(stream)
        except ApiError:
            stream.params, stream.name, stream.output_rtmp_url = before  # nothing changed
            raise
        self._send_params(stream, params)
        if rtmp_changed:
            for listener in self._listeners:
                await listener.stream_changed(stream)
        return stream

    def _send_params(self, stream: Stream, params: dict[str, Any]) -> None:
        """``params`` to the stream's channel, and its reload followed where a worker serves it here."""
        channel = self.hub.channels.get(stream.channel)
        if channel is None:
            return
        # a running engine reloads for this change: follow it (joined before the params go out)
        reloads = (
            channel.worker is not None
            and channel.engine_state in (EngineState.READY, EngineState.RELOADING)
            and bool(needs_reload(stream.serving, params))
        )
        watcher = LocalViewer(self.hub, stream.channel) if reloads else None
        version = self.hub.set_params(channel, worker_params(params), replace=True)
        self._stop_following(stream)
        if watcher is None:
            stream.serving = params  # hot, or loaded afresh by a worker that has no engine yet
        else:
            task = asyncio.create_task(self._follow(stream, version, params, watcher))
            self._reloads[stream.id] = (task, watcher)

    async def _follow(
        self, stream: Stream, version: int, wanted: dict[str, Any], watcher: LocalViewer
    ) -> None:
        """Wait for the reload of ``version``; when it fails, go back to the params that serve."""
        try:
            outcome = await watch_reload(watcher.events(), version)
        finally:
            watcher.close()
            if self._reloads.get(stream.id, (None, None))[1] is watcher:
                del self._reloads[stream.id]
        if outcome is None or stream.ended.is_set():
            return
        ok, error = outcome
        if ok:
            stream.serving = wanted
            return
        serving = serving_after_failure(stream.serving, wanted)
        stream.reload_failure = failure(version, error, stream.serving, wanted)
        stream.params = stream.serving = serving
        if self.store is not None:
            try:
                await self.store.save(stream)
            except StoreUnavailable as exc:  # kept here; the next change writes it again
                log.warning("stream %s: its failed reload could not be stored: %s", stream.id, exc)
        channel = self.hub.channels.get(stream.channel)
        if channel is not None:  # the channel's params too: a worker that takes it over loads what served
            self.hub.set_params(channel, worker_params(serving), replace=True)

    def _stop_following(self, stream: Stream) -> None:
        following = self._reloads.pop(stream.id, None)
        if following is not None:
            task, watcher = following
            watcher.close()  # its events end: the task returns
            task.cancel()

    async def delete(self, stream: Stream) -> None:
        """Gone everywhere: the stored record, the outputs and sessions, the channel and its worker."""
        if self.store is not None:
            try:
                await self.store.delete(stream.id)
            except StoreUnavailable as exc:
                raise _unavailable(exc) from None
        await self._stop(stream)

    async def _save(self, stream: Stream) -> None:
        """Write ``stream`` through to the store; a 503 when the store cannot take it now."""
        if self.store is not None:
            try:
                await self.store.save(stream)
            except StoreUnavailable as exc:
                raise _unavailable(exc) from None

    async def follow(self, changes: AsyncIterator[Stream | Removed | None]) -> None:
        """Apply here the streams other nodes create, change and delete (runs until cancelled).

        ``changes`` is the shared store's (:meth:`api.streams.shared.SharedStreams.changes`); this
        node's own writes come back too and change nothing. Two streams with one
        key (two nodes creating a named stream at once): the older one stays.
        """
        async for change in changes:
            if change is None:
                continue
            stream_id = change.id if isinstance(change, Stream) else change.stream_id
            try:
                if isinstance(change, Stream):
                    await self._mirror(change)
                elif (gone := self.streams.get(stream_id)) is not None:
                    await self._stop(gone)
            except Exception:  # one stream's trouble (a full channel table...) never stops the others
                # the id only: a stream's record holds its key
                log.exception("could not apply a change of the stream registry to stream %s", stream_id)

    async def _mirror(self, record: Stream) -> None:
        current = self.streams.get(record.id)
        if current is None:
            rival = self._by_key.get(record.stream_key)
            if rival is not None:
                newer = max((rival, record), key=lambda s: (s.created, s.id))
                if self.store is not None:
                    with contextlib.suppress(StoreUnavailable):  # another node deletes it then
                        await self.store.delete(newer.id)
                if newer is record:
                    return
                await self._stop(rival)
            await self._start(record)
            return
        if current.record() == record.record():
            return  # our own write, or news we have
        if (current.stream_key, current.playback_id) != (record.stream_key, record.playback_id):
            await self._stop(current)  # never happens through the API: start it afresh
            await self._start(record)
            return
        rtmp_changed = record.output_rtmp_url != current.output_rtmp_url
        current.name, current.output_rtmp_url = record.name, record.output_rtmp_url
        current.reload_failure, current.node = record.reload_failure, record.node
        if record.params != current.params:
            current.params = record.params
            self._send_params(current, record.params)
        if rtmp_changed:
            for listener in self._listeners:
                await listener.stream_changed(current)

    async def stop_all(self) -> None:
        """At shutdown: stop every stream here, keeping the stored records for the next start."""
        for stream in list(self.streams.values()):
            await self._stop(stream)

    async def _stop(self, stream: Stream) -> None:
        stream.ended.set()
        self._stop_following(stream)
        self.streams.pop(stream.id, None)
        self._by_key.pop(stream.stream_key, None)
        self._by_playback.pop(stream.playback_id, None)
        for listener in self._listeners:
            await listener.stream_closed(stream)
        self.hub.close_channel(stream.channel)

    def status(
        self,
        stream: Stream,
        base_url: str,
        outputs: dict[str, dict[str, Any]] | None = None,
        min_input_fps: float = DEGRADED_INPUT_FPS,
    ) -> dict[str, Any]:
        """Daydream's status ``data``, and ours; input under ``min_input_fps`` is DEGRADED_INPUT."""
        outputs = outputs or {}
        channel = self.hub.channels.get(stream.channel)
        stats = channel.stats() if channel else {}
        fps_in, fps_out = stats.get("fps_in", 0.0), stats.get("fps_out", 0.0)
        engine_state = stats.get("engine_state", "waiting_for_worker")
        return {
            "stream_id": stream.id,
            "pipeline": stream.pipeline,
            "state": stream_state(engine_state, fps_in, fps_out, min_input_fps),
            "detail": _detail(channel, engine_state),
            "queue": _queue(channel),
            "inference_status": {
                "start_time": _ms(stream.created),
                "last_params_update_time": _ms(channel.last_params_time) if channel else None,
                "last_params": stream.params,
                "input_fps": fps_in,
                "output_fps": fps_out,
                "last_input_time": _ms(channel.last_input_time) if channel else None,
                "last_output_time": _ms(channel.last_output_time) if channel else None,
                "restart_count": stats.get("restart_count", 0),
                "last_restart_time": _ms(channel.last_restart_time) if channel else None,
                "last_error": stats.get("last_error"),
                "last_error_time": _ms(channel.last_error_time) if channel else None,
                "last_reload_error": stream.reload_failure.to_json() if stream.reload_failure else None,
            },
            "gateway_status": {
                "whep_url": stream.urls(base_url)["output_stream_url"],
                "error": next((o["last_error"] for o in outputs.values() if o.get("last_error")), None),
                "outputs": outputs,
                "ingest_metrics": {"frames_in": stats.get("frames_in", 0), "drops": stats.get("drops", {})},
            },
            "worker": stats.get("worker"),
            "engine": stats.get("engine", {}),
            "latency_ms": stats.get("latency_ms", {"p50": None, "p99": None}),
            "frames_out": stats.get("frames_out", 0),
            "params_version": stats.get("params_version", 0),
            "output_params_version": stats.get("output_params_version", 0),
            "drops": stats.get("drops", {}),
            "gpu_memory_mb": stats.get("worker_stats", {}).get("gpu_memory_mb"),
            #: while the worker loads: stage, done/total (steps or bytes), fraction, eta_s
            "progress": stats.get("progress"),
            "worker_stats": stats.get("worker_stats", {}),
        }


def _unavailable(exc: StoreUnavailable) -> ApiError:
    return ApiError(
        503,
        f"the stream registry is unreachable: {exc}",
        "STREAMS/REGISTRY_UNAVAILABLE",
        None,
        {"Retry-After": "5"},
    )


def _detail(channel: Channel | None, engine_state: str) -> str:
    """Why the stream is where it is, for people: the queue's words while it waits for a slot."""
    if channel is not None and channel.worker is None and channel.announced is not None:
        return channel.announced.detail  # "waiting for a slot: 4 of 4 in use (2nd in the queue)"
    if engine_state == EngineState.IDLE:
        return "idle: no input for a while, so its worker slot was given back; input brings it back"
    return engine_state


def _queue(channel: Channel | None) -> dict[str, int | None] | None:
    """While waiting for a slot: its place in the queue (1: next) and the slots in use."""
    if channel is None or channel.worker is not None or channel.announced is None:
        return None
    status = channel.announced
    return {"position": status.position, "in_use": status.in_use, "slots": status.slots}


def stream_state(
    engine_state: EngineState | str, fps_in: float, fps_out: float, min_input_fps: float = DEGRADED_INPUT_FPS
) -> str:
    """Daydream's states from what the relay knows. Clients wait for ONLINE.

    Input arriving, but slower than ``min_input_fps``, is DEGRADED_INPUT (the
    stream is back ONLINE as soon as the rate recovers); ``0`` never says so.
    """
    if engine_state == EngineState.ERROR:
        return "ERROR"
    if engine_state in (EngineState.WAITING_FOR_WORKER, EngineState.LOADING):
        return "LOADING"
    if fps_in <= 0:
        return "OFFLINE"
    if fps_in < min_input_fps:
        return "DEGRADED_INPUT"
    if fps_out < fps_in * 0.5:
        return "DEGRADED_INFERENCE"
    return "ONLINE"


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)
