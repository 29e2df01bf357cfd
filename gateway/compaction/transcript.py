"""A conversation as plain text, for the summary call: roles, text, tool calls and results.

Dialect-neutral on purpose: every API's items are JSON with roles, types and text, and the
summarizing model needs the words, not the structure. Long tool outputs are clipped in the
middle; reasoning and signed thinking (opaque, or not the model's to share) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

INSTRUCTIONS = (
    "You compress the history of a conversation between a user and an AI agent that uses "
    "tools, so that the agent can continue the task without the original messages. Write a "
    "dense summary: the user's goal and constraints, decisions made, files and commands "
    "involved with their important results, errors met and how they were resolved, and what "
    "remains to be done. Keep exact names, paths, identifiers and numbers. Do not add advice "
    "or commentary. Answer with the summary only."
)
CLIP_CHARS = 4000
"""A tool output longer than this keeps its start and end."""
_SKIPPED_TYPES = frozenset({"reasoning", "thinking", "redacted_thinking"})
_SKIPPED_KEYS = frozenset(
    {
        "id",
        "call_id",
        "tool_use_id",
        "tool_call_id",
        "signature",
        "encrypted_content",
        "cache_control",
        "status",
        "type",
        "role",
    }
)


def transcript(items: Iterable[Any], max_chars: int, earlier: Sequence[str] = ()) -> str:
    """The items as text; past ``max_chars`` the oldest are left out (and said to be).

    ``earlier`` (summaries from earlier compactions) always comes first, whole: it is the
    densest account of the start of the conversation.
    """
    lines = [line for item in items if (line := _render(item))]
    size, start = sum(len(text) + 2 for text in earlier), len(lines)
    while start > 0 and size + len(lines[start - 1]) + 2 <= max_chars:
        start -= 1
        size += len(lines[start]) + 2
    if start:
        lines[start:start] = [f"[... {start} older messages left out: too long to summarize ...]"]
    return "\n\n".join([*earlier, *lines[start:]])


def _render(item: Any) -> str:
    if not isinstance(item, dict):
        return _clip(str(item))
    kind = item.get("type", "message")
    if kind in _SKIPPED_TYPES:
        return ""
    label = item.get("role") or kind
    if kind in ("function_call", "custom_tool_call"):
        arguments = _clip(_text(item.get("arguments") or item.get("input")))
        return f"[{label}] {item.get('name')}({arguments})"
    body = _clip("\n".join(_texts(item)))
    return f"[{label}]\n{body}" if body else ""


def _texts(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for child in node:
            yield from _texts(child)
    elif isinstance(node, dict):
        kind = node.get("type")
        if kind in _SKIPPED_TYPES:
            return
        if kind == "tool_use":
            yield f"(calls {node.get('name')} with {_text(node.get('input'))})"
            return
        if kind in ("image", "image_url", "input_image", "document", "input_file"):
            yield f"({kind} omitted)"
            return
        if "function" in node and isinstance(node["function"], dict):
            function = node["function"]
            yield f"(calls {function.get('name')} with {_text(function.get('arguments'))})"
            return
        for key, child in node.items():
            if key not in _SKIPPED_KEYS and key != "function":
                yield from _texts(child)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _clip(text: str) -> str:
    if len(text) <= CLIP_CHARS:
        return text
    half = CLIP_CHARS // 2
    return f"{text[:half]}\n[... {len(text) - CLIP_CHARS} characters clipped ...]\n{text[-half:]}"
