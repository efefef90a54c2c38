"""The worker's pool of shared values (one loaded model per share key), without any model."""

from __future__ import annotations

import threading

import pytest

from worker.pool import SharedPool


class Model:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False


def test_a_key_is_built_once_and_closed_by_its_last_user() -> None:
    pool: SharedPool[Model] = SharedPool(lambda model: setattr(model, "closed", True))
    builds: list[str] = []

    def build(name: str) -> Model:
        builds.append(name)
        return Model(name)

    first = pool.acquire("sd", lambda: build("sd"))
    assert pool.acquire("sd", lambda: build("again")) is first
    other = pool.acquire("sdxl", lambda: build("sdxl"))
    assert builds == ["sd", "sdxl"] and pool.users("sd") == 2 and len(pool) == 2
    pool.release("sd")
    assert not first.closed
    pool.release("sd")
    assert first.closed and pool.users("sd") == 0 and not other.closed
    assert pool.acquire("sd", lambda: build("sd")) is not first  # built anew after the last release


def test_users_of_a_key_being_built_wait_for_that_build() -> None:
    pool: SharedPool[Model] = SharedPool(lambda model: None)
    building, release = threading.Event(), threading.Event()
    builds: list[int] = []

    def slow_build() -> Model:
        builds.append(1)
        building.set()
        release.wait(30)
        return Model("slow")

    got: list[Model] = []
    builder = threading.Thread(target=lambda: got.append(pool.acquire("k", slow_build)))
    builder.start()
    assert building.wait(30)
    waiter = threading.Thread(target=lambda: got.append(pool.acquire("k", slow_build)))
    waiter.start()
    release.set()
    builder.join(30)
    waiter.join(30)
    assert len(got) == 2 and got[0] is got[1] and builds == [1]


def test_a_failed_build_is_every_waiters_error_and_leaves_nothing() -> None:
    pool: SharedPool[Model] = SharedPool(lambda model: None)

    def broken() -> Model:
        raise RuntimeError("no weights")

    with pytest.raises(RuntimeError, match="no weights"):
        pool.acquire("k", broken)
    assert len(pool) == 0
    assert pool.acquire("k", lambda: Model("fixed")).name == "fixed"
