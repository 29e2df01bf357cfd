"""Errors the gateway answers itself, rendered in the provider's own error shape.

Hierarchy::

    GatewayError              any answer the gateway makes instead of the upstream's
    ├── BadRequest            malformed JSON, unreadable body (400)
    ├── BodyTooLarge          over the gateway's body cap (413)
    ├── LimitReached          a hard limit stops the session (400, names the rule)
    └── UpstreamUnavailable   upstream unreachable (502)
        └── UpstreamTimeout   no answer within the first-byte timeout (504)
"""

from __future__ import annotations

from gateway.dialects.base import ErrorKind


class GatewayError(Exception):
    kind = ErrorKind.INTERNAL
    code: str | None = None
    status: int | None = None
    """Overrides the status the provider uses for ``kind``."""
    outcome = "gateway_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(GatewayError):
    kind = ErrorKind.INVALID_REQUEST
    outcome = "bad_request"


class BodyTooLarge(GatewayError):
    kind = ErrorKind.TOO_LARGE
    outcome = "bad_request"


class LimitReached(GatewayError):
    kind = ErrorKind.INVALID_REQUEST
    outcome = "rejected"

    def __init__(self, message: str, *, rule: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.rule = rule
        self.code = rule


class UpstreamUnavailable(GatewayError):
    kind = ErrorKind.UPSTREAM
    outcome = "upstream_unavailable"


class UpstreamTimeout(UpstreamUnavailable):
    status = 504
