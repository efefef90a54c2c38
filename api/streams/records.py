"""A stream as a self-contained JSON record: what the cluster's shared registry stores per stream.

Pure functions, no I/O: :mod:`api.streams.shared` puts these records in a
JetStream key-value bucket, and tests can round-trip them. The SQLite store of
a single node keeps the same fields as columns.
"""

from __future__ import annotations

from typing import Any

import orjson

from api.streams.manager import Stream
from api.streams.reloads import ReloadFailure

#: bumped when a field changes meaning; a record of a newer version is refused, not misread
VERSION = 1


def to_record(stream: Stream) -> bytes:
    return orjson.dumps({"version": VERSION, **stream.record()})


def from_record(data: bytes) -> Stream:
    """The stream a record describes; ValueError for one that is not a stream record we can read."""
    try:
        record: dict[str, Any] = orjson.loads(data)
        if record.get("version") != VERSION:
            raise ValueError(f"a stream record of version {record.get('version')!r}, not {VERSION}")
        failure = record.get("reload_failure")
        return Stream(
            id=record["id"],
            stream_key=record["stream_key"],
            playback_id=record["playback_id"],
            pipeline=record["pipeline"],
            params=record["params"],
            name=record.get("name", ""),
            output_rtmp_url=record.get("output_rtmp_url"),
            created=float(record["created"]),
            reload_failure=ReloadFailure.from_json(failure) if failure else None,
            node=record.get("node", ""),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a stream record: {exc}") from None
