"""Load a pipeline, VAE, LoRAs and ControlNets with diffusers' ``from_pretrained``.

Hub ids download once into the Hugging Face cache (huggingface_hub prints
progress bars; with a ``prefetch``, :mod:`.download` first fetches what
the load needs and says its bytes). One short request first tells whether
the hub answers and has the id; without it, or with ``HF_HUB_OFFLINE`` set,
only local directories and the cache are used, and anything missing becomes
one ``EngineError`` that names it, says why, and lists what the cache holds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

# From the defining modules: to a type checker, diffusers' top-level names are the placeholder
# classes it exports when torch is missing (no base class, no methods).
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from huggingface_hub import HfApi, constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from worker.engines.base import EngineError
from worker.engines.diffusion.params import DiffusionParams

log = logging.getLogger(__name__)

T = TypeVar("T")
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)
ModelKind = Literal["turbo", "lcm", "base"]

PRESETS: dict[str, ModelKind] = {
    "stabilityai/sd-turbo": "turbo",
    "stabilityai/sdxl-turbo": "turbo",
    "SimianLuo/LCM_Dreamshaper_v7": "lcm",
    "KBlueLeaf/kohaku-v2.1": "base",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "base",
    "Lykon/dreamshaper-8": "base",
    "prompthero/openjourney-v4": "base",
}
"""Known models and how they are distilled; ``base`` models need LCM-LoRA for few steps."""

TINY_VAES = {False: "madebyollin/taesd", True: "madebyollin/taesdxl"}  # keyed by "is SDXL"
SDXL_LCM_LORA = "latent-consistency/lcm-lora-sdxl"
SD15_LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"
PROBE_TIMEOUT_S = (
    3.0  # httpx's connect and read timeouts for the one request that asks the hub about a model id
)
PROBE_DEADLINE_S = 4.0  # the whole of it, DNS and huggingface_hub's first-call lookups included
REMEMBER_S = 60.0  # how long a hub's answer (or silence) is reused instead of asking again
CACHED_SHOWN = 12  # cached model ids an error message lists

#: downloads a hub id before it loads (:func:`.download.prefetch` with the load's progress), given the
#: repo id and the load's keyword arguments (pipeline components passed there need none of their files)
Prefetch = Callable[[str, Collection[str]], None]


@dataclass
class LoadedModels:
    """Everything the engine runs, on its device."""

    pipe: Any  # a StableDiffusionPipeline or StableDiffusionXLPipeline
    vae: AutoencoderKL | AutoencoderTiny
    scheduler: LCMScheduler
    kind: ModelKind
    is_xl: bool
    controlnets: list[ControlNetModel] = field(default_factory=list)


def model_kind(model_id: str) -> ModelKind:
    """Preset kind, else guessed from the name (``turbo`` / ``lcm``), else ``base``."""
    if model_id in PRESETS:
        return PRESETS[model_id]
    name = model_id.lower()
    if "turbo" in name:
        return "turbo"
    return "lcm" if "lcm" in name else "base"


def load_models(
    params: DiffusionParams, device: torch.device, dtype: torch.dtype, prefetch: Prefetch | None = None
) -> LoadedModels:
    """Load every model ``params`` asks for, apply LoRAs, move all to ``device``.

    ``prefetch`` downloads the pipeline, VAE and ControlNets from the hub first (LoRAs load as before).
    """
    pipe = _load_pipeline(params.model_id, dtype, prefetch)
    is_xl = getattr(pipe, "text_encoder_2", None) is not None
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise EngineError(
            f"model {params.model_id!r} predicts {prediction!r}; only epsilon models are supported"
        )
    kind = model_kind(params.model_id)
    _apply_loras(pipe, params, kind, is_xl)
    pipe.to(device)
    vae = module_to(_load_vae(params, pipe, is_xl, dtype, prefetch), device)
    controlnets = [
        module_to(_load_controlnet(c.model_id, dtype, prefetch), device) for c in params.enabled_controlnets()
    ]
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return LoadedModels(pipe, vae, scheduler, kind, is_xl, controlnets)


def module_to(model: ModuleT, target: torch.device | torch.dtype) -> ModuleT:
    """``model.to(device)`` or ``model.to(dtype=dtype)``, checked against torch's ``Module.to``.

    The model's own ``to`` runs (diffusers' ``ModelMixin.to`` among them); diffusers decorates that
    one with ``functools.wraps``, which typeshed types as a callable that does not bind ``self``, so
    mypy rejects calling it on a diffusers model directly.
    """
    if isinstance(target, torch.dtype):
        return model.to(dtype=target)
    return model.to(target)


def pretrained(
    load: Callable[..., T], source: str, what: str, *, prefetch: Prefetch | None = None, **kwargs: Any
) -> T:
    """``load(source, local_files_only=..., **kwargs)`` from a local directory, the hub or its cache.

    A hub id is first checked with one bounded request (``probe_hub``), so a
    hub that cannot be reached or a model that does not exist is one clear
    ``EngineError`` within seconds instead of minutes of retries; a cached
    copy still loads without the hub. A hub that answers gets ``prefetch``
    first (never offline, never for a local directory).
    """
    started = time.monotonic()
    if os.path.isdir(source):
        log.info("loading %s %s (local directory)", what, source)
        try:
            result = load(source, local_files_only=True, **kwargs)
        except Exception as exc:
            raise EngineError(
                f"{what} {source!r} is not available: it could not be loaded from its local "
                f"directory: {_reason(exc)}"
            ) from exc
    else:
        result = _from_hub(load, source, what, kwargs, prefetch)
    log.info("loaded %s %s in %.1f s", what, source, time.monotonic() - started)
    return result


def _load_pipeline(model_id: str, dtype: torch.dtype, prefetch: Prefetch | None) -> Any:
    config = pretrained(DiffusionPipeline.load_config, model_id, "model")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if "safety_checker" in config:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    pipe = pretrained(DiffusionPipeline.from_pretrained, model_id, "model", prefetch=prefetch, **kwargs)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
        raise EngineError(
            f"model {model_id!r} is a {type(pipe).__name__}, not a Stable Diffusion (XL) pipeline"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_controlnet(model_id: str, dtype: torch.dtype, prefetch: Prefetch | None) -> ControlNetModel:
    return pretrained(ControlNetModel.from_pretrained, model_id, "ControlNet", prefetch=prefetch, dtype=dtype)


def _apply_loras(pipe: Any, params: DiffusionParams, kind: ModelKind, is_xl: bool) -> None:
    """Load LCM-LoRA (base models only) and ``lora_dict``, then fuse them into the weights.

    Fused weights run at full speed; the LoRA layers are dropped afterwards.
    """
    loras: dict[str, tuple[str, float]] = {}
    if params.use_lcm_lora and kind == "base":
        lcm_id = SDXL_LCM_LORA if is_xl and params.lcm_lora_id == SD15_LCM_LORA else params.lcm_lora_id
        loras["lcm"] = (lcm_id, 1.0)
    for index, (source, weight) in enumerate((params.lora_dict or {}).items()):
        loras[f"lora_{index}"] = (source, weight)
    if not loras:
        return
    for name, (source, _) in loras.items():
        kwargs: dict[str, Any] = {"adapter_name": name}
        location = source
        if os.path.isfile(source):
            location, kwargs["weight_name"] = os.path.split(source)
        pretrained(pipe.load_lora_weights, location, "LoRA", **kwargs)
    names = list(loras)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras.values()])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()


def _load_vae(
    params: DiffusionParams, pipe: Any, is_xl: bool, dtype: torch.dtype, prefetch: Prefetch | None
) -> AutoencoderKL | AutoencoderTiny:
    if params.use_tiny_vae:
        vae_id = params.vae_id or TINY_VAES[is_xl]
        return pretrained(AutoencoderTiny.from_pretrained, vae_id, "tiny VAE", prefetch=prefetch, dtype=dtype)
    if params.vae_id:
        return pretrained(AutoencoderKL.from_pretrained, params.vae_id, "VAE", prefetch=prefetch, dtype=dtype)
    return pipe.vae


@dataclass(frozen=True)
class HubAnswer:
    """What the hub said about a model id: ``found``, ``missing`` (404, or 401 for private/gated) or
    ``unreachable``.
    """

    state: Literal["found", "missing", "unreachable"]
    cause: str = ""


def probe_hub(repo_id: str) -> HubAnswer:
    """Ask the hub once, without retries and within ``PROBE_DEADLINE_S``, whether ``repo_id`` exists.

    huggingface_hub's downloads retry network errors with backoff (5 tries, up
    to 8 s apart, 10 s timeouts): minutes before a plain "no network". An
    unreachable hub is remembered for ``REMEMBER_S`` so that the next models
    of the same load do not wait again; answers about an id are remembered too.
    """
    endpoint, now = constants.ENDPOINT, time.monotonic()
    for key in ((endpoint, ""), (endpoint, repo_id)):
        if key in _answers and now - _answers[key][0] < REMEMBER_S:
            return _answers[key][1]
    answer = _within(PROBE_DEADLINE_S, lambda: _ask_hub(endpoint, repo_id, PROBE_TIMEOUT_S))
    if answer is None:
        answer = HubAnswer("unreachable", f"no answer within {PROBE_DEADLINE_S:g} s")
    _answers[(endpoint, "" if answer.state == "unreachable" else repo_id)] = (now, answer)
    return answer


def cached_models() -> list[str]:
    """The model ids in the hub cache, as huggingface_hub's own scan sees them."""
    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    return sorted(repo.repo_id for repo in info.repos if repo.repo_type == "model")


