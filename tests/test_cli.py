"""The commands explain themselves: help for every flag, one-line errors, settings that reach the workers."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.__main__ import build_parser as api_parser
from api.__main__ import overrides_from_args
from api.doctor import build_parser as doctor_parser
from api.server.config import load_config
from producers.cli import build_parser as producers_parser
from relay.__main__ import build_parser as relay_parser
from relay.client import connect
from tests.helpers import child_pids, recv_json, start_server, stop_server
from tests.test_commands import ROOT
from worker.__main__ import build_parser as worker_parser

PARSERS = {
    "api": api_parser,
    "relay": relay_parser,
    "worker": worker_parser,
    "producers": producers_parser,
    "doctor": doctor_parser,
}


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_has_help_and_a_log_level(command):
    parsers = list(_all_parsers(PARSERS[command]()))
    for prog, parser in parsers:
        text = parser.format_help()
        assert "``" not in text, f"{prog}: raw reStructuredText in its help"
        for action in parser._actions:
            if (
                isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
                or action.help == argparse.SUPPRESS
            ):
                continue
            assert action.help, f"{prog} {'/'.join(action.option_strings) or action.dest}: no help text"
    leaves = [p for _, p in parsers if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]
    for parser in leaves:
        assert "--log-level" in parser.format_help(), f"{parser.prog}: no --log-level"


def _busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def busy_port():
    yield from _busy_port()


def test_relay_port_in_use_is_one_line(busy_port):
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--port", str(busy_port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"port {busy_port}" in result.stderr and "--port" in result.stderr


@pytest.mark.parametrize(
    ("flag", "variable"),
    [("--port", "STREAMDIFFUSION_SERVER__PORT"), ("--relay-port", "STREAMDIFFUSION_RELAY__PORT")],
)
def test_server_port_in_use_is_one_line(busy_port, flag, variable, tmp_path):
    other = "--relay-port" if flag == "--port" else "--port"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "api",
            flag,
            str(busy_port),
            other,
            "0",
            "--workers",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"port {busy_port}" in result.stderr and flag in result.stderr and variable in result.stderr


async def test_relay_says_where_it_listens_and_says_shutdown_on_sigterm():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "--port", "0", cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        url = re.search(r"relay listening on (ws://127\.0\.0\.1:\d+)", line).group(1)
        client, _ = await connect(url, "viewer", "x")
        process.send_signal(signal.SIGTERM)
        assert (await recv_json(client, "shutdown"))["type"] == "shutdown"
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_print_config_ends_quietly_when_the_reader_leaves():
    result = subprocess.run(
        f"'{sys.executable}' -m api --print-config | head -1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout == "server:\n"
    assert result.stderr == ""


def test_model_and_acceleration_reach_the_local_workers(monkeypatch):
    from worker.__main__ import parse_args
    from worker.launch import LAUNCH_ENV

    args = api_parser().parse_args(["--model", "my/model", "--acceleration", "none"])
    launched = load_config(None, overrides_from_args(args)).launch_options("ws://127.0.0.1:9")
    monkeypatch.setenv(LAUNCH_ENV, launched.environment()[LAUNCH_ENV])  # what the server's children get
    options, _ = parse_args([])
    assert options.params["model_id"] == "my/model" and options.params["acceleration"] == "none"
    assert options.relay_url == "ws://127.0.0.1:9" and options.quality == 85
    assert parse_args(["--quality", "40"])[0].quality == 40  # a flag typed to the worker still wins


async def test_relay_token_reaches_workers_by_environment_never_argv(tmp_path):
    process, _ = await start_server("--token", "s3cret-token", data_dir=tmp_path)
    try:
        (worker,) = child_pids(process.pid)
        argv = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        assert b"s3cret-token" not in b" ".join(argv)
        assert b"RELAY_TOKEN=s3cret-token" in environ
        assert argv[1:3] == [b"-m", b"worker"] and b"--model" not in argv  # options: typed, by environment
        (options,) = [e for e in environ if e.startswith(b"STREAMDIFFUSION_WORKER_OPTIONS=")]
        assert b'"model":"stabilityai/sd-turbo"' in options
    finally:
        assert await stop_server(process) == 0


@pytest.mark.slow
async def test_generated_api_key_survives_a_restart(tmp_path):
    data = tmp_path / "data"
    keys = []
    for _ in range(2):
        process, text = await start_server("--workers", "0", data_dir=data)
        try:
            key = re.search(r"api key:\s+(sdk_\w+) \(kept in (.+)\)", text)
            assert key is not None, text
            keys.append(key.group(1))
            assert Path(key.group(2)) == data / "api_key"
            url = re.search(r"api ready at (http://\S+)", text).group(1)
            async with httpx.AsyncClient() as client:
                ok = await client.get(url + "/v1/streams", headers={"Authorization": f"Bearer {keys[-1]}"})
                refused = await client.get(url + "/v1/streams", headers={"Authorization": "Bearer nope"})
            assert ok.status_code == 200 and refused.status_code == 401
        finally:
            assert await stop_server(process) == 0
    assert keys[0] == keys[1]
    assert stat.S_IMODE(os.stat(data / "api_key").st_mode) == 0o600


async def test_a_configured_api_key_is_not_printed(tmp_path):
    process, text = await start_server("--workers", "0", "--api-key", "my-own-key", data_dir=tmp_path)
    assert await stop_server(process) == 0
    assert "my-own-key" not in text and "as configured" in text
    assert not (tmp_path / "api_key").exists()


def test_capacity_comes_from_the_hardware_unless_given():
    from worker.__main__ import parse_args
    from worker.capacity import auto_capacity, diffusion_capacity

    options, _ = parse_args(["--engine", "filter"])
    assert options.capacity == auto_capacity("filter") == min(16, 2 * (os.cpu_count() or 1))
    assert parse_args(["--engine", "filter", "--capacity", "3"])[0].capacity == 3
    assert auto_capacity("diffusion") == 1  # no CUDA device here
    # one shared model, then streams on it: a 24 GiB card holds the most a batch should take
    assert [diffusion_capacity(g * 2**30) for g in (0, 4, 6, 8, 24, 80)] == [1, 1, 4, 8, 8, 8]
    config = load_config(None, overrides_from_args(api_parser().parse_args([])))
    assert config.launch_options("ws://x").capacity is None  # the local workers decide from their hardware
    args = api_parser().parse_args(["--capacity", "5"])
    assert load_config(None, overrides_from_args(args)).launch_options("ws://x").capacity == 5
