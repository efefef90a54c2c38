"""Model loading without a usable hub: one bounded, clear error, the cache still serving, and the CPU warning.

The hub is played by local sockets: a port that refuses connections, a
socket that accepts and never answers, and a small HTTP server that serves
a tiny model the way the hub does (or answers 404/401). huggingface_hub
reads ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` once, at import, into
``huggingface_hub.constants``; the loading code reads those constants when
it runs, so tests set them there. Its download URLs are fixed at import,
so the one test that downloads through it runs in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from huggingface_hub import constants, snapshot_download

from tests.test_commands import ROOT
from tests.tiny_models import TinyModels
from worker.engines.base import EngineError
from worker.engines.diffusion import DiffusionEngine, loading

pytestmark = pytest.mark.diffusion
REPO = "tiny-org/tiny-sd"
SIZE = 384


class FakeHub:
    """An HTTP server answering the few hub requests a download makes, for the repositories in ``repos``.

    Anything else gets ``missing``: a status and headers (huggingface.co answers an unknown
    model with 401 and ``X-Error-Code: RepoNotFound``; a mirror may answer a plain 404).
    """

    def __init__(self, repos: dict[str, Path], missing: tuple[int, dict[str, str]] = (404, {})) -> None:
        self.repos, self.missing = repos, missing
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.answer(self, with_body=True)

            def do_HEAD(self) -> None:
                hub.answer(self, with_body=False)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def run_python(
        self, args: list[str], env: dict[str, str], timeout: float, unset: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``python *args`` in a fresh process whose huggingface_hub talks to this hub (``HF_ENDPOINT``
        is read at import), online, with ``env`` added and ``unset`` removed; the hub closes after.
        """
        full = {**os.environ, **env, "HF_ENDPOINT": self.url}
        for name in ("HF_HUB_OFFLINE", *unset):
            full.pop(name, None)
        try:
            return subprocess.run(
                [sys.executable, *args],
                cwd=ROOT,
                env=full,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        finally:
            self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, request: BaseHTTPRequestHandler, with_body: bool) -> None:
        self.requests.append(f"{request.command} {request.path}")
        parts = unquote(urlsplit(request.path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and "/".join(parts[2:4]) in self.repos:
            root = self.repos["/".join(parts[2:4])]
            files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            if parts[4:5] == ["tree"]:  # list_repo_tree, recursive: one page
                answer: Any = [
                    {"type": "file", "path": f, "size": (root / f).stat().st_size, "oid": _commit(root / f)}
                    for f in files
                ]
            else:  # model_info / repo_info
                answer = {
                    "id": "/".join(parts[2:4]),
                    "sha": _commit(root),
                    "siblings": [{"rfilename": f} for f in files],
                }
            return _send(
                request, 200, json.dumps(answer).encode(), {"Content-Type": "application/json"}, with_body
            )
        if (
            len(parts) > 4 and parts[2] == "resolve" and "/".join(parts[:2]) in self.repos
        ):  # <repo>/resolve/<rev>/<file>
            root = self.repos["/".join(parts[:2])]
            file = root.joinpath(*parts[4:])
            if not file.is_file():
                return _send(request, 404, b"", {"X-Error-Code": "EntryNotFound"}, with_body)
            data = file.read_bytes()
            headers = {"X-Repo-Commit": _commit(root), "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return _send(request, 200, data, headers, with_body)
        status, headers = self.missing
        return _send(request, status, b'{"error": "Repository not found"}', headers, with_body)


def _commit(root: Path) -> str:
    return hashlib.sha1(str(root).encode()).hexdigest()


def _send(
    request: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], with_body: bool
) -> None:
    request.send_response(status)
    for name, value in {**headers, "Content-Length": str(len(data))}.items():
        request.send_header(name, value)
    request.end_headers()
    if with_body:
        request.wfile.write(data)


def refused_endpoint() -> str:
    """A local port nothing listens on: connections are refused at once, as with no network or DNS."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def stalled_endpoint() -> Iterator[str]:
    """A socket that accepts connections (the kernel does) and never answers: only a timeout ends a
    request.
    """
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture(scope="module")
def hub_cache(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache holding ``REPO`` (the tiny SD model), written by huggingface_hub's own download."""
    cache = tmp_path_factory.mktemp("hub-cache")
    hub = FakeHub({REPO: tiny.sd})
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(constants, "HF_HUB_OFFLINE", False)
            snapshot_download(REPO, cache_dir=cache, endpoint=hub.url)
    finally:
        hub.close()
    return cache


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub may be asked (the session is offline by default); no earlier answer or warning is
    remembered.
    """
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "_answers", {})
    monkeypatch.setattr(loading, "_warned", {})


def use_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path) -> None:
    """What ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` would have set at import."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def load_error(model_id: str) -> str:
    with pytest.raises(EngineError) as failure:
        DiffusionEngine({"model_id": model_id}).load()
    message = str(failure.value)
    assert "\n" not in message  # one line, as the worker reports it to the client
    return message


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if "Retrying" in r.getMessage() or "thrown while" in r.getMessage()
    ]


def test_an_unreachable_hub_is_one_error_that_lists_the_cache(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = refused_endpoint()
    use_hub(monkeypatch, endpoint, hub_cache)
    message = load_error("stabilityai/sd-turbo")
    assert message.startswith(
        f"model 'stabilityai/sd-turbo' is not available: cannot reach the Hugging Face hub "
        f"{endpoint} (ConnectError"
    )
    assert f"it is not in the local cache {hub_cache} (cached models: {REPO})" in message
    assert "hf download stabilityai/sd-turbo" in message
    assert retry_lines(caplog) == []


def test_a_hub_that_never_answers_is_given_up_on(
    hub_cache: Path, stalled_endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the probe's timeout this would wait on the socket until pytest's own timeout."""
    use_hub(monkeypatch, stalled_endpoint, hub_cache)
    message = load_error("stabilityai/sd-turbo")
    assert f"cannot reach the Hugging Face hub {stalled_endpoint} (" in message
    assert "ReadTimeout" in message or "no answer within" in message
    assert f"(cached models: {REPO})" in message
    assert retry_lines(caplog) == []


@pytest.mark.parametrize("missing", [(404, {}), (401, {"X-Error-Code": "RepoNotFound"})], ids=["404", "401"])
def test_a_model_the_hub_does_not_have_is_named(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, missing: tuple[int, dict[str, str]]
) -> None:
    hub = FakeHub({}, missing)
    try:
        use_hub(monkeypatch, hub.url, hub_cache)
        message = load_error("nobody/does-not-exist")
    finally:
        hub.close()
    assert message.startswith(
        f"model 'nobody/does-not-exist' is not available: it does not exist on the "
        f"Hugging Face hub {hub.url} (HTTP {missing[0]})"
    )
    assert f"(cached models: {REPO})" in message
    assert "GET /api/models/nobody/does-not-exist" in hub.requests


def test_a_cached_model_loads_with_the_hub_unreachable(
    tiny: TinyModels, hub_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use_hub(monkeypatch, refused_endpoint(), hub_cache)
    frame = [np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)]
    cached = DiffusionEngine(tiny.fast_params(SIZE, model_id=REPO))
    cached.load()
    local = DiffusionEngine(tiny.fast_params(SIZE, model_id=str(tiny.sd)))
    local.load()
    assert np.array_equal(cached.process(frame)[0], local.process(frame)[0])  # the same weights
    warnings = [
        r.getMessage() for r in caplog.records if r.name == loading.log.name and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1  # config and weights load apart: one warning
    assert warnings[0].startswith(f"model '{REPO}': cannot reach the Hugging Face hub")
    assert warnings[0].endswith("; loaded the copy in the local cache")


def test_offline_mode_names_the_cache_and_what_it_holds(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_hub(monkeypatch, refused_endpoint(), hub_cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = load_error("stabilityai/sd-turbo")
    assert message.startswith(
        "model 'stabilityai/sd-turbo' is not available: HF_HUB_OFFLINE is set and it is not "
        f"in the local cache {hub_cache} (cached models: {REPO})"
    )


@pytest.mark.slow
def test_a_reachable_hub_downloads_the_model_into_the_cache(tiny: TinyModels, tmp_path: Path) -> None:
    """The real download path, in a process whose huggingface_hub read ``HF_ENDPOINT`` at import."""
    hub = FakeHub({REPO: tiny.sd})
    script = (
        "import json\n"
        "from diffusers import DiffusionPipeline\n"
        "from worker.engines.diffusion.loading import cached_models, pretrained\n"
        f"pipe = pretrained(DiffusionPipeline.from_pretrained, {REPO!r}, 'model')\n"
        "print(json.dumps([type(pipe).__name__, cached_models()]))\n"
    )
    done = hub.run_python(["-c", script], {"HF_HUB_CACHE": str(tmp_path / "cache")}, timeout=100)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == ["StableDiffusionPipeline", [REPO]]
    assert any(
        r.startswith("GET ") and "/unet/diffusion_pytorch_model.safetensors" in r for r in hub.requests
    )
    assert "Retrying" not in done.stderr


def test_the_engine_warns_once_per_load_that_the_cpu_is_slow(
    tiny: TinyModels, caplog: pytest.LogCaptureFixture
) -> None:
    engine = DiffusionEngine(tiny.fast_params(SIZE, model_id=str(tiny.sd)), device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="worker.engines.diffusion.model"):
        engine.load()
        engine.process([np.zeros((SIZE, SIZE, 3), np.uint8)])
    slow = [r for r in caplog.records if "no CUDA device" in r.getMessage()]
    assert [r.getMessage() for r in slow] == [
        "no CUDA device: the diffusion engine runs on the CPU, expect seconds per frame"
    ]
    assert slow[0].levelno == logging.WARNING and slow[0].name == "worker.engines.diffusion.model"
