"""RTMP targets: checking URLs, hiding stream keys, probing the server.

RTMP URLs carry secrets (the stream key is the last path segment), so
everything that logs or reports a target goes through :func:`mask_url`.
FFmpeg connects without a timeout and holds the GIL while doing it (see
../shared/media-notes.md), so :func:`probe` does a bounded TCP connect
first: an unreachable host fails in seconds with a clear message instead
of hanging the output process.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

SCHEMES = {"rtmp": 1935, "rtmps": 443}
#: FFmpeg's muxer for RTMP.
FORMAT = "flv"


class TargetError(ValueError):
    """The RTMP URL cannot work (wrong scheme, no host, no app or stream key)."""


def validate_rtmp_url(url: str) -> str:
    """Return ``url`` if it looks like ``rtmp[s]://host[:port]/app/key``; raise :class:`TargetError`.

    The API can call this when a stream is created, to answer 422 early.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetError(f"bad RTMP URL: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise TargetError("an RTMP output URL must start with rtmp:// or rtmps://")
    if not parts.hostname:
        raise TargetError("the RTMP URL has no host")
    if port == 0:
        raise TargetError("the RTMP URL has port 0")
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) < 2:
        raise TargetError("the RTMP URL needs an application and a stream key: rtmp://host/app/key")
    return url


def mask_url(url: str) -> str:
    """``rtmp://host/app/****``: the URL with its stream key (and any password) hidden."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<bad url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "****@" + netloc.rsplit("@", 1)[1]
    head, _, key = parts.path.rstrip("/").rpartition("/")
    path = f"{head}/****" if key else parts.path  # a lone segment may be a key too (rtmp://host/KEY)
    return f"{parts.scheme}://{netloc}{path}"


def address(url: str) -> tuple[str, int]:
    """The ``(host, port)`` an RTMP URL connects to (default ports 1935 and 443)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or SCHEMES.get(parts.scheme, 1935)


def probe(url: str, timeout: float = 5.0) -> None:
    """Open and close a TCP connection to the RTMP server; raise ``OSError`` if that fails."""
    host, port = address(url)
    with socket.create_connection((host, port), timeout=timeout):
        pass


def describe_error(url: str, exc: BaseException) -> str:
    """A log line a person can act on, with the stream key masked."""
    host, port = address(url)
    target = mask_url(url)
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"RTMP server {host}:{port} refused the connection for {target} "
            "(is the RTMP server running and listening on that port?)"
        )
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"RTMP server {host}:{port} did not answer in time for {target}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the RTMP host {host!r} for {target}"
    reason = str(exc).replace(url, target) or type(exc).__name__
    return f"publishing to {target} failed: {reason}"


def codec_options() -> dict[str, str]:
    """libx264 settings for live RTMP: no B-frames, no lookahead, IDR when forced."""
    return {"tune": "zerolatency", "preset": "veryfast", "forced-idr": "1"}
