"""Caps on open-valued fields: what a client chooses (model, agent, team, User-Agent, tool and
session names) reaches metric labels, log lines and span attributes at most ``LIMIT``
characters long. One 200 KB model name otherwise grew ``/metrics`` by 17 MB (it is in many
series) and the log by a 230 KB line.

Only what the gateway records is capped: the body and headers go upstream as sent.
"""

from __future__ import annotations

LIMIT = 128
MARKER = "\u2026"
"""Ends a capped value, so a reader knows it was longer."""


def cap(value: str, limit: int = LIMIT) -> str:
    """``value``, or its first ``limit - 1`` characters and the marker."""
    if len(value) <= limit:
        return value
    return value[: limit - 1] + MARKER


def cap_optional(value: str | None, limit: int = LIMIT) -> str | None:
    return None if value is None else cap(value, limit)
