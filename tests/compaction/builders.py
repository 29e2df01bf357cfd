"""Realistic conversations in each API's shape, and an in-memory session for the compactor.

Histories look like an agent's: a system prompt, the task, then tool exchanges whose outputs
are files the agent read (about 1,500 bytes each, different every time).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.compaction import Call, Outcome, Rewrite, Summary, SummaryFailed
from gateway.dialects.base import History
from gateway.policy.model import Context
from gateway.tokens import TokenCounter

# Exact counts: these tests check compaction's arithmetic, and on a loaded machine the
# per-loop-turn budget (tests/test_tokens.py tests it) would turn some counts into estimates.
COUNTER = TokenCounter(budget=math.inf)
COUNTER.count_text("", "gpt-4o")  # loads o200k here, not on the event loop (tests use no other)
count = COUNTER.count_item

SYSTEM = "You are a coding agent. Use the tools to inspect and edit the repository."
TASK = "Refactor the parser module so that every error carries its line number."
WORDS = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega", "pi"]


def tool_output(n: int, chars: int = 1500) -> str:
    """A file the agent read: different for every ``n``, about ``chars`` long."""
    rng = random.Random(n)
    text = f"src/file{n}.py:\n"
    while len(text) < chars:
        text += rng.choice(WORDS) + " "
    return text[:chars]


def arguments(n: int) -> str:
    return orjson.dumps({"path": f"src/file{n}.py"}).decode()


# -- Chat Completions ---------------------------------------------------------------------------


def chat_exchange(n: int, chars: int = 1500, parallel: int = 1) -> list[dict[str, Any]]:
    calls = [
        {
            "id": f"call_{n}_{k}",
            "type": "function",
            "function": {"name": "read_file", "arguments": arguments(n * 10 + k)},
        }
        for k in range(parallel)
    ]
    results = [
        {"role": "tool", "tool_call_id": f"call_{n}_{k}", "content": tool_output(n * 10 + k, chars)}
        for k in range(parallel)
    ]
    return [{"role": "assistant", "content": None, "tool_calls": calls}, *results]


def chat_history(exchanges: int, chars: int = 1500, start: int = 0) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TASK},
    ]
    for n in range(start, start + exchanges):
        items += chat_exchange(n, chars)
    return items


# -- Responses ----------------------------------------------------------------------------------


def responses_exchange(n: int, chars: int = 1500, reasoning: bool = True) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if reasoning:
        items.append(
            {
                "type": "reasoning",
                "id": f"rs_{n}",
                "summary": [{"type": "summary_text", "text": f"I should read file {n}."}],
                "encrypted_content": f"gAAAAB{n:04d}" + "x" * 120,
            }
        )
    items += [
        {
            "type": "function_call",
            "id": f"fc_{n}",
            "call_id": f"call_{n}",
            "name": "read_file",
            "arguments": arguments(n),
        },
        {"type": "function_call_output", "call_id": f"call_{n}", "output": tool_output(n, chars)},
    ]
    return items


def user_input(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def responses_history(exchanges: int, chars: int = 1500, start: int = 0) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": SYSTEM}],
        },
        user_input(TASK),
    ]
    for n in range(start, start + exchanges):
        items += responses_exchange(n, chars)
    return items


# -- Anthropic Messages -------------------------------------------------------------------------


def anthropic_exchange(n: int, chars: int = 1500, thinking: bool = True) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if thinking:
        content.append(
            {"type": "thinking", "thinking": f"Read file {n} next.", "signature": "EqQBCkYI" * 8}
        )
    content.append(
        {
            "type": "tool_use",
            "id": f"toolu_{n}",
            "name": "Read",
            "input": {"file_path": f"src/file{n}.py"},
        }
    )
    result = {"type": "tool_result", "tool_use_id": f"toolu_{n}", "content": tool_output(n, chars)}
    return [{"role": "assistant", "content": content}, {"role": "user", "content": [result]}]


def anthropic_history(exchanges: int, chars: int = 1500, start: int = 0) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": TASK}]}]
    for n in range(start, start + exchanges):
        items += anthropic_exchange(n, chars)
    return items


# -- the compactor's side -----------------------------------------------------------------------


def raws(items: Sequence[Any]) -> list[bytes]:
    """Items as the agent sent them: one JSON buffer each."""
    return [orjson.dumps(item) for item in items]


def decoded(buffers: Sequence[Any]) -> list[Any]:
    return [orjson.loads(bytes(buffer)) for buffer in buffers]


def context(**overrides: Any) -> Context:
    settings: dict[str, Any] = {
        "compact_at": 0.8,
        "target": 0.5,
        "keep_last": 2,
        "strategies": ["elide_tool_output", "summarize", "truncate"],
    }
    return Context(**{**settings, **overrides})


@dataclass
class Summarizer:
    """A summary model: records each transcript, answers after ``delay`` or fails."""

    text: str = "The agent read src/file0.py to src/file9.py; the parser still lacks lines."
    model: str = "summary-model"
    delay: float = 0.0
    fail: str | None = None
    transcripts: list[str] = field(default_factory=list)

    async def __call__(self, transcript: str) -> Summary:
        self.transcripts.append(transcript)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise SummaryFailed(self.fail)
        return Summary(f"{self.text} (summary {len(self.transcripts)})", self.model)


@dataclass
class Session:
    """What the store keeps of one session: its saved rewrites (as JSON) and every outcome
    ``keep`` was given."""

    id: str = "session-1"
    saved: list[dict[str, Any]] = field(default_factory=list)
    kept: list[Outcome] = field(default_factory=list)
    reads: int = 0

    async def rewrites(self) -> list[Rewrite]:
        self.reads += 1
        return [Rewrite.from_json(data) for data in self.saved]

    async def keep(self, outcome: Outcome) -> None:
        self.kept.append(outcome)
        if outcome.rewrite is not None:
            # Through JSON, as a store keeps it.
            self.saved.append(orjson.loads(orjson.dumps(outcome.rewrite.to_json())))

    def call(
        self,
        history: History,
        items: Sequence[Any],
        settings: Context,
        window: int,
        summarize: Summarizer | None = None,
        model: str | None = "gpt-4o",
        fixed: Sequence[Any] = (),
    ) -> Call:
        originals = raws(items)
        return Call(
            session_id=self.id,
            model=model,
            history=history,
            originals=originals,
            fixed=list(fixed),
            body_size=sum(len(raw) for raw in originals) + 200,
            settings=settings,
            window=window,
            summarize=summarize,
            rewrites=self.rewrites,
            keep=self.keep,
        )


def tokens(items: Sequence[Any], model: str | None = "gpt-4o") -> int:
    """The compactor's count of a conversation (no fixed parts)."""
    return sum(count(orjson.dumps(item), model) for item in items)
