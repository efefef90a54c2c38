"""StreamDiffusion engine on diffusers.

Importing this package (or ``.params``) does not import torch: the engine
class is loaded on first access, so the API can validate parameters with
``DiffusionParams`` on a machine without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.engines.diffusion.params import DiffusionParams, parse_params

if TYPE_CHECKING:
    from worker.engines.diffusion.engine import DiffusionEngine


def __getattr__(name: str) -> Any:
    if name == "DiffusionEngine":
        from worker.engines.diffusion.engine import DiffusionEngine

        return DiffusionEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DiffusionEngine", "DiffusionParams", "parse_params"]
