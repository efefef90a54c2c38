"""Daydream-style identifiers: a prefix and random characters from an unambiguous alphabet."""

from __future__ import annotations

import secrets

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def random_id(length: int = 16, prefix: str = "") -> str:
    """``length`` characters from ``ALPHABET`` (~94 bits for 16): unguessable."""
    return prefix + "".join(secrets.choice(ALPHABET) for _ in range(length))


def stream_id() -> str:
    return random_id(prefix="str_")


def stream_key() -> str:
    return random_id(prefix="stk_")


def playback_id() -> str:
    return random_id()


def api_key() -> str:
    return random_id(24, prefix="sdk_")
