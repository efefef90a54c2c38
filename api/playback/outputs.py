"""Stream outputs that run as child processes: RTMP push and HLS.

PyAV network output runs in its own process (it can hold the GIL in network
I/O and ``close()``; see ../shared/media-notes.md). An RTMP output starts
with the stream when ``output_rtmp_url`` is set and restarts when it
changes. With MediaMTX configured, every stream's output is also pushed
there over RTMP and the stream's WHEP URL is MediaMTX's. HLS starts on the
first playlist request (no encoder runs for
streams nobody watches over HLS); that first playlist request waits for the
first segment, and only answers 503 with ``Retry-After`` when none comes in
time. Every HLS answer carries CORS headers for players on other origins.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.server.config import Config
from api.server.errors import error_response, not_found
from api.server.services import services
from api.streams.manager import Stream, StreamListener
from media.hls import PLAYLIST, hls_dir_for, hls_response, remove_dir
from media.output_process import OutputProcess
from media.rtmp import TargetError, mask_url

router = APIRouter()
log = logging.getLogger("api.outputs")


@dataclass(frozen=True)
class Republisher:
    """An external server (MediaMTX) that gets every stream's output and serves WHEP for it.

    ``publish_base`` is where we push (``rtmp://mediamtx:1935``); the path is
    the stream's playback id, which MediaMTX accepts as a new path.
    ``whep_base`` is its WebRTC address (``http://mediamtx:8889``); its WHEP
    URL for a path is ``{whep_base}/{path}/whep``.
    """

    publish_base: str
    whep_base: str

    def publish_url(self, path: str) -> str:
        return f"{self.publish_base.rstrip('/')}/{path}"

    def whep_url(self, path: str) -> str:
        return f"{self.whep_base.rstrip('/')}/{path}/whep"


class Outputs(StreamListener):
    """The API's output processes per stream, and the HLS directories they write.

    ``hls_base`` is the configured ``server.hls_dir``; None means a temporary
    directory, made on the first HLS request and removed with the last HLS
    output, so a server that stops (or never serves HLS) leaves none behind.
    A stream's own directory goes when the stream closes; a configured base
    is never removed (it may hold other things). In a cluster every node
    knows every stream, but a stream's pushes (RTMP, republishing) run on one
    node: where ``pushes_here`` says (the node that created it while it is
    up; :meth:`follow_pushers` moves them when that changes); HLS runs
    wherever it is asked for.
    """

    def __init__(
        self,
        relay_url: str,
        token: str | None,
        hls_base: Path | None,
        republish: Republisher | None = None,
        first_playlist_wait_s: float = 15.0,
        pushes_here: Callable[[Stream], bool] | None = None,
    ) -> None:
        self._pushes_here = pushes_here or (lambda stream: True)
        self.relay_url, self.token, self.hls_base = relay_url, token, hls_base
        #: how long a first playlist request waits for the first segment before a 503 (players with
        #: default settings retry a 503 once, about a second later, and ignore Retry-After)
        self.first_playlist_wait_s = first_playlist_wait_s
        self.republish = republish
        self.rtmp: dict[str, OutputProcess] = {}
        self.hls: dict[str, OutputProcess] = {}
        self.external: dict[str, OutputProcess] = {}
        self._temp_base: Path | None = None

    async def stream_created(self, stream: Stream) -> None:
        await self.stream_changed(stream)
        if self.republish is not None:
            stream.external_whep_url = self.republish.whep_url(stream.playback_id)
            if self._pushes_here(stream):
                await self._republish(stream)

    async def _republish(self, stream: Stream) -> None:
        assert self.republish is not None
        output = OutputProcess(
            self.relay_url,
            stream.channel,
            token=self.token,
            rtmp_url=self.republish.publish_url(stream.playback_id),
        )
        self.external[stream.id] = output
        await output.start()

    async def follow_pushers(self, streams: Iterable[Stream]) -> None:
        """Start the pushes that now belong here and stop those that moved away (a cluster's node
        came or went); called periodically. Pushes already where they belong are left alone.
        """
        for stream in list(streams):
            here = self._pushes_here(stream)
            if here != (stream.id in self.rtmp) and (stream.output_rtmp_url or stream.id in self.rtmp):
                await self.stream_changed(stream)
            if self.republish is not None and here != (stream.id in self.external):
                if here:
                    await self._republish(stream)
                else:
                    await self.external.pop(stream.id).stop()

    async def stream_changed(self, stream: Stream) -> None:
        """Start, restart or stop the RTMP push to match ``stream.output_rtmp_url``."""
        current = self.rtmp.pop(stream.id, None)
        if current is not None:
            await current.stop()
        if stream.output_rtmp_url and self._pushes_here(stream):
            try:
                output = OutputProcess(
                    self.relay_url, stream.channel, rtmp_url=stream.output_rtmp_url, token=self.token
                )
            except TargetError as exc:  # stored before the API checked URLs: serve the stream without it
                log.warning(
                    "stream %s: RTMP output %s not started: %s",
                    stream.id,
                    mask_url(stream.output_rtmp_url),
                    exc,
                )
                return
            self.rtmp[stream.id] = output
            await output.start()

    def _hls_base(self) -> Path:
        """The configured base, or our temporary one (made now if there is none)."""
        if self.hls_base is not None:
            return self.hls_base
        if self._temp_base is None:
            self._temp_base = Path(tempfile.mkdtemp(prefix="sd-hls-"))
        return self._temp_base

    async def hls_for(self, stream: Stream) -> Path:
        output = self.hls.get(stream.id)
        if output is None:
            output = OutputProcess(
                self.relay_url,
                stream.channel,
                token=self.token,
                hls_dir=hls_dir_for(self._hls_base(), stream.id),
            )
            self.hls[stream.id] = output
            await output.start()
        assert output.hls_dir is not None
        return output.hls_dir

    async def stream_closed(self, stream: Stream) -> None:
        for outputs in (self.rtmp, self.hls, self.external):
            output = outputs.pop(stream.id, None)
            if output is not None:
                await output.stop()
                if output.hls_dir is not None:
                    remove_dir(output.hls_dir)
        if self._temp_base is not None and not self.hls:  # checked after the awaits above
            remove_dir(self._temp_base)
            self._temp_base = None

    def state(self, stream: Stream) -> dict[str, Any]:
        return {
            kind: outputs[stream.id].state()
            for kind, outputs in (("rtmp", self.rtmp), ("hls", self.hls), ("republish", self.external))
            if stream.id in outputs
        }


#: every HLS answer, errors included: players (hls.js) on other origins read them and the Retry-After
HLS_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Retry-After, Content-Length",
}
PLAYLIST_POLL_S = 0.1


@router.options("/live/video-to-video/{playback_id}/hls/{filename}")
async def hls_preflight() -> Response:
    return Response(
        status_code=204,
        headers={
            **HLS_CORS,
            "Access-Control-Allow-Methods": "GET, OPTIONS",
            "Access-Control-Allow-Headers": "Range",
            "Access-Control-Max-Age": "86400",
        },
    )


@router.get("/live/video-to-video/{playback_id}/hls/{filename}")
async def hls_file(playback_id: str, filename: str, request: Request) -> Response:
    """A playlist or segment. HLS starts with the first request for it; that request waits for the
    first segment (up to ``server.hls_first_playlist_wait_s``), so a player with default settings plays."""
    found = services(request)
    stream = found.streams.by_playback_id(playback_id)
    if stream is None:
        error = not_found()
        error.headers = HLS_CORS
        raise error
    directory = await found.outputs.hls_for(stream)
    response = await hls_response(directory, filename)
    if response.status_code == 404 and filename == PLAYLIST:
        deadline = asyncio.get_running_loop().time() + found.outputs.first_playlist_wait_s
        while response.status_code == 404 and asyncio.get_running_loop().time() < deadline:
            if await request.is_disconnected():
                break
            await asyncio.sleep(PLAYLIST_POLL_S)  # the encoder writes the playlist by rename: poll for it
            response = await hls_response(directory, filename)
        if response.status_code == 404:
            return error_response(
                503,
                "HLS output is starting; retry shortly",
                "STREAMS/HLS_STARTING",
                headers={**HLS_CORS, "Retry-After": "2"},
            )
    response.headers.update(HLS_CORS)
    return response


def outputs_for(
    config: Config,
    relay_url: str,
    relay_token: str | None,
    pushes_here: Callable[[Stream], bool] | None = None,
) -> Outputs:
    """The outputs ``config`` asks for: where HLS goes, and the MediaMTX republisher if configured;
    ``pushes_here``: in a cluster, whether this node runs a stream's pushes.
    """
    base = Path(config.server.hls_dir) if config.server.hls_dir else None
    mediamtx = config.mediamtx
    republish = (
        Republisher(mediamtx.publish_url, mediamtx.whep_url)
        if mediamtx.publish_url and mediamtx.whep_url
        else None
    )
    return Outputs(
        relay_url, relay_token, base, republish, config.server.hls_first_playlist_wait_s, pushes_here
    )
