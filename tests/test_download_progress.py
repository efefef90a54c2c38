"""A first load of a hub model says how many bytes have arrived: ``downloading <id>`` in bytes.

The hub is a loopback HTTP server (``FakeHub``) serving tiny random-weight
models the way huggingface.co lays them out, with files diffusers must not
fetch beside them (fp16 variants, pickled duplicates, a single-file
checkpoint, a safety checker the engine passes as None). huggingface_hub
reads ``HF_ENDPOINT`` and ``HF_HOME`` at import, so the load runs in a
subprocess with those set, as a user's worker would.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.test_model_loading import FakeHub
from tests.tiny_models import TinyModels
from worker.engines.diffusion.download import ByteTally, plan
from worker.pipeline import LoadProgress

REPO, VAE = "tiny-org/tiny-sd", "tiny-org/tiny-taesd"
SIZE = 384

# a layout like stable-diffusion-v1-5's: variants, pickles, a checkpoint at the root, a safety checker
SD15_FILES = [
    "model_index.json",
    "README.md",
    "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.bin",
]
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def test_the_plan_takes_the_plain_safetensors_of_each_component_and_nothing_else():
    assert plan(SD15_FILES, SD15_INDEX, skip=["safety_checker", "dtype"]) == [
        "feature_extractor/preprocessor_config.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_the_plan_leaves_to_diffusers_what_it_cannot_be_sure_of():
    pickled_unet = [f for f in SD15_FILES if f != "unet/diffusion_pytorch_model.safetensors"]
    assert plan(pickled_unet, SD15_INDEX) == []  # diffusers then takes the .bin of every component
    single = [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    assert plan(single, None) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert plan(["config.json", "diffusion_pytorch_model.bin"], None) == []
    sharded = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json"] + [
        f"unet/diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)
    ]
    assert plan(sharded, {"unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, None]}) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]


def test_bytes_from_download_threads_become_progress_with_a_fraction_and_an_eta():
    """The pure half: counts added from several threads, through the worker's LoadProgress (its clock
    the test's), arrive in order with fraction and ETA, and the last one says the whole."""
    sent: list[dict[str, Any]] = []
    now = [10.0]
    progress = LoadProgress(lambda event, message, data: sent.append(data), lambda: now[0])
    mib = 2**20
    tally = ByteTally(8 * mib, lambda done, total: progress("downloading m", done, total, "bytes"))
    progress("downloading m", 0, tally.total, "bytes")
    now[0] += 1.0  # the clock moves on: the next count is sent

    def fetch() -> None:
        for _ in range(4):
            tally.add(mib // 2)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tally.done == 8 * mib
    first, *middle, last = sent
    assert (first["done"], first["fraction"], first["unit"]) == (0, 0.0, "bytes")
    assert middle and middle[0]["done"] == mib // 2 and middle[0]["eta_s"] == 15.0  # 1/16 in 1 s
    assert (last["done"], last["total"], last["fraction"]) == (8 * mib, 8 * mib, 1.0) and "eta_s" not in last


def hub_repo(tiny: TinyModels, root: Path) -> Path:
    """The tiny SD model with what a hub repository has beside it, none of which a load needs."""
    repo = root / "tiny-sd"
    shutil.copytree(tiny.sd, repo)
    index = json.loads((repo / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (repo / "model_index.json").write_text(json.dumps(index, indent=2))
    (repo / "safety_checker").mkdir()
    (repo / "safety_checker" / "config.json").write_text("{}")
    (repo / "safety_checker" / "model.safetensors").write_bytes(os.urandom(300_000))
    unet = repo / "unet"
    shutil.copy(
        unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.safetensors"
    )
    (unet / "diffusion_pytorch_model.bin").write_bytes(os.urandom(200_000))
    (repo / "tiny-sd-pruned.safetensors").write_bytes(os.urandom(400_000))
    (repo / "README.md").write_text("a tiny model\n")
    return repo


SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from diffusers import AutoencoderTiny, DiffusionPipeline
from worker.engines.diffusion import DiffusionEngine

params, alone = json.loads(sys.argv[1]), Path(sys.argv[2])
# what diffusers downloads by itself, into a cache of its own, for the comparison
DiffusionPipeline.download(params["model_id"], cache_dir=alone, safety_checker=None)
AutoencoderTiny.from_pretrained(params["vae_id"], cache_dir=alone)

def load():
    said = []
    engine = DiffusionEngine(params)
    engine.on_progress = lambda stage, done, total, unit: said.append([stage, done, total, unit])
    engine.load()
    size = (params["height"], params["width"], 3)
    frame = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    out = engine.process([frame])[0]
    engine.close()
    return said, list(out.shape), float(out.std())

first, shape, std = load()
again, _, _ = load()
print(json.dumps({"first": first, "again": again, "shape": shape, "std": std}))
"""


def snapshot_files(cache: Path, repo_id: str) -> set[str]:
    """Paths of the files a hub cache holds for ``repo_id``."""
    (snapshot,) = (cache / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir()
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}


@pytest.mark.diffusion
@pytest.mark.slow
def test_a_hub_model_not_in_the_cache_downloads_as_a_stage_in_bytes(tiny: TinyModels, tmp_path: Path) -> None:
    repo = hub_repo(tiny, tmp_path)
    hub = FakeHub({REPO: repo, VAE: tiny.tiny_vae})
    params = tiny.fast_params(SIZE, model_id=REPO, vae_id=VAE)
    done = hub.run_python(
        ["-c", SCRIPT, json.dumps(params), str(tmp_path / "alone")],
        {"HF_HOME": str(tmp_path / "hf-home")},
        timeout=300,
        unset=("HF_HUB_CACHE", "HF_HUB_DISABLE_PROGRESS_BARS"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])

    # the engine's cache holds exactly what diffusers alone takes: no variant, pickle or checkpoint
    cache = tmp_path / "hf-home" / "hub"
    for repo_id in (REPO, VAE):
        assert snapshot_files(cache, repo_id) == snapshot_files(tmp_path / "alone", repo_id)
    pipeline_files = snapshot_files(cache, REPO)
    assert "safety_checker/model.safetensors" not in pipeline_files
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in pipeline_files
    # each file came over the wire once per cache: the load after the download fetched nothing again
    gets = Counter(  # "GET /<repo>/resolve/<revision>/<file>" -> (repo, file)
        (path.split("/resolve/")[0], path.split("/resolve/")[1].split("/", 1)[1])
        for method, path in (r.split(" ", 1) for r in hub.requests)
        if method == "GET" and "/resolve/" in path
    )
    assert set(gets.values()) == {2}, gets

    stages = [stage for stage, *_ in result["first"]]
    order = [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]]
    assert order[:5] == [
        f"loading {REPO}",
        f"downloading {REPO}",
        f"loading {REPO}",
        f"downloading {VAE}",
        f"loading {REPO}",
    ]
    assert order[-1] == "warming up"
    # model_index.json came before, with the config diffusers reads first: the stage counts the rest
    expected = {
        REPO: sum((repo / f).stat().st_size for f in pipeline_files if f != "model_index.json"),
        VAE: sum((tiny.tiny_vae / f).stat().st_size for f in snapshot_files(cache, VAE)),
    }
    for repo_id, total in expected.items():
        said = [(d, t, unit) for stage, d, t, unit in result["first"] if stage == f"downloading {repo_id}"]
        assert {(t, unit) for _, t, unit in said} == {(total, "bytes")}
        counts = [d for d, _, _ in said]
        assert counts[0] == 0 and counts[-1] == total and counts == sorted(counts)
        if repo_id == REPO:  # several files: counted as each arrives, not only at the end
            assert any(0 < d < total for d in counts), counts
    # cached now: the same load downloads nothing and says no download stage
    assert not any(stage.startswith("downloading") for stage, *_ in result["again"])
    assert result["shape"] == [SIZE, SIZE, 3] and result["std"] > 1  # the model works
