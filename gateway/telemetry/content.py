"""Message content for spans, in the GenAI conventions' shape; only when the operator opts in.

``gen_ai.input.messages``, ``gen_ai.output.messages`` and ``gen_ai.system_instructions`` as JSON
strings of role and parts, bounded: the newest messages first, long texts clipped. Which
blocks are text, and the text of a tool result, are read as ``gateway/dialects/text.py`` reads
prose; the role-and-parts shape is the conventions', and stays here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.dialects.base import as_dict, as_list
from gateway.dialects.text import TEXT_BLOCKS, texts

if TYPE_CHECKING:
    from gateway.exchange import Exchange


def input_messages(items: Sequence[Any], limit: int) -> str:
    """``gen_ai.input.messages``: the newest messages that fit in ``limit`` characters (at
    least the newest one), in the order they were sent; long texts are clipped."""
    kept: list[bytes] = []
    size = 2
    for item in reversed(items):
        encoded = orjson.dumps(_message(item, limit))
        if kept and size + len(encoded) + 1 > limit:
            break
        kept.append(encoded)
        size += len(encoded) + 1
    kept.reverse()
    return (b"[" + b",".join(kept) + b"]").decode()


def system_instructions(preamble: Sequence[Any], limit: int) -> str:
    parts = [part for block in preamble for part in _parts(block, limit)]
    return _clip(orjson.dumps(parts).decode(), limit)


def output_messages(ex: Exchange, finish_reasons: list[str], limit: int) -> str | None:
    """``gen_ai.output.messages``: from a JSON answer as sent, or a stream's text deltas."""
    facts = ex.response_facts
    reason = finish_reasons[0] if finish_reasons else "stop"
    response = ex.response
    if ex.facts is not None and ex.facts.stream:
        if facts is None:
            return None
        text = "".join(t for t in facts.generated() if isinstance(t, str))
        messages: list[Any] = [
            {"role": "assistant", "parts": [_text(text, limit)], "finish_reason": reason}
        ]
    elif isinstance(response, web.Response) and isinstance(response.body, bytes):
        try:
            answer = as_dict(orjson.loads(response.body))
        except orjson.JSONDecodeError:
            return None
        messages = _answer_messages(answer, reason, limit)
    else:
        return None
    return _clip(orjson.dumps(messages).decode(), limit)


def _answer_messages(answer: dict[str, Any], reason: str, limit: int) -> list[Any]:
    if "choices" in answer:  # Chat Completions: one message per choice
        return [
            {
                **_message(as_dict(choice).get("message"), limit),
                "finish_reason": as_dict(choice).get("finish_reason") or reason,
            }
            for choice in as_list(answer.get("choices"))
        ]
    if "output" in answer:  # Responses: the output items make one message
        parts = [p for item in as_list(answer.get("output")) for p in _item_parts(item, limit)]
        return [{"role": "assistant", "parts": parts, "finish_reason": reason}]
    parts = _parts(answer.get("content"), limit)  # Anthropic Messages
    return [{"role": "assistant", "parts": parts, "finish_reason": reason}]


def _message(item: Any, limit: int) -> dict[str, Any]:
    """One message of any of the three APIs in the conventions' shape (role and parts)."""
    message = as_dict(item)
    kind = message.get("type")
    if isinstance(kind, str) and kind != "message":  # a Responses item other than a message
        speaker = "tool" if kind.endswith("_output") else "assistant"
        return {"role": speaker, "parts": _item_parts(message, limit)}
    role = message.get("role")
    if not isinstance(role, str):
        role = "user"
    if role == "tool":  # Chat Completions tool result
        return {
            "role": "tool",
            "parts": [_tool_response(message.get("tool_call_id"), message.get("content"), limit)],
        }
    parts = _parts(message.get("content"), limit)
    for call in as_list(message.get("tool_calls")):
        call = as_dict(call)
        function = as_dict(call.get("function"))
        parts.append(_tool_call(call.get("id"), function.get("name"), function.get("arguments")))
    return {"role": role, "parts": parts}


def _item_parts(item: Any, limit: int) -> list[dict[str, Any]]:
    item = as_dict(item)
    kind = item.get("type")
    if kind == "message":
        return _parts(item.get("content"), limit)
    if kind == "function_call":
        return [_tool_call(item.get("call_id"), item.get("name"), item.get("arguments"))]
    if kind == "function_call_output":
        return [_tool_response(item.get("call_id"), item.get("output"), limit)]
    return [{"type": str(kind or "unknown")}]


def _parts(content: Any, limit: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [_text(content, limit)]
    parts: list[dict[str, Any]] = []
    for block in as_list(content):
        if isinstance(block, str):
            parts.append(_text(block, limit))
            continue
        block = as_dict(block)
        kind = block.get("type")
        if kind in TEXT_BLOCKS:
            parts.append(_text(block.get("text"), limit))
        elif kind == "tool_use":
            parts.append(_tool_call(block.get("id"), block.get("name"), block.get("input")))
        elif kind == "tool_result":
            parts.append(_tool_response(block.get("tool_use_id"), block.get("content"), limit))
        elif kind in ("thinking", "reasoning"):
            parts.append({"type": "reasoning", "content": _clip(str(block.get(kind, "")), limit)})
        else:
            parts.append({"type": str(kind or "unknown")})
    return parts


def _text(text: Any, limit: int) -> dict[str, Any]:
    return {"type": "text", "content": _clip(text if isinstance(text, str) else "", limit)}


def _tool_call(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    return {"type": "tool_call", "id": call_id, "name": name, "arguments": arguments}


def _tool_response(call_id: Any, content: Any, limit: int) -> dict[str, Any]:
    if not isinstance(content, str):
        content = " ".join(texts(content))
    return {"type": "tool_call_response", "id": call_id, "response": _clip(content, limit)}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "\u2026"
