"""Anthropic Messages: the ``message`` JSON and its streaming events."""

from __future__ import annotations

from collections.abc import Mapping

from .api import JsonObject, ProviderApi, Turn, json_deltas, sse, text_deltas
from .errors import anthropic_prompt_too_long
from .ids import new_id
from .usage import Usage
from .validation import check_anthropic_version, validate_messages


def prompt_parts(body: JsonObject) -> list[object]:
    return [body.get("system"), body.get("messages"), body.get("tools")]


def usage_json(usage: Usage, output_tokens: int | None = None) -> JsonObject:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": usage.output_tokens if output_tokens is None else output_tokens,
        "service_tier": "standard",
    }


def _stop_reason(turn: Turn) -> str:
    return "tool_use" if turn.tool_call else "end_turn"


def _message(turn: Turn, content: list[JsonObject], *, done: bool) -> JsonObject:
    message: JsonObject = {
        "id": new_id("msg_01", 22),
        "type": "message",
        "role": "assistant",
        "model": turn.model,
        "content": content,
        "stop_reason": _stop_reason(turn) if done else None,
        "stop_sequence": None,
    }
    if turn.usage is not None:
        message["usage"] = usage_json(turn.usage, None if done else 1)
    return message


def json_answer(turn: Turn) -> JsonObject:
    if turn.tool_call is None:
        block: JsonObject = {"type": "text", "text": turn.text}
    else:
        block = {
            "type": "tool_use",
            "id": new_id("toolu_01", 22),
            "name": turn.tool_call.name,
            "input": turn.tool_call.arguments,
        }
    return _message(turn, [block], done=True)


def sse_events(turn: Turn) -> list[bytes]:
    """message_start, one content block (start, ping, deltas, stop), message_delta, stop."""
    if turn.tool_call is None:
        start: JsonObject = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in text_deltas(turn.text)]
    else:
        start = {
            "type": "tool_use",
            "id": new_id("toolu_01", 22),
            "name": turn.tool_call.name,
            "input": {},
        }
        deltas = [{"type": "input_json_delta", "partial_json": ""}]
        deltas += [
            {"type": "input_json_delta", "partial_json": piece}
            for piece in json_deltas(turn.arguments)
        ]
    message_delta: JsonObject = {
        "type": "message_delta",
        "delta": {"stop_reason": _stop_reason(turn), "stop_sequence": None},
    }
    if turn.usage is not None:
        message_delta["usage"] = {"output_tokens": turn.usage.output_tokens}
    return [
        sse("message_start", {"type": "message_start", "message": _message(turn, [], done=False)}),
        sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": start},
        ),
        sse("ping", {"type": "ping"}),
        *(
            sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            for delta in deltas
        ),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_delta", message_delta),
        sse("message_stop", {"type": "message_stop"}),
    ]


def validate(body: JsonObject, headers: Mapping[str, str]) -> None:
    check_anthropic_version(headers)
    validate_messages(body, headers)


def validate_count_tokens(body: JsonObject, headers: Mapping[str, str]) -> None:
    check_anthropic_version(headers)
    validate_messages(body, headers, require_max_tokens=False)


MESSAGES = ProviderApi(
    flavor="anthropic",
    validate=validate,
    prompt_parts=prompt_parts,
    context_overflow=anthropic_prompt_too_long,
    json_answer=json_answer,
    sse_events=sse_events,
)
