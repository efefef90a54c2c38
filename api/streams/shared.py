"""The cluster's streams in a NATS JetStream key-value bucket, so every node knows every stream.

With ``relay.nats`` set, each API node keeps its streams here instead of in
its own SQLite file: a stream created on one node is answered for by all
(``/v1/streams``, WHIP with its key, WHEP/MJPEG/HLS with its playback id).
JetStream stores the bucket on disk, replicated over ``replicas`` NATS
servers, so the streams outlive any node. Each node follows the bucket
(:meth:`SharedStreams.changes`): the first changes are every stream there
(then ``None``: caught up), then each create, update and delete as it
happens, the node's own writes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

try:  # the cluster extra (nats-py): a node with relay.nats has it (its relay checked at start)
    from nats.aio.client import Client
    from nats.errors import Error as NatsError
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js.api import KeyValueConfig, StorageType
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError, ServiceUnavailableError
    from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
except ImportError:  # importable without it (python -m api doctor imports every module)
    pass

from api.streams.manager import StoreUnavailable, Stream
from api.streams.records import from_record, to_record

log = logging.getLogger("api.streams")

PREFIX = "streams."
#: how long a node waits at start for the NATS cluster's JetStream (a cluster starting with it)
JETSTREAM_WAIT_S = 30.0
#: how often a watch with nothing new checks the connection, and waits before watching again
WATCH_RECHECK_S = 1.0
WATCH_RETRY_S = 1.0


@dataclass(frozen=True)
class Removed:
    """A stream deleted from the bucket (on any node)."""

    stream_id: str


class SharedStreams:
    """A :class:`~api.streams.manager.StreamManager` store whose records every node shares."""

    def __init__(self, client: Client, kv: KeyValue) -> None:
        self.client, self.kv = client, kv

    @classmethod
    async def open(
        cls, client: Client, bucket: str, replicas: int = 1, wait_s: float = JETSTREAM_WAIT_S
    ) -> SharedStreams:
        """The bucket, created on first use (file storage, the last value per stream).

        A NATS cluster starting with the nodes elects its JetStream leader
        within seconds: until then, and for at most ``wait_s``, it tries again.
        """
        js = client.jetstream()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                try:
                    return cls(client, await js.key_value(bucket))
                except BucketNotFoundError:
                    config = KeyValueConfig(
                        bucket=bucket, history=1, replicas=replicas, storage=StorageType.FILE
                    )
                    return cls(client, await js.create_key_value(config))
            except (ServiceUnavailableError, NatsTimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"no JetStream on the NATS server after {wait_s:g} s ({exc!r}); the cluster's "
                        "stream registry needs it: enable it (a 'jetstream { store_dir: ... }' block in "
                        "each nats-server's config)"
                    ) from None
                log.info("waiting for NATS JetStream (%s)", type(exc).__name__)
                await asyncio.sleep(0.5)  # a retry interval while the NATS cluster elects its leader

    async def save(self, stream: Stream) -> None:
        try:
            await self.kv.put(PREFIX + stream.id, to_record(stream))
        except NatsError as exc:
            raise StoreUnavailable(_reason(exc)) from None

    async def delete(self, stream_id: str) -> None:
        try:
            await self.kv.delete(PREFIX + stream_id)
        except NatsError as exc:
            raise StoreUnavailable(_reason(exc)) from None

    async def load(self) -> list[Stream]:
        """Every stream in the bucket, oldest first."""
        streams = []
        with contextlib.suppress(NoKeysError):
            for key in await self.kv.keys():
                if key.startswith(PREFIX):
                    try:
                        entry = await self.kv.get(key)
                        streams.append(from_record(entry.value or b""))
                    except KeyNotFoundError:
                        continue  # deleted meanwhile
                    except ValueError as exc:
                        log.warning("ignoring %s in the streams bucket: %s", key, exc)
        return sorted(streams, key=lambda s: (s.created, s.id))

    async def changes(self) -> AsyncIterator[Stream | Removed | None]:
        """Every stream now (then ``None``: caught up), then each change as it comes, for ever.

        After the NATS connection comes back the watch starts again (a
        restarted server has forgotten it): every stream again, deletes
        included, so what changed meanwhile is caught up; the caller's copy
        ignores what it has.
        """
        while True:
            reconnects = self.client.stats["reconnects"]
            try:
                watcher = await self.kv.watchall()
            except NatsError as exc:  # still disconnected: try again
                log.info("cannot follow the streams bucket yet (%s); trying again", _reason(exc))
                await asyncio.sleep(WATCH_RETRY_S)
                continue
            try:
                while self.client.stats["reconnects"] == reconnects:
                    try:
                        entry = await watcher.updates(timeout=WATCH_RECHECK_S)
                    except NatsTimeoutError:
                        continue  # nothing new: check the connection, wait again
                    if (change := _change(entry)) is not False:
                        yield change
            finally:
                with contextlib.suppress(NatsError, AttributeError):
                    await watcher.stop()
            log.info("NATS connection back: following the streams bucket afresh")


def _change(entry: KeyValue.Entry | None) -> Stream | Removed | Literal[False] | None:
    """What a watch entry says: a stream, a removal, None (caught up), or False (not ours, unreadable)."""
    if entry is None:
        return None
    if not entry.key.startswith(PREFIX):
        return False
    if entry.operation in (KV_DEL, KV_PURGE):
        return Removed(entry.key.removeprefix(PREFIX))
    try:
        return from_record(entry.value or b"")
    except ValueError as exc:
        log.warning("ignoring %s in the streams bucket: %s", entry.key, exc)
        return False


def _reason(exc: Exception) -> str:
    """A NATS error in words (some of nats-py's say nothing by themselves)."""
    return f"NATS: {exc}" if str(exc).strip() else f"NATS: {type(exc).__name__}"
