"""OpenAI Chat Completions: ``chat.completion`` JSON and ``chat.completion.chunk`` SSE."""

from __future__ import annotations

from collections.abc import Mapping

from .api import JsonObject, ProviderApi, Turn, json_deltas, sse, text_deltas
from .errors import chat_context_length_exceeded
from .ids import new_id
from .usage import Usage
from .validation import validate_chat

DONE = b"data: [DONE]\n\n"
SYSTEM_FINGERPRINT = "fp_fake0000"


def prompt_parts(body: JsonObject) -> list[object]:
    return [body.get("messages"), body.get("tools") or body.get("functions")]


def usage_json(usage: Usage) -> JsonObject:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _finish_reason(turn: Turn) -> str:
    return "tool_calls" if turn.tool_call else "stop"


def json_answer(turn: Turn) -> JsonObject:
    message: JsonObject = {"role": "assistant", "content": turn.text, "refusal": None}
    if turn.tool_call is not None:
        message["content"] = None
        message["tool_calls"] = [
            {
                "id": new_id("call_"),
                "type": "function",
                "function": {"name": turn.tool_call.name, "arguments": turn.arguments},
            }
        ]
    message["annotations"] = []
    answer: JsonObject = {
        "id": new_id("chatcmpl-", 29),
        "object": "chat.completion",
        "created": turn.created,
        "model": turn.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(turn),
            }
        ],
    }
    if turn.usage is not None:
        answer["usage"] = usage_json(turn.usage)
    answer["service_tier"] = "default"
    answer["system_fingerprint"] = SYSTEM_FINGERPRINT
    return answer


def sse_events(turn: Turn) -> list[bytes]:
    """Role chunk, content or tool-call deltas, finish chunk, optional usage chunk, [DONE]."""
    options = turn.body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    base: JsonObject = {
        "id": new_id("chatcmpl-", 29),
        "object": "chat.completion.chunk",
        "created": turn.created,
        "model": turn.model,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    def chunk(delta: JsonObject, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        data: JsonObject = {**base, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return sse(None, data)

    events = [chunk(delta) for delta in _deltas(turn)]
    events.append(chunk({}, _finish_reason(turn)))
    if include_usage and turn.usage is not None:
        events.append(sse(None, {**base, "choices": [], "usage": usage_json(turn.usage)}))
    events.append(DONE)
    return events


def _deltas(turn: Turn) -> list[JsonObject]:
    if turn.tool_call is None:
        first: JsonObject = {"role": "assistant", "content": "", "refusal": None}
        return [first, *({"content": piece} for piece in text_deltas(turn.text))]
    opening = {
        "index": 0,
        "id": new_id("call_"),
        "type": "function",
        "function": {"name": turn.tool_call.name, "arguments": ""},
    }
    deltas: list[JsonObject] = [
        {"role": "assistant", "content": None, "tool_calls": [opening], "refusal": None}
    ]
    for piece in json_deltas(turn.arguments):
        deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    return deltas


def _validate(body: JsonObject, headers: Mapping[str, str]) -> None:
    validate_chat(body)


CHAT = ProviderApi(
    flavor="openai",
    validate=_validate,
    prompt_parts=prompt_parts,
    context_overflow=chat_context_length_exceeded,
    json_answer=json_answer,
    sse_events=sse_events,
)
