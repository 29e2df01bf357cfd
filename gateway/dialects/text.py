"""What text a message holds, in any of the three APIs: the one walk over a message's JSON.

The token counter (``tokens.py``), the summary transcript (``compaction/transcript.py``) and
content capture (``telemetry/content.py``) each need the words a model reads in a message, a
system block, a tool definition or a tool result, whichever API it comes in. Every API's items
are JSON with types and text, so one walk serves them all: strings are text (numbers too), keys
that hold ids and markers are not (``STRUCTURAL_KEYS``), and a base64 image or document is no
text at all (the counter bills it by its pixels or pages: ``INLINE_MEDIA_TOKENS`` each).

Two readings differ, and only where they must:

- Counting (``skip=STRUCTURAL_KEYS``, no ``render``): everything the provider bills, roles and
  reasoning included. It is on the hot path (every message the counter has not seen), so the
  walk is plain recursion with no callback unless one is asked for.
- Prose (``skip=PROSE_SKIP``, ``render=prose``): what a reader (the summarizing model, an
  operator reading a span) needs: a tool call as one sentence, media named and left out,
  reasoning and signed thinking left out (opaque, or not the model's to share).

The fake provider counts its own way on purpose (``gateway/fake_provider/usage.py``): it is the
independent oracle the gateway's figures are checked against, so it shares no code with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

STRUCTURAL_KEYS = frozenset(
    {"type", "id", "call_id", "tool_use_id", "tool_call_id", "cache_control", "signature", "status"}
)
"""Keys whose values are ids or markers, never text a model reads."""
PROSE_SKIP = STRUCTURAL_KEYS | {"role", "encrypted_content", "function"}
"""Also left out of prose: the role (the reader labels it), reasoning's opaque blob, and a
``function`` that is not a call (a call is rendered by ``prose``)."""

TEXT_BLOCKS = frozenset({"text", "input_text", "output_text"})
"""Content blocks that are plain text, in the three APIs."""
REASONING_BLOCKS = frozenset({"reasoning", "thinking", "redacted_thinking"})
MEDIA_BLOCKS = frozenset({"image", "image_url", "input_image", "document", "input_file"})

INLINE_MEDIA_TOKENS = 1600
"""A base64 image or document is billed by its pixels or pages, not its characters; this is the
providers' typical figure for one image."""
MEDIA_KEYS = frozenset({"data", "image_url", "file_data"})
"""Keys that may hold a base64 image or document (a string over ``INLINE_MEDIA_CHARS``)."""
INLINE_MEDIA_CHARS = 1024

Render = Callable[[dict[str, Any]], str | None]
"""A block as the caller writes it (``""`` to leave it out), or None to walk it as text."""
Collect = Callable[[Any, list[str]], int]
"""Appends the texts a value holds to a list; returns the tokens of the inline media it holds
instead (``INLINE_MEDIA_TOKENS`` each)."""


def walker(skip: frozenset[str], render: Render | None = None) -> Collect:
    """The walk, for one reading: ``skip`` keys are not text, ``render`` writes the blocks it
    knows (a closure, so the recursion passes no settings: the counter's walk is hot)."""

    def collect(value: Any, parts: list[str]) -> int:
        extra = 0
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            if render is not None:
                rendered = render(value)
                if rendered is not None:
                    if rendered:
                        parts.append(rendered)
                    return 0
            for key, child in value.items():
                if key in skip:
                    continue
                if isinstance(child, str):  # the common leaf, without a call
                    if key in MEDIA_KEYS and len(child) > INLINE_MEDIA_CHARS:
                        extra += INLINE_MEDIA_TOKENS
                    else:
                        parts.append(child)
                else:
                    extra += collect(child, parts)
        elif isinstance(value, list):
            for child in value:
                extra += collect(child, parts)
        elif value is not None and not isinstance(value, bool):
            parts.append(str(value))
        return extra

    return collect


def prose(block: dict[str, Any]) -> str | None:
    """A block a reader needs in other words than its fields: a tool call as one sentence,
    media by its kind, reasoning not at all; None for a block read as its text."""
    kind = block.get("type")
    if kind in REASONING_BLOCKS:
        return ""
    if kind == "tool_use":
        return f"(calls {block.get('name')} with {as_text(block.get('input'))})"
    if kind in MEDIA_BLOCKS:
        return f"({kind} omitted)"
    function = block.get("function")
    if isinstance(function, dict):
        return f"(calls {function.get('name')} with {as_text(function.get('arguments'))})"
    return None


def as_text(value: Any) -> str:
    """A string as it is; anything else (tool arguments as an object) as JSON."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


count_texts = walker(STRUCTURAL_KEYS)
"""The counter's reading: everything the provider bills."""
prose_texts = walker(PROSE_SKIP, prose)
"""The prose reading (the transcript, content capture)."""


def texts(value: Any) -> list[str]:
    """The texts of ``value`` as prose reads them."""
    parts: list[str] = []
    prose_texts(value, parts)
    return parts
