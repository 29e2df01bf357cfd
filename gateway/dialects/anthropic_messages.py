"""Anthropic Messages: ``POST /v1/messages`` (Claude Code, the Anthropic SDK)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import orjson

from gateway.dialects.base import (
    STATUS_OF,
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
    load_object,
    parse_object,
)
from gateway.dialects.envelope import (
    UNSET,
    Array,
    ArrayOrText,
    Envelope,
    Field,
    decode,
    decoder,
)
from gateway.loops import Signature, signatures
from gateway.sse import SSEEvent

_TYPES = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.AUTHENTICATION: "authentication_error",
    ErrorKind.PERMISSION: "permission_error",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.TOO_LARGE: "request_too_large",
    ErrorKind.RATE_LIMIT: "rate_limit_error",
    ErrorKind.INTERNAL: "api_error",
    ErrorKind.UPSTREAM: "api_error",
    ErrorKind.OVERLOADED: "overloaded_error",
    ErrorKind.CONTEXT_OVERFLOW: "invalid_request_error",
}


def parse_usage(raw: Any) -> Usage | None:
    usage = as_dict(raw)
    if not usage:
        return None
    cache_read = as_int(usage.get("cache_read_input_tokens"))
    cache_creation = as_int(usage.get("cache_creation_input_tokens"))
    return Usage(
        input_tokens=as_int(usage.get("input_tokens")) + cache_read + cache_creation,
        output_tokens=as_int(usage.get("output_tokens")),
        cache_read_tokens=cache_read,
        cache_creation_tokens=cache_creation,
    )


def session_from_user_id(user_id: str) -> str | None:
    """Claude Code's ``metadata.user_id``: JSON with ``session_id`` (2.1.78+), or the older
    ``user_<hash>_account_<uuid>_session_<uuid>``."""
    if user_id.startswith("{"):
        try:
            parsed = orjson.loads(user_id)
        except orjson.JSONDecodeError:
            return None
        return as_str(as_dict(parsed).get("session_id")) or None
    _, marker, session = user_id.rpartition("_session_")
    return session or None if marker else None


def _is_new_user_input(message: Any) -> bool:
    if not isinstance(message, dict) or message.get("role") != "user":
        return False
    content = message.get("content")
    if isinstance(content, str):
        return True
    return any(as_dict(block).get("type") != "tool_result" for block in as_list(content))


def _has_tool_results(message: JSONObject) -> bool:
    return any(as_dict(b).get("type") == "tool_result" for b in as_list(message.get("content")))


class MessagesHistory:
    """``messages``: a user message with tool results belongs to the assistant turn before it.

    Items are kept or dropped whole and never re-serialized unless elided, so signed thinking
    blocks reach the provider byte for byte.
    """

    field = "messages"

    def layout(self, items: Sequence[Any]) -> Layout:
        layout = Layout(0)
        for index, item in enumerate(items):
            message = as_dict(item)
            after_assistant = index > 0 and as_dict(items[index - 1]).get("role") == "assistant"
            if after_assistant and layout.units and _has_tool_results(message):
                layout.units[-1] = (layout.units[-1][0], index + 1)
                layout.inputs[-1] = layout.inputs[-1] or _is_new_user_input(message)
            else:
                layout.units.append((index, index + 1))
                layout.inputs.append(_is_new_user_input(message))
        return layout

    def elide(self, item: Any, min_bytes: int) -> Any | None:
        message = as_dict(item)
        if message.get("role") != "user":
            return None
        content = as_list(message.get("content"))
        changed = False
        blocks: list[Any] = []
        for block in content:
            note = None
            if as_dict(block).get("type") == "tool_result":
                note = elision_note(block.get("content", ""), min_bytes)
            if note is None:
                blocks.append(block)
            else:
                blocks.append({**block, "content": note})
                changed = True
        return {**message, "content": blocks} if changed else None

    def note(self, text: str) -> Any:
        return {"role": "user", "content": [{"type": "text", "text": text}]}

    def summary_request(
        self, model: str, instructions: str, transcript: str, max_tokens: int
    ) -> JSONObject:
        return {
            "model": model,
            "system": instructions,
            "messages": [{"role": "user", "content": transcript}],
            "max_tokens": max_tokens,
        }

    def overflow(self, tokens: int, maximum: int) -> str:
        return f"prompt is too long: {tokens} tokens > {maximum} maximum"

    def summary_text(self, answer: JSONObject) -> str:
        texts = [
            block.get("text")
            for block in map(as_dict, as_list(answer.get("content")))
            if block.get("type") == "text"
        ]
        return "".join(text for text in texts if isinstance(text, str))


class MessagesEnvelope(Envelope):
    messages: Array = UNSET
    system: ArrayOrText = UNSET
    max_tokens: Field = UNSET
    # Read only by tracing (the request's sampling settings).
    top_k: Field = UNSET
    stop_sequences: Field = UNSET


_DECODER = decoder(MessagesEnvelope)


class AnthropicMessages:
    name = "anthropic.messages"
    provider = "anthropic"
    operation = "chat"
    history: History = MessagesHistory()

    def decode(self, raw: bytes) -> Body:
        return decode(_DECODER, raw)

    def read_request(self, body: Body) -> RequestFacts:
        messages = as_list(body.get("messages"))
        system = body.get("system")
        preamble = [system] if isinstance(system, str) else list(as_list(system))
        facts = RequestFacts(
            model=as_str(body.get("model")),
            stream=body.get("stream") is True,
            items=messages,
            system=preamble,
            preamble=preamble,
            tools=as_list(body.get("tools")),
            max_output_tokens=as_int(body.get("max_tokens")) or None,
        )
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user":
                facts.first_user = message
                break
        # Claude Code may end the list with a mid-conversation system note: look past it.
        latest = next(
            (m for m in reversed(messages) if as_dict(m).get("role") in ("user", "assistant")),
            None,
        )
        facts.user_turn = _is_new_user_input(latest)
        metadata = as_dict(body.get("metadata"))
        user_id = metadata.get("user_id")
        if isinstance(user_id, str) and (session := session_from_user_id(user_id)):
            facts.session_hints["metadata.user_id"] = session
        session_id = metadata.get("session_id")
        if isinstance(session_id, str) and session_id:
            facts.session_hints["metadata.session_id"] = session_id
        return facts

    def upstream_body(self, body: Body, raw: bytes) -> tuple[bytes, bool]:
        return raw, False

    def tool_call_turns(self, facts: RequestFacts) -> Iterator[Signature]:
        for message in reversed(facts.items):
            role = as_dict(message).get("role")
            if role == "user" and _is_new_user_input(message):
                return
            if role != "assistant":
                continue  # tool results, and Claude Code's mid-conversation system notes
            uses = [
                (block.get("name"), block.get("input"))
                for block in map(as_dict, as_list(message.get("content")))
                if block.get("type") == "tool_use"
            ]
            if not uses:
                return
            yield signatures(uses)

    def decode_response(self, data: bytes) -> JSONObject | None:
        return load_object(data)

    def read_response(self, body: JSONObject) -> ResponseFacts:
        reason = as_str(body.get("stop_reason"))
        usage = parse_usage(body.get("usage"))
        return ResponseFacts(
            usage=usage,
            model=as_str(body.get("model")),
            id=as_str(body.get("id")),
            finish_reasons=[reason] if reason else [],
            output_text=list(as_list(body.get("content"))) if usage is None else [],
        )

    def observe_stream(self, rewritten: bool) -> MessagesStreamObserver:
        return MessagesStreamObserver()

    def error(self, kind: ErrorKind, message: str, code: str | None = None) -> ProviderError:
        body = {"type": "error", "error": {"type": _TYPES[kind], "message": message}}
        status = 529 if kind is ErrorKind.OVERLOADED else STATUS_OF[kind]
        return ProviderError(status, body)

    def stream_failure(self, error: ProviderError) -> bytes | None:
        return None


class MessagesStreamObserver:
    """Parses ``message_start``, ``message_delta`` and errors; content deltas are kept raw."""

    __slots__ = ("facts",)
    rewrites = False

    def __init__(self) -> None:
        self.facts = ResponseFacts(delta_text=_delta_text)

    def on_event(self, event: SSEEvent) -> bytes | None:
        kind = event.event
        if kind == "content_block_delta":
            self.facts.deltas.append(event.data)
            return event.raw
        if kind is not None and kind not in _READ:
            return event.raw
        payload = parse_object(event.data)
        if payload is None:
            return event.raw
        kind = payload.get("type") or kind
        facts = self.facts
        if kind == "content_block_delta":
            facts.deltas.append(event.data)
        elif kind == "message_start":
            message = as_dict(payload.get("message"))
            facts.id = as_str(message.get("id"))
            facts.model = as_str(message.get("model"))
            facts.usage = parse_usage(message.get("usage"))
        elif kind == "message_delta":
            reason = as_str(as_dict(payload.get("delta")).get("stop_reason"))
            if reason:
                facts.finish_reasons = [reason]
            self._merge_delta_usage(as_dict(payload.get("usage")))
        elif kind == "error":
            facts.error = str(as_dict(payload.get("error")).get("type") or "error")
        return event.raw

    def _merge_delta_usage(self, delta: JSONObject) -> None:
        """``message_delta`` carries the cumulative output count, and may restate input."""
        if not delta:
            return
        usage = self.facts.usage or Usage()
        usage.output_tokens = as_int(delta.get("output_tokens")) or usage.output_tokens
        restated = parse_usage(delta)
        if restated is not None and restated.input_tokens > usage.input_tokens:
            usage.input_tokens = restated.input_tokens
            usage.cache_read_tokens = restated.cache_read_tokens
            usage.cache_creation_tokens = restated.cache_creation_tokens
        self.facts.usage = usage


_READ = frozenset({"message_start", "message_delta", "error"})


def _delta_text(data: bytes) -> str:
    delta = as_dict((parse_object(data) or {}).get("delta"))
    text = delta.get("text") or delta.get("partial_json") or delta.get("thinking")
    return text if isinstance(text, str) else ""
