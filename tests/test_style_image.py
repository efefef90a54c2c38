"""Style image URLs: fetched once by the API as data URLs, never from private addresses."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.server
import threading

import httpx
import pytest

from api.server.app import create_app
from api.server.errors import ApiError
from api.server.http import running
from api.server.services import services
from api.streams import style_image
from tests.api_fixtures import AUTH, KEY, api  # noqa: F401  (fixture)
from tests.helpers import jpeg, server_config


@pytest.fixture
def files(tmp_path):
    """A real HTTP server on loopback serving ``tmp_path``."""
    (tmp_path / "style.jpg").write_bytes(jpeg(64, 64, seed=5))
    (tmp_path / "notes.txt").write_text("not an image")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def body(url: str) -> dict:
    return {"pipeline": "streamdiffusion", "params": {"ip_adapter_style_image_url": url}}


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("https://127.0.0.1/style.jpg", "private address"),
        ("https://localhost:9/style.jpg", "private address"),
        ("https://[::1]/style.jpg", "private address"),
        ("http://example.com/style.jpg", "https URL"),
        ("ftp://example.com/style.jpg", "https URL"),
        ("data:text/plain;base64,aGVsbG8=", "data:image"),
        ("data:image/png;base64,aGVsbG8=", "JPEG or PNG"),
        ("https://[::1/style.jpg", "not a valid URL"),
        ("https://example.com:99999/style.jpg", "not a valid URL"),
        ("https://[64:ff9b::7f00:1]/style.jpg", "private address"),  # NAT64 of 127.0.0.1
        ("https://[2002:a00:1::1]/style.jpg", "private address"),  # 6to4 of 10.0.0.1
        ("https://[::7f00:1]/style.jpg", "private address"),  # IPv4-compatible 127.0.0.1
        ("https://[::ffff:192.168.0.1]/style.jpg", "private address"),  # IPv4-mapped
    ],
)
async def test_unsafe_or_unusable_urls_are_422(api, url, needle):
    response = await api.post("/v1/streams", json=body(url))
    assert response.status_code == 422
    assert needle in response.json()["error"] and "ip_adapter_style_image_url" in response.json()["error"]


async def test_data_url_is_accepted_as_is(api):
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg(32, 32)).decode()
    response = await api.post("/v1/streams", json=body(url))
    assert response.status_code == 201 and response.json()["params"]["ip_adapter_style_image_url"] == url


async def test_fetched_image_becomes_a_data_url(files):
    settings = server_config(KEY, server={"style_image_allow_private": True})
    app = create_app(settings)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        response = await client.post("/v1/streams", json=body(f"{files}/style.jpg"))
        assert response.status_code == 201
        data_url = response.json()["params"]["ip_adapter_style_image_url"]
        assert data_url.startswith("data:image/jpeg;base64,")
        assert base64.b64decode(data_url.split(",", 1)[1]) == jpeg(64, 64, seed=5)
        sid = response.json()["id"]
        channel = services(app).relay.hub.channels[sid]
        assert channel.params["ip_adapter_style_image_url"] == data_url  # what the worker gets
        for path, needle in (("notes.txt", "not a JPEG or PNG"), ("missing.jpg", "HTTP 404")):
            response = await client.patch(
                f"/v1/streams/{sid}/params", json={"ip_adapter_style_image_url": f"{files}/{path}"}
            )
            assert response.status_code == 422 and needle in response.json()["error"]


async def test_download_is_capped_while_it_streams(files):
    with pytest.raises(ApiError) as exc:
        await style_image.fetch(f"{files}/style.jpg", allow_private=True, max_bytes=100)
    assert "over 100 bytes" in exc.value.message


async def test_a_trickling_server_cannot_hold_the_fetch():
    """Each byte comes before the per-read timeout, yet the whole fetch ends at the deadline."""
    stop = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while not stop.is_set():
                writer.write(b"x")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ApiError) as exc:
            await style_image.fetch(
                f"http://127.0.0.1:{port}/slow.jpg", allow_private=True, timeout=5, deadline=0.5
            )
        assert "took over 0.5 s" in exc.value.message
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
