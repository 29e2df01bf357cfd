"""The seam between the gateway and one provider API.

A dialect reads facts from a request body, finds usage in a JSON answer or an SSE stream, and
shapes errors the way that provider does. Dialects take bytes and dicts and return values: no
web layer, no I/O, so they are tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import chain
from typing import Any, Protocol

import orjson

from gateway.dialects.envelope import Envelope, Items
from gateway.loops import Signature
from gateway.sse import SSEEvent

JSONObject = dict[str, Any]
Body = Envelope | JSONObject
"""A request body as dialects read it: a decoded envelope, or (in tests) a plain dict."""


class ErrorKind(StrEnum):
    """What went wrong, in provider-neutral words; each dialect maps it to its own type."""

    INVALID_REQUEST = "invalid_request"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    RATE_LIMIT = "rate_limit"
    UPSTREAM = "upstream"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"
    CONTEXT_OVERFLOW = "context_overflow"
    """The prompt does not fit the model's context window (agents compact on this one)."""


@dataclass(slots=True)
class Usage:
    """Token usage of one call, as the provider reported it (or estimated, flagged).

    ``input_tokens`` counts every prompt token, cached or not; ``cache_read_tokens`` and
    ``cache_creation_tokens`` are parts of it. (Anthropic reports them apart; OpenAI inside.)
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class RequestFacts:
    """What the gateway needs to know of one LLM request."""

    model: str | None
    stream: bool
    items: Sequence[Any]
    """Conversation items: messages (chat, Anthropic) or input items (Responses); an
    ``Items`` that decodes each one only when read."""
    system: list[Any] = field(default_factory=list)
    """The system prompt: the leading system/developer messages, or the API's own field."""
    preamble: list[Any] = field(default_factory=list)
    """Prompt parts outside ``items`` (Anthropic ``system``, Responses ``instructions``)."""
    tools: Sequence[Any] = field(default_factory=list)
    max_output_tokens: int | None = None
    """The output cap the request sets, if any."""
    user_turn: bool = False
    """The newest item is new user input, not a tool result."""
    first_user: Any = None
    session_hints: dict[str, str] = field(default_factory=dict)
    """Session ids found in the body, by where they were found (``prompt_cache_key``,
    ``metadata.user_id``, ``metadata.session_id``, ``user``); identity ranks them."""


def prompt_parts(facts: RequestFacts) -> Iterable[Any]:
    """Everything the model reads as input, each part once: what token estimates count.
    Lazily decoded arrays give their raw elements (the token cache keys on their bytes)."""
    return chain(facts.preamble, raw_elements(facts.items), raw_elements(facts.tools))


def raw_elements(items: Sequence[Any]) -> Iterable[Any]:
    """The elements as sent where the array was decoded lazily, else the elements."""
    return items.raw() if isinstance(items, Items) else items


@dataclass(slots=True)
class ResponseFacts:
    """What the gateway learned from an answer, filled as a stream goes by."""

    usage: Usage | None = None
    model: str | None = None
    id: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    output_text: list[Any] = field(default_factory=list)
    """Generated content (an answer's blocks when it had no usage), kept only to estimate
    output tokens when usage never came."""
    deltas: list[bytes] = field(default_factory=list)
    """A stream's content events, unparsed: read (``delta_text``) only if an estimate is
    needed, so an ordinary stream costs no JSON parsing per chunk."""
    delta_text: Callable[[bytes], str] | None = None
    error: str | None = None

    def generated(self) -> list[Any]:
        """Everything generated so far, for an estimate of output tokens."""
        if self.delta_text is None:
            return self.output_text
        return self.output_text + [self.delta_text(data) for data in self.deltas]


@dataclass(slots=True, frozen=True)
class ProviderError:
    status: int
    body: JSONObject


STATUS_OF: dict[ErrorKind, int] = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.AUTHENTICATION: 401,
    ErrorKind.PERMISSION: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.RATE_LIMIT: 429,
    ErrorKind.INTERNAL: 500,
    ErrorKind.UPSTREAM: 502,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.CONTEXT_OVERFLOW: 400,
}


MAX_COUNT = 2**40
"""The most tokens one count may say (a trillion): beyond it a client or an upstream is lying,
and the figures must stay exact integers everywhere they are added (Redis's included)."""


