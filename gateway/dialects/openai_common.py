"""What Chat Completions and Responses share: the error shape and where sessions hide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.dialects.base import STATUS_OF, Body, ErrorKind, ProviderError, as_dict

_TYPES = {
    ErrorKind.RATE_LIMIT: ("requests", "rate_limit_exceeded"),
    ErrorKind.AUTHENTICATION: ("invalid_request_error", "invalid_api_key"),
    ErrorKind.INTERNAL: ("server_error", None),
    ErrorKind.UPSTREAM: ("server_error", None),
    ErrorKind.OVERLOADED: ("server_error", None),
    ErrorKind.CONTEXT_OVERFLOW: ("invalid_request_error", "context_length_exceeded"),
}


def openai_error(kind: ErrorKind, message: str, code: str | None = None) -> ProviderError:
    type_, default_code = _TYPES.get(kind, ("invalid_request_error", None))
    body = {
        "error": {"message": message, "type": type_, "param": None, "code": code or default_code}
    }
    return ProviderError(STATUS_OF[kind], body)


def session_hints(body: Body, hints: dict[str, str]) -> None:
    for key in ("prompt_cache_key", "user"):
        value = body.get(key)
        if isinstance(value, str) and value:
            hints[key] = value
    session = as_dict(body.get("metadata")).get("session_id")
    if isinstance(session, str) and session:
        hints["metadata.session_id"] = session


SYSTEM_ROLES = ("system", "developer")


def leading_system(items: Sequence[Any]) -> int:
    """How many system and developer messages open the conversation."""
    count = 0
    while count < len(items) and as_dict(items[count]).get("role") in SYSTEM_ROLES:
        count += 1
    return count
