"""The commands users run, as subprocesses: the embedded server, relay and worker CLIs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys

from api.__main__ import python_command
from api.server.services import services
from media.codec import decode_image
from relay.client import connect
from tests.helpers import input_frame, jpeg, recv_frame, recv_json, start_server, stop_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def test_embedded_server_runs_a_relay_and_a_filter_worker(tmp_path):
    process, text = await start_server(data_dir=tmp_path, stderr=asyncio.subprocess.PIPE)
    try:
        while "more workers:" not in text:  # the rest of the banner
            text += (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        url = re.search(r"relay ready at (ws://[\d.]+:\d+)", text).group(1)
        producer, _ = await connect(url, "producer", "cam")
        image = jpeg(96, 64, seed=2)
        ready = await recv_json(producer, "report", event="ready")  # worker process joined, engine loaded
        assert ready["data"]["engine"] == "filter"
        await producer.send(input_frame(1, image, "cam", 96, 64))
        frame = await recv_frame(producer)
        assert frame.seq == 1
        assert abs(decode_image(frame.payload).astype(int) - decode_image(image)).mean() > 10
        await producer.close()
    finally:
        await stop_server(process)
    stderr = (await process.stderr.read()).decode()
    assert process.returncode == 0
    assert "engine:        'filter'" in text  # the banner says why there is no diffusion ...
    assert "level=warning" not in stderr and "level=info" not in stderr  # ... and the log stays quiet
    python = python_command(sys.executable, cwd=ROOT)
    assert f"{python} -m producers pattern --relay {url}" in text  # commands that run as shown


def test_printed_commands_name_the_interpreter_that_runs_the_server(tmp_path):
    venv_python = str(tmp_path / ".venv" / "bin" / "python")
    assert python_command(venv_python, cwd=str(tmp_path)) == ".venv/bin/python"  # after make run
    assert python_command(str(tmp_path / "python"), cwd=str(tmp_path)) == "./python"
    elsewhere = python_command(venv_python, cwd="/")
    assert elsewhere in (venv_python.lstrip("/"), venv_python, "python")


def test_relay_refuses_public_address_without_token():
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--host", "0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "without tokens" in result.stderr


def test_worker_rejects_bad_params_json():
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--params", "{oops"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "--params is not valid JSON" in result.stderr


async def test_shutdown_tells_websocket_clients_in_their_protocol():
    import orjson
    import websockets

    from api.server.app import create_app
    from api.server.http import running
    from tests.helpers import server_config

    app = create_app(server_config(key=None))
    async with running(app) as url:
        base = url.replace("http://", "ws://")
        seed000 = await websockets.connect(base + "/ws")
        assert orjson.loads(await seed000.recv())["type"] == "status"
        seed001 = await websockets.connect(base + "/api/ws/alice")
        assert orjson.loads(await seed001.recv()) == {"status": "connected"}
        relay_client, _ = await connect(services(app).relay_url, "viewer", "x", services(app).relay_token)
        while len(app.state.farewells) < 2:  # both sessions set up server-side
            await asyncio.sleep(0.01)
    goodbyes = []
    for ws in (seed000, seed001, relay_client):
        messages = []
        with contextlib.suppress(websockets.ConnectionClosed):  # read until the server closes
            while True:
                messages.append(orjson.loads(await asyncio.wait_for(ws.recv(), 5)))
        goodbyes.append(messages[-1])
    assert goodbyes[0]["type"] == "status" and goodbyes[0]["data"]["status"] == "shutdown"
    assert goodbyes[1] == {"status": "error", "message": "Server is shutting down"}
    assert goodbyes[2]["type"] == "shutdown"
