"""Configuration: one YAML file, ``STREAMDIFFUSION_*`` environment overrides, CLI flags on top.

Precedence, lowest first: defaults < YAML file < ``.env`` in the working
directory < environment < command-line flags. Nested keys use ``__`` in the environment, as seed 001 does::

    STREAMDIFFUSION_MODEL__MODEL_ID=stabilityai/sd-turbo
    STREAMDIFFUSION_SERVER__PORT=9000
    STREAMDIFFUSION_SERVER__API_KEYS='["key1", "key2"]'

Every option is documented by its ``Field`` description; ``python -m api
--print-config`` shows the effective values and ``config.example.yaml``
lists them all.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from relay.config import RelayConfig
from worker.launch import LaunchOptions

ENV_PREFIX = "STREAMDIFFUSION_"
CONFIG_ENV = "STREAMDIFFUSION_CONFIG"
#: read from the working directory, under the environment and over the YAML file
DOTENV_FILE = ".env"


class ConfigError(ValueError):
    """An invalid configuration file or value; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NamedStream(_Section):
    """A stream the configuration names, with a stream key the operator chose (for OBS settings
    that never change); created at start if the data dir does not hold it yet."""

    name: str = Field(min_length=1, max_length=128, description="the stream's name")
    stream_key: str = Field(
        pattern=r"^[A-Za-z0-9_-]{20,128}$",
        description="its stream key: 20-128 letters, digits, _ or -; keep it as secret as a password",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="its params (the defaults fill the rest)"
    )


class ServerSection(_Section):
    host: str = Field("127.0.0.1", description="HTTP address; loopback only unless changed")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0: any free port)")
    public_url: str | None = Field(None, description="base URL clients use, for whip_url and friends")
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer keys for /v1; empty: one is generated and printed"
    )
    max_queue_size: int = Field(0, ge=0, description="seed-001 sessions at once (0: no limit)")
    seed_endpoints: Literal["auto", "off", "open", "keyed"] = Field(
        "auto",
        description="the seed protocols' endpoints (/ws, /api/ws, /api/settings, /api/queue, "
        "/api/stream): open without a key, keyed (the API key), or off; auto: open when the server "
        "listens on loopback, else off",
    )
    max_body_bytes: int = Field(
        8 * 2**20,
        ge=1024,
        description="largest HTTP request body; larger ones get a 413 (style images as data URLs need ~7 MB)",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds a connection may take to send a request's headers before it is closed",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds a request's body may take, from its headers to its last byte, before a 408 "
        "(raise it for large style images over slow links)",
    )
    max_connections_per_client: int = Field(
        128,
        ge=1,
        description="HTTP connections one client address may hold at once; its requests beyond them get "
        "a 429 unless they carry the API key",
    )
    max_websockets_per_client: int = Field(
        128,
        ge=1,
        description="WebSocket sessions one client address may hold at once (a cap of their own, so idle "
        "sockets never starve plain requests); beyond them a 429 unless the API key is shown",
    )
    origins: list[str] = Field(
        default_factory=list,
        description="browser origins, besides the server's own and loopback pages, allowed to open its "
        "WebSockets (/ws, /api/ws, ingest), e.g. https://app.example; other Origin headers get a 403",
    )
    session_timeout_s: float = Field(0, ge=0, description="seed-001 session length in seconds (0: no limit)")
    hls_dir: str | None = Field(None, description="where HLS segments go (default: a temporary directory)")
    hls_first_playlist_wait_s: float = Field(
        15.0,
        ge=0,
        description="how long the first HLS playlist request waits for the first segment before a 503",
    )
    data_dir: str | None = Field(
        None,
        description="where the server keeps its state, such as the generated "
        "API key (default: $XDG_DATA_HOME/streamdiffusion-server, "
        "else ~/.local/share/streamdiffusion-server)",
    )
    cluster_streams_bucket: str = Field(
        "sd_streams",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="with relay.nats: the NATS JetStream key-value bucket where every node keeps the "
        "cluster's streams (instead of data_dir), so any node serves any stream",
    )
    cluster_streams_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="copies of that bucket JetStream keeps (3 on a 3-server NATS cluster survives the "
        "loss of one server; at most the number of servers)",
    )
    style_image_allow_private: bool = Field(
        False, description="fetch style image URLs from private addresses too (closed networks only)"
    )
    ice_servers: list[str] = Field(
        default_factory=list, description="WebRTC ICE servers, e.g. stun:stun.example.org:3478"
    )
    whep_shared_encoder: bool = Field(
        True,
        description="WHEP viewers of a stream share one encoder per codec "
        "(false: one encoder per viewer, adapting to its network)",
    )
    whep_bitrate: int = Field(
        1_500_000, ge=100_000, le=50_000_000, description="bits per second of shared WHEP encoders"
    )
    degraded_input_fps: float = Field(
        15.0,
        ge=0,
        description="a stream whose input arrives slower than this many frames per second is "
        "DEGRADED_INPUT, as Daydream's runner says under 15 (0: never)",
    )
    named_streams: list[NamedStream] = Field(
        default_factory=list,
        description="streams with stream keys you choose (name, stream_key, params), created at start "
        "if missing: stable OBS settings",
    )


