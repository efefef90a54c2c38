"""What a server hands its local workers: typed options in the environment, never on argv.

The server builds :class:`LaunchOptions` from its configuration and puts
them, as JSON, in the child's environment (with the relay token, which has
its own variable); ``python -m worker`` reads them as its defaults, so a
flag given to the worker still wins. Nothing here is assembled as strings
for a command line, and ``ps`` shows no option a user did not type.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: the environment variable holding a local worker's options (JSON)
LAUNCH_ENV = "STREAMDIFFUSION_WORKER_OPTIONS"
#: the TensorRT engine cache directory :mod:`worker.engines.diffusion.acceleration` reads
ENGINE_DIR_ENV = "TENSORRT_CACHE_DIR"


class LaunchOptions(BaseModel):
    """Defaults of ``python -m worker``'s flags (same names), as a server gives them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    relay: str = "ws://127.0.0.1:8765"
    engine: Literal["auto", "filter", "diffusion"] = "auto"
    #: channels served at once; None: from the hardware
    capacity: int | None = Field(default=None, ge=1)
    #: params.model_id and params.acceleration under every channel's params
    model: str | None = None
    acceleration: Literal["none", "sdpa", "xformers", "compile", "tensorrt"] | None = None
    quality: int = Field(default=85, ge=1, le=100)
    #: where TensorRT engines are cached (the server's ``model.engine_dir``); no worker flag has it,
    #: so it travels as the variable the engine reads, not in the JSON
    engine_dir: str | None = Field(default=None, exclude=True)

    def environment(self) -> dict[str, str]:
        env = {LAUNCH_ENV: self.model_dump_json(exclude_none=True)}
        if self.engine_dir is not None:
            env[ENGINE_DIR_ENV] = self.engine_dir
        return env

    @classmethod
    def from_environment(cls) -> LaunchOptions | None:
        """The options a server left for this process, if it is a server's local worker."""
        text = os.environ.get(LAUNCH_ENV)
        return cls.model_validate_json(text) if text else None
