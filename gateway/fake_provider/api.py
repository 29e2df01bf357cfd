"""The seam between the HTTP layer and one provider API: a ``Turn`` in, bodies out.

``app.py`` parses and validates a request, decides what the fake says (a ``Turn``), and hands it
to the ``ProviderApi`` of the route, which renders the JSON answer or the SSE events of its API.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .config import ToolCallSpec
from .errors import FakeError, Flavor
from .usage import Usage

JsonObject = dict[str, Any]

_WORDS = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True, slots=True)
class Turn:
    """What the fake answers to one request."""

    body: JsonObject
    model: str
    text: str
    tool_call: ToolCallSpec | None
    usage: Usage | None
    created: int

    @property
    def arguments(self) -> str:
        """The tool call's arguments as the JSON text providers send."""
        assert self.tool_call is not None
        return orjson.dumps(self.tool_call.arguments).decode()


@dataclass(frozen=True, slots=True)
class ProviderApi:
    """One provider API: its error flavor, checks, prompt parts and answer renderers.

    ``context_overflow(tokens, window)`` is the API's own refusal of a too-long prompt.
    """

    flavor: Flavor
    validate: Callable[[JsonObject, Mapping[str, str]], None]
    prompt_parts: Callable[[JsonObject], list[object]]
    context_overflow: Callable[[int, int], FakeError]
    json_answer: Callable[[Turn], JsonObject]
    sse_events: Callable[[Turn], list[bytes]]


def text_deltas(text: str) -> list[str]:
    """The reply split into word-sized deltas, as a model streams it."""
    return _WORDS.findall(text) or [text]


def json_deltas(text: str, pieces: int = 3) -> list[str]:
    """Tool-call arguments split into a few partial JSON strings."""
    if not text:
        return [text]
    size = max(1, -(-len(text) // pieces))
    return [text[start : start + size] for start in range(0, len(text), size)]


def sse(event: str | None, data: object) -> bytes:
    """One SSE event, JSON serialized compactly like the providers do."""
    payload = orjson.dumps(data)
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"
