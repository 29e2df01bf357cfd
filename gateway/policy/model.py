"""The policy file's schema: pydantic models, validated once at load.

Names here are the contract operators write against (see ``policies/`` and the README). Every
settings block is complete in ``defaults``; a rule names only what it changes, and rules merge
in order over the defaults.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Strategy = Literal["elide_tool_output", "summarize", "truncate", "clear", "prompt"]
LoopAction = Literal["reject", "flag", "pause"]
Window = Literal["minute", "hour", "day", "month"]
StoreOutage = Literal["open", "closed"]
Fraction = Annotated[float, Field(gt=0, le=1)]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"12h"`` or ``"7d"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"not a duration: {value!r} (use seconds, or 30s, 15m, 12h, 7d)")


class _Block(BaseModel):
    # Attribute docstrings become field descriptions: the policy reference is generated
    # from them (``gateway policy reference``), so the docs cannot drift from the code.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ModelRules(_Block):
    allow: list[str] = ["*"]
    """Model globs that may be called (``gpt-4o*``, ``claude-*``)."""
    deny: list[str] = []
    """Model globs that may not, even when allowed above."""


class Limits(_Block):
    max_turns: int | None = Field(None, ge=1)
    """LLM calls per session (goose's GOOSE_MAX_TURNS). Grants add to it."""
    warn_at: Fraction = 0.8
    """Fraction of a limit past which answers carry warning headers."""
    max_session_tokens: int | None = Field(None, ge=1)
    """Input plus output tokens per session. Grants add to it."""
    max_request_input_tokens: int | None = Field(None, ge=1)
    """Estimated input tokens of one call."""
    max_body_bytes: int | None = Field(None, ge=1)
    """Size of one request body."""
    models: ModelRules = ModelRules()
    """Which models may be called."""
    idle_timeout: float | None = None
    """Seconds (or ``30m``) without a call after which a session ends; the next call with the
    same id starts its counts afresh."""

    @field_validator("idle_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return None if value is None else parse_duration(value)


class Budget(_Block):
    per: Literal["key", "team"] = "team"
    """Whose spending is counted: each principal (its gateway key, JWT subject, or in
    passthrough mode its provider key), or each team."""
    window: Window = "day"
    """Calendar window in UTC (``minute`` for rate limits); the budget resets at its end, and
    a call refused under it is answered 429 with ``Retry-After`` set to the seconds left."""
    max_tokens: int | None = Field(None, ge=1)
    """Input plus output tokens in the window."""
    max_cost: float | None = Field(None, gt=0)
    """Cost in the window, in the currency of the prices (US dollars for the built-in table).
    A call to a model without a price is refused under a cost budget."""
    max_requests: int | None = Field(None, ge=1)
    """LLM calls (turns) in the window, counted when each begins: a call is a request whether
    it then succeeds or fails upstream. Calls the policy refuses, and token counting, are not
    counted."""

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.max_tokens is None and self.max_cost is None and self.max_requests is None:
            raise ValueError("a budget needs max_tokens, max_cost or max_requests")
        return self


class Loops(_Block):
    identical_tool_calls: int = Field(8, ge=2)
    """Consecutive identical tool calls (name and arguments) that count as a runaway loop."""
    repeated_requests: int = Field(6, ge=2)
    """Byte-identical requests in a row, each answered successfully: a retry storm."""
    turn_rate_factor: float = Field(10.0, gt=1)
    """A session turning this many times faster than its own norm is flagged."""
    min_turns_per_minute: float = Field(30.0, gt=0)
    """...and at least this fast, so a slow session speeding up is not flagged."""
    action: LoopAction = "reject"
    """``reject`` stops the call; ``flag`` only records; ``pause`` stops the session until an
    operator grants more."""


class Context(_Block):
    window: int | Literal["auto"] = "auto"
    """The context window in tokens, or ``auto`` for the model's own."""
    compact_at: Fraction = 0.8
    """Compact when the estimated input reaches this fraction of the window (goose's
    GOOSE_AUTO_COMPACT_THRESHOLD)."""
    target: Fraction = 0.5
    """Compact down to this fraction, so compaction does not repeat every turn."""
    strategies: list[Strategy] = ["elide_tool_output", "summarize", "truncate"]
    """Tried in order until the request is under ``target``."""
    summary_model: str | None = None
    """Model for summaries; default the session's own."""
    keep_last: int = Field(4, ge=1)
    """Latest exchanges that no strategy but ``clear`` touches. An exchange is one model turn
    with the tool results that answer it, or one user message."""
    default_window: int = Field(128_000, ge=1024)
    """The window of a model in neither ``windows`` nor the built-in table."""
    summary_max_tokens: int = Field(4096, ge=256)
    """Output cap of the summary call."""
    summary_timeout: float = 120.0
    """Seconds (or ``2m``) the summary call may take before the next strategy is used."""

    @field_validator("summary_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _order(self) -> Context:
        if self.target >= self.compact_at:
            raise ValueError("context.target must be below context.compact_at")
        return self


class PolicySettings(_Block):
    """Everything a rule can set."""

    limits: Limits = Limits()
    """Per-session limits and the models allowed."""
    budgets: list[Budget] = []
    """Token, cost and request budgets per principal or team over a calendar window (a
    ``minute`` window makes a rate limit)."""
    loops: Loops = Loops()
    """Runaway-loop detection and what to do about it."""
    context: Context = Context()
    """Context compaction near the model's window."""
    store_outage: StoreOutage = "open"
    """What a call meets while the session store is failing or behind (the gateway is
    degraded for ``store``): ``open`` serves it, with the limits checked against what this
    process holds in memory (a session the store cannot read starts from zero, and its
    figures are added to the stored ones when the store is back; no turn is lost);
    ``closed`` refuses it before it goes upstream with a 503 and ``Retry-After``, which
    agents retry later, so no limit is ever checked against part of the figures."""


class Match(_Block):
    """All given conditions must hold; values are globs (``codex*``), case-insensitive."""

    agent: str | None = None
    """The agent's name (``claude-code``, ``codex``, ``goose``...; see the README)."""
    key: str | None = None
    """A key's name from ``keys``, or its hash."""
    team: str | None = None
    """The caller's team: its gateway key's or JWT's; in passthrough mode from ``keys`` or
    a trusted proxy's ``team_header``."""
    principal: str | None = None
    """The authenticated principal's public id: ``key:<gateway key id>``, ``jwt:<subject>``,
    or ``passthrough:<provider key hash>``."""
    scope: str | None = None
    """A scope the caller's credential holds (``llm``, ``upstream:byok``)."""
    model: str | None = None
    """The requested model."""
    session_name: str | None = None
    """The session's human name (``X-Gateway-Session-Name``)."""
    mode: Literal["interactive", "headless"] | None = None
    """``X-Gateway-Mode``; without it, clients that run headless say so in their User-Agent
    (``codex exec``, ``claude -p``)."""
    headers: dict[str, str] = {}
    """Any request header, by name, with a glob for its value."""


class Rule(_Block):
    name: str | None = None
    """Shown in rejections and ``policy explain``; default ``rules[N]``."""
    match: Match = Match()
    """When the rule applies; an empty match applies to every request."""
    limits: dict[str, Any] | None = None
    """Any ``limits`` settings; merged over what came before."""
    budgets: list[dict[str, Any]] | None = None
    """Replaces the budgets that came before."""
    loops: dict[str, Any] | None = None
    """Any ``loops`` settings; merged over what came before."""
    context: dict[str, Any] | None = None
    """Any ``context`` settings; merged over what came before."""
    store_outage: StoreOutage | None = None
    """Replaces ``store_outage`` for the calls the rule matches."""


class KeyInfo(_Block):
    name: str
    """A name for the key, for rules (``match: {key: ci-bot}``) and people."""
    team: str | None = None
    """The team its spending counts against."""


MAX_PRICE = 10_000.0
"""Per million tokens: a hundred times the dearest model's output; above it, a typo."""


class Price(_Block):
    """Per million tokens, in the currency of cost budgets (the built-in table's: US dollars);
    each from 0 to 10,000 (a hundred times the dearest model's output price)."""

    input: float = Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)
    """Per million input tokens that were neither read from nor written to a cache."""
    output: float = Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)
    """Per million output tokens (reasoning tokens included: they are output)."""
    cache_read: float | None = Field(None, ge=0, le=MAX_PRICE, allow_inf_nan=False)
    """Per million input tokens read from the provider's prompt cache; default the input
    price."""
    cache_write: float | None = Field(None, ge=0, le=MAX_PRICE, allow_inf_nan=False)
    """Per million input tokens written to the prompt cache (Anthropic's cache creation, 1.25
    times its input price for the 5-minute cache); default the input price."""


class PolicyFile(_Block):
    version: Literal[1]
    """The schema version of this file."""
    defaults: PolicySettings = PolicySettings()
    """Settings for every request, before rules."""
    rules: list[Rule] = []
    """Applied in order; each matching rule merges its settings over the result so far."""
    keys: dict[str, KeyInfo] = {}
    """Key hashes (as shown by ``gateway sessions``) to names and teams."""
    team_header: str | None = None
    """A trusted header naming the caller's team (set it only behind an authenticating proxy)."""
    prices: dict[str, Price] = {}
    """Model globs to prices, over the built-in table (genai-prices' OpenAI and Anthropic
    prices): the first entry whose glob matches a model replaces its built-in price. The glob
    ``*`` is the default price, for models neither another entry nor the built-in table
    prices; without one such models are unpriced (counted, and refused under a cost budget)."""
    windows: dict[str, int] = {}
    """Model globs to context windows in input tokens, over the built-in table (in
    ``gateway/compaction/windows.py``), for ``context.window: auto``."""
    capture_content_teams: list[str] = []
    """Teams whose prompts and completions go on their spans although content capture is off
    globally (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``). The team is the
    caller's authenticated one (its gateway key's or JWT's); no request header turns capture
    on. Paused while the gateway is degraded."""

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: dict[str, int]) -> dict[str, int]:
        small = [glob for glob, tokens in value.items() if tokens < 1024]
        if small:
            raise ValueError(f"windows under 1024 tokens: {', '.join(small)}")
        return value
