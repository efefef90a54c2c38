"""Seed 001's ``/api/ws/{userId}?mode=image|video``: the frame loop of its frontend.

The flow, exactly as the seed gives it::

    server: {"status": "connected"}
    server: {"status": "send_frame"}
    client: {"status": "next_frame"}
    client: {...params...}
    client: <image bytes>             (image mode only)
    ... server: {"status": "send_frame"} again, and so on

Results are not sent on the socket: the page shows ``GET
/api/stream/{userId}`` (MJPEG). The server sends the next ``send_frame``
when the worker has produced the result of the frame it was given, so the
client sends exactly as fast as the engine runs (one frame in flight, no
backlog). Other statuses, as in the seed's server:

* ``{"status": "wait", "message": "waiting for a slot: 4 of 4 in use (2nd
  in the queue)", "queue_position": 2}`` while no worker is free for the
  session, again each time its place changes; ``send_frame`` follows once
  one is;
* ``{"status": "error", "message"}`` only for what ends the session (the
  seed's frontend takes it for a disconnect): ``Server is full`` (more than
  ``max_queue_size`` sessions), a userId already connected, an engine that
  failed to load; the socket is then closed;
* ``{"status": "warning", "message"}`` for what the session survives
  (ours; the seed's loop ignores statuses it does not know): invalid params,
  a message that is not JSON, an unknown status, params or bytes out of
  turn, an undecodable image, or no image within ``image_wait_s`` after the
  params. The bundle is dropped and ``send_frame`` follows (unless a frame
  is still being processed: its result brings one), so a client that follows
  the seed's loop never stalls;
* ``{"status": "timeout", "message": "Your session has ended"}`` after
  ``timeout_s`` (when set), then the socket is closed.

An empty image (the page before the camera starts) is answered by
``send_frame``, as the seed's server did. In video mode (txt2img) the
client sends no image; a black frame of the session's size drives the
worker instead.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
import weakref
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, WebSocket

from api.playback.mjpeg import MjpegStream
from api.seeds.access import admit
from api.seeds.channel import Result, SessionChannel
from api.seeds.params import ParamsError, initial_params, merge_params
from api.seeds.settings001 import Seed001Options
from api.seeds.socket import Outgoing, first_done, receive
from api.server.services import services
from media.codec import encode_image
from relay.local import Closed
from wire.errors import ProtocolError
from wire.messages import Report, ReportEvent
from wire.relay_messages import ChannelState, EngineState, RelayMessage, Status

log = logging.getLogger("api.seeds")

router = APIRouter()

CONNECTED = {"status": "connected"}
SEND_FRAME = {"status": "send_frame"}
TIMEOUT = {"status": "timeout", "message": "Your session has ended"}
MAX_USER_ID = 128
_NOT_JSON = object()


def error(message: str) -> dict[str, Any]:
    """A problem that ends the session (the seed's frontend disconnects on it)."""
    return {"status": "error", "message": message}


def wait(status: Status | None) -> dict[str, Any]:
    """The seed's ``wait``, with why and the session's place in the queue (the demo ignores extras)."""
    if status is None:
        return {"status": "wait", "message": "waiting for a worker"}
    return {"status": "wait", "message": status.detail, "queue_position": status.position}


def warning(message: str) -> dict[str, Any]:
    """A problem the session survives: ``send_frame`` follows."""
    return {"status": "warning", "message": message}


class Mode(enum.StrEnum):
    """``?mode=``: the client sends images (img2img), or none and a black frame drives txt2img."""

    IMAGE = "image"
    VIDEO = "video"


class Expect(enum.Enum):
    NEXT_FRAME = "next_frame"
    PARAMS = "params"
    IMAGE = "image"


class Session:
    """One connected user: its socket, its channel, and where it is in the frame loop."""

    def __init__(
        self, user_id: str, mode: Mode, out: Outgoing, channel: SessionChannel, opts: Seed001Options
    ) -> None:
        self.user_id, self.mode, self.out, self.channel, self.opts = user_id, mode, out, channel, opts
        self.streams: weakref.WeakSet[MjpegStream] = weakref.WeakSet()  # its MJPEG viewers
        self.expect = Expect.NEXT_FRAME
        self.awaiting: int | None = None  # seq whose result releases the next send_frame
        self.published_at = 0.0
        self.waiting = not channel.has_worker
        #: the queue news the client gets at connect (its events leave out the hub's repeat of it)
        self.told_at_connect = channel.queue_status
        self._bundle_error: str | None = None
        self._bundle_params: dict[str, Any] | None = None
        self._image_timer: asyncio.TimerHandle | None = None

    # -- the client's side ----------------------------------------------------

    async def read(self, websocket: WebSocket) -> None:
        while (message := await receive(websocket)) is not None:
            if isinstance(message, bytes):
                await self._on_bytes(message)
            else:
                await self._on_text(message)

    async def _on_text(self, text: str) -> None:
        try:
            data: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            data = _NOT_JSON
        if isinstance(data, dict) and data.get("status") == "next_frame":
            self.expect = Expect.PARAMS  # also restarts a bundle left unfinished
            self._bundle_error, self._bundle_params = None, None
            self._cancel_image_timer()
            return
        if self.expect is not Expect.PARAMS:
            wanted = "image bytes" if self.expect is Expect.IMAGE else '{"status": "next_frame"}'
            await self._recover(f"expected {wanted}")
            return
        if data is _NOT_JSON:
            self._bundle_error = "params must be JSON"
        else:
            try:
                self._bundle_params = merge_params(self.channel.params, data).params
            except ParamsError as exc:
                self._bundle_error = str(exc)
        if self._bundle_error is not None:
            await self.out.json(warning(self._bundle_error))
        if self.mode is Mode.IMAGE:
            self.expect = Expect.IMAGE
            self._image_timer = asyncio.get_running_loop().call_later(
                self.opts.image_wait_s, self._image_late
            )
        else:
            await self._finish_bundle(None)

    async def _on_bytes(self, data: bytes) -> None:
        if self.expect is not Expect.IMAGE:
            wanted = "params JSON" if self.expect is Expect.PARAMS else '{"status": "next_frame"}'
            await self._recover(f"expected {wanted}, not bytes")
            return
        if not data:  # no camera frame yet: ask again, as the seed's server does
            self.expect = Expect.NEXT_FRAME
            await self.out.json(SEND_FRAME)
            return
        await self._finish_bundle(data)

    async def _recover(self, problem: str) -> None:
        """Drop the bundle, say why, and ask for the next one (unless a result is on its way)."""
        self.expect = Expect.NEXT_FRAME
        self._bundle_error = self._bundle_params = None
        self._cancel_image_timer()
        await self.out.json(warning(problem))
        if self.awaiting is None and not self.waiting:
            await self.out.json(SEND_FRAME)

    def _image_late(self) -> None:
        self._image_timer = None
        if self.expect is Expect.IMAGE and not self.out.closed:
            asyncio.get_running_loop().create_task(
                self._recover(f"no image within {self.opts.image_wait_s:g} s after the params")
            )

    def _cancel_image_timer(self) -> None:
        if self._image_timer is not None:
            self._image_timer.cancel()
            self._image_timer = None

    async def _finish_bundle(self, image: bytes | None) -> None:
        """Apply the bundle's params and publish its image, or drop it and ask again."""
        self._cancel_image_timer()
        self.expect = Expect.NEXT_FRAME
        if self._bundle_error is not None or self._bundle_params is None:
            await self.out.json(SEND_FRAME)
            return
        params = self._bundle_params
        try:
            payload = image if image is not None else _black_jpeg(params["width"], params["height"])
            if params != self.channel.params:
                self.channel.set_params(params)
            self.awaiting = self.channel.publish(payload)
            self.published_at = time.monotonic()
        except ProtocolError as exc:
            await self.out.json(warning(str(exc)))
            await self.out.json(SEND_FRAME)

    # -- the engine's side ----------------------------------------------------

    async def pump(self) -> None:
        """Turn hub news into statuses: results release ``send_frame``; workers come and go."""
        events = self.channel.events(told=self.told_at_connect)
        while not self.out.closed:
            try:
                event = await asyncio.wait_for(anext(events), self._stall_timeout())
            except TimeoutError:
                log.info(
                    "session %s: no result in %.0f s; asking for a new frame", self.user_id, self.opts.stall_s
                )
                await self._release()
                continue
            match event:
                case Result():
                    if self.awaiting is not None and event.frame.seq >= self.awaiting:
                        await self._release()
                case Closed():
                    return
                case _:
                    if not await self._on_control(event):
                        return

    def _stall_timeout(self) -> float | None:
        if self.awaiting is None or self.channel.engine_state is not EngineState.READY:
            return None
        return max(0.0, self.published_at + self.opts.stall_s - time.monotonic())

    async def _release(self) -> None:
        self.awaiting = None
        await self.out.json(SEND_FRAME)

    async def _on_control(self, message: RelayMessage) -> bool:
        """Handle one hub message; False ends the session."""
        match message:
            case Status(state=ChannelState.WAITING_FOR_WORKER):  # again as its place changes
                self.waiting, self.awaiting = True, None
                await self.out.json(wait(message))
            case Status(state=ChannelState.ASSIGNED) if self.waiting or self.awaiting is not None:
                self.waiting = False
                await self._release()  # a new worker has no frame of ours: send one
            case Report(event=ReportEvent.ERROR):
                if self.channel.engine_state is EngineState.ERROR:
                    await self.out.json(error(message.message))
                    return False
                log.warning("session %s: %s", self.user_id, message.message)
                if self.awaiting is not None:
                    await self._release()  # that frame failed; the session goes on
        return True

    async def timer(self) -> None:
        await asyncio.sleep(self.opts.timeout_s)  # the session's allowed length, by design
        await self.out.json(TIMEOUT)

    def close(self) -> None:
        """Release the channel; MJPEG responses of this user end with it."""
        self._cancel_image_timer()
        for stream in list(self.streams):
            stream.viewer.close()
        self.channel.close()


@router.websocket("/api/ws/{user_id}")
async def seed001_socket(websocket: WebSocket, user_id: str, mode: str | None = None) -> None:
    if not await admit(websocket):
        return
    await websocket.accept()
    out = Outgoing(websocket)
    running = services(websocket)
    opts, reg = running.seeds.options, running.seeds.sessions
    mode = mode or opts.input_mode
    max_queue = int(running.config.server.max_queue_size)
    refusal, code = None, 1008  # policy violation, unless the server is just busy
    if mode not in tuple(Mode):
        refusal = f"unknown mode {mode!r}: use image or video"
    elif not user_id or len(user_id) > MAX_USER_ID:
        refusal = f"userId must have 1 to {MAX_USER_ID} characters"
    elif max_queue > 0 and len(reg) >= max_queue:
        refusal, code = "Server is full", 1013
    elif user_id in reg:
        refusal = "User already connected"
    if refusal is None:
        try:
            params = initial_params(
                running.config.default_stream_params(), mode="img2img" if mode == Mode.IMAGE else "txt2img"
            )
            channel = SessionChannel(running.hub, "ws001", params)
        except ParamsError as exc:  # the server's own default_params are invalid
            refusal, code = str(exc), 1011
        except ProtocolError as exc:  # the relay's channel limit
            refusal, code = f"Server is full: {exc}", 1013
    if refusal is not None:
        await out.json(error(refusal))
        await out.close(code)
        return
    session = reg[user_id] = Session(user_id, Mode(mode), out, channel, opts)
    try:
        await out.json(CONNECTED)
        await out.json(wait(session.told_at_connect) if session.waiting else SEND_FRAME)
        tasks = [session.read(websocket), session.pump()]
        if opts.timeout_s > 0:
            tasks.append(session.timer())
        with running.farewells.registered(lambda: out.json(error("Server is shutting down"))):
            await first_done(*tasks)
    finally:
        if reg.get(user_id) is session:
            del reg[user_id]
        session.close()
        await out.close()


@functools.lru_cache(maxsize=8)
def _black_jpeg(width: int, height: int) -> bytes:
    """The input that drives a video-mode (txt2img) session: the engine ignores its pixels."""
    return encode_image(np.zeros((height, width, 3), np.uint8))
