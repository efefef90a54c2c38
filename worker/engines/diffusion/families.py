"""Model families (SD 1.5, SD 2.1, SDXL) of the models and ControlNets Daydream names.

A ControlNet only works with the family it was trained for, and IP-Adapter
exists for SD 1.5 and SDXL only; Daydream refuses such params up front
(422). Ids this table does not know (local directories, other hub models)
are left to the engine, which checks the weights it loads.
"""

from __future__ import annotations

import re
from typing import Literal

Family = Literal["sd15", "sd21", "sdxl"]

MODELS: dict[str, Family] = {
    "stabilityai/sd-turbo": "sd21",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/sdxl-turbo": "sdxl",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "SimianLuo/LCM_Dreamshaper_v7": "sd15",
    "KBlueLeaf/kohaku-v2.1": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "Lykon/dreamshaper-8": "sd15",
    "prompthero/openjourney-v4": "sd15",
}

#: how ControlNet ids on the hub name their family (thibaud/controlnet-sd21-*, lllyasviel/control_v11*_sd15_*,
#: xinsir/controlnet-*-sdxl-1.0, diffusers/controlnet-*-sdxl-1.0)
_CONTROLNET_PATTERNS: tuple[tuple[re.Pattern[str], Family], ...] = (
    (re.compile(r"sd-?xl", re.IGNORECASE), "sdxl"),
    (re.compile(r"sd-?2\.?1|sd21", re.IGNORECASE), "sd21"),
    (re.compile(r"sd-?1\.?5|sd15|control_v11", re.IGNORECASE), "sd15"),
)

#: SDXL pipelines take at most this many ControlNets at once (Daydream's rule)
MAX_SDXL_CONTROLNETS = 3
#: families IP-Adapter weights exist for
IP_ADAPTER_FAMILIES: frozenset[Family] = frozenset({"sd15", "sdxl"})

NAMES: dict[Family, str] = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL"}


def model_family(model_id: str) -> Family | None:
    return MODELS.get(model_id)


def controlnet_family(model_id: str) -> Family | None:
    if "/" not in model_id:  # a local directory: its config decides, at load time
        return None
    return next((family for pattern, family in _CONTROLNET_PATTERNS if pattern.search(model_id)), None)
