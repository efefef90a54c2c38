"""The doctor command reports real facts of this machine."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from api.doctor import check_model_cache, check_port
from tests.test_commands import ROOT


@pytest.mark.slow
def test_doctor_json_lists_checks_and_passes_on_this_machine():
    result = subprocess.run(
        [sys.executable, "-m", "api.doctor", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["websockets"]["ok"] and checks["python"]["ok"]
    assert "cuda" in checks and "port 8080" in checks and "model" in checks
    for check in checks.values():
        assert check["ok"] or check["fix"], f"{check['name']} failed without saying how to fix it"


def test_busy_port_is_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        check = check_port("api", port)
    assert not check.ok and "in use" in check.detail


def test_model_cache_finds_local_directories_and_cached_models(tmp_path, monkeypatch):
    assert check_model_cache(str(tmp_path)).ok
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--org--name").mkdir()
    assert check_model_cache("org/name").ok
    missing = check_model_cache("other/model")
    assert not missing.ok and "org/name" in missing.detail and "download" in missing.fix
