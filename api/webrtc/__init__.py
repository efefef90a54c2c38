"""WebRTC ingest (WHIP) and playback (WHEP) for streams, on aiortc.

The server mounts :data:`router` and builds one :class:`WebRTCState` with
:func:`webrtc_state`; its session registry follows the streams, so deleting
a stream (or shutting the server down, which deletes them all) closes its
sessions.
"""

from __future__ import annotations

from api.server.config import Config
from api.webrtc.jitter import complete_frames_on_marker
from api.webrtc.routes import router
from api.webrtc.sessions import SessionRegistry, WebRTCSettings, WebRTCState

__all__ = ["SessionRegistry", "WebRTCSettings", "WebRTCState", "router", "webrtc_state"]


def webrtc_state(config: Config) -> WebRTCState:
    """WHIP/WHEP state for ``config``: ICE servers, shared WHEP encoders and their bitrate."""
    complete_frames_on_marker()  # one frame interval less delay on every WHIP session
    server = config.server
    return WebRTCState(
        WebRTCSettings(
            ice_servers=tuple(server.ice_servers),
            shared_encoding=server.whep_shared_encoder,
            output_bitrate=server.whep_bitrate,
        )
    )
