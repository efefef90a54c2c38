"""Values built once per key, shared by their users, closed when the last one lets go.

The worker keeps one loaded diffusion model per set of params that can share
a batch; channels acquire it when their engine loads and release it when
they stop. Building happens outside the pool's lock (a model takes seconds to
minutes), and users asking for a key being built wait for that one build
instead of starting another; a failed build is everyone's error and leaves
nothing behind, so the next acquire builds again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class _Entry(Generic[V]):
    def __init__(self) -> None:
        self.users = 0
        self.value: V | None = None
        self.error: BaseException | None = None
        self.built = threading.Event()


class SharedPool(Generic[V]):
    """Reference-counted values by key; ``close`` is called on a value when its last user releases it."""

    def __init__(self, close: Callable[[V], None]) -> None:
        self._close = close
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry[V]] = {}

    def acquire(self, key: Hashable, build: Callable[[], V]) -> V:
        """The value for ``key``, built by ``build`` if nobody holds one; pair with :meth:`release`."""
        with self._lock:
            entry = self._entries.get(key)
            builder = entry is None
            if entry is None:
                entry = self._entries[key] = _Entry()
            entry.users += 1
        if builder:
            try:
                entry.value = build()
            except BaseException as exc:
                with self._lock:
                    if self._entries.get(key) is entry:
                        del self._entries[key]
                entry.error = exc
                raise
            finally:
                entry.built.set()
            return entry.value
        entry.built.wait()
        if entry.error is not None:
            raise entry.error
        assert entry.value is not None
        return entry.value

    def release(self, key: Hashable) -> None:
        """One user fewer; the last one closes the value (on the caller's thread)."""
        with self._lock:
            entry = self._entries[key]
            entry.users -= 1
            if entry.users > 0:
                return
            del self._entries[key]
        if entry.value is not None:
            self._close(entry.value)

    def users(self, key: Hashable) -> int:
        """How many hold ``key`` now (0 when nobody does)."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.users if entry is not None else 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
