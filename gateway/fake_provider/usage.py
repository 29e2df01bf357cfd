"""Token counts the fake reports: a cheap byte estimate or an o200k_base count.

"bytes" mode is len(JSON of the prompt parts) // 4 and never touches tiktoken, so the fake stays
fast as a benchmark upstream; "tiktoken" mode counts the text parts of the prompt with o200k_base,
loaded lazily from the rank tables bundled in ``gateway/data/tiktoken``.

Which text a prompt holds (``_texts``) is decided here on purpose, not with the gateway's
``gateway/dialects/text.py``: the fake is the independent oracle the gateway's token figures are
checked against, so a mistake in the gateway's reading cannot hide by being made twice.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

import orjson
import tiktoken

from .config import UsageMode

ENCODING_NAME = "o200k_base"

# keys whose string values are ids or markers, not prompt text
_STRUCTURAL_KEYS = frozenset(
    {
        "type",
        "id",
        "role",
        "call_id",
        "tool_call_id",
        "tool_use_id",
        "status",
        "cache_control",
        "signature",
        "encrypted_content",
        "media_type",
        "detail",
    }
)


@functools.cache
def _encoding() -> tiktoken.Encoding:
    """o200k_base, read from the bundled rank tables unless TIKTOKEN_CACHE_DIR is set."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(resources.files("gateway") / "data" / "tiktoken")
    return tiktoken.get_encoding(ENCODING_NAME)


async def load_encoding() -> None:
    """Load o200k_base in a thread (about a second, file I/O) unless it is loaded already."""
    if _encoding.cache_info().currsize == 0:
        await asyncio.to_thread(_encoding)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one answer; the API modules render them in their own shape."""

    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def count_text(text: str) -> int:
    """o200k_base token count of ``text`` (special-token text is counted as ordinary text)."""
    return len(_encoding().encode_ordinary(text))


def input_tokens(parts: list[object], mode: UsageMode, factor: float) -> int:
    """Estimate of the prompt (system, messages or input, tools) scaled by ``factor``."""
    if mode == "bytes":
        return max(0, round(len(orjson.dumps(parts)) // 4 * factor))
    return max(0, round(count_text("\n".join(_texts(parts))) * factor))


def output_tokens(reply: str, mode: UsageMode) -> int:
    """Token count of the answer's text (or of a tool call's name and arguments)."""
    if mode == "bytes":
        return max(1, len(reply.encode()) // 4)
    return max(1, count_text(reply))


def _texts(node: object) -> Iterator[str]:
    """The text parts of a prompt: strings except ids/markers; schemas and args as JSON."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _texts(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in _STRUCTURAL_KEYS:
                continue
            if key in ("parameters", "input_schema", "input", "arguments") and isinstance(
                value, dict
            ):
                yield orjson.dumps(value).decode()
            else:
                yield from _texts(value)
