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
from wire.errors import ProtocolError
from wire.images import probe_image

MAX_BYTES = 5 * 2**20
FIELD = "ip_adapter_style_image_url"


def _invalid(message: str) -> ApiError:
    return ApiError(422, f"invalid field 'params.{FIELD}': {message}", "REQUEST/VALIDATION")


def check_data_url(url: str, max_bytes: int = MAX_BYTES) -> str:
    head, _, data = url.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        raise _invalid("a data URL must look like data:image/<type>;base64,<data>")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise _invalid(f"the image is over {max_bytes} bytes")
    try:
        probe_image(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError, ProtocolError):
        raise _invalid("the data URL does not hold a JPEG or PNG image") from None
    return url


async def public_addresses(host: str, port: int) -> list[str]:
    """The host's addresses; raise when any of them is not a public one."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise _invalid(f"cannot resolve {host!r}") from None
    addresses = sorted({info[4][0] for info in infos})
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise _invalid(f"{host!r} resolves to a private address; only public hosts are fetched")
    return addresses


async def fetch(url: str, allow_private: bool = False, max_bytes: int = MAX_BYTES,
                timeout: float = 10.0) -> str:
    """Download ``url`` and return it as a ``data:`` URL; 422 for anything unusable."""
    parts = urlsplit(url)
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in allowed or not parts.hostname:
        raise _invalid("use an https URL or a data:image/...;base64 URL")
    if not allow_private:
        await public_addresses(parts.hostname, parts.port or 443)
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
    try:
        fmt, _, _ = probe_image(bytes(body))
    except ProtocolError:
        raise _invalid("it is not a JPEG or PNG image") from None
    return f"data:image/{fmt.label};base64,{base64.b64encode(body).decode()}"


async def resolve(params: dict, allow_private: bool = False) -> dict:
    """``params`` with a fetched style image in place of its URL (unchanged when there is none)."""
    url = params.get(FIELD)
    if not url or not isinstance(url, str):
        return params
    if url.startswith("data:"):
        check_data_url(url)
        return params
    return {**params, FIELD: await fetch(url, allow_private)}
