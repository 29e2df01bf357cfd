"""OpenAI Responses: ``POST /v1/responses`` (Codex CLI, OpenCode's openai provider)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from gateway.dialects.base import (
    Body,
    ErrorKind,
    JSONObject,
    ProviderError,
    RequestFacts,
    ResponseFacts,
    Usage,
    as_dict,
    as_int,
    as_list,
    as_str,
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
from gateway.dialects.openai_common import openai_error, session_hints
from gateway.loops import Signature, signatures
from gateway.sse import SSEEvent

_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_SYSTEM_ROLES = ("system", "developer")
# Call items and the field holding their arguments; outputs and reasoning sit between calls.
_CALLS = {"function_call": "arguments", "custom_tool_call": "input", "local_shell_call": "action"}
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


def _is_user_message(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("role") == "user"
        and item.get("type", "message") == "message"
    )


class ResponsesEnvelope(Envelope):
    input: ArrayOrText = UNSET
    instructions: Field = UNSET
    max_output_tokens: Field = UNSET
    user: Field = UNSET
    prompt_cache_key: Field = UNSET


_DECODER = decoder(ResponsesEnvelope)


class OpenAIResponses:
    name = "openai.responses"
    provider = "openai"
    operation = "chat"

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
            if as_dict(item).get("role") in _SYSTEM_ROLES:
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
            kind = item.get("type", "message")
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
        payload = parse_object(event.data)
        if payload is None:
            return event.raw
        kind = kind or payload.get("type")
        if kind in _DELTAS:
            self.facts.deltas.append(event.data)
        elif kind in _FINAL_EVENTS or kind == "response.created":
            _read_response_object(as_dict(payload.get("response")), self.facts)
        elif kind == "error":
            self.facts.error = str(payload.get("code") or "error")
        return event.raw


_DELTAS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta"})
_READ = frozenset({"response.created", "error"})


def _delta_text(data: bytes) -> str:
    delta = (parse_object(data) or {}).get("delta")
    return delta if isinstance(delta, str) else ""
