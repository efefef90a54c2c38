"""Server settings: HTTP, relay, local workers, API keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relay.config import RelayConfig


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    #: URL clients use to reach this server (for whip_url etc.); default: from each request
    public_url: str | None = None
    #: accepted ``Authorization: Bearer`` keys for ``/v1/*``; empty: one is generated and printed
    api_keys: frozenset[str] = field(default_factory=frozenset)
    relay: RelayConfig = field(default_factory=RelayConfig)
    workers: int = 1
    engine: str = "auto"
    worker_args: list[str] = field(default_factory=list)
    #: seed-001 sessions at once (0: no limit)
    max_queue_size: int = 0
    #: the seed endpoints: "auto" (open on loopback, else off), "open", "keyed" (API key) or "off"
    seed_endpoints: str = "auto"
    #: seed-001 input mode and pipeline name shown by /api/settings
    pipeline_mode: str = "image"
    pipeline_name: str = "img2img"
    #: seed-001 session length in seconds (0: no limit)
    session_timeout_s: float = 0
    jpeg_quality: int = 85
    #: ICE servers for WebRTC: "stun:host:port" or {"urls", "username", "credential"}
    ice_servers: list[Any] = field(default_factory=list)
    #: WHEP viewers of a stream share one encoder per codec, at this many bits per second
    whep_shared_encoder: bool = True
    whep_bitrate: int = 1_500_000
    #: MediaMTX republishing: where to push (rtmp://host:1935) and its WHEP base (http://host:8889)
    mediamtx_publish_url: str | None = None
    mediamtx_whep_url: str | None = None
    #: fetch style images from private addresses too (tests, closed networks)
    style_image_allow_private: bool = False
    #: where HLS segments are written; None: a temporary directory
    hls_dir: str | None = None
    #: how long the first HLS playlist request waits for the first segment (then 503)
    hls_first_playlist_wait_s: float = 15.0
    #: largest HTTP request body accepted (413 above)
    max_body_bytes: int = 8 * 2**20
    #: seconds for a request's headers, and connections per client address
    header_timeout_s: float = 10.0
    max_connections_per_client: int = 128
    #: where the server keeps its state (the generated API key); None: the platform's data directory
    data_dir: str | None = None
    #: stream params filled in when a client leaves them out (model, size...)
    default_params: dict[str, Any] = field(default_factory=dict)
    #: input of another aspect ratio than a stream's: "crop" (centre) or "pad" (letterbox), never stretched
    fit: str = "crop"
    #: input frames per second under which a stream's state is DEGRADED_INPUT (0: never)
    degraded_input_fps: float = 15.0
