"""OpenAI Chat Completions: ``POST /v1/chat/completions``."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

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
    load_object,
    parse_object,
)
from gateway.dialects.envelope import UNSET, Array, Envelope, Field, decode, decoder, load_json
from gateway.dialects.openai_common import (
    SYSTEM_ROLES,
    leading_system,
    openai_error,
    session_hints,
)
from gateway.loops import Signature, signatures
from gateway.sse import SSEEvent

# The field every chunk carries once include_usage is on. An unescaped quote cannot occur inside
# a JSON string, so this only ever matches the key itself.
_USAGE_NULL = re.compile(rb',\s*"usage":\s*null|"usage":\s*null\s*,\s*')


def parse_usage(raw: Any) -> Usage | None:
    usage = as_dict(raw)
    if not usage:
        return None
    return Usage(
        input_tokens=as_int(usage.get("prompt_tokens")),
        output_tokens=as_int(usage.get("completion_tokens")),
        cache_read_tokens=as_int(as_dict(usage.get("prompt_tokens_details")).get("cached_tokens")),
        reasoning_tokens=as_int(
            as_dict(usage.get("completion_tokens_details")).get("reasoning_tokens")
        ),
    )


class ChatHistory:
    """``messages``: tool messages belong to the assistant message whose calls they answer."""

    field = "messages"

    def layout(self, items: Sequence[Any]) -> Layout:
        system = leading_system(items)
        layout = Layout(system)
        for index in range(system, len(items)):
            role = as_dict(items[index]).get("role")
            if role == "tool" and layout.units:
                layout.units[-1] = (layout.units[-1][0], index + 1)
            else:
                layout.units.append((index, index + 1))
                layout.inputs.append(role == "user")
        return layout

    def elide(self, item: Any, min_bytes: int) -> Any | None:
        message = as_dict(item)
        if message.get("role") != "tool":
            return None
        note = elision_note(message.get("content"), min_bytes)
        return None if note is None else {**message, "content": note}

    def note(self, text: str) -> Any:
        return {"role": "user", "content": text}

    def summary_request(
        self, model: str, instructions: str, transcript: str, max_tokens: int
    ) -> JSONObject:
        return {
            "model": model,
            "messages": [
                {"role": "system", "content": instructions},
                {"role": "user", "content": transcript},
            ],
            "max_completion_tokens": max_tokens,
        }

    def overflow(self, tokens: int, maximum: int) -> str:
        return (
            f"This model's maximum context length is {maximum} tokens. However, your messages "
            f"resulted in {tokens} tokens. Please reduce the length of the messages."
        )

    def summary_text(self, answer: JSONObject) -> str:
        choices = as_list(answer.get("choices"))
        message = as_dict(as_dict(choices[0]).get("message")) if choices else {}
        content = message.get("content")
        return content if isinstance(content, str) else ""


class ChatEnvelope(Envelope):
    stream_options: Field = UNSET
    messages: Array = UNSET
    max_tokens: Field = UNSET
    max_completion_tokens: Field = UNSET
    user: Field = UNSET
    prompt_cache_key: Field = UNSET
    # Read only by tracing (the request's sampling settings).
    frequency_penalty: Field = UNSET
    presence_penalty: Field = UNSET
    seed: Field = UNSET
    stop: Field = UNSET
    n: Field = UNSET


_DECODER = decoder(ChatEnvelope)


class OpenAIChat:
    name = "openai.chat"
    provider = "openai"
    operation = "chat"
    history: History = ChatHistory()

    def decode(self, raw: bytes) -> Body:
        return decode(_DECODER, raw)

    def read_request(self, body: Body) -> RequestFacts:
        messages = as_list(body.get("messages"))
        facts = RequestFacts(
            model=as_str(body.get("model")),
            stream=body.get("stream") is True,
            items=messages,
            tools=as_list(body.get("tools")),
            max_output_tokens=as_int(body.get("max_completion_tokens") or body.get("max_tokens"))
            or None,
        )
        # The conversation's start: leading system messages and the first user message. Only
        # the start is read, so the cost does not grow with the history.
        for message in messages:
            role = as_dict(message).get("role")
            if role in SYSTEM_ROLES:
                facts.system.append(message)
            elif role == "user":
                facts.first_user = message
                break
        if messages and isinstance(messages[-1], dict):
            facts.user_turn = messages[-1].get("role") == "user"
        session_hints(body, facts.session_hints)
        return facts

    def upstream_body(self, body: Body, raw: bytes) -> tuple[bytes, bool]:
        """Ask upstream for usage on a stream the client left without it."""
        if body.get("stream") is not True:
            return raw, False
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return raw, False
        if "stream_options" not in body:
            # Splice the field in front, leaving every other byte as the client sent it.
            brace = raw.index(b"{") + 1
            rest = raw[brace:]
            sep = b"," if rest.strip() != b"}" else b""
            return raw[:brace] + b'"stream_options":{"include_usage":true}' + sep + rest, True
        rewritten = load_json(raw)  # the rare case: stream_options present without usage
        rewritten["stream_options"] = {**as_dict(options), "include_usage": True}
        return orjson.dumps(rewritten), True

    def tool_call_turns(self, facts: RequestFacts) -> Iterator[Signature]:
        for message in reversed(facts.items):
            role = as_dict(message).get("role")
            if role == "tool" or role in SYSTEM_ROLES:
                continue
            calls = as_list(message.get("tool_calls")) if role == "assistant" else []
            if not calls:
                return
            functions = (as_dict(as_dict(call).get("function")) for call in calls)
            yield signatures((f.get("name"), f.get("arguments")) for f in functions)

    def decode_response(self, data: bytes) -> JSONObject | None:
        return load_object(data)

    def read_response(self, body: JSONObject) -> ResponseFacts:
        facts = ResponseFacts(
            usage=parse_usage(body.get("usage")),
            model=as_str(body.get("model")),
            id=as_str(body.get("id")),
        )
        choices = as_list(body.get("choices"))
        for choice in choices:
            reason = as_dict(choice).get("finish_reason")
            if isinstance(reason, str):
                facts.finish_reasons.append(reason)
        if facts.usage is None:
            facts.output_text = [as_dict(choice).get("message") for choice in choices]
        return facts

    def observe_stream(self, rewritten: bool) -> ChatStreamObserver:
        return ChatStreamObserver(rewritten)

    def error(self, kind: ErrorKind, message: str, code: str | None = None) -> ProviderError:
        return openai_error(kind, message, code)

    def stream_failure(self, error: ProviderError) -> bytes | None:
        return None


class ChatStreamObserver:
    """Parses only the chunks that matter (the first, finish and usage chunks); content chunks
    are kept raw, and read only if the output must be estimated."""

    __slots__ = ("facts", "rewrites")

    def __init__(self, rewritten: bool) -> None:
        self.facts = ResponseFacts(delta_text=_delta_text)
        # When the gateway added include_usage, the client must not see its traces.
        self.rewrites = rewritten

    def on_event(self, event: SSEEvent) -> bytes | None:
        data, raw = event.data, event.raw
        if self.rewrites:
            raw = _without_usage_null(raw)
        facts = self.facts
        if facts.id is not None and not _worth_parsing(data):
            facts.deltas.append(data)
            return raw
        chunk = parse_object(data)
        if chunk is None:
            return raw
        if facts.id is None:
            facts.id = as_str(chunk.get("id"))
            facts.model = as_str(chunk.get("model"))
        if "error" in chunk:
            facts.error = str(as_dict(chunk["error"]).get("code") or "error")
        choices = as_list(chunk.get("choices"))
        for choice in choices:
            reason = as_dict(choice).get("finish_reason")
            if isinstance(reason, str):
                facts.finish_reasons.append(reason)
        facts.deltas.append(data)
        usage = parse_usage(chunk.get("usage"))
        if usage is not None:
            facts.usage = usage
            if self.rewrites and not choices:
                return None
        return raw


def _without_usage_null(raw: bytes) -> bytes:
    """The chunk without the ``"usage":null`` that include_usage puts in every chunk. Plain
    substring searches first: a regex scan of every chunk cost more than the rest of the
    stream's handling (callgrind). ``find``, not ``in``: on Python 3.11 ``bytes in bytes``
    first tries the operand as an int and formats a TypeError each time."""
    if raw.find(b'"usage"') < 0:
        return raw
    for compact in (b',"usage":null', b'"usage":null,'):
        if raw.find(compact) >= 0:
            return raw.replace(compact, b"", 1)
    return _USAGE_NULL.sub(b"", raw, count=1)


def _worth_parsing(data: bytes) -> bool:
    """Chunks worth parsing as they pass: usage, a finish reason, an error."""
    return (
        data.find(b'"usage":{') >= 0
        or data.find(b'"finish_reason":"') >= 0
        or data.find(b'"error"') >= 0
        or data.find(b'"usage": {') >= 0
        or data.find(b'"finish_reason": "') >= 0
    )


def _delta_text(data: bytes) -> str:
    chunk = parse_object(data) or {}
    parts: list[str] = []
    for choice in as_list(chunk.get("choices")):
        delta = as_dict(as_dict(choice).get("delta"))
        content = delta.get("content")
        if isinstance(content, str):
            parts.append(content)
        for call in as_list(delta.get("tool_calls")):
            arguments = as_dict(as_dict(call).get("function")).get("arguments")
            if isinstance(arguments, str):
                parts.append(arguments)
    return "".join(parts)