class RelaySection(_Section):
    host: str = Field("127.0.0.1", description="relay WebSocket address")
    port: int = Field(8765, ge=0, le=65535, description="relay WebSocket port")
    tokens: list[str] = Field(default_factory=list, description="relay tokens; needed beyond loopback")
    max_frame_bytes: int = Field(8 * 2**20, ge=1024, description="largest encoded frame")
    max_width: int = Field(4096, ge=16, description="largest frame width")
    max_height: int = Field(4096, ge=16, description="largest frame height")
    max_channels: int = Field(256, ge=1, description="channels (streams and sessions) at once")
    max_params_bytes: int = Field(
        256 * 2**10,
        ge=1024,
        le=16 * 2**20 - 64 * 2**10,
        description="largest params message a relay client sends, and most "
        "its merges may add to a channel's params (JSON bytes)",
    )
    insecure: bool = Field(False, description="allow a non-loopback relay with no tokens (or open channels)")
    open_channels: bool | None = Field(
        None,
        description="relay clients without a token may join channels "
        "that are not /v1 streams (seed-002 clients); null: yes when no "
        "token is configured",
    )
    origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed to open relay "
        "WebSockets, e.g. https://app.example; empty: any Origin header is refused",
    )
    hello_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds a relay connection has to say hello; "
        "a silent one then becomes a seed-002 consumer (open channels) or is closed",
    )
    max_connections_per_ip: int = Field(
        64,
        ge=1,
        description="relay connections one address may hold, not counting those with the relay token",
    )
    control_rate: float = Field(
        20.0,
        gt=0,
        description="control messages a relay connection may send per "
        "second (the excess is dropped; frames are not counted)",
    )
    control_burst: int = Field(40, ge=1, description="control messages a relay connection may send at once")
    anonymous_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of the workers' capacity that "
        "anonymous channels (seed clients, tokenless relay clients) may hold; "
        "the rest waits for /v1 streams (1: no reserve)",
    )
    anonymous_channel_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of max_channels that relay clients without the relay token "
        "(seed-002 clients) may open; the rest stays free for /v1 streams and seed sessions "
        "(1: no reserve)",
    )
    idle_release_s: float = Field(
        60.0,
        ge=0,
        description="a channel (a stream, a session) without input this many seconds gives its worker "
        "slot back until input returns (0: never)",
    )
    nats: str = Field(
        "",
        description="NATS server URLs (comma-separated) to join other nodes' relays as one cluster "
        "(docs/cluster.md; needs the cluster extra); empty: this node alone",
    )
    node_name: str = Field("", description="this node's name in the cluster; empty: generated")


class MediaMTXSection(_Section):
    publish_url: str | None = Field(
        None,
        pattern=r"^rtmps?://",
        description="push every output here, e.g. rtmp://127.0.0.1:1935 (off: null)",
    )
    whep_url: str | None = Field(
        None, description="MediaMTX WebRTC base returned as WHEP URL, e.g. http://127.0.0.1:8889"
    )


