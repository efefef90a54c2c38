"""WebRTC ingest (WHIP) and playback (WHEP) for streams, on aiortc.

``install(app)`` mounts the routes and ties session lifetimes to streams:
deleting a stream (or shutting the server down, which deletes them all)
closes its sessions.
"""

from __future__ import annotations

from fastapi import FastAPI

from api.webrtc.jitter import complete_frames_on_marker
from api.webrtc.routes import router
from api.webrtc.sessions import SessionRegistry, WebRTCSettings, WebRTCState

__all__ = ["SessionRegistry", "WebRTCSettings", "WebRTCState", "install", "router"]


def install(app: FastAPI, settings: WebRTCSettings | None = None) -> WebRTCState:
    """Mount WHIP/WHEP on ``app``; ICE servers come from ``settings.ice_servers`` when the server has them."""
    if settings is None:
        server = app.state.settings
        settings = WebRTCSettings(ice_servers=tuple(server.ice_servers), shared_encoding=server.whep_shared_encoder,
                                  output_bitrate=server.whep_bitrate)
    complete_frames_on_marker()  # one frame interval less delay on every WHIP session
    state = WebRTCState(settings)
    app.state.webrtc = state

    async def link_to_streams(app: FastAPI) -> None:  # the StreamManager exists from startup on
        app.state.streams.close_hooks.append(state.registry.close_stream)

    app.state.startup_hooks.append(link_to_streams)
    app.include_router(router)
    return state
