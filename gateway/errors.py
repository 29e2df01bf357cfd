"""Errors the gateway answers itself, rendered in the provider's own error shape.

Hierarchy::

    GatewayError              any answer the gateway makes instead of the upstream's
    ├── InternalError         a bug in the gateway (500)
    ├── BadRequest            malformed JSON, unreadable body, a refused path spelling (400)
    │   ├── BodyTimeout       the body did not arrive within timeouts.client_body (408)
    │   ├── UnsupportedEncoding  a Content-Encoding the gateway cannot read (415)
    │   ├── TwoCredentials    Authorization and x-api-key carry two different keys (400)
    │   └── SessionTaken      the session id and its qualified form belong to other keys (400)
    ├── ClientDisconnected    the client went away before its request was read (499, logged)
    ├── MethodNotAllowed      not POST on an LLM route (405)
    ├── NotFound              a path the gateway does not serve (404)
    ├── BodyTooLarge          over the gateway's body cap (413)
    ├── PolicyRejection       the policy stops the call (400; 429 for a window budget)
    ├── ContextOverflow       over the context window after compaction, or ``prompt`` (400)
    └── UpstreamUnavailable   upstream unreachable (502)
        └── UpstreamTimeout   no answer within the first-byte timeout (504)
"""

from __future__ import annotations

from gateway.dialects.base import ErrorKind


class GatewayError(Exception):
    kind = ErrorKind.INTERNAL
    code: str | None = None
    status: int | None = None
    in_stream = False
    """Answered as an event stream to a streamed request, where the API has such a form."""
    """Overrides the status the provider uses for ``kind``."""
    outcome = "gateway_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InternalError(GatewayError):
    outcome = "gateway_error"


class BadRequest(GatewayError):
    kind = ErrorKind.INVALID_REQUEST
    outcome = "bad_request"


class BodyTimeout(BadRequest):
    """Agents retry a 408 (a slow upload may pass next time); the connection is closed."""

    status = 408
    code = "request_timeout"


class UnsupportedEncoding(BadRequest):
    status = 415
    code = "unsupported_content_encoding"


class TwoCredentials(BadRequest):
    def __init__(self) -> None:
        super().__init__(
            "The request carries two different credentials (Authorization and x-api-key); "
            "send one of them."
        )


class SessionTaken(BadRequest):
    """The id and its qualified form both belong to other keys (a key-hash collision)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"Session {session_id} belongs to another API key; send another session id."
        )


class ClientDisconnected(GatewayError):
    """Nobody is left to answer: recorded as 499 (nginx's "client closed request"), not as a
    gateway failure."""

    status = 499
    outcome = "client_gone"


class MethodNotAllowed(GatewayError):
    kind = ErrorKind.INVALID_REQUEST
    status = 405
    code = "method_not_allowed"
    outcome = "bad_request"


class NotFound(GatewayError):
    kind = ErrorKind.NOT_FOUND
    outcome = "bad_request"


class BodyTooLarge(GatewayError):
    kind = ErrorKind.TOO_LARGE
    outcome = "bad_request"


class PolicyRejection(GatewayError):
    """A hard stop answers 400, which agents show and stop on (they retry a 429 for minutes);
    a window budget that will reset answers 429 with ``Retry-After``."""

    kind = ErrorKind.INVALID_REQUEST
    outcome = "rejected"

    def __init__(
        self, message: str, *, limit: str, rule: str, retry_after: float | None = None
    ) -> None:
        headers = {"X-Gateway-Policy-Rule": rule, "X-Gateway-Policy-Limit": limit}
        self.code = f"gateway_policy_{limit}"
        if retry_after is not None:
            self.kind = ErrorKind.RATE_LIMIT
            headers["Retry-After"] = str(max(1, round(retry_after)))
            # Codex waits and retries only on this code (with "try again in Ns" in the text).
            self.code = "rate_limit_exceeded"
        super().__init__(message, headers=headers)
        self.limit = limit
        self.rule = rule


class ContextOverflow(GatewayError):
    """The prompt is over the window the policy allows: the provider's own overflow error, which
    agents answer by compacting (or their human decides). Codex reads it only from a stream."""

    kind = ErrorKind.CONTEXT_OVERFLOW
    code = "context_length_exceeded"
    outcome = "rejected"
    in_stream = True

    def __init__(self, message: str, *, rule: str) -> None:
        headers = {"X-Gateway-Policy-Rule": rule, "X-Gateway-Policy-Limit": "context_window"}
        super().__init__(message, headers=headers)
        self.rule = rule


class UpstreamUnavailable(GatewayError):
    kind = ErrorKind.UPSTREAM
    outcome = "upstream_unavailable"


class UpstreamTimeout(UpstreamUnavailable):
    status = 504
    outcome = "upstream_timeout"
