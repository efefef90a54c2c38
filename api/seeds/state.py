"""What the seed protocols keep while the server runs, on :attr:`api.server.services.Services.seeds`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from api.seeds.settings001 import Seed001Options

if TYPE_CHECKING:
    from api.seeds.ws001 import Session


@dataclass
class SeedState:
    #: seed 001's title, input mode, session timeout... (tests may replace it)
    options: Seed001Options
    #: seed 001's connected users by id; ``max_queue_size`` counts them
    sessions: dict[str, Session] = field(default_factory=dict)
