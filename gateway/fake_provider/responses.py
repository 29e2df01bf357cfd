"""OpenAI Responses: the ``response`` object and its typed streaming events."""

from __future__ import annotations

from collections.abc import Mapping

from .api import JsonObject, ProviderApi, Turn, json_deltas, sse, text_deltas
from .errors import responses_context_length_exceeded
from .ids import new_id
from .usage import Usage
from .validation import validate_responses


def prompt_parts(body: JsonObject) -> list[object]:
    return [body.get("instructions"), body.get("input"), body.get("tools")]


def usage_json(usage: Usage) -> JsonObject:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _response(turn: Turn, response_id: str, output: list[JsonObject], *, done: bool) -> JsonObject:
    """The response object; echoes the request's settings as the real API does."""
    body = turn.body
    response: JsonObject = {
        "id": response_id,
        "object": "response",
        "created_at": turn.created,
        "status": "completed" if done else "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": turn.model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }
    if done:
        if turn.usage is None:
            del response["usage"]
        else:
            response["usage"] = usage_json(turn.usage)
    return response


def _message_item(item_id: str, text: str, *, done: bool) -> JsonObject:
    content = [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
    return {
        "id": item_id,
        "type": "message",
        "status": "completed" if done else "in_progress",
        "content": content if done else [],
        "role": "assistant",
    }


def _call_item(item_id: str, call_id: str, turn: Turn, *, done: bool) -> JsonObject:
    assert turn.tool_call is not None
    return {
        "id": item_id,
        "type": "function_call",
        "status": "completed" if done else "in_progress",
        "arguments": turn.arguments if done else "",
        "call_id": call_id,
        "name": turn.tool_call.name,
    }


def json_answer(turn: Turn) -> JsonObject:
    if turn.tool_call is None:
        item = _message_item(new_id("msg_", 48), turn.text, done=True)
    else:
        item = _call_item(new_id("fc_", 48), new_id("call_"), turn, done=True)
    return _response(turn, new_id("resp_", 48), [item], done=True)


def sse_events(turn: Turn) -> list[bytes]:
    """created, in_progress, the output item's events, completed; numbered in order."""
    response_id = new_id("resp_", 48)
    started = _response(turn, response_id, [], done=False)
    events: list[tuple[str, JsonObject]] = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
    ]
    if turn.tool_call is None:
        item, item_events = _message_events(turn)
    else:
        item, item_events = _call_events(turn)
    events += item_events
    events.append(
        ("response.completed", {"response": _response(turn, response_id, [item], done=True)})
    )
    return [
        sse(kind, {"type": kind, "sequence_number": number, **payload})
        for number, (kind, payload) in enumerate(events)
    ]


def _message_events(turn: Turn) -> tuple[JsonObject, list[tuple[str, JsonObject]]]:
    item_id = new_id("msg_", 48)
    where: JsonObject = {"item_id": item_id, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    full_part = {**empty_part, "text": turn.text}
    done_item = _message_item(item_id, turn.text, done=True)
    events: list[tuple[str, JsonObject]] = [
        (
            "response.output_item.added",
            {"output_index": 0, "item": _message_item(item_id, "", done=False)},
        ),
        ("response.content_part.added", {**where, "part": empty_part}),
    ]
    for piece in text_deltas(turn.text):
        events.append(("response.output_text.delta", {**where, "delta": piece, "logprobs": []}))
    events += [
        ("response.output_text.done", {**where, "text": turn.text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": full_part}),
        ("response.output_item.done", {"output_index": 0, "item": done_item}),
    ]
    return done_item, events


def _call_events(turn: Turn) -> tuple[JsonObject, list[tuple[str, JsonObject]]]:
    item_id, call_id = new_id("fc_", 48), new_id("call_")
    where: JsonObject = {"item_id": item_id, "output_index": 0}
    done_item = _call_item(item_id, call_id, turn, done=True)
    events: list[tuple[str, JsonObject]] = [
        (
            "response.output_item.added",
            {"output_index": 0, "item": _call_item(item_id, call_id, turn, done=False)},
        ),
    ]
    for piece in json_deltas(turn.arguments):
        events.append(("response.function_call_arguments.delta", {**where, "delta": piece}))
    events += [
        ("response.function_call_arguments.done", {**where, "arguments": turn.arguments}),
        ("response.output_item.done", {"output_index": 0, "item": done_item}),
    ]
    return done_item, events


def _validate(body: JsonObject, headers: Mapping[str, str]) -> None:
    validate_responses(body)


RESPONSES = ProviderApi(
    flavor="openai",
    validate=_validate,
    prompt_parts=prompt_parts,
    context_overflow=responses_context_length_exceeded,
    json_answer=json_answer,
    sse_events=sse_events,
)