_answers: dict[
    tuple[str, str], tuple[float, HubAnswer]
] = {}  # (endpoint, repo id or "" for the hub) -> answer
_warned: dict[str, float] = {}  # warning -> when it was logged


def _from_hub(
    load: Callable[..., T], repo_id: str, what: str, kwargs: dict[str, Any], prefetch: Prefetch | None = None
) -> T:
    """Download (or update) from a hub that answers, else load the cached copy, else explain why neither
    works.
    """
    name = f"{what} {repo_id!r}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise EngineError(
            f"{name} is not available: it is neither a local directory nor a valid Hugging Face model id"
        ) from None
    endpoint = constants.ENDPOINT
    if _offline():
        problem, hint = (
            "HF_HUB_OFFLINE is set",
            f"unset HF_HUB_OFFLINE to download it, or {_download_hint(repo_id)}",
        )
    else:
        answer = probe_hub(repo_id)
        if answer.state == "found":
            log.info("loading %s %s from %s (downloads what the cache lacks)", what, repo_id, endpoint)
            if prefetch is not None:
                _prefetch(prefetch, repo_id, what, kwargs)
            try:
                return load(repo_id, local_files_only=False, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure: the cached copy may still load
                problem, hint = f"loading it from {endpoint} failed ({_reason(exc)})", ""
        elif answer.state == "missing":
            problem = f"it does not exist on the Hugging Face hub {endpoint} ({answer.cause})"
            hint = "check the id; a private or gated model needs a token with access (hf auth login)"
        else:
            problem = f"cannot reach the Hugging Face hub {endpoint} ({answer.cause})"
            hint = _download_hint(repo_id)
    try:
        result = load(repo_id, local_files_only=True, **kwargs)
    except Exception as exc:
        raise EngineError(
            f"{name} is not available: {problem} and {_cache_state(repo_id, exc)}"
            + (f"; {hint}" if hint else "")
        ) from exc
    if not _offline():
        _warn_once(f"{name}: {problem}; loaded the copy in the local cache")
    return result


def _prefetch(prefetch: Prefetch, repo_id: str, what: str, kwargs: dict[str, Any]) -> None:
    """``prefetch``; a failure is logged, and the load that follows downloads (or explains) it."""
    try:
        prefetch(repo_id, list(kwargs))
    except Exception as exc:  # noqa: BLE001 - the load retries the download and reports its own failure
        log.warning("downloading %s %s ahead of loading it failed (%s)", what, repo_id, _reason(exc))


def _ask_hub(endpoint: str, repo_id: str, timeout: float) -> HubAnswer:
    """One ``model_info`` request: it goes through no retry loop, unlike downloads."""
    try:
        HfApi(endpoint=endpoint).model_info(repo_id, timeout=timeout)
    except RepositoryNotFoundError as exc:  # gated and private repositories included (401)
        return HubAnswer("missing", _status(exc))
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        return HubAnswer("missing" if status in (401, 404) else "unreachable", _status(exc))
    except Exception as exc:  # noqa: BLE001 - refused, DNS, timeouts, offline mode, proxies: all "unreachable"
        return HubAnswer("unreachable", f"{type(exc).__name__}: {_reason(exc)}")
    return HubAnswer("found")


def _within(seconds: float, call: Callable[[], T]) -> T | None:
    """``call()``, or None when it has not returned after ``seconds``.

    httpx bounds each connect and read, not a DNS lookup that hangs, nor the
    lookups huggingface_hub makes before its first request; a daemon thread
    bounds everything, and is left behind if it never returns.
    """
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(call()), name="hub-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    return results[0] if results else None


def _warn_once(message: str) -> None:
    """Log ``message`` once per ``REMEMBER_S``: a pipeline's config and weights load apart, yet are one
    model.
    """
    now = time.monotonic()
    if now - _warned.get(message, -REMEMBER_S) >= REMEMBER_S:
        _warned[message] = now
        log.warning("%s", message)


def _cache_state(repo_id: str, exc: Exception) -> str:
    """Why the cache could not serve ``repo_id``, with what it holds instead."""
    cache, models = constants.HF_HUB_CACHE, cached_models()
    if repo_id in models:
        return f"its copy in the local cache {cache} does not load ({_reason(exc)})"
    shown = ", ".join(models[:CACHED_SHOWN]) or "none"
    more = f" and {len(models) - CACHED_SHOWN} more" if len(models) > CACHED_SHOWN else ""
    return f"it is not in the local cache {cache} (cached models: {shown}{more})"


def _download_hint(repo_id: str) -> str:
    return (
        f"run `hf download {repo_id}` on a machine with network access and copy its cache here, "
        "or use a local directory instead"
    )


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    now = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return now or constants.is_offline_mode()


def _status(exc: HfHubHTTPError) -> str:
    return f"HTTP {exc.response.status_code}" if exc.response is not None else _reason(exc)


def _reason(exc: BaseException) -> str:
    """The first line of the error, or what it means when a gated repository is behind it."""
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, GatedRepoError):
            return "it is gated: accept its conditions on the hub, then log in with `hf auth login`"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
