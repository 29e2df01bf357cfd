"""Provider-style random ids (``chatcmpl-…``, ``resp_…``, ``msg_01…``, ``toolu_01…``)."""

from __future__ import annotations

import os

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def base62(length: int) -> str:
    """Random base62 text of ``length`` characters (cheap: no secrets module per call)."""
    return "".join(_ALPHABET[byte % 62] for byte in os.urandom(length))


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + base62(length)
