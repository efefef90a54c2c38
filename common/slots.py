"""Newest-wins slots: hand-offs between a producer and a slower consumer.

Real-time video must show the newest picture, not a backlog: when the
consumer is busy, a new item replaces the unsent one and the replaced item
is counted as a drop. :class:`Newest` is the one store (no lock, no waiting);
:class:`ThreadSlot` adds waiting for threads (the worker's stages, the media
encoder) and :class:`AsyncSlot` for one event loop (a WebRTC track). The
relay's outbox keeps one :class:`Newest` per (channel, kind) behind its own
wake-up, since one sender task serves many slots.

Closing stops the consumer: a waiting or later ``take`` raises :class:`Closed`
at once, and whatever was left is not handed out.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Closed(Exception):
    """The slot was closed: the stage feeding it has stopped."""


class Newest(Generic[T]):
    """The newest ``size`` items, oldest first; a put into a full store drops the oldest.

    ``size`` is 1 for a latest-frame-wins slot, or an engine's batch size when
    it takes several consecutive frames at once. ``dropped`` counts the items
    pushed out before anyone took them. Cheap enough for the relay's hot path
    (a list, swapped out whole by :meth:`take`).
    """

    __slots__ = ("_items", "_size", "dropped")

    def __init__(self, size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._items: list[T] = []
        self._size = size
        self.dropped = 0

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> T | None:
        """Store ``item``; return the item it pushed out (counted in ``dropped``), if any."""
        items = self._items
        items.append(item)
        if len(items) > self._size:
            self.dropped += 1
            return items.pop(0)
        return None

    def take(self) -> list[T]:
        """Every stored item, oldest first; the store is empty afterwards."""
        items, self._items = self._items, []
        return items

    def resize(self, size: int) -> None:
        """Keep the newest ``size`` items from now on; the ones that no longer fit are dropped."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        excess = len(self._items) - size
        if excess > 0:
            del self._items[:excess]
            self.dropped += excess
        self._size = size


class _Waiting(Generic[T]):
    """What the two waiting flavours share: the store, its drop count, and being closed."""

    def __init__(self, size: int = 1) -> None:
        self._store: Newest[T] = Newest(size)
        self._closed = False

    @property
    def dropped(self) -> int:
        return self._store.dropped

    @property
    def closed(self) -> bool:
        return self._closed


class ThreadSlot(_Waiting[T]):
    """A :class:`Newest` shared between threads: ``take`` waits for items."""

    def __init__(self, size: int = 1) -> None:
        super().__init__(size)
        self._cond = threading.Condition()

    def put(self, item: T) -> T | None:
        """Store ``item`` and wake a waiting taker; return the item it pushed out, if any."""
        with self._cond:
            pushed_out = self._store.put(item)
            self._cond.notify()
            return pushed_out

    def take(self, count: int = 1, timeout: float | None = None) -> list[T]:
        """Wait for ``count`` items and return all stored ones, oldest first.

        Returns an empty list if ``timeout`` passes first; raises :class:`Closed`
        once closed.
        """
        with self._cond:
            store = self._store
            if not self._cond.wait_for(lambda: self._closed or len(store) >= count, timeout):
                return []
            if self._closed:
                raise Closed
            return store.take()

    def resize(self, size: int) -> None:
        """Keep the newest ``size`` items from now on (an engine's batch size changed)."""
        with self._cond:
            self._store.resize(size)

    def wait_closed(self, timeout: float) -> bool:
        """Sleep ``timeout`` seconds, waking at once when closed; whether it is closed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class AsyncSlot(_Waiting[T]):
    """A :class:`Newest` within one event loop: ``take`` awaits items. Not thread-safe."""

    def __init__(self, size: int = 1) -> None:
        super().__init__(size)
        self._ready = asyncio.Event()

    def put(self, item: T) -> T | None:
        """Store ``item`` and wake the taker; return the item it pushed out, if any."""
        pushed_out = self._store.put(item)
        self._ready.set()
        return pushed_out

    async def take(self) -> list[T]:
        """Wait for an item and return all stored ones, oldest first; :class:`Closed` once closed."""
        while not (self._closed or len(self._store)):
            self._ready.clear()
            await self._ready.wait()
        if self._closed:
            raise Closed
        return self._store.take()

    def close(self) -> None:
        self._closed = True
        self._ready.set()
