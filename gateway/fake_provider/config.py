"""What the fake provider answers: the app-wide configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .faults import Fault

UsageMode = Literal["bytes", "tiktoken"]

DEFAULT_REPLY = "Hello! This is a deterministic reply from the gateway's fake provider."


@dataclass(slots=True)
class ToolCallSpec:
    """One tool call the fake answers with: a tool name and its JSON arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class FakeProviderConfig:
    """How the fake provider behaves for every request (scenario headers override per request).

    Handlers read it from ``app[CONFIG]`` on every request, so tests may change it in place.

    - ``tool_loop``: when set, every answer is this same tool call (a runaway agent loop).
    - ``token_factor``: multiplies the reported input tokens.
    - ``usage_mode``: ``"bytes"`` estimates tokens as len(JSON of the prompt parts) // 4;
      ``"tiktoken"`` counts the prompt's text parts with o200k_base.
    - ``reply_text``: the deterministic text answer.
    - ``chunk_delay``: seconds between SSE events.
    - ``record``: keep the last 1000 received requests in ``app[RECEIVED]``.
    - ``context_window``: when set, a chat, responses or messages request whose input tokens
      (counted as for the reported usage, ``token_factor`` included) exceed it is refused with
      the API's real context-overflow 400, before anything is generated.
    - ``faults``: fault rules (``faults.py``) the app starts with, as ``--fault`` gives them;
      at run time they live in ``app[FAULTS]``.
    """

    tool_loop: ToolCallSpec | None = None
    token_factor: float = 1.0
    usage_mode: UsageMode = "bytes"
    reply_text: str = DEFAULT_REPLY
    chunk_delay: float = 0.0
    record: bool = True
    context_window: int | None = None
    faults: tuple[Fault, ...] = ()
