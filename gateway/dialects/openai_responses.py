"""OpenAI Responses: ``POST /v1/responses`` (Codex CLI, OpenCode's openai provider)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import orjson

from gateway.dialects.base import (
    Body,
    ErrorKind,
    History,
    JSONObject,
    Layout,
    ProviderError,
    RequestFacts,
    ResponseFacts,
    Usage,
    as_dict,
    as_int,
    as_list,
    as_str,
    elision_note,
    parse_object,
)
from gateway.dialects.envelope import (
    UNSET,
    ArrayOrText,
    Envelope,
    Field,
    decode,
    decoder,
)
from gateway.dialects.openai_common import (
    SYSTEM_ROLES,
    leading_system,
    openai_error,
    session_hints,
)
from gateway.loops import Signature, signatures
from gateway.sse import SSEEvent

_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Call items and the field holding their arguments; outputs and reasoning sit between calls.
_CALLS = {"function_call": "arguments", "custom_tool_call": "input", "local_shell_call": "action"}
_OUTPUTS = frozenset(
    {
        "function_call_output",
        "custom_tool_call_output",
        "local_shell_call_output",
        "computer_call_output",
        "mcp_approval_response",
    }
)
_PASSIVE = frozenset(
    {"function_call_output", "custom_tool_call_output", "local_shell_call_output", "reasoning"}
)


def parse_usage(raw: Any) -> Usage | None:
    usage = as_dict(raw)
    if not usage:
        return None
    return Usage(
        input_tokens=as_int(usage.get("input_tokens")),
        output_tokens=as_int(usage.get("output_tokens")),
        cache_read_tokens=as_int(as_dict(usage.get("input_tokens_details")).get("cached_tokens")),
        reasoning_tokens=as_int(
            as_dict(usage.get("output_tokens_details")).get("reasoning_tokens")
        ),
    )


def _kind(item: JSONObject) -> str:
    """An item's type; one that is not a string (the API refuses it) matches no known type."""
    kind = item.get("type", "message")
    return kind if isinstance(kind, str) else ""


def _call_id(item: JSONObject) -> str | None:
    call_id = item.get("call_id")
    return call_id if isinstance(call_id, str) else None


def _is_user_message(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("role") == "user"
        and item.get("type", "message") == "message"
    )


class ResponsesHistory:
    """``input`` items: a call's output belongs to its call, a reasoning item to the item after
    it, and calls answered together (parallel calls) stay together."""

    field = "input"

    def layout(self, items: Sequence[Any]) -> Layout:
        system = leading_system(items)
        layout = Layout(system)
        open_calls: set[str | None] = set()
        after_reasoning = False
        for index in range(system, len(items)):
            item = as_dict(items[index])
            kind = _kind(item)
            bound = kind in _OUTPUTS or after_reasoning or bool(open_calls)
            if bound and layout.units:
                layout.units[-1] = (layout.units[-1][0], index + 1)
                layout.inputs[-1] = layout.inputs[-1] or _is_user_message(item)
            else:
                layout.units.append((index, index + 1))
                layout.inputs.append(_is_user_message(item))
            if kind in _CALLS:
                open_calls.add(_call_id(item))
            elif kind in _OUTPUTS:
                open_calls.discard(_call_id(item))
            after_reasoning = kind == "reasoning"
        return layout

    def elide(self, item: Any, min_bytes: int) -> Any | None:
        output = as_dict(item)
        if _kind(output) not in _OUTPUTS or "output" not in output:
            return None
        note = elision_note(output["output"], min_bytes)
        return None if note is None else {**output, "output": note}

    def note(self, text: str) -> Any:
        return {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        }

    def summary_request(
        self, model: str, instructions: str, transcript: str, max_tokens: int
    ) -> JSONObject:
        return {
            "model": model,
            "instructions": instructions,
            "input": [self.note(transcript)],
            "max_output_tokens": max_tokens,
            "store": False,
        }

    def overflow(self, tokens: int, maximum: int) -> str:
        return (
            "Your input exceeds the context window of this model. Please adjust your input and "
            f"try again. ({tokens} tokens > {maximum} maximum.)"
        )

    def summary_text(self, answer: JSONObject) -> str:
        texts = [
            part.get("text")
            for item in map(as_dict, as_list(answer.get("output")))
            if item.get("type") == "message"
            for part in map(as_dict, as_list(item.get("content")))
            if part.get("type") == "output_text"
        ]
        return "".join(text for text in texts if isinstance(text, str))


class ResponsesEnvelope(Envelope):
    input: ArrayOrText = UNSET
    instructions: Field = UNSET
    max_output_tokens: Field = UNSET
    user: Field = UNSET
    prompt_cache_key: Field = UNSET
    previous_response_id: Field = UNSET


_DECODER = decoder(ResponsesEnvelope)


