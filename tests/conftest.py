from __future__ import annotations

import pytest

from relay import Relay, RelayConfig


@pytest.fixture
async def relay():
    async with Relay(RelayConfig(port=0)) as running:
        yield running
