"""Stream outputs that run as child processes: RTMP push and HLS.

PyAV network output runs in its own process (it can hold the GIL in network
I/O and ``close()``; see ../shared/media-notes.md). An RTMP output starts
with the stream when ``output_rtmp_url`` is set and restarts when it
changes. HLS starts on the first playlist request (no encoder runs for
streams nobody watches over HLS) and answers 503 with ``Retry-After`` until
the first segment exists.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from api.errors import error_response, not_found
from api.streams import Stream
from media.hls import hls_dir_for, hls_response, remove_dir
from media.output_process import OutputProcess

router = APIRouter()


class Outputs:
    def __init__(self, relay_url: str, token: str | None, hls_base: Path) -> None:
        self.relay_url, self.token, self.hls_base = relay_url, token, hls_base
        self.rtmp: dict[str, OutputProcess] = {}
        self.hls: dict[str, OutputProcess] = {}

    async def stream_changed(self, stream: Stream) -> None:
        """Start, restart or stop the RTMP push to match ``stream.output_rtmp_url``."""
        current = self.rtmp.pop(stream.id, None)
        if current is not None:
            await current.stop()
        if stream.output_rtmp_url:
            output = OutputProcess(self.relay_url, stream.channel, rtmp_url=stream.output_rtmp_url,
                                   token=self.token)
            self.rtmp[stream.id] = output
            await output.start()

    async def hls_for(self, stream: Stream) -> Path:
        directory = hls_dir_for(self.hls_base, stream.id)
        if stream.id not in self.hls:
            output = OutputProcess(self.relay_url, stream.channel, hls_dir=directory, token=self.token)
            self.hls[stream.id] = output
            await output.start()
        return directory

    async def stream_closed(self, stream: Stream) -> None:
        for outputs in (self.rtmp, self.hls):
            output = outputs.pop(stream.id, None)
            if output is not None:
                await output.stop()
        remove_dir(hls_dir_for(self.hls_base, stream.id))

    def state(self, stream: Stream) -> dict[str, Any]:
        return {kind: outputs[stream.id].state() for kind, outputs in
                (("rtmp", self.rtmp), ("hls", self.hls)) if stream.id in outputs}


@router.get("/live/video-to-video/{playback_id}/hls/{filename}")
async def hls_file(playback_id: str, filename: str, request: Request) -> Response:
    stream = request.app.state.streams.by_playback_id(playback_id)
    if stream is None:
        raise not_found()
    outputs: Outputs = request.app.state.outputs
    directory = await outputs.hls_for(stream)
    response = await hls_response(directory, filename)
    if response.status_code == 404 and filename == "index.m3u8":
        return error_response(503, "HLS output is starting; retry shortly", "STREAMS/HLS_STARTING",
                              headers={"Retry-After": "2"})
    return response


def install(app: FastAPI) -> None:
    app.include_router(router)

    async def start(app_: FastAPI) -> None:
        settings = app_.state.settings
        base = Path(settings.hls_dir) if settings.hls_dir else Path(tempfile.mkdtemp(prefix="sd-hls-"))
        outputs = Outputs(app_.state.relay_url, next(iter(settings.relay.tokens), None), base)
        app_.state.outputs = outputs
        streams = app_.state.streams
        streams.change_hooks.append(outputs.stream_changed)
        streams.close_hooks.append(outputs.stream_closed)
        app_.state.stream_created_hooks.append(outputs.stream_changed)

    app.state.startup_hooks.insert(0, start)
