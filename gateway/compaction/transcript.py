"""A conversation as plain text, for the summary call: roles, text, tool calls and results.

Dialect-neutral on purpose: every API's items are JSON with roles, types and text, and the
summarizing model needs the words, not the structure: each item's text is read as prose
(``gateway/dialects/text.py``). Long tool outputs are clipped in the middle; reasoning and signed
thinking (opaque, or not the model's to share) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from gateway.dialects.text import REASONING_BLOCKS, as_text, texts

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
    if kind in REASONING_BLOCKS:
        return ""
    label = item.get("role") or kind
    if kind in ("function_call", "custom_tool_call"):
        arguments = _clip(as_text(item.get("arguments") or item.get("input")))
        return f"[{label}] {item.get('name')}({arguments})"
    body = _clip("\n".join(texts(item)))
    return f"[{label}]\n{body}" if body else ""


def _clip(text: str) -> str:
    if len(text) <= CLIP_CHARS:
        return text
    half = CLIP_CHARS // 2
    return f"{text[:half]}\n[... {len(text) - CLIP_CHARS} characters clipped ...]\n{text[-half:]}"
