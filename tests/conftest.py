from __future__ import annotations

import getpass
from collections.abc import Iterator

import pytest

from relay import Relay, RelayConfig
from tests.leftovers import (  # noqa: F401  (hooks and the autouse fixture, run from here)
    _nothing_left_behind,
    install,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_unconfigure,
)


def pytest_configure(config: pytest.Config) -> None:
    """The run's own temp dir (tests/leftovers.py), before anything imports torch.

    torch makes its compile cache, ``torchinductor_<user>``, in the temp dir
    (importing diffusers does, and ``torch.compile``, partly whatever
    ``TORCHINDUCTOR_CACHE_DIR`` says): expected there, and gone with the run.
    """
    install(config).allow(f"torchinductor_{getpass.getuser()}")


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
