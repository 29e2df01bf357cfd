"""The admin API's own write bodies (grant, end, degrade) as strict pydantic models, and the
strict JSON reading behind them: ``parse`` turns raw bytes into a model or a ``BodyRefused``
whose message says what is wrong in one bounded line.

Strict means: one JSON object, UTF-8, no duplicate field (the gateway must act on what the
caller meant, not on whichever of two values a parser keeps), no NaN or Infinity, no unknown
field (a ``role`` or ``admin`` slipped into a body is refused by name, never ignored), and
no type coercion (``"5"`` is not a number of turns).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, NoReturn, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_BODY = 64 * 1024
"""Bytes of an admin write body read at most (a grant or a degrade reason is a line)."""
MAX_GRANT = 2**53
"""Turns or tokens granted at once at most: JSON's exact integers (the audit line too)."""
MAX_REASON = 500
"""Characters of an operator's reason kept; a longer one is cut, as it always was."""
MAX_BY = 120
"""Characters of an operator's name (``by``) kept."""
_SHOWN_FIELDS = 5

WHOLE = "turns and tokens must be whole numbers"
POSITIVE = "grant a positive number of turns and/or tokens"
AT_MOST = f"grant at most {MAX_GRANT} turns or tokens at once"
NOT_JSON = "the body must be JSON (UTF-8, no duplicate fields, no NaN)"
NOT_OBJECT = "the body must be a JSON object"

B = TypeVar("B", bound="AdminBody")


class BodyRefused(ValueError):
    """A body that is refused: ``status`` (400, 413) and a message safe to echo (names a
    caller sent are cleaned and cut)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class AdminBody(BaseModel):
    """An admin write body: unknown fields refused, no coercion, the value never echoed."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,
        use_attribute_docstrings=True,
    )
    messages: ClassVar[dict[str, str]] = {}
    """The message for a field's error: ``field.error_type`` first, then ``field``. Kept
    from before the models, where tests and operators' scripts read them."""


class GrantBody(AdminBody):
    """``POST /gateway/sessions/{session_id}/grant``: more turns and/or tokens for a session."""

    turns: int = Field(0, ge=0, le=MAX_GRANT)
    """Turns added to what the session's limits allow."""
    tokens: int = Field(0, ge=0, le=MAX_GRANT)
    """Tokens added to what the session's limits allow."""
    reason: str = ""
    """Why, for the audit log (the first 500 characters are kept)."""
    by: str | None = None
    """Who grants it, as the caller says (else ``X-Gateway-Operator``, else "admin"); the
    audit log names the credential that was shown beside it."""

    messages: ClassVar[dict[str, str]] = {
        "turns": WHOLE,
        "tokens": WHOLE,
        "turns.greater_than_equal": POSITIVE,
        "tokens.greater_than_equal": POSITIVE,
        "turns.less_than_equal": AT_MOST,
        "tokens.less_than_equal": AT_MOST,
        "reason": "reason must be a string",
        "by": "by must be a string",
    }

    @model_validator(mode="after")
    def _something(self) -> GrantBody:
        if self.turns + self.tokens == 0:
            raise ValueError(POSITIVE)
        return self


class EndBody(AdminBody):
    """``POST /gateway/sessions/{session_id}/end``: the session's next calls are refused."""

    reason: str = ""
    """Why, for the audit log and the refusals the agent reads (first 500 characters)."""
    by: str | None = None
    """Who ends it, as the caller says (else ``X-Gateway-Operator``, else "admin")."""

    messages: ClassVar[dict[str, str]] = {
        "reason": "reason must be a string",
        "by": "by must be a string",
    }


class DegradeBody(AdminBody):
    """``POST /gateway/degrade``: degraded mode by hand on (with a reason) or off."""

    on: bool
    """True enters degraded mode by hand; false leaves it (what the gateway detected stays)."""
    reason: str = ""
    """Why: needed to enter it; shown in health and the audit log (one line, 500 characters)."""

    messages: ClassVar[dict[str, str]] = {
        "on": "on must be true or false",
        "reason": "reason must be a string",
    }


def strict_json(raw: bytes) -> dict[str, Any]:
    """The JSON object ``raw`` holds ({} for an empty body). ``BodyRefused`` for anything
    else: not UTF-8, a lone surrogate, NaN or Infinity, nesting past 1024, a duplicate field
    at any depth, or not an object."""
    if not raw.strip():
        return {}
    try:
        # orjson first: it refuses bad UTF-8, lone surrogates (which no sink could write
        # later), NaN and Infinity, and depth bombs, fast. It keeps the last of two fields,
        # so json (bounded by what orjson let through) looks for duplicates.
        orjson.loads(raw)
        body = json.loads(raw, object_pairs_hook=_unique)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise BodyRefused(NOT_JSON) from None
    if not isinstance(body, dict):
        raise BodyRefused(NOT_OBJECT)
    return body


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("duplicate field")
    return found


def parse(model: type[B], raw: bytes) -> B:
    """``raw`` as a ``model``, or ``BodyRefused`` saying what is wrong."""
    if len(raw) > MAX_BODY:
        too_large(MAX_BODY)
    body = strict_json(raw)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise BodyRefused(problem(exc, model)) from None


def too_large(limit: int) -> NoReturn:
    raise BodyRefused(f"the body is larger than {limit} bytes", 413)


def problem(exc: ValidationError, model: type[AdminBody]) -> str:
    """What is wrong with a body, in a line: unknown fields by name, else the first error
    in the model's own words. What a caller sent is cleaned and cut before it is echoed."""
    errors = exc.errors(include_url=False, include_input=False, include_context=True)
    unknown = [_plain(_where(e["loc"]), 40) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        shown = ", ".join(unknown[:_SHOWN_FIELDS])
        more = ", ..." if len(unknown) > _SHOWN_FIELDS else ""
        return f"unknown field(s): {shown}{more}; it takes {', '.join(model.model_fields)}"
    first = errors[0]
    where = _where(first["loc"])
    if first["type"] == "value_error" and not where:  # a model validator's own words
        return _plain(str(first.get("ctx", {}).get("error", first["msg"])), 300)
    said = model.messages.get(f"{where}.{first['type']}") or model.messages.get(where)
    if said is not None:
        return said
    return f"{_plain(where, 60) or 'the body'}: {_plain(first['msg'], 300)}"


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(map(str, loc))


def _plain(text: str, limit: int) -> str:
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text[:limit])