def as_int(value: Any) -> int:
    """A token count from a provider's JSON or a request: absent, null, junk or negative count
    as 0; a count past ``MAX_COUNT`` as ``MAX_COUNT``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return 0
    return min(value, MAX_COUNT)


def load_object(data: bytes) -> JSONObject | None:
    """A whole body as a JSON object, or None for anything else."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def parse_object(data: bytes) -> JSONObject | None:
    """A JSON object from an event's data, or None for anything else (``[DONE]``, junk)."""
    if data[:1] != b"{":
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def elision_note(value: Any, min_bytes: int) -> str | None:
    """The note that stands in for a tool output of ``min_bytes`` or more (else None)."""
    size = len(value.encode()) if isinstance(value, str) else len(orjson.dumps(value))
    if size < min_bytes:
        return None
    return (
        f"[Tool output removed by the gateway to fit the context window: {size:,} bytes. "
        "Run the tool again if it is still needed.]"
    )


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def as_dict(value: Any) -> JSONObject:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list | Items) else []


class StreamObserver(Protocol):
    """Watches one SSE stream. Returns what to send the client for each event."""

    facts: ResponseFacts

    def on_event(self, event: SSEEvent) -> bytes | None:
        """The bytes to forward for this event (usually ``event.raw``), or None to drop it."""
        ...

    @property
    def rewrites(self) -> bool:
        """Whether events may be changed or dropped, so raw chunks cannot be forwarded as is."""
        ...


@dataclass(slots=True)
class Layout:
    """A conversation cut into the pieces a rewrite may keep or drop, but never split.

    ``system`` leading items (system and developer messages) are never touched. After them,
    each unit is one exchange: a message, or a model turn with everything bound to it (its
    tool results, the item a reasoning item belongs to). Dropping whole units keeps every
    tool call paired with its result.
    """

    system: int
    units: list[tuple[int, int]] = field(default_factory=list)
    """``[start, end)`` item indexes of each unit, in order."""
    inputs: list[bool] = field(default_factory=list)
    """Per unit: it holds new user input (not only tool results)."""


class History(Protocol):
    """How one API lays out a conversation, and the few items the gateway writes into one."""

    field: str
    """The body's field holding the conversation (``messages``, ``input``)."""

    def layout(self, items: Sequence[Any]) -> Layout: ...

    def elide(self, item: Any, min_bytes: int) -> Any | None:
        """The item with its tool output replaced by a short note, or None when it holds no
        tool output of ``min_bytes`` or more. Deterministic: the same item gives the same note."""
        ...

    def note(self, text: str) -> Any:
        """A user message from the gateway (a summary, or a note of what was removed)."""
        ...

    def summary_request(
        self, model: str, instructions: str, transcript: str, max_tokens: int
    ) -> JSONObject:
        """A plain (non-streamed, tool-free) call that asks the model to summarize."""
        ...

    def summary_text(self, answer: JSONObject) -> str: ...

    def overflow(self, tokens: int, maximum: int) -> str:
        """The provider's own words for a prompt over the window (agents match on them)."""
        ...


class Dialect(Protocol):
    name: str
    """Route name, e.g. ``openai.chat``."""
    provider: str
    """``gen_ai.provider.name``: ``openai`` or ``anthropic``."""
    operation: str
    """``gen_ai.operation.name``: ``chat``."""
    history: History
    """The conversation's layout, for context compaction."""

    def decode(self, raw: bytes) -> Body:
        """The body's envelope; raises ``EnvelopeError`` for what is not a JSON object."""
        ...

    def read_request(self, body: Body) -> RequestFacts: ...

    def upstream_body(self, body: Body, raw: bytes) -> tuple[bytes, bool]:
        """The body to send upstream, and whether the gateway changed it."""
        ...

    def tool_call_turns(self, facts: RequestFacts) -> Iterator[Signature]:
        """The tool calls of each assistant turn in the history, newest first, back to the
        latest new user input (loop detection reads these)."""
        ...

    def decode_response(self, data: bytes) -> JSONObject | None:
        """A whole JSON answer as ``read_response`` reads it (None if not a JSON object)."""
        ...

    def read_response(self, body: JSONObject) -> ResponseFacts: ...

    def observe_stream(self, rewritten: bool) -> StreamObserver:
        """An observer for the answer to a request; ``rewritten`` as from ``upstream_body``."""
        ...

    def error(self, kind: ErrorKind, message: str, code: str | None = None) -> ProviderError:
        """The provider's own error for this kind: status and JSON body."""
        ...

    def stream_failure(self, error: ProviderError) -> bytes | None:
        """The same error as an event stream, for an API whose clients only understand some
        errors inside a stream (Codex and context overflow); None to answer plain HTTP."""
        ...