class WorkersSection(_Section):
    count: int = Field(1, ge=0, description="local worker processes")
    engine: Literal["auto", "filter", "diffusion"] = Field(
        "auto", description="auto: diffusion with a CUDA GPU, filter otherwise"
    )
    capacity: int | None = Field(
        None,
        ge=1,
        description="channels each local worker serves at once "
        "(default: from the hardware, 2 per core for filter; for diffusion what GPU memory holds "
        "of one shared model plus 0.5 GiB a channel, at most 8)",
    )
    args: list[str] = Field(
        default_factory=list, description="extra command-line flags for each worker, as you would type them"
    )


class ModelSection(_Section):
    model_id: str = Field("stabilityai/sd-turbo", description="default model: hub id or local path")
    acceleration: Literal["none", "sdpa", "xformers", "compile", "tensorrt"] = Field(
        "xformers",
        description="default acceleration, as Daydream's default (xformers: PyTorch's SDPA where "
        "xformers is not installed; tensorrt engines are cached in model.engine_dir)",
    )
    engine_dir: str | None = Field(
        None,
        description="TensorRT engine cache directory for local workers, relative to the working "
        "directory (seed 001's engine_dir); null: $TENSORRT_CACHE_DIR, else ~/.cache/daydream/tensorrt",
    )
    use_cuda_graph: bool = Field(
        False,
        description="accepted for seed 001's config and has no effect: acceleration compile already "
        "runs CUDA graphs on CUDA, tensorrt does not use them (a warning says so at start when true)",
    )


class PipelineSection(_Section):
    name: str = Field("img2img", description="pipeline name shown by /api/settings")
    mode: Literal["image", "video"] = Field("image", description="seed-001 input mode")
    width: int = Field(512, ge=384, le=1024, multiple_of=64, description="default width")
    height: int = Field(512, ge=384, le=1024, multiple_of=64, description="default height")
    use_tiny_vae: bool = Field(True, description="TAESD instead of the full VAE")
    use_lcm_lora: bool = Field(True, description="fuse LCM-LoRA into non-turbo models")
    fit: Literal["crop", "pad"] = Field(
        "crop",
        description="input of another aspect ratio than the stream's: crop (cut the centre) or pad "
        "(letterbox), never stretched; a stream's params.fit overrides it",
    )
    warmup: int = Field(
        10,
        ge=0,
        description="accepted for seed 001's config and has no effect: workers warm up each model "
        "with as many steps as its acceleration needs (a warning says so at start when set)",
    )


