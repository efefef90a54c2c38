"""HLS output: where a stream's files live, how FFmpeg writes them, how to serve them.

The output process writes ``index.m3u8`` and ``seg_<n>.ts`` into one
directory per stream. When the picture size changes it starts a new muxer
that appends to the same playlist after an ``#EXT-X-DISCONTINUITY`` (players
reset their decoder there) and continues its segment numbers; the playlist
never gets an ``#EXT-X-ENDLIST``, which would end playback for good (the
directory goes when the stream does). The API serves that directory at
``/live/video-to-video/{playback_id}/hls/{file}`` with :func:`hls_response`.
Only names matching :data:`FILE_NAME` are ever served, so a request cannot
reach outside the directory, and FFmpeg's half-written ``*.tmp`` files are
invisible (``temp_file`` makes every file appear complete, by rename).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path

from starlette.responses import Response

FORMAT = "hls"
PLAYLIST = "index.m3u8"
SEGMENT_PREFIX = "seg_"
CONTENT_TYPES = {".m3u8": "application/vnd.apple.mpegurl", ".ts": "video/mp2t"}
FILE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}\.(?:m3u8|ts)$")
STREAM_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def hls_dir_for(base_dir: Path | str, stream_id: str) -> Path:
    """The directory holding ``stream_id``'s playlist; ``ValueError`` for ids unsafe as a name."""
    if not STREAM_ID.fullmatch(stream_id):
        raise ValueError(f"stream id {stream_id!r} cannot name a directory")
    return Path(base_dir) / stream_id


def prepare_dir(directory: Path) -> None:
    """Create ``directory`` and delete a previous run's playlist and segments."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():
        if path.name.startswith((PLAYLIST, SEGMENT_PREFIX)):
            path.unlink(missing_ok=True)


def remove_dir(directory: Path) -> None:
    """Delete an HLS directory and its files: a stream's when it closes, a temporary base with its last
    output.
    """
    shutil.rmtree(directory, ignore_errors=True)


def start_number(hls_time: float) -> int:
    """A first segment number that grows with wall time.

    A restarted output process then continues the media sequence upwards
    (one segment per ``hls_time`` at most), instead of restarting at 0, which
    players would take for an old playlist.
    """
    return int(time.time() / hls_time)


def container_options(directory: Path, hls_time: float, list_size: int) -> dict[str, str]:
    """FFmpeg HLS muxer options: a sliding live window of complete, independent segments.

    ``append_list``: a muxer opened on an existing playlist (a new picture
    size, a retry) continues it after a discontinuity, numbering on from its
    last segment (``start_number`` only counts for a new playlist);
    ``omit_endlist``: closing one for the next never tells players the stream ended.
    """
    return {
        "hls_time": f"{hls_time:g}",
        "hls_list_size": str(list_size),
        "hls_flags": "delete_segments+independent_segments+temp_file+append_list+omit_endlist",
        "hls_segment_filename": str(directory / f"{SEGMENT_PREFIX}%d.ts"),
        "start_number": str(start_number(hls_time)),
    }


def codec_options() -> dict[str, str]:
    """libx264 settings: no B-frames, and keyframes only on the GOP grid (no scene cuts).

    Segments can only be cut at keyframes, so a fixed GOP of ``fps * hls_time``
    frames at a constant frame rate gives segments of exactly ``hls_time``.
    """
    return {"tune": "zerolatency", "preset": "veryfast", "sc_threshold": "0"}


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


async def hls_response(directory: Path | None, filename: str) -> Response:
    """Serve ``directory/filename`` (a playlist or segment) or answer 404.

    Reads the whole file (segments are small) so a segment deleted by the
    sliding window mid-request cannot break a half-sent response. The
    playlist changes every segment and must not be cached; segments never
    change once they appear.
    """
    suffix = Path(filename).suffix
    if directory is None or not FILE_NAME.fullmatch(filename):
        return Response(status_code=404)
    path = directory / filename
    if path.resolve().parent != directory.resolve():
        return Response(status_code=404)
    data = await asyncio.to_thread(_read, path)
    if data is None:
        return Response(status_code=404)
    cache = "no-cache, no-store" if suffix == ".m3u8" else "public, max-age=60"
    return Response(data, media_type=CONTENT_TYPES[suffix], headers={"Cache-Control": cache})
