"""Newest-wins slots (common/slots.py) and the one percentile helper (common/percentiles.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from common.percentiles import RELAY_QUANTILES, label, percentiles_ms
from common.slots import AsyncSlot, Closed, Newest, ThreadSlot

LIMIT = 10.0


# -- Newest -----------------------------------------------------------------------


def test_one_slot_keeps_the_newest_and_counts_what_it_replaced() -> None:
    slot: Newest[int] = Newest()
    assert slot.put(1) is None
    assert slot.put(2) == 1 and slot.put(3) == 2
    assert slot.dropped == 2 and len(slot) == 1
    assert slot.take() == [3]
    assert slot.take() == [] and len(slot) == 0
    assert slot.put(4) is None and slot.dropped == 2  # a take empties it: nothing replaced


def test_batch_store_keeps_the_newest_in_order() -> None:
    store: Newest[int] = Newest(3)
    pushed = [store.put(i) for i in range(5)]
    assert pushed == [None, None, None, 0, 1]
    assert store.take() == [2, 3, 4] and store.dropped == 2


def test_resize_keeps_the_newest_and_counts_the_rest() -> None:
    store: Newest[int] = Newest(4)
    for i in range(4):
        store.put(i)
    store.resize(2)
    assert store.size == 2 and store.dropped == 2
    assert store.take() == [2, 3]
    store.resize(3)
    for i in range(3):
        store.put(i)
    assert store.take() == [0, 1, 2] and store.dropped == 2
    with pytest.raises(ValueError):
        store.resize(0)
    with pytest.raises(ValueError):
        Newest(0)


# -- ThreadSlot -----------------------------------------------------------------


def test_thread_slot_hands_the_newest_to_a_waiting_thread() -> None:
    slot: ThreadSlot[int] = ThreadSlot()
    got: list[list[int]] = []
    taker = threading.Thread(target=lambda: got.append(slot.take(timeout=LIMIT)))
    taker.start()
    slot.put(7)
    taker.join(LIMIT)
    assert got == [[7]]
    for i in range(5):
        slot.put(i)
    assert slot.take() == [4] and slot.dropped == 4


def test_thread_slot_waits_for_a_batch_and_times_out_empty_handed() -> None:
    slot: ThreadSlot[int] = ThreadSlot(2)
    slot.put(1)
    assert slot.take(count=2, timeout=0) == []  # one is not a batch of two
    slot.put(2)
    assert slot.take(count=2, timeout=0) == [1, 2]
    slot.put(3)
    slot.resize(1)
    slot.put(4)
    assert slot.take(timeout=0) == [4] and slot.dropped == 1


def test_closing_a_thread_slot_stops_takers_and_sleepers() -> None:
    slot: ThreadSlot[int] = ThreadSlot()
    outcomes: list[str] = []

    def take() -> None:
        try:
            slot.take()
        except Closed:
            outcomes.append("closed")

    def sleep() -> None:
        outcomes.append(f"woken {slot.wait_closed(LIMIT * 10)}")

    threads = [threading.Thread(target=take), threading.Thread(target=sleep)]
    for thread in threads:
        thread.start()
    assert not slot.wait_closed(0)
    slot.close()
    for thread in threads:
        thread.join(LIMIT)
    assert sorted(outcomes) == ["closed", "woken True"]
    slot.put(1)
    with pytest.raises(Closed):  # closed means stopped: what is left is not handed out
        slot.take(timeout=0)


# -- AsyncSlot ------------------------------------------------------------------


async def test_async_slot_wakes_the_taker_with_the_newest() -> None:
    slot: AsyncSlot[int] = AsyncSlot()
    taker = asyncio.create_task(slot.take())
    await asyncio.sleep(0)  # the taker is waiting now
    assert not taker.done()
    slot.put(1)
    slot.put(2)
    assert await asyncio.wait_for(taker, LIMIT) == [2]
    assert slot.dropped == 1


async def test_closing_an_async_slot_ends_the_taker() -> None:
    slot: AsyncSlot[int] = AsyncSlot()
    taker = asyncio.create_task(slot.take())
    await asyncio.sleep(0)
    slot.close()
    with pytest.raises(Closed):
        await asyncio.wait_for(taker, LIMIT)
    assert slot.closed
    slot.put(1)
    with pytest.raises(Closed):
        await slot.take()


# -- percentiles ------------------------------------------------------------------


def test_percentiles_are_nearest_rank_in_ms_with_a_fixed_shape() -> None:
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles_ms(samples) == {"p50": 51.0, "p90": 91.0, "p99": 100.0, "max": 100.0}
    assert percentiles_ms(reversed(samples), RELAY_QUANTILES) == {"p50": 51.0, "p99": 100.0}
    assert percentiles_ms([], RELAY_QUANTILES) == {"p50": None, "p99": None}
    assert percentiles_ms([0.0012344], (0.5,)) == {"p50": 1.234}  # rounded to 3 decimals
    assert [label(q) for q in (0.5, 0.999, 1.0)] == ["p50", "p99.9", "max"]
