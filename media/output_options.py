"""What an output process is told, checked in one place, and how it travels.

The API builds :class:`Options` (in :class:`~media.output_process.OutputProcess`)
and turns it into a command line and an environment; the child parses them
back with :func:`parse_args`. Both sides build the same dataclass, so its
checks (:meth:`Options.__post_init__`) are the only ones, and a bad value
fails in the API before any child is spawned. The RTMP URL and the relay
token travel in the environment (:data:`ENV_RTMP`, :data:`ENV_TOKEN`), not
argv, so ``ps`` shows no stream key.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from media import rtmp

ENV_RTMP = "OUTPUT_RTMP_URL"
ENV_TOKEN = "OUTPUT_RELAY_TOKEN"
#: the child's module, as ``python -m`` runs it
CHILD_MODULE = "media.output_encoder"


@dataclass
class Options:
    """One output: a relay channel published to exactly one of an RTMP URL or an HLS directory."""

    relay: str
    channel: str
    token: str | None = None
    rtmp: str | None = None
    hls: Path | None = None
    fps: float = 30.0
    hls_time: float = 1.0
    hls_list_size: int = 6
    #: JSON status lines on stdout, for the parent.
    status: bool = False
    #: exit when stdin closes: the parent (the API) died without stopping us.
    watch_stdin: bool = False
    #: a connect, write or close blocked this long kills the process (a hung server).
    stall_timeout: float = 20.0
    verbose: bool = False

    def __post_init__(self) -> None:
        """Raise ``ValueError`` (:class:`~media.rtmp.TargetError` for the URL) on a bad option."""
        if (self.rtmp is None) == (self.hls is None):
            raise ValueError(f"give exactly one RTMP URL (--rtmp or ${ENV_RTMP}) or HLS directory (--hls)")
        if self.rtmp is not None:
            rtmp.validate_rtmp_url(self.rtmp)
        if self.fps <= 0 or self.stall_timeout <= 0:
            raise ValueError("fps and stall timeout must be > 0")
        if self.hls_time < 1 or self.hls_list_size < 1:
            raise ValueError("HLS time (players need a target duration >= 1 s) and list size must be >= 1")

    def argv(self) -> list[str]:
        """The child's arguments after ``python -m CHILD_MODULE`` (no secrets: see :meth:`environment`)."""
        args = [
            "--relay",
            self.relay,
            "--channel",
            self.channel,
            "--fps",
            f"{self.fps:g}",
            "--stall-timeout",
            f"{self.stall_timeout:g}",
        ]
        args += ["--status"] if self.status else []
        args += ["--watch-stdin"] if self.watch_stdin else []
        if self.hls is not None:
            args += [
                "--hls",
                str(self.hls),
                "--hls-time",
                f"{self.hls_time:g}",
                "--hls-list-size",
                str(self.hls_list_size),
            ]
        return args + (["-v"] if self.verbose else [])

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (the parent's environment) with our RTMP URL and token, and no inherited ones."""
        env = dict(base)
        env.pop(ENV_RTMP, None)
        env.pop(ENV_TOKEN, None)
        if self.rtmp is not None:
            env[ENV_RTMP] = self.rtmp
        if self.token:
            env[ENV_TOKEN] = self.token
        return env


def parse_args(argv: list[str] | None = None, description: str | None = None) -> Options:
    """The child's side of :meth:`Options.argv` and :meth:`Options.environment`; exit 2 on a bad option."""
    p = argparse.ArgumentParser(prog=f"python -m {CHILD_MODULE}", description=description)
    p.add_argument("--relay", required=True, help="relay WebSocket URL, ws://host:port")
    p.add_argument("--channel", required=True, help="the channel whose output to publish")
    p.add_argument("--token", default=os.environ.get(ENV_TOKEN), help=f"relay token (or ${ENV_TOKEN})")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--rtmp", default=os.environ.get(ENV_RTMP), help=f"push to rtmp[s]://host/app/key (or ${ENV_RTMP})"
    )
    target.add_argument("--hls", type=Path, help="write DIR/index.m3u8 and its segments")
    p.add_argument("--fps", type=float, default=30.0, help="RTMP: GOP hint; HLS: the output frame rate")
    p.add_argument("--hls-time", type=float, default=1.0, help="HLS segment length, seconds")
    p.add_argument("--hls-list-size", type=int, default=6, help="segments listed in the playlist")
    p.add_argument("--status", action="store_true", help="JSON status lines on stdout")
    p.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    p.add_argument(
        "--stall-timeout", type=float, default=20.0, help="exit when a network write blocks this long"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    try:
        return Options(
            relay=a.relay,
            channel=a.channel,
            token=a.token,
            rtmp=None if a.hls is not None else a.rtmp,  # --hls wins over $OUTPUT_RTMP_URL
            hls=a.hls,
            fps=a.fps,
            hls_time=a.hls_time,
            hls_list_size=a.hls_list_size,
            status=a.status,
            watch_stdin=a.watch_stdin,
            stall_timeout=a.stall_timeout,
            verbose=a.verbose,
        )
    except ValueError as exc:
        p.error(str(exc))
