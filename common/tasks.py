"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def first_done(*coroutines: Coroutine[Any, Any, Any]) -> list[BaseException | Any]:
    """Run ``coroutines`` until one returns (or fails); cancel and await the rest.

    Returns every task's result or exception (cancellations included), so the
    caller decides which failures matter.
    """
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    return results
