"""Streams kept in SQLite, so ids, stream keys and playback URLs survive a restart (or a kill -9).

Standard-library ``sqlite3``, one file in the server's data directory, WAL
journal. Every write commits at once: these are a handful of small
control-plane writes (create, update, delete), never per frame, so they run
on the event loop (the methods are coroutines only to share the interface of
the cluster's store, :mod:`api.streams.shared`). The schema version is SQLite's ``user_version``; each
migration moves it up by one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from api.streams.manager import Stream
from api.streams.reloads import ReloadFailure

FILE_NAME = "streams.sqlite3"

MIGRATIONS: tuple[str, ...] = (
    # 1: streams with their secrets, params and outputs
    """
    CREATE TABLE streams (
        id TEXT PRIMARY KEY,
        stream_key TEXT NOT NULL UNIQUE,
        playback_id TEXT NOT NULL UNIQUE,
        pipeline TEXT NOT NULL,
        params TEXT NOT NULL,
        name TEXT NOT NULL,
        output_rtmp_url TEXT,
        created REAL NOT NULL
    )
    """,
    # 2: the last change whose reload failed (JSON), shown in the stream's status
    "ALTER TABLE streams ADD COLUMN reload_failure TEXT",
)


class StreamStore:
    """Where :class:`~api.streams.manager.StreamManager` writes what must outlive the process."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # it holds stream keys; SQLite gives its -wal and -shm files the same mode
        self.path.touch(mode=0o600, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: each write is durable
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    @classmethod
    def in_directory(cls, data_dir: Path | str) -> StreamStore:
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(directory / FILE_NAME)

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"{self.path} was written by a newer version (schema {version}, this one "
                f"knows {len(MIGRATIONS)})"
            )
        for number, statement in enumerate(MIGRATIONS[version:], start=version + 1):
            with self._db:  # the migration and its version move together
                self._db.execute("BEGIN")
                self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    async def load(self) -> list[Stream]:
        """Every stored stream, oldest first."""
        return list(self._rows())

    def _rows(self) -> Iterator[Stream]:
        with closing(
            self._db.execute(
                "SELECT id, stream_key, playback_id, pipeline, params, name, output_rtmp_url, created, "
                "reload_failure FROM streams ORDER BY created"
            )
        ) as rows:
            for row in rows.fetchall():
                yield Stream(
                    id=row[0],
                    stream_key=row[1],
                    playback_id=row[2],
                    pipeline=row[3],
                    params=json.loads(row[4]),
                    name=row[5],
                    output_rtmp_url=row[6],
                    created=row[7],
                    reload_failure=ReloadFailure.from_json(json.loads(row[8])) if row[8] else None,
                )

    async def save(self, stream: Stream) -> None:
        self._db.execute(
            "INSERT INTO streams "
            "(id, stream_key, playback_id, pipeline, params, name, output_rtmp_url, created, reload_failure) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET pipeline = excluded.pipeline, "
            "params = excluded.params, name = excluded.name, output_rtmp_url = excluded.output_rtmp_url, "
            "reload_failure = excluded.reload_failure",
            (
                stream.id,
                stream.stream_key,
                stream.playback_id,
                stream.pipeline,
                json.dumps(stream.params),
                stream.name,
                stream.output_rtmp_url,
                stream.created,
                json.dumps(stream.reload_failure.to_json()) if stream.reload_failure else None,
            ),
        )

    async def delete(self, stream_id: str) -> None:
        self._db.execute("DELETE FROM streams WHERE id = ?", (stream_id,))

    def close(self) -> None:
        self._db.close()
