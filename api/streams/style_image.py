"""``ip_adapter_style_image_url``: fetch https images once, in the API, as ``data:`` URLs.

Daydream accepts an https URL or a ``data:image/...;base64`` URL of up to
5 MB. The engine only reads ``data:`` URLs (workers may have no network), so
the API fetches URLs when params arrive. Fetching on a user's behalf must not
reach this host's private network: every address the name resolves to must
be public, redirects are not followed, and the body is capped while it
streams. (A DNS answer that changes between our check and httpx's own lookup
is not covered; put the server behind an egress proxy where that matters.)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from urllib.parse import urlsplit

import httpx

from api.server.errors import ApiError
from relay.config import RelayConfig
from wire.errors import ErrorCode, ProtocolError
from wire.images import check_picture

MAX_BYTES = 5 * 2**20
#: widest and tallest image accepted, from its header before decoding: a small PNG can hold a
#: 16000x16000 image (a decompression bomb); the relay's default frame limits, and the server passes
#: its own ``relay.max_width`` and ``max_height``
MAX_SIZE = (RelayConfig.max_width, RelayConfig.max_height)
#: the whole fetch (DNS, connect, headers, body) ends by then: a byte-trickling server cannot hold it
DEADLINE_S = 15.0
FIELD = "ip_adapter_style_image_url"
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _invalid(message: str) -> ApiError:
    return ApiError(422, f"invalid field 'params.{FIELD}': {message}", "REQUEST/VALIDATION")


def check_image(data: bytes, max_size: tuple[int, int]) -> str:
    """The image's format (JPEG, PNG, WebP, BMP or GIF: what the worker decodes), within ``max_size``."""
    try:
        fmt, _, _ = check_picture(data, *max_size)
    except ProtocolError as exc:
        if exc.code is ErrorCode.RESOLUTION_TOO_LARGE:
            raise _invalid(f"the image is {exc}") from None
        raise _invalid("it is not a JPEG, PNG, WebP, BMP or GIF image") from None
    return fmt


def check_data_url(url: str, max_bytes: int = MAX_BYTES, max_size: tuple[int, int] = MAX_SIZE) -> str:
    head, _, data = url.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        raise _invalid("a data URL must look like data:image/<type>;base64,<data>")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise _invalid(f"the image is over {max_bytes} bytes")
    try:
        image = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("the data URL is not valid base64") from None
    check_image(image, max_size)
    return url


async def public_addresses(host: str, port: int) -> list[str]:
    """The host's addresses; raise when any of them is not a public one."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise _invalid(f"cannot resolve {host!r}") from None
    addresses = sorted({info[4][0] for info in infos})
    for address in addresses:
        if not is_public(ipaddress.ip_address(address.split("%")[0])):
            raise _invalid(f"{host!r} resolves to a private address; only public hosts are fetched")
    return addresses


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global, and so is every IPv4 address it carries (NAT64, 6to4, Teredo, IPv4-mapped or -compatible):
    ``64:ff9b::7f00:1`` reaches 127.0.0.1 through a NAT64 gateway, though Python calls it global."""
    return address.is_global and all(inner.is_global for inner in embedded_ipv4(address))


def embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    inner = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in NAT64 or int(address) >> 32 == 0:  # NAT64, or IPv4-compatible ::a.b.c.d
        inner.append(low32)
    return [a for a in inner if a is not None]


async def fetch(
    url: str,
    allow_private: bool = False,
    max_bytes: int = MAX_BYTES,
    timeout: float = 10.0,
    deadline: float = DEADLINE_S,
    max_size: tuple[int, int] = MAX_SIZE,
) -> str:
    """Download ``url`` and return it as a ``data:`` URL; 422 for anything unusable.

    ``timeout`` bounds each network step; ``deadline`` the whole fetch.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # https://[::1/ and friends
        raise _invalid(f"not a valid URL ({exc})") from None
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in allowed or not parts.hostname:
        raise _invalid("use an https URL or a data:image/...;base64 URL")
    try:
        async with asyncio.timeout(deadline):
            body = await _download(url, parts.hostname, port or 443, allow_private, max_bytes, timeout)
    except TimeoutError:
        raise _invalid(f"fetching it took over {deadline:g} s") from None
    fmt = check_image(body, max_size)
    return f"data:image/{fmt};base64,{base64.b64encode(body).decode()}"


async def _download(
    url: str, host: str, port: int, allow_private: bool, max_bytes: int, timeout: float
) -> bytes:
    if not allow_private:
        await public_addresses(host, port)
    body = bytearray()
    try:
        async with (
            httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise _invalid(f"fetching it answered HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise _invalid(f"the image is over {max_bytes} bytes")
    except httpx.HTTPError as exc:
        raise _invalid(f"cannot fetch it: {type(exc).__name__}") from None
    return bytes(body)


async def resolve(params: dict, allow_private: bool = False, max_size: tuple[int, int] = MAX_SIZE) -> dict:
    """``params`` with a fetched style image in place of its URL (unchanged when there is none)."""
    url = params.get(FIELD)
    if not url or not isinstance(url, str):
        return params
    if url.startswith("data:"):
        check_data_url(url, max_size=max_size)
        return params
    return {**params, FIELD: await fetch(url, allow_private, max_size=max_size)}
