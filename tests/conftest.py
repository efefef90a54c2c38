from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay import Relay, RelayConfig


@pytest.fixture(scope="session", autouse=True)
def _offline() -> Iterator[None]:
    """No test may reach the Hugging Face hub: missing models must fail fast and clearly."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture
async def relay():
    async with Relay(RelayConfig(port=0)) as running:
        yield running


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """Tiny random-weight diffusion models saved with ``save_pretrained`` (built once per run)."""
    from tests.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))
