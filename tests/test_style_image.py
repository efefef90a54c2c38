"""Style image URLs: fetched once by the API as data URLs, never from private addresses."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.server
import struct
import threading
import zlib

import cv2
import httpx
import numpy as np
import pytest

from api.server.app import create_app
from api.server.errors import ApiError
from api.server.http import running
from api.server.services import services
from api.streams import style_image
from tests.api_fixtures import AUTH, KEY, api  # noqa: F401  (fixture)
from tests.helpers import jpeg, server_config
from wire.images import probe_picture
from worker.engines.base import EngineError
from worker.engines.diffusion import ip_adapter


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
        ("data:image/png;base64,aGVsbG8=", "not a JPEG, PNG, WebP"),
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
        for path, needle in (("notes.txt", "not a JPEG, PNG, WebP"), ("missing.jpg", "HTTP 404")):
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


def encoded(ext: str, width: int = 40, height: int = 24) -> bytes:
    """A real image in ``ext`` (``.webp``...), written by OpenCV: the worker's decoder reads it back."""
    ok, data = cv2.imencode(ext, np.full((height, width, 3), 90, np.uint8))
    assert ok
    return data.tobytes()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height``: its header alone, all a size check may read."""
    ihdr = b"IHDR" + struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack("!I", 13) + ihdr + struct.pack("!I", zlib.crc32(ihdr))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk + struct.pack("!I", 0) + b"IEND" + struct.pack("!I", zlib.crc32(b"IEND"))
    )


def data_url(image: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


@pytest.mark.parametrize("kind", ["webp", "bmp", "gif"])
async def test_webp_bmp_and_gif_data_urls_are_accepted_and_decoded(api, kind):
    """Browsers send ``canvas.toDataURL('image/webp')``; the worker's decoder (OpenCV) reads all three."""
    url = data_url(encoded(f".{kind}"), kind)
    response = await api.post("/v1/streams", json=body(url))
    assert response.status_code == 201, response.text
    assert ip_adapter.decode_data_url(url).shape == (24, 40, 3)


def test_lossy_webp_is_sized_from_its_header():
    ok, lossy = cv2.imencode(".webp", np.zeros((24, 40, 3), np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 80])
    assert ok and probe_picture(lossy.tobytes()) == ("webp", 40, 24)


async def test_an_image_over_the_size_limit_is_422_before_decoding(api):
    """A 16000x16000 PNG of zeros is 746 KB and decodes to 732 MiB: refused from its header."""
    stream = (await api.post("/v1/streams", json=body(data_url(encoded(".png"))))).json()
    for path in (f"/v1/streams/{stream['id']}", f"/v1/streams/{stream['id']}/params"):
        bomb = {"params": {"ip_adapter_style_image_url": data_url(png_header(16000, 16000))}}
        response = await api.patch(path, json=bomb)
        assert response.status_code == 422, response.text
        assert "16000x16000 exceeds the limit of 4096x4096" in response.json()["error"]
        assert "ip_adapter_style_image_url" in response.json()["error"]


async def test_the_size_limit_is_the_relays_frame_limit_also_for_fetched_images(files, tmp_path):
    (tmp_path / "wide.png").write_bytes(encoded(".png", 100, 20))
    settings = server_config(
        KEY, server={"style_image_allow_private": True}, relay={"max_width": 64, "max_height": 64}
    )
    app = create_app(settings)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        for image in (data_url(encoded(".png", 100, 20)), f"{files}/wide.png"):
            response = await client.post("/v1/streams", json=body(image))
            assert response.status_code == 422, response.text
            assert "100x20 exceeds the limit of 64x64" in response.json()["error"]


def test_the_worker_checks_the_size_before_decoding():
    with pytest.raises(EngineError, match="16000x16000 exceeds"):
        ip_adapter.decode_data_url(data_url(png_header(16000, 16000)))
    with pytest.raises(EngineError, match="100x20 exceeds the limit of 64x64"):
        ip_adapter.decode_data_url(data_url(encoded(".png", 100, 20)), max_size=(64, 64))
