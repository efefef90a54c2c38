"""Thread-safe hand-offs between pipeline stages that keep only the newest work."""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Closed(Exception):
    """The stage upstream has stopped."""


class NewestBuffer(Generic[T]):
    """Holds the newest ``size`` items; older ones are dropped and counted.

    ``size`` is 1 for a latest-frame-wins slot, or the engine's batch size
    when it wants several consecutive frames at once.
    """

    def __init__(self, size: int = 1) -> None:
        self._items: deque[T] = deque(maxlen=size)
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> None:
        with self._cond:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()

    def take(self, count: int = 1, timeout: float | None = None) -> list[T]:
        """Wait for ``count`` items and return them oldest first; raise ``Closed`` when closed.

        Returns an empty list if ``timeout`` passes first.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or len(self._items) >= count, timeout):
                return []
            if self._closed:
                raise Closed
            items = list(self._items)
            self._items.clear()
            return items

    def resize(self, size: int) -> None:
        """Keep the newest ``size`` items from now on (an engine's batch size changed)."""
        with self._cond:
            if self._items.maxlen != size:
                self._items = deque(self._items, maxlen=size)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
