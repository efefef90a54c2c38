"""Streams the configuration names, with stream keys the operator chose: stable OBS settings."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import websockets

from api.server.app import create_app
from api.server.config import Config, ConfigError, load_config
from api.server.http import running
from api.streams.manager import check_named_streams
from tests.helpers import server_config

KEY = "sdk_named_streams_test"
STUDIO_KEY = "studio-key-chosen-by-the-operator"
NAMED = {"name": "studio", "stream_key": STUDIO_KEY, "params": {"prompt": "a watercolour"}}


def config(data_dir: Path, named: list[dict]) -> Config:
    return server_config(KEY, server={"data_dir": str(data_dir), "named_streams": named})


async def streams_of(url: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        response = await http.get("/v1/streams")
        assert response.status_code == 200
        return response.json()["data"]


async def test_a_named_stream_is_created_once_and_its_key_opens_the_ingest(tmp_path: Path) -> None:
    ids = []
    for _ in range(2):  # a restart on the same data dir finds it again, never a second one
        async with running(create_app(config(tmp_path, [NAMED]))) as url:
            (stream,) = await streams_of(url)
            assert (stream["name"], stream["stream_key"]) == ("studio", STUDIO_KEY)
            assert stream["params"]["prompt"] == "a watercolour" and stream["params"]["fit"] == "crop"
            ids.append(stream["id"])
            ingest = url.replace("http://", "ws://") + f"/live/video-to-video/{STUDIO_KEY}/ws"
            async with websockets.connect(ingest):
                pass  # the key opens the stream's ingest
            assert stream["whip_url"].endswith(f"/live/video-to-video/{STUDIO_KEY}/whip")
    assert ids[0] == ids[1]


def test_a_named_stream_with_bad_params_is_refused_before_the_server_starts() -> None:
    bad = {**NAMED, "params": {"guidance_scale": "lots"}}
    loaded = load_config(None, {"server": {"named_streams": [NAMED, bad]}})
    with pytest.raises(ConfigError, match=r"server.named_streams\[1\] \('studio'\): .*params.guidance_scale"):
        check_named_streams(loaded)
    check_named_streams(load_config(None, {"server": {"named_streams": [NAMED]}}))


def test_named_stream_keys_must_be_unguessable() -> None:
    with pytest.raises(ConfigError, match="stream_key"):
        load_config(None, {"server": {"named_streams": [{"name": "x", "stream_key": "short"}]}})
    loaded = load_config(None, {"server": {"named_streams": [NAMED]}})
    assert loaded.server.named_streams[0].stream_key == STUDIO_KEY
