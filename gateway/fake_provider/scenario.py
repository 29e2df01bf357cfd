"""The ``x-fake-scenario`` request header: per-request behaviour for tests.

Values (several may be joined with ``;``):

- ``tool_loop:<name>:<json-args>`` / ``tool:<name>:<json-args>``: answer with that tool call;
- ``error:<status>``: answer that status with the API's real error body;
- ``cut_stream:<n>``: send n SSE events, then close the connection abruptly;
- ``no_usage``: omit usage from JSON answers and streams;
- ``slow:<seconds>``: sleep before answering;
- ``token_factor:<f>``: override the configured token factor;
- ``context_window:<n>``: override the configured context window (input tokens).

The header reaches only requests the test sends itself; for faults in every request, the
gateway's own retries included, see the fault rules in ``faults.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .config import ToolCallSpec

HEADER = "x-fake-scenario"

_KEYWORDS = (
    "tool_loop:",
    "tool:",
    "error:",
    "cut_stream:",
    "no_usage",
    "slow:",
    "token_factor:",
    "context_window:",
)


class ScenarioError(ValueError):
    """The scenario header could not be understood."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """Parsed scenario; ``None`` fields mean "use the configuration"."""

    tool_call: ToolCallSpec | None = None
    error_status: int | None = None
    cut_after: int | None = None
    no_usage: bool = False
    delay: float = 0.0
    token_factor: float | None = None
    context_window: int | None = None


NO_SCENARIO = Scenario()


def parse_scenario(values: list[str]) -> Scenario:
    """Parse every value of the header; an unknown or malformed value raises ScenarioError."""
    if not values:
        return NO_SCENARIO
    fields: dict[str, Any] = {}
    for value in values:
        for part in _split(value):
            _apply(part, fields)
    return Scenario(**fields)


def _split(value: str) -> list[str]:
    """Split on ``;`` but keep a ``;`` that is inside a tool call's JSON arguments."""
    parts: list[str] = []
    for piece in value.split(";"):
        stripped = piece.strip()
        if parts and not stripped.startswith(_KEYWORDS):
            parts[-1] = f"{parts[-1]};{piece}"
        elif stripped:
            parts.append(stripped)
    return parts


def _apply(part: str, fields: dict[str, Any]) -> None:
    kind, _, rest = part.partition(":")
    try:
        if kind in ("tool_loop", "tool"):
            fields["tool_call"] = _tool_call(rest)
        elif kind == "error":
            fields["error_status"] = _status(rest)
        elif kind == "cut_stream":
            fields["cut_after"] = int(_non_negative(int(rest)))
        elif kind == "no_usage" and not rest:
            fields["no_usage"] = True
        elif kind == "slow":
            fields["delay"] = _non_negative(float(rest))
        elif kind == "token_factor":
            fields["token_factor"] = _non_negative(float(rest))
        elif kind == "context_window":
            fields["context_window"] = int(_non_negative(int(rest)))
        else:
            raise ScenarioError(f"unknown scenario {part!r}")
    except ValueError as exc:
        if isinstance(exc, ScenarioError):
            raise
        raise ScenarioError(f"malformed scenario {part!r}: {exc}") from exc


def _tool_call(rest: str) -> ToolCallSpec:
    name, _, raw_args = rest.partition(":")
    if not name:
        raise ScenarioError("a tool scenario needs a tool name")
    arguments = orjson.loads(raw_args) if raw_args.strip() else {}
    if not isinstance(arguments, dict):
        raise ScenarioError("tool arguments must be a JSON object")
    return ToolCallSpec(name=name, arguments=arguments)


def _status(rest: str) -> int:
    status = int(rest)
    if not 400 <= status <= 599:
        raise ScenarioError(f"error status must be 4xx or 5xx, got {status}")
    return status


def _non_negative(number: float) -> float:
    if number < 0:
        raise ScenarioError(f"expected a non-negative number, got {number}")
    return number