class OpenAIResponses:
    name = "openai.responses"
    provider = "openai"
    operation = "chat"
    history: History = ResponsesHistory()

    def decode(self, raw: bytes) -> Body:
        return decode(_DECODER, raw)

    def read_request(self, body: Body) -> RequestFacts:
        raw_input = body.get("input")
        items: Sequence[Any]
        if isinstance(raw_input, str):
            items = [{"type": "message", "role": "user", "content": raw_input}]
        else:
            items = as_list(raw_input)
        facts = RequestFacts(
            model=as_str(body.get("model")),
            stream=body.get("stream") is True,
            items=items,
            tools=as_list(body.get("tools")),
            max_output_tokens=as_int(body.get("max_output_tokens")) or None,
        )
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            facts.system.append(instructions)
            facts.preamble.append(instructions)
        # The conversation's start only: its cost does not grow with the history.
        for item in items:
            if as_dict(item).get("role") in SYSTEM_ROLES:
                facts.system.append(item)
            elif _is_user_message(item):
                facts.first_user = item
                break
        facts.user_turn = bool(items) and _is_user_message(items[-1])
        session_hints(body, facts.session_hints)
        return facts

    def upstream_body(self, body: Body, raw: bytes) -> tuple[bytes, bool]:
        return raw, False

    def tool_call_turns(self, facts: RequestFacts) -> Iterator[Signature]:
        group: list[tuple[Any, Any]] = []
        for item in reversed(facts.items):
            item = as_dict(item)
            kind = _kind(item)
            call = _CALLS.get(kind)
            if call is not None:
                group.append((item.get("name", kind), item.get(call)))
                continue
            if group:
                yield signatures(group)
                group = []
            if kind in _PASSIVE or (kind == "message" and item.get("role") == "assistant"):
                continue
            return
        if group:
            yield signatures(group)

    def decode_response(self, data: bytes) -> JSONObject | None:
        """Only what ``read_response`` reads: the answer echoes the request's instructions and
        tools (tens of KB on an agent's call), which the decoder skips without building."""
        try:
            return _RESPONSE.decode(data).as_dict()
        except msgspec.DecodeError:
            return None

    def read_response(self, body: JSONObject) -> ResponseFacts:
        facts = ResponseFacts()
        _read_response_object(body, facts)
        if facts.usage is None:
            facts.output_text = list(as_list(body.get("output")))
        return facts

    def observe_stream(self, rewritten: bool) -> ResponsesStreamObserver:
        return ResponsesStreamObserver()

    def error(self, kind: ErrorKind, message: str, code: str | None = None) -> ProviderError:
        return openai_error(kind, message, code)

    def stream_failure(self, error: ProviderError) -> bytes | None:
        """Codex reads context overflow only from a ``response.failed`` event: a stream of
        that one event, with the error the provider would put there."""
        detail = as_dict(error.body.get("error"))
        if detail.get("code") != "context_length_exceeded":
            return None
        response = {
            "id": f"resp_gw_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "failed",
            "error": {"code": detail["code"], "message": detail.get("message", "")},
            "output": [],
            "usage": None,
        }
        event = {"type": "response.failed", "sequence_number": 0, "response": response}
        return b"event: response.failed\ndata: " + orjson.dumps(event) + b"\n\n"


def _read_response_object(response: JSONObject, facts: ResponseFacts) -> None:
    facts.id = as_str(response.get("id")) or facts.id
    facts.model = as_str(response.get("model")) or facts.model
    usage = parse_usage(response.get("usage"))
    if usage is not None:
        facts.usage = usage
    status = response.get("status")
    if isinstance(status, str) and status != "in_progress":
        facts.finish_reasons = [status]
    error = as_dict(response.get("error"))
    if error:
        facts.error = str(error.get("code") or "error")


class ResponsesStreamObserver:
    """Parses the response objects (created, completed...); text deltas are kept raw."""

    __slots__ = ("facts",)
    rewrites = False

    def __init__(self) -> None:
        self.facts = ResponseFacts(delta_text=_delta_text)

    def on_event(self, event: SSEEvent) -> bytes | None:
        kind = event.event
        if kind in _DELTAS:
            self.facts.deltas.append(event.data)
            return event.raw
        if kind is not None and kind not in _FINAL_EVENTS and kind not in _READ:
            return event.raw
        try:
            payload = _EVENT.decode(event.data)
        except msgspec.DecodeError:
            return event.raw  # not a JSON object of the expected shape: relayed, not read
        kind = kind or (payload.type if isinstance(payload.type, str) else None)
        if kind in _DELTAS:
            self.facts.deltas.append(event.data)
        elif kind in _FINAL_EVENTS or kind == "response.created":
            if payload.response is not None:
                _read_response_object(payload.response.as_dict(), self.facts)
        elif kind == "error":
            self.facts.error = str(payload.code or "error")
        return event.raw


class _ResponseObject(msgspec.Struct):
    """What the stream's response objects are read for. The rest (the echoed instructions and
    tools, tens of KB on an agent's call) is skipped by the decoder, never built."""

    id: Any = None
    model: Any = None
    status: Any = None
    usage: Any = None
    error: Any = None

    def as_dict(self) -> JSONObject:
        return {f: getattr(self, f) for f in self.__struct_fields__}


class _Response(_ResponseObject):
    output: Any = None
    """Read only when the answer has no usage (its text is then counted)."""


class _Event(msgspec.Struct):
    type: Any = None
    response: _ResponseObject | None = None
    code: Any = None


_EVENT = msgspec.json.Decoder(_Event)
_RESPONSE = msgspec.json.Decoder(_Response)


_DELTAS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta"})
_READ = frozenset({"response.created", "error"})


def _delta_text(data: bytes) -> str:
    delta = (parse_object(data) or {}).get("delta")
    return delta if isinstance(delta, str) else ""
