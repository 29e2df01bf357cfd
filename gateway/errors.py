"""Errors the gateway answers itself, rendered in the provider's own error shape.

Hierarchy::

    GatewayError              any answer the gateway makes instead of the upstream's
    ├── InternalError         a bug in the gateway (500)
    ├── BadRequest            malformed JSON, unreadable body, a refused path spelling (400)
    │   ├── BodyTimeout       the body did not arrive within timeouts.client_body (408)
    │   ├── UnsupportedEncoding  a Content-Encoding the gateway cannot read (415)
    │   ├── TwoCredentials    Authorization and x-api-key carry two different keys (400)
    │   ├── SessionTaken      the session id and its qualified form belong to other keys (400)
    │   ├── HostRefused       a ``Host`` not in ``allowed_hosts`` (400)
    │   └── CredentialInQuery a credential in the query string (400)
    ├── Unauthenticated       no valid gateway credential for the auth mode (401)
    ├── Forbidden             the credential does not allow this call (403)
    ├── ClientDisconnected    the client went away before its request was read (499, logged)
    ├── MethodNotAllowed      not POST on an LLM route (405)
    ├── NotFound              a path the gateway does not serve (404)
    ├── BodyTooLarge          over the gateway's body cap (413)
    ├── PolicyRejection       the policy stops the call (400; 429 for a window budget)
    ├── ContextOverflow       over the context window after compaction, or ``prompt`` (400)
    ├── Shed                  the upstream's concurrency limit and queue are full (429)
    ├── StoreUnavailable      the session store is failing and the policy fails closed (503)
    │   └── KeysUnreadable    a gateway key the store could not read yet (503)
    └── UpstreamUnavailable   upstream unreachable (502)
        ├── UpstreamTimeout   no answer within the first-byte timeout (504)
        └── BreakerOpen       the upstream's circuit breaker is open (Anthropic 529, OpenAI 503)
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


class HostRefused(BadRequest):
    code = "gateway_host_refused"

    def __init__(self, host: str) -> None:
        shown = "".join(c for c in host[:100] if c.isprintable())
        super().__init__(
            f"The Host {shown!r} is not one this gateway serves: use its own address, or add the"
            " name to allowed_hosts in the gateway's config."
        )


class CredentialInQuery(BadRequest):
    code = "gateway_credential_in_query"

    def __init__(self) -> None:
        super().__init__(
            "A credential in the query string is refused (a URL is written to logs along the"
            " way): send it in the Authorization or x-api-key header."
        )


class Unauthenticated(GatewayError):
    """No credential the gateway accepts (``reason`` is the metric's outcome: missing,
    invalid, expired, revoked, provider_key, wrong_plane). Agents stop on a 401 and show it,
    so the message says the gateway refused, not the provider, and how to fix it."""

    kind = ErrorKind.AUTHENTICATION
    status = 401
    outcome = "unauthenticated"
    method = "none"
    """How the credential was checked (``key``, ``jwt``, ``passthrough``), or ``none`` when
    the call carried no gateway credential: the auth metric's label."""

    def __init__(self, message: str, reason: str) -> None:
        # x-should-retry: the SDKs obey it, and Claude Code otherwise retries a 401 with
        # backoff for minutes (seen: six tries in 25 s) before it shows anything.
        super().__init__(message, headers={"x-should-retry": "false"})
        self.reason = reason
        self.code = f"gateway_auth_{reason}"


class Forbidden(GatewayError):
    """The credential is good but does not cover this call (a model or scope it lacks)."""

    kind = ErrorKind.PERMISSION
    status = 403
    outcome = "forbidden"
    method = "none"
    """As ``Unauthenticated.method``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, headers={"x-should-retry": "false"})
        self.reason = reason
        self.code = f"gateway_forbidden_{reason}"


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


class BreakerOpen(UpstreamUnavailable):
    """The provider's own overload error, which the SDKs and agents retry after
    ``Retry-After``: the gateway answers for an upstream it knows to be unwell, without
    sending it the call."""

    kind = ErrorKind.OVERLOADED
    code = "upstream_unavailable"
    outcome = "breaker_open"

    def __init__(self, upstream: str, retry_after: float) -> None:
        wait = max(1, round(retry_after))
        super().__init__(
            f"The upstream {upstream} is failing and the gateway's circuit breaker for it is"
            f" open (upstreams.{upstream}.breaker): calls are not sent there for now. Try"
            f" again in {wait}s; it closes once a probe call succeeds.",
            headers={"Retry-After": str(wait), "X-Gateway-Shed": "breaker_open"},
        )


class Shed(GatewayError):
    """Too many calls for the upstream right now: a 429 with ``Retry-After``, which agents
    wait out and retry (Codex reads the seconds from the message)."""

    kind = ErrorKind.RATE_LIMIT
    code = "rate_limit_exceeded"
    outcome = "shed"

    def __init__(self, upstream: str, reason: str, retry_after: float, limit: int) -> None:
        wait = max(1, round(retry_after))
        why = {
            "queue_full": "its queue of waiting calls is full",
            "queue_timeout": "this call waited its longest for a slot",
            "session_share": "this session holds its share of the slots and the queue is full",
        }.get(reason, reason)
        super().__init__(
            f"The gateway is at its concurrency limit for upstream {upstream} ({limit} calls in"
            f" flight) and {why} (upstreams.{upstream}.concurrency). Please try again in"
            f" {wait}s.",
            headers={"Retry-After": str(wait), "X-Gateway-Shed": reason},
        )


class StoreUnavailable(GatewayError):
    """The session store is failing or behind, and the caller's policy says
    ``store_outage: closed``: refused before it goes upstream, as the provider's own
    overload error with ``Retry-After`` (agents retry a 503 later)."""

    kind = ErrorKind.OVERLOADED
    status = 503
    code = "gateway_store_unavailable"
    outcome = "store_unavailable"

    def __init__(self, rule: str, retry_after: float = 5.0) -> None:
        wait = max(1, round(retry_after))
        super().__init__(
            "The gateway's session store is failing, and the policy refuses calls while it"
            f" is (store_outage: closed, set by {rule}). Try again in {wait}s. An operator"
            " lifts this by fixing the store, or with store_outage: open (limits then checked"
            " against what the gateway holds in memory).",
            headers={"Retry-After": str(wait), "X-Gateway-Policy-Rule": rule},
        )


class KeysUnreadable(StoreUnavailable):
    """A gateway key this replica cannot check: its store (Redis) has been away since it
    started, so it has not read the keys. Agents retry a 503 where a 401 would stop them."""

    def __init__(self, prefix: str, shown: str, retry_after: float = 5.0) -> None:
        wait = max(1, round(retry_after))
        GatewayError.__init__(
            self,
            f"{prefix}: the gateway key {shown} cannot be checked now: the gateway's key store"
            f" is unreachable and this gateway has not read its keys yet. Try again in {wait}s."
            " An operator lifts this by bringing the store (Redis) back.",
            headers={"Retry-After": str(wait)},
        )