class PerformanceSection(_Section):
    enable_similar_image_filter: bool = Field(False, description="skip near-identical frames")
    similar_image_filter_threshold: float = Field(0.98, ge=0, le=1, description="similarity to skip")
    similar_image_filter_max_skip_frame: int = Field(10, ge=0, description="most frames skipped in a row")
    jpeg_quality: int = Field(85, ge=1, le=100, description="JPEG quality of results and MJPEG")


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("warning", description="quiet by default")


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        yaml_file=None,
        # seed 000 and 001 users `cp .env.example .env`: read it from the working directory, as the
        # environment is read (its other variables, e.g. docker compose's, are none of ours)
        env_file=DOTENV_FILE,
        env_file_encoding="utf-8",
        dotenv_filtering="only_existing",
    )

    server: ServerSection = Field(default_factory=ServerSection)
    relay: RelaySection = Field(default_factory=RelaySection)
    workers: WorkersSection = Field(default_factory=WorkersSection)
    mediamtx: MediaMTXSection = Field(default_factory=MediaMTXSection)
    model: ModelSection = Field(default_factory=ModelSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    performance: PerformanceSection = Field(default_factory=PerformanceSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # first wins: flags (init), then environment, then .env, then the YAML file
        return init_settings, env_settings, dotenv_settings, YamlConfigSettingsSource(settings_cls)

    def default_stream_params(self) -> dict[str, Any]:
        """Stream params this server fills in when a client leaves them out."""
        return {
            "model_id": self.model.model_id,
            "acceleration": self.model.acceleration,
            "width": self.pipeline.width,
            "height": self.pipeline.height,
            "use_tiny_vae": self.pipeline.use_tiny_vae,
            "use_lcm_lora": self.pipeline.use_lcm_lora,
            "enable_similar_image_filter": self.performance.enable_similar_image_filter,
            "similar_image_filter_threshold": self.performance.similar_image_filter_threshold,
            "similar_image_filter_max_skip_frame": self.performance.similar_image_filter_max_skip_frame,
        }

    def stream_defaults(self) -> dict[str, Any]:
        """What a new /v1 stream's params start from: the defaults and the server's ``fit``."""
        return {**self.default_stream_params(), "fit": self.pipeline.fit}

    def relay_config(self) -> RelayConfig:
        """The embedded relay's settings: the relay section under :class:`RelayConfig`'s names."""
        fields = self.relay.model_dump()
        fields["hello_timeout"] = fields.pop("hello_timeout_s")
        for name in ("tokens", "origins"):
            fields[name] = frozenset(fields[name])
        return RelayConfig(**fields)

    def launch_options(self, relay_url: str) -> LaunchOptions:
        """What each local worker gets (typed, through its environment: never on its command line)."""
        return LaunchOptions(
            relay=relay_url,
            engine=self.workers.engine,
            capacity=self.workers.capacity,
            model=self.model.model_id,
            acceleration=self.model.acceleration,
            quality=self.performance.jpeg_quality,
            engine_dir=None if self.model.engine_dir is None else str(Path(self.model.engine_dir).resolve()),
        )

    def inert_options(self) -> list[str]:
        """Seed 001 options given here that this server accepts but does not use: said at start, so
        nobody tunes them in vain."""
        notes = []
        if self.model.use_cuda_graph:
            notes.append(
                "model.use_cuda_graph has no effect: acceleration compile already uses CUDA graphs "
                "on CUDA, and tensorrt does not use them"
            )
        if "warmup" in self.pipeline.model_fields_set:
            notes.append(
                "pipeline.warmup has no effect: workers warm up each model with as many steps "
                "as its acceleration needs"
            )
        return notes


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Read ``path`` (or ``$STREAMDIFFUSION_CONFIG``), the environment and ``overrides``.

    Raises :class:`ConfigError` naming the file and the first bad field.
    """
    path = path or os.environ.get(CONFIG_ENV)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} not found")
        try:
            content = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")

    class FileConfig(Config):
        model_config = SettingsConfigDict(**{**Config.model_config, "yaml_file": path})

    try:
        return FileConfig(**(overrides or {}))
    except SettingsError as exc:  # a list or mapping variable that is not JSON
        raise ConfigError(environment_error(str(exc), os.environ)) from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        source = f"{path}: " if path else ""
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"{source}unknown option '{where}'") from None
        raise ConfigError(f"{source}invalid option '{where}': {error['msg']}") from None


def environment_error(message: str, environ: Mapping[str, str]) -> str:
    """Say which variables pydantic-settings could not parse: its own message names a section only.

    Options that hold lists or mappings take JSON (``'["a", "b"]'``); a plain value is the usual slip.
    """
    match = re.search(r'field "(\w+)"', message)
    section = match.group(1) if match else None
    suspects = []
    if section in Config.model_fields:
        defaults = Config.model_fields[section].default_factory()  # type: ignore[misc]
        for option in type(defaults).model_fields:
            name = f"{ENV_PREFIX}{section.upper()}__{option.upper()}"
            if name in environ and isinstance(getattr(defaults, option), (list, dict, set, frozenset)):
                try:
                    json.loads(environ[name])
                except ValueError:
                    suspects.append(name)
    if not suspects:
        return f"{message} (list and mapping options take JSON, in the environment or .env)"
    return f"{', '.join(suspects)}: a list or mapping option takes JSON, e.g. {suspects[0]}='[\"value\"]'"


def example_yaml() -> str:
    """Every option with its default and description, as a commented YAML file."""
    lines = [
        "# StreamDiffusion server configuration. Every value here is the default.",
        f"# Override any of them with {ENV_PREFIX}<SECTION>__<OPTION> or a command-line flag.",
        "",
    ]
    for section_name, field in Config.model_fields.items():
        section = field.default_factory()  # type: ignore[misc]
        lines.append(f"{section_name}:")
        for name, info in type(section).model_fields.items():
            value = yaml.safe_dump(getattr(section, name), default_flow_style=True).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {name}: {value}  # {info.description}")
        lines.append("")
    return "\n".join(lines)
