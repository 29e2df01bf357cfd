"""Runaway-loop detection: what an agent repeats, read from the history it sends.

Three detectors, each cheap:

- ``identical_tool_calls``: the newest assistant turns made the same tool call(s), name and
  normalized arguments. The history itself holds the evidence, so no state is needed.
- ``repeated_requests``: the same body, byte for byte, after successful answers (a retry storm).
- ``turn_rate``: the session turns far faster than its own norm.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.caps import cap


class Signature:
    """One assistant turn's tool calls: compared as sent, and only when those differ, with
    arguments parsed and keys sorted (so formatting and call order do not matter).

    An agent in a loop resends the same calls byte for byte, so the common comparison costs
    no JSON parsing."""

    __slots__ = ("_normal", "raw")

    def __init__(self, raw: tuple[tuple[str, Any], ...]) -> None:
        self.raw = raw
        self._normal: tuple[str, ...] | None = None

    @property
    def normal(self) -> tuple[str, ...]:
        if self._normal is None:
            self._normal = tuple(sorted(call_signature(name, args) for name, args in self.raw))
        return self._normal

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        return self.raw == other.raw or self.normal == other.normal

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self) -> bool:
        return bool(self.raw)


@dataclass(slots=True, frozen=True)
class Detection:
    detector: str
    count: float
    """Identical tool calls or requests in a row, or the session's turns a minute."""
    threshold: float
    """The setting's threshold; for ``turn_rate``, the rate the session's norm allows."""
    tool: str | None = None
    at_least: bool = False
    """``count`` stopped at ``COUNT_BOUND``: the history holds more than that."""

    def describe(self) -> str:
        times = f"at least {int(self.count)}" if self.at_least else f"{int(self.count)}"
        if self.detector == "identical_tool_calls":
            return f"the same tool call {self.tool} {times} times in a row"
        if self.detector == "repeated_requests":
            return f"the same request {times} times in a row"
        return (
            f"{self.count:.0f} turns a minute, over the {self.threshold:.0f} a minute "
            f"its own norm allows"
        )

    def evidence(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "count": self.count,
            "at_least": self.at_least,
            "threshold": self.threshold,
            "tool": self.tool,
        }


def call_signature(name: Any, arguments: Any) -> str:
    """``name(args)`` with arguments parsed and keys sorted, so formatting does not matter."""
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return f"{name}({arguments})"
    try:
        normalized = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        normalized = repr(arguments)
    return f"{name}({normalized})"


COUNT_BOUND = 100
"""Identical turns counted at most. The history is the client's, so its length bounds
nothing; a message saying "at least 100 times" tells an operator all a larger count would.
Counting costs about 4 µs a turn on a recorded Codex loop (each turn's call and output items
are decoded), so about 0.4 ms at the bound, paid only by calls that are past the threshold."""


def identical_run(
    turns: Iterator[Signature], bound: int = COUNT_BOUND
) -> tuple[int, Signature | None, bool]:
    """How many of the newest turns (newest first) made the same calls, counted up to
    ``bound``, and whether the run goes on past it (the count is then a lower bound).

    ``Signature`` compares the calls as sent first, so a loop's byte-identical resends cost
    no parsing: counting on past a policy's threshold reads items, nothing more."""
    newest = next(turns, None)
    if not newest:
        return 0, None, False
    count = 1
    for turn in turns:
        if turn != newest:
            return count, newest, False
        if count >= bound:
            return count, newest, True
        count += 1
    return count, newest, False


def tool_name(signature: Signature) -> str:
    return cap(", ".join(sorted({name for name, _ in signature.raw})))  # in spans, logs, errors


def rate_detection(
    rate_fast: float, rate_slow: float, turns: int, factor: float, minimum: float
) -> Detection | None:
    """Flag a session turning ``factor`` times faster than its own slow average."""
    if turns < 20 or rate_fast < minimum or rate_slow <= 0:
        return None
    if rate_fast >= factor * rate_slow:
        return Detection("turn_rate", rate_fast, factor * rate_slow)
    return None


def signatures(calls: Iterable[tuple[Any, Any]]) -> Signature:
    return Signature(tuple((str(name), args) for name, args in calls))
