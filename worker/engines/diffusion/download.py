"""Hub downloads that say how many bytes have arrived, before diffusers loads the model.

diffusers' ``from_pretrained`` downloads a hub model through huggingface_hub's
``snapshot_download`` and passes it no progress hook, so a first load of a
multi-GB model said nothing for minutes. :func:`prefetch` downloads the files
diffusers is going to load first, with ``snapshot_download``'s own
``tqdm_class`` (huggingface_hub adds every file's bytes to one bar, the
``huggingface_hub.snapshot_download`` group), and reports them as a
``downloading <id>`` stage in bytes; diffusers then finds them in the cache.

:func:`plan` only picks files diffusers would fetch too (the plain
safetensors weights of each component it loads, their configs, the other
component folders), so nothing is downloaded that the load would not have
downloaded anyway; for a layout it does not recognise it picks nothing and
diffusers downloads as before, without bytes in the progress.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import tqdm as hf_tqdm

from worker.engines.base import ProgressCallback

log = logging.getLogger(__name__)

#: the progress-bar group of snapshot_download's bar that counts the bytes of every file written
SNAPSHOT_BAR = "huggingface_hub.snapshot_download"
#: file endings diffusers counts as weights (``filter_model_files``)
WEIGHTS = (".safetensors", ".bin", ".msgpack", ".onnx", ".pb", ".ckpt", ".flashpack")
#: plain (not a variant such as fp16) safetensors weights of diffusers and transformers models, sharded or
#: not, and their index: what diffusers loads by default
PLAIN_SAFETENSORS = re.compile(r"(diffusion_pytorch_model|model)(-\d{5}-of-\d{5})?\.safetensors")
PLAIN_INDEX = re.compile(r"(diffusion_pytorch_model|model)\.safetensors\.index\.json")
#: a single model's weights (a VAE, a ControlNet), as ``ModelMixin.from_pretrained`` names them
MODEL_WEIGHTS = "diffusion_pytorch_model.safetensors"


def plan(
    files: Collection[str], model_index: Mapping[str, Any] | None, skip: Collection[str] = ()
) -> list[str]:
    """The files of a hub repository that diffusers will load, as far as that is certain; [] when not.

    ``files``: every file in the repository; ``model_index``: its ``model_index.json`` (a pipeline),
    None for a single model; ``skip``: components the caller passes itself (diffusers fetches none of
    their files). A pipeline component with weights but no plain safetensors makes diffusers choose
    other weights for every component, so then nothing is picked.
    """
    if model_index is None:
        return sorted({"config.json", MODEL_WEIGHTS}) if {"config.json", MODEL_WEIGHTS} <= set(files) else []
    chosen = ["model_index.json"]
    for name, value in model_index.items():
        if name.startswith("_") or name in skip or not _is_component(value):
            continue
        inside = [f for f in files if f.startswith(f"{name}/")]
        if not any(f.endswith(WEIGHTS) for f in inside):
            chosen += inside  # a tokenizer, a scheduler: diffusers takes the whole folder
            continue
        direct = {f.removeprefix(f"{name}/") for f in inside if f.count("/") == 1}
        weights = sorted(f for f in direct if PLAIN_SAFETENSORS.fullmatch(f))
        if not weights:
            return []
        extras = sorted(f for f in direct if f == "config.json" or PLAIN_INDEX.fullmatch(f))
        chosen += [f"{name}/{f}" for f in extras + weights]
    return sorted(chosen)


def _is_component(value: Any) -> bool:
    """A ``model_index.json`` entry naming a class (``["diffusers", "UNet2DConditionModel"]``), not null."""
    return isinstance(value, list) and len(value) == 2 and value[1] is not None


class ByteTally:
    """Bytes of one download so far, added from huggingface_hub's download threads and said one at a time.

    Serialised because the callback (the worker's load progress) is not thread-safe and must see the
    counts in order; a resumed download's rollback is a negative addition.
    """

    def __init__(self, total: int, say: Callable[[int, int], None]) -> None:
        self.total, self.done = total, 0
        self._say = say
        self._lock = threading.Lock()

    def add(self, count: float) -> None:
        with self._lock:
            self.done += int(count)
            self._say(self.done, self.total)


def counting_bar(tally: ByteTally) -> type[hf_tqdm]:
    """A ``tqdm_class`` for ``snapshot_download``: huggingface_hub's own bars (shown or not, as usual),
    the bytes-written one also adding to ``tally``."""

    class CountingBar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.counts = kwargs.get("name") == SNAPSHOT_BAR
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self.counts and n:
                tally.add(n)
            return super().update(n)

    return CountingBar


def prefetch(repo_id: str, say: ProgressCallback, skip: Collection[str] = ()) -> bool:
    """Download what diffusers will load of ``repo_id`` and is not cached yet, saying the bytes.

    True when something was downloaded (the caller says its own stage again). Errors propagate; the
    caller's load then tries on its own and explains any failure.
    """
    files = [
        entry.path for entry in HfApi().list_repo_tree(repo_id, recursive=True) if isinstance(entry, RepoFile)
    ]
    index = _model_index(repo_id) if "model_index.json" in files else None
    patterns = [glob.escape(f) for f in plan(files, index, skip)]
    if not patterns:
        return False
    planned = snapshot_download(repo_id, allow_patterns=patterns, dry_run=True)  # what it would fetch
    missing = [f for f in planned if f.will_download]
    if not missing:
        return False
    stage = f"downloading {repo_id}"
    total = sum(f.file_size or 0 for f in missing)
    tally = ByteTally(total, lambda done, whole: say(stage, done, whole, "bytes"))
    log.info("downloading %d files of %s (%d bytes)", len(missing), repo_id, tally.total)
    say(stage, 0, tally.total, "bytes")
    snapshot_download(repo_id, allow_patterns=patterns, tqdm_class=counting_bar(tally))
    if tally.done != tally.total:  # huggingface_hub changed how it counts: the stage still ends complete
        log.debug("counted %d of %d bytes downloading %s", tally.done, tally.total, repo_id)
        say(stage, tally.total, tally.total, "bytes")
    return True


def _model_index(repo_id: str) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (diffusers' ``load_config`` has usually cached it already)."""
    with open(hf_hub_download(repo_id, "model_index.json"), encoding="utf-8") as file:
        index: dict[str, Any] = json.load(file)
    return index
